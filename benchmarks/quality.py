"""Development quality suite: train a preset on each set and seed, test it, print one Markdown table.

    python benchmarks/quality.py [--preset cpu] [--config FILE.json] [--seeds 0 1 2] [--sets NAME ...]
                                 [--max-minutes M] [--steps N] [--data-root DIR] [--out DIR]

Training and testing go through the public API only: `grdnet.train(...)`, then
`grdnet.evaluation.run_test(grdnet.load(model), set)` on the set's own test split. The table has
one row per set and seed (image AUROC, pixel AUROC, AUPRO, training minutes and steps, and the
false-alarm rate on test/good at the model's stored threshold and at the bare 0.99 quantile of the
held-out scores, for comparison), then the mean and the worst of
every column over all rows. All rows also go to OUT/quality.json (rewritten after every run).

Sets (default: all):
  magnetic_tile     DATA_ROOT/magnetic_tile: grayscale JPEG tiles, every image a different size and
                    aspect ratio, 4 `uneven` masks empty; 761 train, 191 good + 392 defective test
  deeppcb           DATA_ROOT/deeppcb: binary 640 px boards, every good image a different circuit,
                    many tiny defects per image (0.05-0.75% of the pixels); 500 train, 100 + 150 test
  surface           generated brushed-metal surfaces (`grdnet.demo_data.make_surface_dataset`, the
                    demo's sizes with seed 1, so never the demo's test split), cached in OUT/sets
  magnetic_tile-30  small-data versions: the same test split, 30 training images drawn with
  deeppcb-30        numpy default_rng(0) (OUT/sets/NAME: symlinks, nothing copied)
  magnetic_tile-30-lit  magnetic_tile-30 under drifting light: every image, training and test, gets
                    its own gain in [0.5, 1.5] and offset in [-0.2, 0.4] (intensities 0..1, clipped;
                    drawn per image with default_rng), as on a line whose good images range from
                    dark to near-white; masks unchanged (OUT/sets/NAME: PNG copies)
DATA_ROOT defaults to ../shared/data beside the repository. The test splits here are development
sets: choose settings on them, then report on data no choice was made on (docs/EXPERIMENTS.md).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

import grdnet
from grdnet.data import train_images
from grdnet.demo_data import make_surface_dataset
from grdnet.evaluation import run_test

REPO = Path(__file__).resolve().parent.parent
SETS = ("magnetic_tile", "deeppcb", "surface", "magnetic_tile-30", "deeppcb-30", "magnetic_tile-30-lit")
SMALL_N, SMALL_SEED = 30, 0
LIT_GAIN, LIT_OFFSET = (0.5, 1.5), (-0.2, 0.4)
COLUMNS = [("image AUROC", "image_auroc", 3), ("pixel AUROC", "pixel_auroc", 3), ("AUPRO", "aupro", 3),
           ("minutes", "minutes", 1), ("steps", "steps", 0), ("false alarms (test/good)", "false_alarm_rate", 3),
           ("... at the bare quantile", "false_alarm_rate_bare_quantile", 3)]
WORST = {"image_auroc": min, "pixel_auroc": min, "aupro": min, "minutes": max, "false_alarm_rate": max,
         "false_alarm_rate_bare_quantile": max}


def small_set(source: Path, dest: Path, n: int = SMALL_N, seed: int = SMALL_SEED) -> Path:
    """`dest`: `n` of `source`'s training images (drawn with default_rng(seed)), its whole test split."""
    if not (source / "train" / "good").is_dir():
        sys.exit(f"quality.py: {source}/train/good not found (see --data-root)")
    images = train_images(source)
    if len(images) < n:
        sys.exit(f"quality.py: {source} has {len(images)} training images, fewer than {n}")
    chosen = sorted(np.random.default_rng(seed).choice(len(images), size=n, replace=False))
    good = dest / "train" / "good"
    good.mkdir(parents=True, exist_ok=True)
    for old in good.iterdir():
        old.unlink()
    for i in chosen:
        (good / images[i].name).symlink_to(images[i].resolve())
    for part in ("test", "ground_truth"):
        link = dest / part
        if link.is_symlink():
            link.unlink()
        if (source / part).exists():
            link.symlink_to((source / part).resolve(), target_is_directory=True)
    return dest


def lit_set(source: Path, dest: Path, seed: int = SMALL_SEED) -> Path:
    """`dest`: `source` with every image given its own gain and offset (PNG copies; masks linked)."""
    if (dest / "done").exists():
        return dest
    images = sorted(p.relative_to(source) for part in ("train", "test") for p in (source / part).rglob("*")
                    if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"))
    for i, rel in enumerate(images):
        rng = np.random.default_rng([seed, i])
        gain, offset = rng.uniform(*LIT_GAIN), rng.uniform(*LIT_OFFSET)
        x = np.asarray(Image.open(source / rel)).astype(np.float32) / 255
        target = (dest / rel).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(255 * (gain * x + offset) + 0.5, 0, 255).astype(np.uint8)).save(target)
    link = dest / "ground_truth"
    if not link.exists():
        link.symlink_to((source / "ground_truth").resolve(), target_is_directory=True)
    (dest / "done").write_text("")
    return dest


