"""Is part of the pooled pixel AUROC an image-level offset? Score the test split as `grdnet test`
does (every view the model's config asks for), then again with each image's anomaly map shifted
by its own median, so that only how a pixel stands against the rest of its image is ranked.

    python benchmarks/map_offset.py MODEL ../shared/data/magnetic_tile

Prints image AUROC (unchanged: the score is not shifted), pixel AUROC, AUPRO and the per-type
pixel AUROC for `model` (the map as it is) and `minus median`.
"""
from __future__ import annotations

import json
import sys

import numpy as np

import grdnet
from grdnet.evaluation import run_test


def main():
    model, data = sys.argv[1], sys.argv[2]
    for name in ("model", "minus median"):
        predictor = grdnet.load(model)
        if name == "minus median":
            predict = predictor.predict

            def shifted(*args, **kwargs):
                out = predict(*args, **kwargs)
                for r in out:  # (m - median + 1) / 2 keeps the map in [0, 1], where the metrics bin it
                    r.anomaly_map = ((r.anomaly_map - np.median(r.anomaly_map) + 1) / 2).astype(r.anomaly_map.dtype)
                return out

            predictor.predict = shifted
        r = run_test(predictor, data)
        print(json.dumps({"map": name, "image_auroc": round(r["image_auroc"], 3),
                          "pixel_auroc": round(r["pixel_auroc"], 3), "aupro": round(r["metrics"]["aupro"], 3),
                          "per_type_pixel_auroc": {k: round(v["pixel_auroc"], 3) for k, v in r["per_type"].items()}}),
              flush=True)


if __name__ == "__main__":
    main()
