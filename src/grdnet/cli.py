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
from .version import __version__


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
    p.add_argument("--preset", default="cpu", help="cpu | grd-cpu | paper | tiny (default: cpu; see README)")
    p.add_argument("--image-size", type=int, help="model input size (square), overrides the preset")
    p.add_argument("--steps", type=int, help="training length in optimiser steps (default: the preset's)")
    p.add_argument("--epochs", type=int, help="training length in passes over the training images (with --steps: the longer)")
    p.add_argument("--max-minutes", type=float, help="time budget; training stops cleanly when it runs out")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--config", help="config file overriding the preset: JSON or YAML with 'model' and 'train' "
                                    "sections, or a run's run.json (its data, ROI and precision too, unless given)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration (usable as --config) and exit without training")
    p.add_argument("--textures", help="folder of texture images used as synthetic anomaly sources")
    p.add_argument("--roi", help="ROI masks: a folder mirroring DATA (train/good/<stem>.png) or one mask for all")
    p.add_argument("--roi-default", help="ROI mask for images that have none in --roi")
    p.add_argument("--roi-mode", choices=["target", "prediction", "none"],
                   help="how the ROI shapes the loss (default target: learn to stay silent outside it)")
    p.add_argument("--accelerator", default="auto", help="cpu | gpu | auto")
    p.add_argument("--devices", default="auto", help="number of devices (Lightning)")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--strategy", default="auto", help="e.g. ddp")
    p.add_argument("--precision", help="32-true, bf16-mixed, 16-mixed (GPU only); default 32-true, "
                   "or bf16-mixed on CPUs with native bf16 (AVX-512 BF16, AMX)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms: the same seed gives the same weights on the same machine")
    p.add_argument("--logger", action="append", choices=["csv", "tensorboard", "mlflow"], default=[],
                   help="extra logger besides the CSV log (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _train_overrides(a) -> tuple[dict, dict]:
    model = {k: v for k, v in {"image_size": a.image_size}.items() if v is not None}
    train = {k: v for k, v in {"steps": a.steps, "epochs": a.epochs, "max_minutes": a.max_minutes,
                               "batch_size": a.batch_size, "lr": a.lr, "seed": a.seed, "texture_dir": a.textures,
                               "roi_mode": a.roi_mode}.items() if v is not None}
    return model, train


def _devices(v: str):
    """"auto", a count ("2", "-1": all) or a list of device indices ("0,1")."""
    return int(v) if v.lstrip("-").isdigit() else v


def _from_record(a) -> None:
    """Fill what a run.json given as --config records and the command line leaves out."""
    from .config import is_run_record, read_config_file

    record = read_config_file(a.config) if a.config else {}
    if not is_run_record(record):
        if a.data is None and not a.print_config:
            raise GRDNetError("no training data: give DATA (or a run's run.json as --config)")
        return
    roi = record.get("roi") or {}
    a.data = a.data or record.get("data")
    a.roi = a.roi or roi.get("source")
    a.roi_default = a.roi_default or roi.get("default")
    a.precision = a.precision or (record.get("trainer") or {}).get("precision")
    if a.data is None and not a.print_config:
        raise GRDNetError(f"{a.config}: records no training data; give DATA")


def cmd_train(a) -> int:
    from .api import resolve_config, train
    from .config import to_json_dict
    from .data import category_dirs
    from .modelfile import read_config

    _from_record(a)
    model, tr = _train_overrides(a)
    if a.print_config:
        data = a.data if a.data and (Path(a.data) / "train" / "good").is_dir() else None
        m, t = resolve_config(data, a.preset, config_file=a.config, model=model, train=tr)
        print(json.dumps({"model": to_json_dict(m), "train": to_json_dict(t)}, indent=2))
        return 0
    if a.out is None:
        raise GRDNetError("--out is required: the run folder to write")

    def one(data, out, val_data):
        path = train(data, out, a.preset, config_file=a.config, model=model, train=tr,
                     accelerator=a.accelerator, devices=_devices(a.devices), num_nodes=a.num_nodes,
                     strategy=a.strategy, precision=a.precision, progress=not a.no_progress,
                     val_data=val_data, val_rule=a.val_rule, roi=a.roi, roi_default=a.roi_default,
                     resume=a.resume, deterministic=a.deterministic, loggers=a.logger)
        if path is None:  # a DDP rank other than 0: rank 0 writes the run folder and reports
            return
        _, cfg = read_config(path)
        t = cfg["training"]
        print(f"model written to {path} (threshold {cfg['threshold']:.4f}, {t['steps']:,} steps = {t['epochs']:g} "
              f"epochs, {t['minutes']} min{', stopped by the time budget' if t['stopped_by'] != 'steps' else ''})",
              flush=True)

    cats = category_dirs(a.data, "train/good")
    if not a.all_categories:
        if not (Path(a.data) / "train" / "good").is_dir() and cats:
            raise GRDNetError(f"{a.data}: a multi-category root ({len(cats)} categories: "
                              f"{', '.join(c.name for c in cats[:4])}{' ...' if len(cats) > 4 else ''}); "
                              "pass --all-categories to train one model per category")
        one(a.data, a.out, a.val_data)
        return 0
    # One model per category into OUT/<category>; finished ones are kept, so a rerun continues.
    if not cats:
        raise GRDNetError(f"{a.data}: no category sub-folders with train/good")
    failed = []
    for cat in cats:
        run = Path(a.out) / cat.name
        if _is_model(run / "model"):
            print(f"{cat.name}: already trained ({run / 'model'}); skipped", flush=True)
            continue
        print(f"{cat.name}: training", flush=True)
        try:
            one(cat, run, None if a.val_data is None else Path(a.val_data) / cat.name)
        except GRDNetError as e:
            print(f"error: {cat.name}: {e}", file=sys.stderr, flush=True)
            failed.append(cat.name)
    if failed:
        print(f"error: {len(failed)} of {len(cats)} categories failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _is_model(folder: Path) -> bool:
    """True when `folder` holds a finished model (a category `train --all-categories` can skip)."""
    from .modelfile import resolve_model_dir

    try:
        return resolve_model_dir(folder) == folder
    except GRDNetError:
        return False


def cmd_test(a) -> int:
    from .api import load
    from .evaluation import run_test, summary_lines, write_json
    from .report import evaluate_categories, is_multi_category, summary_markdown, write_report

    out = Path(a.report) if a.report else None
    if is_multi_category(a.data):
        res = evaluate_categories(a.model, a.data, a.out, threshold=a.threshold,
                                  allow_missing_masks=a.allow_missing_masks, gallery_size=a.gallery)
        print(summary_markdown(res["summary"]), end="")
        if out is not None:
            write_json(res, out)
            print(f"report written to {out}")
        if a.out:
            print(f"reports written to {a.out} (open {Path(a.out) / 'index.html'})")
        return 0
    predictor = load(a.model, tile=a.tile or None)
    if a.pixel_threshold is not None:
        predictor.pixel_threshold = a.pixel_threshold
    if a.out:
        report = write_report(predictor, a.data, a.out, model_path=a.model, threshold=a.threshold,
                              allow_missing_masks=a.allow_missing_masks, gallery_size=a.gallery,
                              roi=a.roi, roi_default=a.roi_default)
    else:
        report = run_test(predictor, a.data, threshold=a.threshold, allow_missing_masks=a.allow_missing_masks,
                          roi=a.roi, roi_default=a.roi_default)
    if out is not None:
        write_json(report, out)
    for line in summary_lines(report):
        print(line)
    if out is not None:
        print(f"report written to {out}")
    if a.out:
        print(f"report folder written to {a.out} (open {Path(a.out) / 'index.html'})")
    return 0


def cmd_calibrate(a) -> int:
    from .calibration import calibrate

    rec = calibrate(a.model, a.val_data, rule=a.rule, quantile=a.quantile)
    v = rec["validation_at_threshold"]
    print(f"threshold {rec['threshold']:.6f} ({a.rule} rule on {rec['n_good']} good, {rec['n_defective']} "
          f"defective images; previous {rec['previous']['threshold']}); on the validation folder: precision "
          f"{v['precision']:.4f} recall {v['recall']:.4f} F1 {v['f1']:.4f}")
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


def _rois(roi_file, paths):
    if roi_file is None:
        return [None] * len(paths)
    from .data import image_size_of
    from .roi import roi_for_image

    return [roi_for_image(roi_file, image_size_of(p)[::-1]) for p in paths]


def cmd_predict(a) -> int:
    from PIL import Image

    from .api import load
    from .data import open_image, pil_to_array
    from .visualize import overlay

    predictor = load(a.model, tile=a.tile or None)
    paths = _expand_inputs(a.inputs)
    roi_file = Path(a.roi) if a.roi else None
    if roi_file is not None and not roi_file.is_file():
        raise GRDNetError(f"{roi_file}: no such ROI file")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    failures = 0
    for start in range(0, len(paths), a.batch_size):
        chunk = paths[start:start + a.batch_size]
        try:
            preds = predictor.predict(chunk, threshold=a.threshold, roi=_rois(roi_file, chunk),
                                      pixel_threshold=a.pixel_threshold)
        except GRDNetError:
            preds = []
            for p in chunk:  # find which image is bad, keep going with the others
                try:
                    preds.append(predictor.predict(p, threshold=a.threshold, roi=_rois(roi_file, [p])[0],
                                                   pixel_threshold=a.pixel_threshold))
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
            Image.fromarray(overlay(image, pred.anomaly_map, defects=pred.defect_mask)).save(name)
            line = {"path": str(path), "score": round(pred.score, 6), "label": pred.label,
                    "threshold": pred.threshold, "overlay": str(name)}
            if pred.defect_mask is not None:
                mask_file = out / f"{path.stem}_defects.png"
                Image.fromarray(pred.defect_mask.astype(np.uint8) * 255).save(mask_file)
                line.update(pixel_threshold=pred.pixel_threshold, defect_mask=str(mask_file),
                            regions=[r.to_dict() for r in pred.regions])
            if a.save_maps:
                np.save(out / f"{path.stem}_map.npy", pred.anomaly_map)
            print(json.dumps(line), flush=True)
    if failures:
        print(f"error: {failures} of {len(paths)} image(s) could not be scored", file=sys.stderr)
        return 1
    return 0


def cmd_roi(a) -> int:
    from PIL import Image

    from .data import image_size_of, open_image, pil_to_array
    from .roi import make_roi, parse_shapes
    from .visualize import overlay

    rects, polys = parse_shapes(a.shapes)
    rects += [[float(v) for v in r.split(",")] for r in a.rect or []]
    polys += [[float(v) for v in p.split(",")] for p in a.polygon or []]
    like = a.like or a.from_image
    if a.size:
        try:
            size = tuple(int(v) for v in a.size.lower().split("x"))
            assert len(size) == 2
        except (ValueError, AssertionError):
            raise GRDNetError(f"--size must be WIDTHxHEIGHT, got {a.size!r}") from None
    elif like:
        size = image_size_of(like)
    else:
        raise GRDNetError("give the ROI's size: --size WxH, --like IMAGE or --from-image IMAGE")
    mask = make_roi(size, rects, polys, reference=a.from_image, threshold=a.threshold, invert=a.invert)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((mask * 255).astype(np.uint8)).save(out)
    preview = out.with_name(out.stem + "_preview.png")
    base = pil_to_array(open_image(like), 3) if like else np.full(mask.shape + (3,), 96, np.uint8)
    Image.fromarray(overlay(base, mask.astype(np.float32) * 0.6, mask)).save(preview)
    print(json.dumps({"roi": str(out), "preview": str(preview), "size": list(size),
                      "coverage": round(float(mask.mean()), 4)}))
    return 0


def cmd_export(a) -> int:
    from .export import OnnxPredictor, OpenVinoPredictor, export_onnx, export_openvino

    if a.format == "onnx":
        if a.int8 or a.calibration_data:
            raise GRDNetError("--int8 and --calibration-data are for --format openvino")
        out = export_onnx(a.model, a.out, opset=a.opset)
        check = json.loads(OnnxPredictor.load(out).meta["onnx"]["export_check"])
        print(f"ONNX model written to {out} (opset {a.opset}; max map difference from PyTorch "
              f"{check['max_abs_map_diff']:.1e} on {check['images']} check images)")
        return 0
    if a.calibration_data and not a.int8:
        raise GRDNetError("--calibration-data is for --int8")
    out = export_openvino(a.model, a.out, int8=a.int8, calibration_data=a.calibration_data,
                          calibration_images=a.calibration_images, opset=a.opset)
    check = json.loads(OpenVinoPredictor.load(out).meta["openvino"]["export_check"])
    if a.int8:
        print(f"OpenVINO INT8 model written to {out} (+ {out.with_suffix('.bin').name}; calibrated on "
              f"{check['calibration']['images']} images of {check['calibration']['folder']}; against PyTorch on "
              f"{check['images']} {check['checked_on']}: score difference mean {check['mean_abs_score_diff']:.4f}, "
              f"max {check['max_abs_score_diff']:.4f}; map difference mean {check['mean_abs_map_diff']:.4f}, "
              f"max {check['max_abs_map_diff']:.3f})")
    else:
        print(f"OpenVINO model written to {out} (+ {out.with_suffix('.bin').name}; max map difference from "
              f"PyTorch {check['max_abs_map_diff']:.1e} on {check['images']} check images)")
    return 0


def cmd_demo(a) -> int:
    from .demo import run_demo

    report = run_demo(a.out, minutes=a.max_minutes, seed=a.seed, progress=not a.no_progress)
    return 0 if report else 1


def cmd_serve(a) -> int:
    from .serve import ServeSettings, serve

    limits = {k: getattr(a, k) for k in ("max_upload_mb", "max_pixels", "max_files", "max_batch", "queue_size")}
    settings = ServeSettings(**{k: v for k, v in limits.items() if v is not None},
                             api_key=a.api_key or os.environ.get("GRDNET_API_KEY"))
    serve(a.model, host=a.host, port=a.port, workers=a.workers, settings=settings)
    return 0


_TILE_HELP = ("score images larger than the model as overlapping model-size tiles at native resolution "
              "(default: only for models trained on crops)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grdnet", description="GRD-Net industrial anomaly detection")
    parser.add_argument("--version", action="version", version=f"grdnet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_train_parser, _test_parser, _calibrate_parser, _predict_parser, _roi_parser, _export_parser,
                _demo_parser, _serve_parser):
        add(sub)
    return parser


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train on DATA/train/good (MVTec AD layout)")
    p.add_argument("data", nargs="?", help="dataset folder (default: the one a --config run.json records)")
    p.add_argument("--out", help="run folder to write (required unless --print-config)")
    _train_args(p)
    p.add_argument("--all-categories", action="store_true",
                   help="DATA holds one MVTec-layout folder per category: train each into OUT/<category>")
    p.add_argument("--val-data", help="labelled validation folder (good/ + defect folders, not the test split): "
                                      "set the threshold on it after training (with --all-categories: "
                                      "VAL_DATA/<category>)")
    p.add_argument("--val-rule", choices=["f1", "quantile"], default="f1",
                   help="threshold rule on --val-data (default: f1)")
    p.set_defaults(func=cmd_train)


def _test_parser(sub) -> None:
    p = sub.add_parser("test", help="evaluate a model on DATA/test with the ground truth")
    p.add_argument("model", help="model folder, run folder, .onnx or OpenVINO .xml file")
    p.add_argument("data")
    p.add_argument("--report", help="write the full report as JSON here")
    p.add_argument("--threshold", type=float, help="override the stored threshold")
    p.add_argument("--pixel-threshold", type=float,
                   help="override the stored pixel threshold (region-level figures)")
    p.add_argument("--allow-missing-masks", action="store_true",
                   help="evaluate defective images without a mask on image metrics only")
    p.add_argument("--roi", help="ROI masks (folder mirroring DATA, or one mask): maps are multiplied by "
                                 "the ROI and pixel metrics use ROI pixels only")
    p.add_argument("--roi-default", help="ROI mask for images that have none in --roi")
    p.add_argument("--out", help="write a report folder here: report.json, images.csv, curves, gallery, "
                                 "index.html (for a multi-category DATA: one per category and a summary)")
    p.add_argument("--gallery", type=int, default=6, help="worst misses and false alarms shown (default 6 each)")
    p.add_argument("--tile", action="store_true", help=_TILE_HELP)
    p.set_defaults(func=cmd_test)


def _calibrate_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="set a model's threshold on a labelled validation folder")
    p.add_argument("model", help="model folder or run folder (its config.json is rewritten)")
    p.add_argument("val_data", help="folder with good/ and one folder per defect type (never the test split)")
    p.add_argument("--rule", choices=["f1", "quantile"], default="f1",
                   help="f1: the F1-optimal threshold; quantile: a quantile of the good images' scores")
    p.add_argument("--quantile", type=float, help="for --rule quantile (default: the model's, 0.99)")
    p.set_defaults(func=cmd_calibrate)


def _predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="score images; write heatmap overlays and one JSON line per image")
    p.add_argument("model", help="model folder, run folder, .onnx or OpenVINO .xml file")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--out", required=True, help="folder for the overlays and defect masks")
    p.add_argument("--threshold", type=float, help="override the stored threshold")
    p.add_argument("--pixel-threshold", type=float,
                   help="override the stored pixel threshold of the defect mask and regions")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--save-maps", action="store_true", help="also save each raw map as .npy")
    p.add_argument("--roi", help="one ROI mask applied to every image (zeroes the map outside it)")
    p.add_argument("--tile", action="store_true", help=_TILE_HELP)
    p.set_defaults(func=cmd_predict)


