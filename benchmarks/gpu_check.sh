#!/usr/bin/env bash
# Where a GPU is lent (the `device` tool): benchmarks/gpu_check.py -- (1) the engine table: random-init OLMo-3 ~1B
# and 7B configs in bf16, batch 8 x 512: an AdamW training step, `sketch` (normalize none / per_tensor; fused and
# unfused fold), `rapidin`; examples/s, ratio to the training step, peak GPU memory, fidelity against exact
# cosines; (2) a scaled end-to-end train.py run on a 7B-shaped random-init model (benchmarks/gpu_e2e.py): each
# stage's time and the paper experiment's forecast. Last lines: one table and a SUMMARY line (budget: 8 minutes
# on one H200). Part 1 needs only torch (CUDA) and transformers; part 2 installs train.py's missing packages
# from wheels in .whl/ (docs/benchmarks.md) or names them and is skipped. Arguments go to the script:
#   bash benchmarks/gpu_check.sh --device cpu --configs tiny --batch 2 --seq 32    # the same code on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true; fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
