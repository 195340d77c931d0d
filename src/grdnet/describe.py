"""One description of a loaded model, for the service's `GET /model` and the report's model section."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any


def describe_model(predictor, path=None) -> dict[str, Any]:
    """Which model `predictor` (a `Predictor` or `OnnxPredictor`) is: its metadata (threshold
    and its rule, calibration, training summary, ...) with, on top, its id, folder (`path`: its
    model folder, or None), input, score kernel, the training summary's main figures and the
    whole config."""
    config = dataclasses.asdict(predictor.cfg)
    # Plain JSON values (tuples as lists, dates as text), as the service sends them and the id hashes them.
    meta = json.loads(json.dumps(predictor.meta or {}, default=str))
    training = meta.get("training") if isinstance(meta.get("training"), dict) else {}
    # The id is derived from the model alone, so every process serving it reports the same one;
    # the training data folder counts by its name only (the id `GET /model` has always shown).
    hashed = meta
    if training.get("data"):
        hashed = {**meta, "training": {**training, "data": Path(str(training["data"])).name}}
    ident = hashlib.sha256(json.dumps({"model": config, **hashed}, sort_keys=True, default=str).encode())
    cfg = predictor.cfg
    return {**meta, "model_id": ident.hexdigest()[:12], "path": None if path is None else str(Path(path).resolve()),
            "image_size": cfg.image_size, "channels": cfg.channels, "aspect": cfg.aspect,
            "score_kernel": cfg.score_kernel, "flip_average": cfg.flip_average, "gan": cfg.gan,
            "threshold": predictor.threshold, "threshold_rule": meta.get("threshold_rule"),
            "pixel_threshold": getattr(predictor, "pixel_threshold", None),  # None: the image threshold
            "calibration": meta.get("calibration"), "trained_on": training.get("data"),
            "trained_until": training.get("finished"), "epochs": training.get("epochs"),
            "steps": training.get("steps"), "config": config}
