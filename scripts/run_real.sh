#!/usr/bin/env bash
# The real-data comparison behind docs/RESULTS.md. Long on CPU: run it in the background and keep working.
#   nohup bash scripts/run_real.sh > runs/real_smollm2.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
manyicl compare configs/real_smollm2.yaml "$@"
echo "wall time: $(( $(date +%s) - start )) s"
