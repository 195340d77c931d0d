"""Training throughput and peak accelerator memory of `grdnet train`, as one Markdown table row.

Trains through the public API (`grdnet.train`) on a generated surface dataset and times the steady
state: training images per second over all ranks after `--warmup` batches, and the peak memory
torch allocated on this process's GPU. Threshold calibration and model writing are not timed.

    python benchmarks/gpu_scale.py --preset paper --image-size 256 --precision bf16-mixed
    python benchmarks/gpu_scale.py --preset tiny --image-size 32 --accelerator cpu --n-train 64  # smoke test
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

import grdnet
from grdnet.demo_data import make_surface_dataset


class Throughput(L.Callback):
    """Images per second between the end of warm-up and the end of training, over all ranks."""

    def __init__(self, warmup: int):
        self.warmup, self.batches, self.images, self.t0, self.seconds = warmup, 0, 0, None, None

    @staticmethod
    def _sync(pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.batches == self.warmup:
            self._sync(pl_module)
            self.t0 = time.perf_counter()
            if pl_module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1
        if self.t0 is not None:
            self.images += batch.shape[0] * trainer.world_size

    def on_train_end(self, trainer, pl_module):
        self._sync(pl_module)
        if self.t0 is not None:
            self.seconds = time.perf_counter() - self.t0
        self.device = pl_module.device
        self.rank_zero = trainer.is_global_zero


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--precision", default="bf16-mixed")
    ap.add_argument("--accelerator", default="gpu")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=None, help="per process (default: the preset's)")
    ap.add_argument("--n-train", type=int, default=1024, help="generated training images")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=20, help="batches left out of the timing")
    ap.add_argument("--workdir", help="dataset and run folder (default: a temporary folder)")
    a = ap.parse_args(argv)

    work = Path(a.workdir or tempfile.mkdtemp(prefix="grdnet-bench-"))
    data = work / f"data-{a.image_size}"
    if not (data / "train" / "good").is_dir():
        make_surface_dataset(data, n_train=a.n_train, n_test_good=4, n_test_defect=4, size=a.image_size, seed=0)
    meter = Throughput(a.warmup)
    train = {"checkpoint_every_minutes": 0.0}
    if a.batch_size:
        train["batch_size"] = a.batch_size
    grdnet.train(data, work / f"run-{a.precision}", a.preset, epochs=a.epochs, image_size=a.image_size, train=train,
                 accelerator=a.accelerator, devices=a.devices, precision=a.precision, progress=False,
                 callbacks=[meter])
    if not getattr(meter, "rank_zero", False):
        return 0
    if meter.seconds is None:
        print(f"error: fewer than {a.warmup} batches ran; raise --n-train or --epochs", file=sys.stderr)
        return 1
    peak = (f"{torch.cuda.max_memory_allocated(meter.device) / 2**30:.2f} GiB" if meter.device.type == "cuda"
            else "n/a (CPU)")
    batch = a.batch_size or grdnet.build_config(a.preset)[1].batch_size
    print("| date | hardware | preset | px | precision | processes | batch/process | train images/s | peak GPU memory |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {dt.date.today()} | {hardware(meter.device)} | {a.preset} | {a.image_size} | {a.precision} | "
          f"{a.devices} | {batch} | {meter.images / meter.seconds:.1f} | {peak} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
