#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): CUDA-marked tests, a 7B-shaped QLoRA run at 2048 tokens with
# peak GPU memory, and tokens/s against the reference recipe, on one CUDA GPU with no network.
# Usage: bench/gpu_check.sh [--steps 20] [--seq-len 2048] [--skip-reference] ...   (after `make setup`)
# Stops after GPU_CHECK_TIMEOUT_S (default 480 s, the 8-minute budget) whatever is left.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
exec timeout --kill-after=10 "${GPU_CHECK_TIMEOUT_S:-480}" "$PY" bench/gpu_check.py "$@"
