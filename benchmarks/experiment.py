"""One tuning experiment: train a preset with overrides, evaluate on a separate set, print a JSON line.

    python benchmarks/experiment.py NAME TRAIN_DATA EVAL_DATA PRESET '{"image_size": 64}' '{"epochs": 35}'

The evaluation set must not be the test split the result will be reported on (see docs/EXPERIMENTS.md).
"""
import json
import sys
import time

import grdnet
from grdnet.evaluation import run_test

name, data, val, preset = sys.argv[1:5]
model, train = json.loads(sys.argv[5]), json.loads(sys.argv[6])
out = sys.argv[7] if len(sys.argv) > 7 else f"/tmp/grdnet-experiments/{name}"
t0 = time.time()
folder = grdnet.train(data, out, preset=preset, model=model, train=train, progress=False)
minutes = (time.time() - t0) / 60
cfg = json.loads((folder / "config.json").read_text())["training"]
r = run_test(grdnet.load(folder), val)
print(json.dumps({"name": name, "minutes": round(minutes, 2), "epochs": cfg["epochs"], "steps": cfg["steps"],
                  "image_auroc": round(r["image_auroc"], 4), "pixel_auroc": round(r["pixel_auroc"], 4),
                  "aupro": r["metrics"]["aupro"] and round(r["metrics"]["aupro"], 4),
                  "per_type_image_auroc": {k: round(v["image_auroc"], 3) for k, v in r["per_type"].items()},
                  "model": model, "train": train}), flush=True)
