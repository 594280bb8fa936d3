#!/usr/bin/env bash
# The measurement behind evaluation.scoring's default and the label hint (docs/EVALUATION.md).
# Both formats evaluate the same queries with the same demonstrations; every query keeps all four scorings.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
manyicl eval configs/scoring_study.yaml
manyicl eval configs/scoring_study.yaml --set format.template.label_hint=false --set output_dir=runs/scoring_study/no_hint
python scripts/scoring_study.py runs/scoring_study/label_hint runs/scoring_study/no_hint | tee runs/scoring_study/table.md
echo "wall time: $(( $(date +%s) - start )) s"
