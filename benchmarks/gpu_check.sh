#!/usr/bin/env bash
# Where a GPU is lent (the `device` tool): benchmarks/gpu_check.py -- random-init OLMo-3 ~1B and 7B configs in bf16,
# batch 8 x 512: an AdamW training step, `sketch` (normalize none / per_tensor), `rapidin`; examples/s, ratio to the
# training step, peak GPU memory, fidelity against exact cosines; one table and a SUMMARY line (<= 8 minutes on one
# H200). Needs only torch (CUDA) and transformers; nothing is installed or downloaded. Arguments go to the script:
#   bash benchmarks/gpu_check.sh --device cpu --configs tiny --batch 2 --seq 32    # the same code on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true; fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
