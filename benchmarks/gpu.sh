#!/usr/bin/env bash
# One prepared check for a GPU machine (not run on the CPU-only development machine):
#  1. speed (benchmarks/speed.py, JSON lines): training images/s at the `paper` preset (256 px,
#     batch 8, bf16-mixed), inference images/s at batch 64 (bf16 autocast, then fp32), with
#     achieved FLOP/s and the machine's matmul limit (fp32 without TF32, and bf16) for scale;
#  2. training throughput of `grdnet train` (benchmarks/gpu_scale.py, Markdown table rows for
#     docs/PERFORMANCE.md): `paper` at 256 px, bf16-mixed and fp32, images/s and peak GPU memory.
# Extra arguments go to speed.py; with --quick the throughput part is shorter too.
#   bash benchmarks/gpu.sh | tee gpu.txt
#   python benchmarks/speed.py --table gpu.txt     # part 1 as tables (non-JSON lines are skipped)
# GPU_WORK=DIR keeps part 2's generated dataset and runs (default: a new temporary folder).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 \
    || { echo "gpu.sh: no NVIDIA GPU visible (nvidia-smi failed)" >&2; exit 1; }
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: this torch has no CUDA')"

# 1. speed
python benchmarks/speed.py --device cuda --precision bf16-mixed --only matmul,train,inference \
    --presets paper --train-batch 8 --infer-batch 64 --no-onnx "$@"
# The same inference without autocast (fp32 weights and activations):
python benchmarks/speed.py --device cuda --only inference --presets paper --infer-batch 64 --no-onnx "$@" \
    | grep '"kind": "inference"'

# 2. training throughput through grdnet.train
WORK="${GPU_WORK:-$(mktemp -d -t grdnet-gpu-XXXX)}"
scale=(--n-train 1024 --epochs 2 --warmup 20)
[[ " $* " == *" --quick "* ]] && scale=(--n-train 256 --epochs 1 --warmup 5)
echo
echo "| date | hardware | preset | px | precision | processes | batch/process | train images/s | peak GPU memory |"
echo "|---|---|---|---|---|---|---|---|---|"
for precision in bf16-mixed 32-true; do
    python benchmarks/gpu_scale.py --preset paper --image-size 256 --precision "$precision" \
        --accelerator gpu --devices 1 "${scale[@]}" --workdir "$WORK" | tail -n 1
done
echo "(work folder: $WORK)" >&2
