"""The Python API: the CLI is a thin layer over these functions."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .config import build_config, file_section
from .scoring import Predictor


def load(path, device: str = "cpu") -> Predictor:
    """Load a trained model (a model folder or a run folder) for prediction."""
    return Predictor.load(path, device=device)


def train(data, out, preset: str = "cpu", *, epochs: int | None = None, max_minutes: float | None = None,
          image_size: int | None = None, config_file=None, model: dict | None = None,
          train: dict | None = None, **trainer_args) -> Path:
    """Train a model on `data` (MVTec AD layout: `data/train/good`) into the run folder `out`.

    Returns the model folder (None in DDP processes other than rank 0). `model`/`train` override
    preset values (see `ModelConfig`, `TrainConfig`); `trainer_args` go to
    `grdnet.training.train` (devices, precision, resume, ...).
    """
    from .training import train as _train

    model, train = dict(model or {}), dict(train or {})
    if image_size is not None:
        model["image_size"] = image_size
    if epochs is not None:
        train["epochs"] = epochs
    if max_minutes is not None:
        train["max_minutes"] = max_minutes
    model_cfg, train_cfg = build_config(preset, model, train, config_file)
    if "channels" not in model and "channels" not in file_section(config_file, "model"):
        from .data import infer_channels, train_images
        model_cfg = dataclasses.replace(model_cfg, channels=infer_channels(train_images(data)))
    return _train(data, out, model_cfg, train_cfg, **trainer_args)
