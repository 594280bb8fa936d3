#!/usr/bin/env bash
# The test command of the README and of CI: set up, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the page test drives Debian's chromium (playwright's own browser download cannot be reached here); without a
# browser it skips and says why
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
    (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 || echo "chromium could not be installed"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m ruff check .  # pyflakes, pycodestyle at 120 columns, isort (pyproject.toml)
python -m pytest -q -p no:cacheprovider "$@"
