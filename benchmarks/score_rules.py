"""Image AUROC of several image-score rules on one trained model's maps (no retraining).

    python benchmarks/score_rules.py MODEL ../shared/data/magnetic_tile

Maps are computed once at the model's resolution; each rule then turns them into image scores.
"""
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

import grdnet
from grdnet.data import load_image, test_samples
from grdnet.metrics import image_metrics
from grdnet.scoring import image_scores


def main():
    model, data = sys.argv[1], Path(sys.argv[2])
    p = grdnet.load(model)
    samples = test_samples(data)
    labels = np.array([s.label for s in samples])
    maps = []
    for i in range(0, len(samples), 32):
        x = torch.stack([load_image(s.path, p.cfg.channels, p.cfg.image_size) for s in samples[i:i + 32]])
        maps.append(p.maps(x).reshape(len(x), 1, p.cfg.image_size, p.cfg.image_size))
    maps = torch.cat(maps)
    # the rules exactly as a model configured with them would score (grdnet.scoring.image_scores)
    rules = [(f"max of {k}x{k} box ", dict(score_rule="max_pool", score_kernel=k)) for k in (1, 3, 5, 7, 11)]
    rules += [(f"mean of top {q:.1%}", dict(score_rule="topk_mean", score_topk=q)) for q in (0.002, 0.01, 0.05)]
    for name, rule in rules:
        s = image_scores(maps, dataclasses.replace(p.cfg, **rule)).numpy()
        print(f"{name}  {image_metrics(s, labels)['image_auroc']:.3f}")


if __name__ == "__main__":
    main()
