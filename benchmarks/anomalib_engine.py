"""GRD-Net through anomalib's Engine on an MVTec-layout folder: fit, test with anomalib's
metrics, then write the trained networks as a grdnet model folder for `grdnet test`.

    python benchmarks/anomalib_engine.py DATA --out DIR [--preset cpu] [--steps N] [--channels 1|3]

Needs the `anomalib` extra. DATA is read by anomalib's `Folder` datamodule (train/good; test/good;
test/TYPE with ground_truth/TYPE/STEM_mask.png; anomalib's `MVTecAD` takes PNG files only, and
magnetic_tile's images are JPEG). The validation split is the test split (`same_as_test`, as
`MVTecAD` does by default): it only sets anomalib's normalisation and thresholds, which leave the
AUROCs unchanged. The batch size is the preset's. Prints anomalib's test metrics as JSON and
writes them to DIR/anomalib_metrics.json; the grdnet model folder is DIR/model (`grdnet test
DIR/model DATA` scores it with grdnet's own views and metrics).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from anomalib.data import Folder
from anomalib.engine import Engine

from grdnet.anomalib import GRDNet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--steps", type=int, default=None, help="training length (default: the preset's)")
    ap.add_argument("--channels", type=int, default=None, help="1 for grayscale data (default: the preset's, 3)")
    args = ap.parse_args()
    out = Path(args.out)
    model = GRDNet(args.preset, train={"steps": args.steps} if args.steps else None,
                   model={"channels": args.channels} if args.channels else None, visualizer=False)
    data = Path(args.data)
    kinds = sorted(p.name for p in (data / "test").iterdir() if p.is_dir() and p.name != "good")
    datamodule = Folder(name=data.name, root=data, normal_dir="train/good", normal_test_dir="test/good",
                        abnormal_dir=[f"test/{k}" for k in kinds], mask_dir=[f"ground_truth/{k}" for k in kinds],
                        val_split_mode="same_as_test", train_batch_size=model.train_cfg.batch_size,
                        eval_batch_size=16, num_workers=0)
    engine = Engine(accelerator="cpu", devices=1, default_root_dir=out / "results", logger=False,
                    enable_progress_bar=False)
    start = time.monotonic()
    engine.fit(model, datamodule=datamodule)
    fit_minutes = (time.monotonic() - start) / 60
    (metrics,) = engine.test(model, datamodule=datamodule)
    doc = {"metrics": metrics, "steps": model.batches_trained, "fit_minutes": round(fit_minutes, 2),
           "callbacks": sorted(type(c).__name__ for c in engine.trainer.callbacks)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "anomalib_metrics.json").write_text(json.dumps(doc, indent=2))
    model.save_grdnet_model(out / "model")
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
