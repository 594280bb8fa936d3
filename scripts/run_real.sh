#!/usr/bin/env bash
# The real-data comparison behind docs/RESULTS.md (configs/real_smollm2.yaml). Many hours on 2 CPU cores, so it
# runs in the background and in stages; every stage is resumable (finished fine-tunes, checkpoints and evaluation
# cells are reused), so an interrupted stage is simply started again:
#   nohup bash scripts/run_real.sh screen > runs/forgetting_screen.log 2>&1 &  # 0: the untuned model on candidate
#                                                                            #    forgetting tasks
#   nohup bash scripts/run_real.sh train > runs/real_smollm2_train.log 2>&1 &  # 1: every fine-tune
#   nohup bash scripts/run_real.sh > runs/real_smollm2.log 2>&1 &              # 2: evaluation, report
# Each stage prints its wall time and copies what docs/RESULTS.md cites into docs/results/.
# Extra arguments go to `manyicl compare`, after the stage (`bash scripts/run_real.sh eval --only base`) or alone
# for the evaluation stage (`bash scripts/run_real.sh --only base`).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
run=runs/real_smollm2
mkdir -p docs/results
stage="${1:-eval}"
if [[ "$stage" == -* ]]; then stage=eval; else [[ $# -gt 0 ]] && shift; fi
case "$stage" in
screen)
    manyicl eval configs/forgetting_screen.yaml "$@"
    echo "wall time (screen stage): $(( $(date +%s) - start )) s"
    cp runs/forgetting_screen/results.json docs/results/forgetting_screen_results.json
    ;;
train)
    manyicl compare configs/real_smollm2.yaml --train-only "$@"
    echo "wall time (train stage): $(( $(date +%s) - start )) s"
    # the training records: steps, loss curves, supervised answers per task, seconds
    (cd "$run/train" && find . -name train_log.jsonl -o -name mixture.json -o -name train_summary.json) |
        while read -r f; do mkdir -p "docs/results/real_smollm2_train/$(dirname "$f")"
                            cp "$run/train/$f" "docs/results/real_smollm2_train/$f"; done
    ;;
eval)
    manyicl compare configs/real_smollm2.yaml "$@"
    echo "wall time (evaluation stage): $(( $(date +%s) - start )) s"
    # what docs/RESULTS.md shows: the generated report, its plots and every record
    cp "$run/results.json" docs/results/real_smollm2_results.json
    if [[ -f "$run/curves.json" ]]; then cp "$run/curves.json" docs/results/real_smollm2_curves.json; fi
    cp "$run"/plots/*.png docs/results/
    sed 's#(plots/#(#g; s#\[results.json\](results.json)#[real_smollm2_results.json](real_smollm2_results.json)#' \
        "$run/report.md" > docs/results/real_smollm2_report.md
    ;;
*)
    echo "scripts/run_real.sh: unknown stage '$stage'; use screen, train, eval or nothing (evaluation)" >&2
    exit 2
    ;;
esac
