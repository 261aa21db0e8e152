#!/usr/bin/env bash
# Where a GPU is lent (the `device` tool): the attribution benchmark on a ~1.2B random OLMo-3 config in bf16,
# batch 8 x 512 tokens, printing the same table as on the CPU (< 5 minutes on an H200). Needs only torch (CUDA),
# transformers, tokenizers, safetensors and lightning, which a stock PyTorch GPU image has; nothing is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
PYTHONUNBUFFERED=1 python3 benchmarks/attribution_speed.py --models olmo3-1b --device cuda --dtype bfloat16 \
  --batch 8 --seq 512 --repeats 5 --fidelity-examples 6 "$@"
