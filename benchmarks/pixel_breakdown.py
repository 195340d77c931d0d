"""Where does pixel AUROC go: which defect pixels rank below which normal pixels?

    python benchmarks/pixel_breakdown.py MODEL ../shared/data/magnetic_tile [--worst 8]

For each defect type, the AUROC of its defect pixels against three sets of normal pixels: all of
them (what per-type pixel AUROC measures), the good images' only, and only those of the same
images (the rest of each defective image); the share of its defect pixels above the good images'
99th percentile (found at all, at a 1% false-positive rate); and for each image with both kinds of
pixel, the AUROC inside that image alone (quartiles): does the map find the defect's region, or
fire on the wrong side of it? The `--worst` images by that within-image AUROC are listed. Maps
at each image's own size (what `grdnet test` scores), every third pixel in each direction.
"""
from __future__ import annotations

import argparse

import numpy as np

import grdnet
from grdnet.data import load_mask, test_samples
from grdnet.metrics import image_metrics


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a defect pixel scores above a normal one), ties counted half: the package's exact AUROC
    (`image_metrics` takes any scores and labels), on at most 300,000 of each."""
    pos, neg = pos[::max(1, len(pos) // 300_000)], neg[::max(1, len(neg) // 300_000)]
    return image_metrics(np.concatenate([pos, neg]), np.r_[np.ones(len(pos)), np.zeros(len(neg))])["image_auroc"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("--worst", type=int, default=8)
    a = ap.parse_args()
    predictor, samples = grdnet.load(a.model), test_samples(a.data)
    rows = []
    for i in range(0, len(samples), 16):
        chunk = samples[i:i + 16]
        for s, p in zip(chunk, predictor.predict([s.path for s in chunk], batch_size=16)):
            h, w = p.anomaly_map.shape
            mask = load_mask(s.mask_path, (w, h)) if s.mask_path else np.zeros((h, w), bool)
            rows.append((s, p.anomaly_map[::3, ::3].astype(np.float32), mask[::3, ::3]))
    good = np.concatenate([m.ravel() for s, m, _ in rows if s.label == 0])
    normal = np.concatenate([good] + [m[~k] for s, m, k in rows if s.label == 1])
    q99 = float(np.quantile(good, 0.99))
    print(f"{a.model}: good images' pixels: median {np.median(good):.3f}, 99th percentile {q99:.3f}")
    print("type      share  vs all  vs good  vs same images  >good q99  within-image AUROC q25/q50/q75 (n)")
    total = sum(int(k.sum()) for s, _, k in rows if s.label == 1)
    worst = []
    for t in sorted({s.defect_type for s, _, _ in rows if s.label == 1}):
        mine = [(s, m, k) for s, m, k in rows if s.defect_type == t]
        pos = np.concatenate([m[k] for _, m, k in mine])
        own = np.concatenate([m[~k] for _, m, k in mine])
        within = []
        for s, m, k in mine:
            if k.any() and not k.all():
                within.append(auroc(m[k], m[~k]))
                worst.append((within[-1], t, s.path.name, float(k.mean())))
        q = np.percentile(within, [25, 50, 75]) if within else [float("nan")] * 3
        print(f"{t:9s} {len(pos) / total:5.2f}  {auroc(pos, normal):6.3f}  {auroc(pos, good):7.3f}  "
              f"{auroc(pos, own):14.3f}  {np.mean(pos > q99):9.3f}  {q[0]:.2f}/{q[1]:.2f}/{q[2]:.2f} ({len(within)})")
    print(f"worst {a.worst} images by within-image AUROC (type, file, defect's share of the image):")
    for v, t, name, share in sorted(worst)[:a.worst]:
        print(f"  {v:.3f}  {t}  {name}  {share:.2f}")


if __name__ == "__main__":
    main()
