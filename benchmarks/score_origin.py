"""Where does a defective image's score come from: from its defect, or from elsewhere in the image?

    python benchmarks/score_origin.py ../shared/data/magnetic_tile MODEL [MODEL ...] [--grow N]

For each defect type: the share of defective images whose anomaly map's maximum (score-filtered)
lies on the defect (its mask at model resolution, grown by `--grow` model pixels, default 1, so
that a response just beside it counts as on it), and the image AUROC against the good test images
when the defective images are scored only on their defect (`on`) or only off it (`off`; the good
images on their whole area, which only favours them). With `score_scales`, each view's maximum is
taken on or off the defect and the views averaged, as the image score averages them. An `off`
AUROC well above 0.5 means the defective images of that type differ from the good ones away from
the defect (another batch, another tile shape, another focus): image AUROC then rewards a model for
firing on that difference, which no other production line will have.
"""
import argparse

import numpy as np
import torch
import torch.nn.functional as F

import grdnet
from grdnet.data import image_size_of, load_image, load_mask, test_samples
from grdnet.metrics import image_metrics


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("models", nargs="+")
    ap.add_argument("--grow", type=int, default=1)
    a = ap.parse_args()
    samples = test_samples(a.data)
    g = 2 * a.grow + 1
    for model in a.models:
        p = grdnet.load(model)
        s, c = p.cfg.image_size, p.cfg.channels
        k = p.cfg.score_kernel
        rows = {}
        good = []
        for i in range(0, len(samples), 32):
            chunk = samples[i:i + 32]
            # all channels: the anomaly map and the coarser views of score_scales, each at s x s
            maps = p._run(torch.stack([load_image(t.path, c, s) for t in chunk]))[0].float()
            n = maps.shape[1]
            filtered = F.avg_pool2d(maps.reshape(-1, 1, s, s), k, stride=1, padding=k // 2,
                                    count_include_pad=False).reshape(len(chunk), n, s * s)
            for t, f in zip(chunk, filtered):
                if t.label == 0:
                    good.append(float(f.amax(1).mean()))
                    continue
                full = torch.from_numpy(load_mask(t.mask_path, image_size_of(t.path))).float()[None, None]
                on = F.max_pool2d(F.adaptive_max_pool2d(full, s), g, stride=1, padding=a.grow).flatten().bool()
                # the image score restricted to the defect or to the rest: per view, then averaged
                rows.setdefault(t.defect_type, []).append(
                    (bool(on[f[0].argmax()]), float(f[:, on].amax(1).mean()) if on.any() else 0.0,
                     float(f[:, ~on].amax(1).mean()) if (~on).any() else 0.0))
        print(f"{model} (defect grown by {a.grow} px)")
        print(f"  {'type':<10} {'n':>4} {'score on defect':>16} {'AUROC on':>9} {'AUROC off':>10}")
        for name, r in sorted(rows.items()):
            hit, on_max, off_max = (np.array(v) for v in zip(*r))
            labels = np.r_[np.zeros(len(good)), np.ones(len(r))]
            auc_on = image_metrics(np.r_[good, on_max], labels)["image_auroc"]
            auc_off = image_metrics(np.r_[good, off_max], labels)["image_auroc"]
            print(f"  {name:<10} {len(r):>4} {hit.mean():>16.2f} {auc_on:>9.3f} {auc_off:>10.3f}")


if __name__ == "__main__":
    main()
