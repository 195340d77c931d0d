"""One trained model, two views of each test image, without retraining: the image squeezed into
the model square (as the `cpu` preset trains) and the image with its aspect ratio kept (shorter
side = model size, long side rounded to a multiple of 16) run whole through the fully
convolutional networks; image/pixel AUROC and AUPRO of each view alone and fused (mean, max).

    python benchmarks/aspect_views.py MODEL ../shared/data/magnetic_tile [--short-scale 0.75]

The package's `ModelConfig.aspect` "both" scores the aspect-kept view as overlapping tiles
instead (the ONNX graph has a fixed input size); this script was how it was found
(docs/EXPERIMENTS.md run 55).
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from grdnet.data import image_size_of, load_image, load_mask, resize_to, short_side_size, test_samples
from grdnet.metrics import evaluate
from grdnet.modelfile import load_model
from grdnet.scoring import image_scores, resize_map


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("--short-scale", type=float, default=1.0, help="shorter side of the aspect view / model size")
    a = ap.parse_args()
    net, cfg, _ = load_model(a.model)
    net.eval()
    s = cfg.image_size
    rows = []
    for t in test_samples(a.data):
        img = load_image(t.path, cfg.channels, None)
        w, h = image_size_of(t.path)
        ah, aw = (16 * round(v / 16) for v in short_side_size(tuple(img.shape[1:]), round(s * a.short_scale)))
        with torch.inference_mode():
            squeezed = net.view_map(resize_to(img, (s, s))[None])
            aspect = net.view_map(resize_to(img, (ah, aw))[None])
        mask = load_mask(t.mask_path, (w, h)) if t.mask_path else np.zeros((h, w), bool)
        rows.append((t, float(image_scores(squeezed, cfg)[0]), float(image_scores(aspect, cfg)[0]),
                     resize_map(squeezed[0], (h, w)), resize_map(aspect[0], (h, w)), mask))

    views = {"squeezed": lambda ss, sa, ms, ma: (ss, ms),
             "aspect": lambda ss, sa, ms, ma: (sa, ma),
             "mean": lambda ss, sa, ms, ma: ((ss + sa) / 2, (ms + ma) / 2),
             "max": lambda ss, sa, ms, ma: (max(ss, sa), np.maximum(ms, ma))}
    for name, fuse in views.items():
        def records():
            for t, ss, sa, ms, ma, mask in rows:
                score, m = fuse(ss, sa, ms, ma)
                yield {"score": score, "label": t.label, "defect_type": t.defect_type, "map": m, "mask": mask}

        r = evaluate(records())
        o = r["overall"]
        print(json.dumps({"view": name, "image_auroc": round(o["image_auroc"], 3),
                          "pixel_auroc": round(o["pixel_auroc"], 3), "aupro": round(o["aupro"], 3),
                          "per_type_image_pixel": {k: [round(v["image_auroc"], 2), round(v["pixel_auroc"], 2)]
                                                   for k, v in r["per_type"].items()}}), flush=True)


if __name__ == "__main__":
    main()
