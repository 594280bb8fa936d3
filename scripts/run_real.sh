#!/usr/bin/env bash
# The real-data comparison behind docs/RESULTS.md. Long on CPU: run it in the background and keep working.
#   nohup bash scripts/run_real.sh > runs/real_smollm2.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
manyicl compare configs/real_smollm2.yaml "$@"
echo "wall time: $(( $(date +%s) - start )) s"
# what docs/RESULTS.md shows: the generated report, its plots and every record
mkdir -p docs/results
run=runs/real_smollm2
cp "$run/results.json" docs/results/real_smollm2_results.json
cp "$run"/plots/*.png docs/results/
sed 's#(plots/#(#g; s#\[results.json\](results.json)#[real_smollm2_results.json](real_smollm2_results.json)#' \
    "$run/report.md" > docs/results/real_smollm2_report.md
