"""Quality against training length: train once, snapshot the model every few minutes (`--every`)
or every N steps (`--every-steps`), then evaluate every snapshot on the test split (snapshots
are evaluated after training, so evaluation time does not eat the training budget).

    python benchmarks/learning_curve.py ../shared/data/magnetic_tile --out /tmp/curve \
        --preset cpu --max-minutes 20 --every 5
    python benchmarks/learning_curve.py DATA --out /tmp/curve --steps 8000 --every-steps 2000 --max-minutes 0

Prints one JSON line per snapshot: minutes, steps, image/pixel AUROC, AUPRO.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import WeightAveraging

import grdnet
from grdnet.evaluation import run_test
from grdnet.modelfile import save_model


class Snapshots(L.Callback):
    """Saves the model every `every_minutes` of training, or every `every_steps` training steps
    (batches: with the GAN, each batch makes two optimiser steps)."""

    def __init__(self, out: Path, every_minutes: float | None = None, every_steps: int | None = None):
        self.out, self.t0, self.saved = out, None, []
        self.every_steps, self.every = every_steps, (every_minutes or 0) * 60
        self.next = every_steps if every_steps else self.every

    def on_train_batch_end(self, trainer, module, *args):
        self.t0 = self.t0 or time.time()
        steps, elapsed = module.batches_trained, time.time() - self.t0
        if (steps if self.every_steps else elapsed) >= self.next:
            self.next += self.every_steps or self.every
            name = f"step{steps:06d}" if self.every_steps else f"{elapsed / 60:05.1f}min"
            folder = self.out / f"snap-{name}"
            # with `ema_decay`, snapshot the weight average: that is what a run stopped here would save
            averaging = [c for c in trainer.callbacks if isinstance(c, WeightAveraging)]
            net = averaging[0]._average_model.module if averaging else module
            save_model(folder, net.net, module.model_cfg,
                       {"threshold": None, "training": {"minutes": elapsed / 60, "steps": steps,
                                                   "train_config": {"train_crops": module.train_cfg.train_crops}}})
            self.saved.append((elapsed / 60, steps, folder))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--max-minutes", type=float, default=20, help="0: no time cap")
    ap.add_argument("--every", type=float, default=5, help="snapshot every M minutes")
    ap.add_argument("--every-steps", type=int, metavar="N", help="snapshot every N steps instead")
    ap.add_argument("--steps", type=int, metavar="N", help="train N steps (default: the preset's length)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", help="JSON config file overriding the preset")
    a = ap.parse_args()
    out = Path(a.out)
    snaps = Snapshots(out / "snapshots", a.every, a.every_steps)
    model = grdnet.train(a.data, out / "run", preset=a.preset, steps=a.steps, max_minutes=a.max_minutes or None,
                         config_file=a.config, train={"seed": a.seed}, progress=False, callbacks=[snaps])
    cfg = json.loads((model / "config.json").read_text())["training"]
    points = [p for p in snaps.saved if p[1] < cfg["steps"]] + [(cfg["minutes"], cfg["steps"], model)]
    for minutes, steps, folder in points:
        r = run_test(grdnet.load(folder), a.data)
        print(json.dumps({"minutes": round(minutes, 1), "steps": steps, "image_auroc": r["image_auroc"],
                          "pixel_auroc": r["pixel_auroc"], "aupro": r["metrics"]["aupro"],
                          "per_type_image_auroc": {k: v["image_auroc"] for k, v in r["per_type"].items()},
                          "model": str(folder)}), flush=True)


if __name__ == "__main__":
    main()
