"""Quality against CPU minutes: train once, snapshot the model every few minutes, then evaluate
every snapshot on the test split (snapshots are evaluated after training, so evaluation time
does not eat the training budget).

    python benchmarks/learning_curve.py ../shared/data/magnetic_tile --out /tmp/curve \
        --preset cpu --max-minutes 20 --every 5

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
    def __init__(self, out: Path, every_minutes: float):
        self.out, self.every, self.t0, self.next = out, every_minutes * 60, None, every_minutes * 60
        self.saved = []

    def on_train_batch_end(self, trainer, module, *args):
        self.t0 = self.t0 or time.time()
        elapsed = time.time() - self.t0
        if elapsed >= self.next:
            self.next += self.every
            folder = self.out / f"snap-{elapsed / 60:05.1f}min"
            # with `ema_decay`, snapshot the weight average: that is what a run stopped here would save
            averaging = [c for c in trainer.callbacks if isinstance(c, WeightAveraging)]
            net = averaging[0]._average_model.module if averaging else module
            save_model(folder, net.net, module.model_cfg,
                       {"threshold": None, "training": {"minutes": elapsed / 60, "steps": trainer.global_step,
                                                   "train_config": {"train_crops": module.train_cfg.train_crops}}})
            self.saved.append((elapsed / 60, trainer.global_step, folder))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--max-minutes", type=float, default=20)
    ap.add_argument("--every", type=float, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", help="JSON config file overriding the preset")
    a = ap.parse_args()
    out = Path(a.out)
    snaps = Snapshots(out / "snapshots", a.every)
    model = grdnet.train(a.data, out / "run", preset=a.preset, max_minutes=a.max_minutes, config_file=a.config,
                         train={"seed": a.seed}, progress=False, callbacks=[snaps])
    cfg = json.loads((model / "config.json").read_text())["training"]
    points = snaps.saved + [(cfg["minutes"], cfg["steps"], model)]
    for minutes, steps, folder in points:
        r = run_test(grdnet.load(folder), a.data)
        print(json.dumps({"minutes": round(minutes, 1), "steps": steps, "image_auroc": r["image_auroc"],
                          "pixel_auroc": r["pixel_auroc"], "aupro": r["metrics"]["aupro"],
                          "per_type_image_auroc": {k: v["image_auroc"] for k, v in r["per_type"].items()},
                          "model": str(folder)}), flush=True)


if __name__ == "__main__":
    main()
