"""Image AUROC of one trained model with several `score_scales` (no retraining).

    python benchmarks/score_scales.py MODEL ../shared/data/magnetic_tile

`ModelConfig.score_scales` changes inference only: the anomaly map (channel 0) and so the pixel
metrics stay as they are; the image score becomes the mean of the score rule over the image at
each scale. Each set is scored exactly as a model configured with it would be (`Predictor`).
"""
import dataclasses
import sys

import numpy as np

import grdnet
from grdnet.data import test_samples
from grdnet.metrics import image_metrics
from grdnet.modelfile import load_model
from grdnet.scoring import InferenceNet

SETS = [(1.0,), (1.0, 0.75), (1.0, 0.5), (1.0, 0.75, 0.5), (1.0, 0.75, 0.5, 0.25)]


def main():
    model, data = sys.argv[1], sys.argv[2]
    net, cfg, _ = load_model(model)
    samples = test_samples(data)
    labels = np.array([s.label for s in samples])
    types = sorted({s.defect_type for s in samples} - {"good"})
    for scales in SETS:
        c = dataclasses.replace(cfg, score_scales=scales)
        scaled = InferenceNet(net.encoder, net.decoder, net.segmenter, c.flip_average, c.score_sizes)
        scores = np.array([p.score for p in grdnet.Predictor(scaled, c).predict([str(s.path) for s in samples])])
        per_type = {}
        for t in types:
            keep = np.array([s.defect_type in ("good", t) for s in samples])
            per_type[t] = round(image_metrics(scores[keep], labels[keep])["image_auroc"], 3)
        print({"score_scales": list(scales), "image_auroc": round(image_metrics(scores, labels)["image_auroc"], 4),
               **per_type}, flush=True)


if __name__ == "__main__":
    main()
