#!/usr/bin/env bash
# GPU training throughput of the `paper` preset at 256 px on one GPU: bf16-mixed, with fp32 for
# comparison. Prints Markdown table rows (date, hardware, images/s, peak GPU memory) to paste into
# docs/PERFORMANCE.md. Needs a CUDA GPU; a few minutes on a current data-centre GPU.
#
#   bash benchmarks/gpu_scale.sh [workdir]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-$(mktemp -d -t grdnet-gpu-scale-XXXX)}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: no CUDA GPU visible')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

echo "| date | hardware | preset | px | precision | processes | batch/process | train images/s | peak GPU memory |"
echo "|---|---|---|---|---|---|---|---|---|"
for precision in bf16-mixed 32-true; do
    python3 benchmarks/gpu_scale.py --preset paper --image-size 256 --precision "$precision" \
        --accelerator gpu --devices 1 --n-train 1024 --epochs 2 --warmup 20 --workdir "$WORK" | tail -n 1
done
echo "(work folder: $WORK)"
