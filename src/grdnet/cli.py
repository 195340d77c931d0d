"""Command line: a thin layer over the Python API. User errors print one line, exit code 2."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from .errors import GRDNetError


def _quiet():
    """Keep the terminal for our output: drop library chatter that says nothing to the user."""
    os.environ.setdefault("LITLOGGER_DISABLE", "1")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*number of training batches.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "lightning.fabric.utilities.seed", "lightning.pytorch.trainer.connectors"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _train_args(p: argparse.ArgumentParser):
    p.add_argument("--preset", default="cpu", help="tiny | cpu | paper (default: cpu)")
    p.add_argument("--image-size", type=int, help="model input size (square), overrides the preset")
    p.add_argument("--epochs", type=int, help="maximum epochs (default: preset)")
    p.add_argument("--max-minutes", type=float, help="time budget; training stops cleanly when it runs out")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--config", help="JSON file with 'model' and 'train' sections overriding the preset")
    p.add_argument("--textures", help="folder of texture images used as synthetic anomaly sources")
    p.add_argument("--roi-mode", choices=["target", "prediction", "none"])
    p.add_argument("--accelerator", default="auto", help="cpu | gpu | auto")
    p.add_argument("--devices", default="auto", help="number of devices (Lightning)")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--strategy", default="auto", help="e.g. ddp")
    p.add_argument("--precision", help="e.g. bf16-mixed, 16-mixed (GPU); 32-true on CPU")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _train_overrides(a) -> tuple[dict, dict]:
    model = {k: v for k, v in {"image_size": a.image_size}.items() if v is not None}
    train = {k: v for k, v in {"epochs": a.epochs, "max_minutes": a.max_minutes, "batch_size": a.batch_size,
                               "lr": a.lr, "seed": a.seed, "texture_dir": a.textures,
                               "roi_mode": a.roi_mode}.items() if v is not None}
    return model, train


def _devices(v: str):
    return v if v == "auto" else int(v)


def cmd_train(a) -> int:
    from .api import train

    model, tr = _train_overrides(a)
    path = train(a.data, a.out, a.preset, config_file=a.config, model=model, train=tr,
                 accelerator=a.accelerator, devices=_devices(a.devices), num_nodes=a.num_nodes,
                 strategy=a.strategy, precision=a.precision, progress=not a.no_progress)
    cfg = json.loads((path / "config.json").read_text())
    print(f"model written to {path} (threshold {cfg['threshold']:.4f}, {cfg['training']['epochs']} epochs, "
          f"{cfg['training']['minutes']} min)")
    return 0


def cmd_test(a) -> int:
    from .api import load
    from .evaluation import run_test, summary_lines, write_json

    predictor = load(a.model, tile=a.tile or None)
    report = run_test(predictor, a.data, threshold=a.threshold, allow_missing_masks=a.allow_missing_masks)
    out = Path(a.report) if a.report else None
    if out is not None:
        write_json(report, out)
    for line in summary_lines(report):
        print(line)
    if out is not None:
        print(f"report written to {out}")
    return 0


def _expand_inputs(items: list[str]) -> list[Path]:
    from .data import list_images

    paths = []
    for it in items:
        p = Path(it)
        if p.is_dir():
            found = list_images(p)
            if not found:
                raise GRDNetError(f"{p}: folder holds no images")
            paths.extend(found)
        elif p.exists():
            paths.append(p)
        else:
            raise GRDNetError(f"{p}: no such file or folder")
    return paths


def cmd_predict(a) -> int:
    from PIL import Image

    from .api import load
    from .data import open_image, pil_to_array
    from .visualize import overlay

    predictor = load(a.model, tile=a.tile or None)
    paths = _expand_inputs(a.inputs)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    failures = 0
    for start in range(0, len(paths), a.batch_size):
        chunk = paths[start:start + a.batch_size]
        try:
            preds = predictor.predict(chunk, threshold=a.threshold)
        except GRDNetError:
            preds = []
            for p in chunk:  # find which image is bad, keep going with the others
                try:
                    preds.append(predictor.predict(p, threshold=a.threshold))
                except GRDNetError as e:
                    preds.append(e)
        for path, pred in zip(chunk, preds):
            if isinstance(pred, GRDNetError):
                failures += 1
                print(f"error: {pred}", file=sys.stderr)
                print(json.dumps({"path": str(path), "error": str(pred)}), flush=True)
                continue
            image = pil_to_array(open_image(path), 3)
            name = out / f"{path.stem}_overlay.png"
            Image.fromarray(overlay(image, pred.anomaly_map)).save(name)
            if a.save_maps:
                np.save(out / f"{path.stem}_map.npy", pred.anomaly_map)
            print(json.dumps({"path": str(path), "score": round(pred.score, 6), "label": pred.label,
                              "threshold": pred.threshold, "overlay": str(name)}), flush=True)
    if failures:
        print(f"error: {failures} of {len(paths)} image(s) could not be scored", file=sys.stderr)
        return 1
    return 0


def cmd_export(a) -> int:
    from .export import OnnxPredictor, export_onnx

    out = export_onnx(a.model, a.out, opset=a.opset)
    check = json.loads(OnnxPredictor.load(out).meta["onnx"]["export_check"])
    print(f"ONNX model written to {out} (opset {a.opset}; max map difference from PyTorch "
          f"{check['max_abs_map_diff']:.1e} on {check['images']} check images)")
    return 0


def cmd_demo(a) -> int:
    from .demo import run_demo

    report = run_demo(a.out, minutes=a.max_minutes, seed=a.seed, progress=not a.no_progress)
    return 0 if report else 1


_TILE_HELP = ("score images larger than the model as overlapping model-size tiles at native resolution "
              "(default: only for models trained on crops)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grdnet", description="GRD-Net industrial anomaly detection")
    parser.add_argument("--version", action="version", version=f"grdnet {__import__('grdnet').__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train on DATA/train/good (MVTec AD layout)")
    p.add_argument("data")
    p.add_argument("--out", required=True, help="run folder to write")
    _train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("test", help="evaluate a model on DATA/test with the ground truth")
    p.add_argument("model", help="model folder, run folder or .onnx file")
    p.add_argument("data")
    p.add_argument("--report", help="write the full report as JSON here")
    p.add_argument("--threshold", type=float, help="override the stored threshold")
    p.add_argument("--allow-missing-masks", action="store_true",
                   help="evaluate defective images without a mask on image metrics only")
    p.add_argument("--tile", action="store_true", help=_TILE_HELP)
    p.set_defaults(func=cmd_test)

    p = sub.add_parser("predict", help="score images; write heatmap overlays and one JSON line per image")
    p.add_argument("model", help="model folder, run folder or .onnx file")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--out", required=True, help="folder for the overlays")
    p.add_argument("--threshold", type=float, help="override the stored threshold")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--save-maps", action="store_true", help="also save each raw map as .npy")
    p.add_argument("--tile", action="store_true", help=_TILE_HELP)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export a model to one self-describing file for other runtimes")
    p.add_argument("model", help="model folder or run folder")
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("--out", help="output file (default: <model folder>.onnx)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="generate a dataset, train, evaluate and show heatmaps (<= 10 min on CPU)")
    p.add_argument("--out", default="grdnet-demo")
    p.add_argument("--max-minutes", type=float, default=None, help="training time budget (default: the demo's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet()
    try:
        return args.func(args)
    except GRDNetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
