#!/usr/bin/env bash
# The test command of the README and of CI: set up, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m ruff check .  # pyflakes, pycodestyle at 120 columns, isort (pyproject.toml)
python -m pytest -q -p no:cacheprovider "$@"
