#!/usr/bin/env bash
# The GPU checks (tests/test_gpu.py, `pytest -m gpu`) on a device machine, with the packages it has (torch,
# transformers, peft, accelerate): bf16 CUDA training steps against fp32, the shared-prefix evaluation against the
# naive path on CUDA, and a throughput line on a random-init ~1B Llama. Under 10 minutes on one GPU; output for
# docs/BENCHMARKS.md. Nothing here is needed in CI.
#   bash scripts/gpu_check.sh
# On this workplace's H200 image (python3 3.12, torch 2.11, transformers 5.17) pydantic, rouge_score and nltk are
# missing: carry them as wheels (the device tool's README). Each step is timed out and prints as it goes, so a hang
# (2026-12-04: 420 s without output after nvidia-smi, cause not established) shows where it is.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
python=$(command -v python || command -v python3)  # the device image has python3 alone
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
echo "$(date -u +%T) import torch ($python)"
timeout 60 "$python" -c "import torch; print(torch.__version__)" || { echo "import torch: failed or hung" >&2; exit 2; }
echo "$(date -u +%T) CUDA"
timeout 120 "$python" - <<'PY' || { echo "the CUDA probe failed or hung (120 s)" >&2; exit 2; }
import importlib, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device: "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
needed = ["transformers", "peft", "accelerate", "pydantic", "yaml", "click", "tqdm", "numpy", "scipy", "sklearn",
          "rouge_score", "tokenizers", "pytest"]
missing = [m for m in needed if importlib.util.find_spec(m) is None]
print("missing packages:", ", ".join(missing) if missing else "none")
PY
if ! "$python" -c "import pytest" 2>/dev/null; then
    echo "pytest is not installed here: install it (pip install pytest) or run the checks on a machine that has it" >&2
    exit 2
fi
echo "$(date -u +%T) pytest -m gpu"
timeout 480 "$python" -m pytest -m gpu -q -s -p no:cacheprovider tests/test_gpu.py
