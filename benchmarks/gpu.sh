#!/usr/bin/env bash
# One prepared speed check for a GPU machine (not run on the CPU-only development machine):
#   training images/s at the `paper` preset (256 px, batch 8, bf16-mixed),
#   inference images/s at batch 64 (fp32 and bf16 autocast), with achieved FLOP/s and the
#   machine's matmul limit (fp32 without TF32, and bf16) for scale.
# Prints JSON lines (see benchmarks/speed.py); extra arguments go to speed.py, e.g. --quick.
#   bash benchmarks/gpu.sh | tee gpu-speed.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 \
    || { echo "gpu.sh: no NVIDIA GPU visible (nvidia-smi failed)" >&2; exit 1; }
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: this torch has no CUDA')"
python benchmarks/speed.py --device cuda --precision bf16-mixed --only matmul,train,inference \
    --presets paper --train-batch 8 --infer-batch 64 --no-onnx "$@"
# The same inference without autocast (fp32 weights and activations):
python benchmarks/speed.py --device cuda --only inference --presets paper --infer-batch 64 --no-onnx "$@" \
    | grep '"kind": "inference"'
