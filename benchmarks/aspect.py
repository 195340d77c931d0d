"""Inference speed of the three `ModelConfig.aspect` modes on a folder of real images, one
trained model, figures as JSON lines:

    python benchmarks/aspect.py MODEL IMAGE_FOLDER [--limit 128] [--batch-size 16]

Each mode is the same weights with `aspect` replaced; images are decoded once, before timing.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import grdnet
from grdnet.data import list_images, open_image, pil_to_array


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("images")
    ap.add_argument("--limit", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    a = ap.parse_args()
    p = grdnet.load(a.model)
    paths = list_images(a.images)[:a.limit]
    arrays = [pil_to_array(open_image(f), p.cfg.channels) for f in paths]
    square = sum(x.shape[0] == x.shape[1] for x in arrays)
    for mode in ("squeeze", "keep", "both"):
        p.cfg = dataclasses.replace(p.cfg, aspect=mode)
        p.predict(arrays[:2])  # warm-up
        t0 = time.perf_counter()
        p.predict(arrays, batch_size=a.batch_size)
        dt = time.perf_counter() - t0
        print(json.dumps({"aspect": mode, "images": len(arrays), "square": square,
                          "images_per_s": round(len(arrays) / dt, 1), "ms_per_image": round(1000 * dt / len(arrays), 1)}),
              flush=True)


if __name__ == "__main__":
    main()
