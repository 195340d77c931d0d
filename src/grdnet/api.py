"""The Python API: the CLI is a thin layer over these functions."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .config import ModelConfig, TrainConfig, build_config, file_section
from .errors import GRDNetError
from .scoring import BasePredictor, Predictor


def load(path, device: str = "cpu", tile: bool | str | None = None) -> BasePredictor:
    """Load a trained model for prediction: a model folder or a run folder (PyTorch `Predictor`),
    a `.onnx` file written by `grdnet export` (ONNX Runtime `OnnxPredictor`, CPU), or an `.xml`
    written by `grdnet export --format openvino` (OpenVINO `OpenVinoPredictor`, CPU).

    `tile`: score images larger than the model as overlapping tiles, or "both" whole and as
    tiles (default: as the model was trained, `TrainConfig.train_crops`); see `BasePredictor.predict`.
    """
    if Path(path).suffix.lower() == ".onnx" and not Path(path).is_dir():
        from .export import OnnxPredictor

        if str(device) != "cpu":
            raise GRDNetError(f"{path}: ONNX models run on the CPU here; load the model folder for device {device}")
        return OnnxPredictor.load(path, tile=tile)
    if Path(path).suffix.lower() == ".xml" and not Path(path).is_dir():
        from .export import OpenVinoPredictor

        if str(device) != "cpu":
            raise GRDNetError(f"{path}: OpenVINO models run on the CPU here; load the model folder for device {device}")
        return OpenVinoPredictor.load(path, tile=tile)
    return Predictor.load(path, device=device, tile=tile)


def train(data, out, preset: str = "cpu", *, steps: int | None = None, epochs: int | None = None,
          max_minutes: float | None = None, image_size: int | None = None, config_file=None, model: dict | None = None,
          train: dict | None = None, roi=None, roi_default=None, val_data=None, val_rule: str = "f1",
          **trainer_args) -> Path:
    """Train a model on `data` (MVTec AD layout: `data/train/good`) into the run folder `out`.

    Returns the model folder (None in DDP processes other than rank 0). The training length is the
    preset's (`cpu`: the longer of 2,500 optimiser steps and 120 passes over the images), or
    `steps`, or `epochs` passes (both: the longer); `max_minutes` caps it. `roi`: a folder of ROI
    masks mirroring `data`, or one mask for all images; `roi_default`: the mask for images without
    one. `model`/`train` override preset values (see `ModelConfig`, `TrainConfig`); `trainer_args`
    go to `grdnet.engine.train` (devices, precision, resume, ...).
    `val_data`: a labelled validation folder (`good/` + defect folders, never the test split);
    when given, the threshold is then set on it by `val_rule` (see `grdnet.calibration`)
    instead of the held-out good images' quantile.
    """
    from .engine import train as _train

    if val_data is not None:
        from .calibration import check_rule, labelled_images

        check_rule(val_rule)
        if not labelled_images(val_data):  # fail before training, not after it
            raise GRDNetError(f"{val_data}: no images found in the validation folder")

    model_cfg, train_cfg = resolve_config(data, preset, steps=steps, epochs=epochs, max_minutes=max_minutes,
                                          image_size=image_size, config_file=config_file, model=model, train=train)
    folder = _train(data, out, model_cfg, train_cfg, roi=roi, roi_default=roi_default, **trainer_args)
    if val_data is not None:
        from lightning.pytorch.utilities import rank_zero_only

        if rank_zero_only.rank == 0:  # under DDP only rank 0 has written the model
            from .calibration import calibrate

            calibrate(folder, val_data, val_rule)
    return folder


def resolve_config(data=None, preset: str = "cpu", *, steps: int | None = None, epochs: int | None = None,
                   max_minutes: float | None = None, image_size: int | None = None, config_file=None,
                   model: dict | None = None, train: dict | None = None) -> tuple[ModelConfig, TrainConfig]:
    """The configuration `train` would use: the preset, then `config_file` (JSON, YAML or a run's
    run.json), then the explicit overrides; the image channels from `data` unless a layer sets them."""
    model, train = dict(model or {}), dict(train or {})
    if image_size is not None:
        model["image_size"] = image_size
    for key, value in (("steps", steps), ("epochs", epochs), ("max_minutes", max_minutes)):
        if value is not None:
            train[key] = value
    model_cfg, train_cfg = build_config(preset, model, train, config_file)
    if data is not None and "channels" not in model and "channels" not in file_section(config_file, "model"):
        from .data import infer_channels, train_images
        model_cfg = dataclasses.replace(model_cfg, channels=infer_channels(train_images(data)))
    return model_cfg, train_cfg


def predict(model, images, *, threshold: float | None = None, pixel_threshold: float | None = None, roi=None,
            tile: bool | str | None = None, batch_size: int = 16, device: str = "cpu"):
    """Load `model` (as `load` does) and score `images`: a path, array or PIL image gives one
    `Prediction`, a list gives a list. Loading once and calling `predict` on the loaded model is
    faster for many calls."""
    return load(model, device=device, tile=tile).predict(images, threshold=threshold, batch_size=batch_size,
                                                         roi=roi, pixel_threshold=pixel_threshold)


def test(model, data, *, out=None, threshold: float | None = None, pixel_threshold: float | None = None, roi=None,
         roi_default=None, allow_missing_masks: bool = False, tile: bool | str | None = None, gallery_size: int = 6,
         device: str = "cpu") -> dict:
    """Evaluate `model` on `data/test` with its ground truth (what `grdnet test` does); returns the
    report dict (metrics overall and per defect type, per-image rows, region-level figures). With
    `out`, also writes the report folder (report.json, images.csv, curves, gallery, index.html)."""
    from .evaluation import run_test
    from .report import write_report

    predictor = load(model, device=device, tile=tile)
    if pixel_threshold is not None:
        predictor.pixel_threshold = pixel_threshold
    if out is not None:
        return write_report(predictor, data, out, model_path=model, threshold=threshold,
                            allow_missing_masks=allow_missing_masks, gallery_size=gallery_size, roi=roi,
                            roi_default=roi_default)
    return run_test(predictor, data, threshold=threshold, allow_missing_masks=allow_missing_masks, roi=roi,
                    roi_default=roi_default)


def calibrate(model, val_data, rule: str = "f1", quantile: float | None = None) -> dict:
    """Set a model folder's threshold on a labelled validation folder (`good/` + defect folders,
    never the test split) by `rule` ("f1" or "quantile"); rewrites its config.json and returns the
    calibration record."""
    from .calibration import calibrate as _calibrate

    return _calibrate(model, val_data, rule=rule, quantile=quantile)