def resolve_set(name: str, data_root: Path, out: Path) -> Path:
    if name == "surface":
        folder = out / "sets" / "surface"
        if not (folder / "test").is_dir():
            make_surface_dataset(folder, n_train=240, n_test_good=40, n_test_defect=80, size=128, channels=3,
                                 seed=1, overwrite=True)
        return folder
    if name.endswith("-lit"):
        return lit_set(resolve_set(name[:-len("-lit")], data_root, out), out / "sets" / name)
    if name.endswith(f"-{SMALL_N}"):
        return small_set(data_root / name[:-len(f"-{SMALL_N}")], out / "sets" / name)
    folder = data_root / name
    if not (folder / "train").is_dir() or not (folder / "test").is_dir():
        sys.exit(f"quality.py: {folder}: no train/ and test/ folders (see --data-root)")
    return folder


def run_one(name: str, data: Path, seed: int, a, overrides: dict) -> dict:
    t0 = time.time()
    model = grdnet.train(data, a.out / "runs" / name / f"seed{seed}", preset=a.preset, config_file=a.config,
                         max_minutes=a.max_minutes or None, train={**overrides, "seed": seed}, progress=False)
    wall = (time.time() - t0) / 60
    predictor = grdnet.load(model)
    r = run_test(predictor, data)
    training = predictor.meta.get("training", {})
    at = r.get("at_threshold")  # counts at the stored threshold; label 0 = the images of test/good
    fa = at["fp"] / (at["fp"] + at["tn"]) if at and at["fp"] + at["tn"] else None
    # ... and at the bare empirical quantile of the held-out scores (the rule before 2026-12-02)
    good = np.array([i["score"] for i in r["images"] if i["label"] == 0])
    bare = predictor.meta.get("val_scores", {}).get("empirical_quantile")
    fa_bare = float((good >= bare).mean()) if bare is not None and good.size else None
    return {"set": name, "seed": seed, "image_auroc": r["image_auroc"], "pixel_auroc": r["pixel_auroc"],
            "aupro": r["metrics"].get("aupro"), "minutes": training.get("minutes", wall),
            "steps": training.get("steps"), "planned_steps": training.get("planned_steps"),
            "stopped_by": training.get("stopped_by"), "n_train": training.get("n_train"),
            "n_val": training.get("n_val"), "false_alarm_rate": fa, "false_alarm_rate_bare_quantile": fa_bare,
            "false_alarms": at and at["fp"], "n_good": at and at["fp"] + at["tn"], "threshold": r["threshold"],
            "per_type_image_auroc": {k: v.get("image_auroc") for k, v in r["per_type"].items()},
            "wall_minutes": wall, "test_minutes": (time.time() - t0) / 60 - wall, "model": str(model)}


def fmt(v, digits: int) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def table(rows: list[dict]) -> str:
    lines = ["| set | seed | " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append(f"| {r['set']} | {r['seed']} | " + " | ".join(fmt(r[k], d) for _, k, d in COLUMNS) + " |")
    for label in ("mean", "worst"):
        cells = []
        for _, k, d in COLUMNS:
            vals = [r[k] for r in rows if r[k] is not None]
            pick = statistics.fmean if label == "mean" else WORST.get(k)
            cells.append(fmt(pick(vals), d) if vals and pick else "")
        lines.append(f"| **{label}** | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu", choices=grdnet.config.PRESET_NAMES)
    ap.add_argument("--config", metavar="FILE.json",
                    help="JSON config ({'model': {...}, 'train': {...}}) applied over the preset")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="S", help="default: 0")
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS, metavar="NAME",
                    help=f"any of: {', '.join(SETS)} (default: all)")
    ap.add_argument("--max-minutes", type=float, default=20.0, metavar="M",
                    help="training budget per run (default 20, as in docs/RESULTS.md; 0: no cap)")
    ap.add_argument("--steps", type=int, metavar="N", help="stop after N training steps (passed as train={'steps': N})")
    ap.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data", metavar="DIR",
                    help="folder holding magnetic_tile/ and deeppcb/ (default: ../shared/data)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/grdnet-quality"), metavar="DIR",
                    help="sets, runs and quality.json (default: /tmp/grdnet-quality)")
    a = ap.parse_args(argv)
    a.out = a.out.resolve()
    overrides = {"steps": a.steps} if a.steps is not None else {}
    try:  # an unknown option fails here, not after the first training
        grdnet.build_config(a.preset, train=overrides, config_file=a.config)
    except grdnet.GRDNetError as e:
        ap.error(str(e))
    rows, started = [], time.strftime("%Y-%m-%dT%H:%M:%S")
    for name in a.sets:
        data = resolve_set(name, a.data_root.resolve(), a.out)
        for seed in a.seeds:
            print(f"quality.py: {name} seed {seed} ...", file=sys.stderr, flush=True)
            rows.append(run_one(name, data, seed, a, overrides))
            (a.out / "quality.json").write_text(json.dumps(
                {"started": started, "command": " ".join(sys.argv), "preset": a.preset,
                 "config": a.config and json.loads(Path(a.config).read_text()), "max_minutes": a.max_minutes,
                 "steps": a.steps, "rows": rows}, indent=2, default=float))
    print(table(rows))
    print(f"\n(rows: {a.out / 'quality.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
