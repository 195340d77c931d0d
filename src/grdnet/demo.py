"""`grdnet demo`: the built-in default. Generates a procedural surface-inspection dataset whose
test defects (scratches, dents, stains, cracks) come from other processes than the Perlin
training defects, trains the `cpu` preset on it for 8 minutes, evaluates, and writes heatmaps."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image

from .demo_data import make_surface_dataset

# The demo's table: the data it generates and its training budget; the model is the `cpu` preset as
# it stands. 8 minutes of training keep the whole demo under 10 minutes on a 2-core CPU.
DEMO = dict(n_train=240, n_test_good=40, n_test_defect=80, minutes=8.0)


def run_demo(out="grdnet-demo", minutes: float | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Generate data, train, evaluate; returns the test report (also written to out/report.json)."""
    from .api import load, train
    from .evaluation import run_test, summary_lines, write_json
    from .visualize import overlay

    out = Path(out)
    t0 = time.time()
    data = out / "data"
    if not (data / "train" / "good").is_dir():
        make_surface_dataset(data, n_train=DEMO["n_train"], n_test_good=DEMO["n_test_good"],
                             n_test_defect=DEMO["n_test_defect"], size=128, channels=3, seed=seed)
    print(f"dataset: {data} ({time.time() - t0:.0f} s)", flush=True)
    budget = DEMO["minutes"] if minutes is None else minutes
    model_dir = train(data, out / "run", "cpu", max_minutes=budget,
                      train={"seed": seed, "epochs": 1000}, progress=progress)
    print(f"trained: {model_dir} ({(time.time() - t0) / 60:.1f} min so far)", flush=True)

    heat = out / "heatmaps"
    heat.mkdir(parents=True, exist_ok=True)
    shown = {}

    def save_overlay(sample, pred, mask):
        if shown.get(sample.defect_type, 0) >= 3:  # a few per defect type are enough to look at
            return
        shown[sample.defect_type] = shown.get(sample.defect_type, 0) + 1
        image = np.asarray(Image.open(sample.path).convert("RGB"))
        Image.fromarray(overlay(image, pred.anomaly_map, mask)).save(
            heat / f"{sample.defect_type}_{sample.path.stem}_{pred.score:.3f}.png")

    report = run_test(load(model_dir), data, on_result=save_overlay)
    write_json(report, out / "report.json")
    for line in summary_lines(report):
        print(line)
    print(f"heatmaps: {heat}   report: {out / 'report.json'}   total {(time.time() - t0) / 60:.1f} min")
    return report
