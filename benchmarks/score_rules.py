"""Image AUROC of several image-score rules on one trained model's maps (no retraining).

    python benchmarks/score_rules.py MODEL ../shared/data/magnetic_tile

Maps are computed once at the model's resolution; each rule then turns them into image scores.
"""
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import grdnet
from grdnet.data import load_image, test_samples
from grdnet.metrics import image_metrics


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
    for k in (1, 3, 5, 7, 11):
        s = F.avg_pool2d(maps, k, 1).flatten(1).amax(1).numpy()
        print(f"max of {k}x{k} box   {image_metrics(s, labels)['image_auroc']:.3f}")
    for q in (0.002, 0.01, 0.05):
        s = maps.flatten(1).topk(max(1, int(q * maps[0].numel())), 1).values.mean(1).numpy()
        print(f"mean of top {q:.1%}  {image_metrics(s, labels)['image_auroc']:.3f}")


if __name__ == "__main__":
    main()
