"""Training speed by dataset size: steps per second of `grdnet.train` on a large set and on small
subsets of it, with rounds (the default) and with one pass per Lightning epoch (as before rounds).

    python benchmarks/train_length.py [--data ../shared/data/magnetic_tile] [--sizes 0 30 5]
                                      [--preset cpu] [--steps 150] [--out /tmp/grdnet-train-length]

Each size is a subset of DATA/train/good drawn as `quality.py` draws its small sets (numpy
default_rng(0), symlinks; 0: all images); each run trains `--steps` steps through the public API (`grdnet.train(...,
steps=N)`) and reads its training seconds from the model's config.json (the Timer's time in
`fit`: data loading, defects, steps, hooks, checkpoint checks, the schedule; not the calibration
after it). `--no-rounds-too` skips the comparison runs. Prints one JSON line per run, then a
Markdown table. Run it alone on the machine: anything beside it changes the figures.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grdnet
from grdnet import engine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import small_set  # noqa: E402  (the suite's own small-set rule: default_rng(0), symlinks)

REPO = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "magnetic_tile")
    ap.add_argument("--sizes", type=int, nargs="+", default=[0, 30, 5], help="0: every training image")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--no-rounds-too", action="store_true", help="skip the one-pass-per-epoch runs")
    ap.add_argument("--out", type=Path, default=Path("/tmp/grdnet-train-length"))
    a = ap.parse_args(argv)
    rows = []
    modes = [("rounds", engine.ROUND_BATCHES)] + ([] if a.no_rounds_too else [("one pass per epoch", 1)])
    for n in a.sizes:
        data = a.data if n == 0 else small_set(a.data, a.out / "sets" / f"n{n}", n)
        for mode, round_batches in modes:
            engine.ROUND_BATCHES = round_batches
            model = grdnet.train(data, a.out / "runs" / f"n{n}-{round_batches}", preset=a.preset, steps=a.steps,
                                 progress=False, train={"checkpoint_every_minutes": 0})
            t = json.loads((Path(model) / "config.json").read_text())["training"]
            row = {"images": t["n_train"], "mode": mode, "steps": t["steps"], "rounds": t["rounds"],
                   "seconds": t["seconds"], "steps_per_s": t["steps"] / t["seconds"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = {r["mode"]: r["steps_per_s"] for r in rows if r["images"] == rows[0]["images"]}
    print("\n| training images | mode | steps | rounds | seconds | steps/s | vs the largest set |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['images']} | {r['mode']} | {r['steps']} | {r['rounds']} | {r['seconds']:.1f} | "
              f"{r['steps_per_s']:.2f} | {r['steps_per_s'] / base[r['mode']]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