def _roi_parser(sub) -> None:
    p = sub.add_parser("roi", help="make a ROI mask from rectangles/polygons or by thresholding an image")
    p.add_argument("--out", required=True, help="mask PNG to write (a _preview.png is written beside it)")
    p.add_argument("--size", help="WIDTHxHEIGHT of the mask")
    p.add_argument("--like", help="take the size from this image (and show the preview on it)")
    p.add_argument("--rect", action="append", help="x0,y0,x1,y1 (repeatable)")
    p.add_argument("--polygon", action="append", help="x1,y1,x2,y2,x3,y3,... (repeatable)")
    p.add_argument("--shapes", help='JSON (or a JSON file): {"rects": [[x0,y0,x1,y1]], "polygons": [[x,y,...]]}')
    p.add_argument("--from-image", help="reference image: ROI = pixels brighter than --threshold")
    p.add_argument("--threshold", type=float, help="0..255 for --from-image (default: Otsu's)")
    p.add_argument("--invert", action="store_true", help="with --from-image: ROI = darker pixels")
    p.set_defaults(func=cmd_roi)


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="export a model to one self-describing file for other runtimes")
    p.add_argument("model", help="model folder or run folder")
    p.add_argument("--format", choices=["onnx", "openvino"], default="onnx",
                   help="onnx: one .onnx file (default); openvino: an OpenVINO IR, .xml + .bin")
    p.add_argument("--out", help="output file (default: <model folder>.onnx, or .xml for openvino)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    p.add_argument("--int8", action="store_true",
                   help="openvino: INT8 post-training quantisation (NNCF), calibrated on the training images")
    p.add_argument("--calibration-data", help="with --int8: calibrate on these good images (a folder, or a "
                                              "dataset root with train/good) instead of the recorded training data")
    p.add_argument("--calibration-images", type=int, default=64,
                   help="with --int8: how many images calibrate (default 64, spread over the folder)")
    p.set_defaults(func=cmd_export)


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="generate a dataset, train, evaluate and show heatmaps (<= 10 min on CPU)")
    p.add_argument("--out", default="grdnet-demo")
    p.add_argument("--max-minutes", type=float, default=None, help="training time budget (default: the demo's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="REST API and inspection web page for a model (http://127.0.0.1:8000/)")
    p.add_argument("model", help="model folder, run folder, .onnx or OpenVINO .xml file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="server processes, each with its own model copy")
    p.add_argument("--api-key", help="require this key in the X-API-Key header (default: $GRDNET_API_KEY)")
    p.add_argument("--max-upload-mb", type=float, help="largest request body in MB (default: 32)")
    p.add_argument("--max-pixels", type=int, help="largest image, read from its header (default: 40000000)")
    p.add_argument("--max-files", type=int, help="most images in one /predict/batch request (default: 16)")
    p.add_argument("--max-batch", type=int, help="most images in one forward pass (default: 8)")
    p.add_argument("--queue-size", type=int, help="requests waiting for inference before 503 (default: 32)")
    p.set_defaults(func=cmd_serve)


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
