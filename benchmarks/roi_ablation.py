"""Does the ROI module do what the paper claims? Train the same preset three ways (ROI loss mode
`target`, `prediction`, and no ROI) on a generated dataset where a part lies on a cluttered
background, then test WITHOUT any ROI at inference. Test defects on the background are labelled
good ("don't care"), and pixels outside the part count as good.

    python benchmarks/roi_ablation.py --out /tmp/roi_ablation --epochs 30

Prints one JSON line per mode and a markdown table.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import grdnet
from grdnet.demo_data import make_roi_dataset
from grdnet.evaluation import run_test


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/roi_ablation")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default="target,prediction,none")
    a = ap.parse_args()
    out = Path(a.out)
    data = out / "data"
    if not (data / "train").is_dir():
        make_roi_dataset(data, n_train=240, n_test_good=40, n_test_defect=80, size=128, channels=3, seed=a.seed)
    rows = []
    for mode in a.modes.split(","):
        t0 = time.time()
        roi = data / "roi" if mode != "none" else None
        model = grdnet.train(data, out / f"run-{mode}", preset="cpu", epochs=a.epochs, progress=False, roi=roi,
                             model={"image_size": a.image_size, "score_kernel": 5},
                             train={"roi_mode": mode if mode != "none" else "none", "batch_size": 16,
                                    "seed": a.seed})
        minutes = (time.time() - t0) / 60
        r = run_test(grdnet.load(model), data)  # no ROI at inference
        outside = [x for x in r["images"] if x["label"] == 0]
        row = {"mode": mode, "epochs": a.epochs, "image_size": a.image_size, "train_minutes": round(minutes, 1),
               "image_auroc": r["image_auroc"], "pixel_auroc": r["pixel_auroc"], "aupro": r["metrics"]["aupro"],
               "false_alarms_at_threshold": sum(x["decision"] for x in outside), "n_good": len(outside)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| ROI mode | image AUROC | pixel AUROC | AUPRO | false alarms (good incl. background defects) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['aupro']:.3f} | "
              f"{r['false_alarms_at_threshold']}/{r['n_good']} |")


if __name__ == "__main__":
    main()
