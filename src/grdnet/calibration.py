"""`grdnet calibrate`: set a model's decision threshold from a labelled validation folder.

Training already stores a threshold: the 0.99 quantile of the scores of good training images held
out from training (`training.calibrate_threshold`). Where labelled defective images exist that
are *not* the test set, this module replaces it with the threshold that maximises F1 on them, or
with the quantile of that folder's good images. The test split is refused: a threshold fitted
on the test set makes every figure computed on it optimistic.

The validation folder has the layout of an MVTec AD test split, `good/` plus one folder per
defect type; masks are not needed.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .data import list_images
from .errors import GRDNetError
from .metrics import image_metrics, threshold_metrics
from .modelfile import CONFIG, read_config

RULES = ("f1", "quantile")


def labelled_images(folder) -> list[tuple[Path, int]]:
    """(path, label) for every image of a validation folder: `good/*` are 0, other sub-folders 1."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GRDNetError(f"{folder}: no such validation folder")
    if not (folder / "good").is_dir():
        hint = (" (it looks like a dataset root: pass a folder laid out like its test split, never "
                "the test split itself)" if (folder / "test").is_dir() else "")
        raise GRDNetError(f"{folder}: validation folder has no good/ sub-folder{hint}")
    if folder.name == "test" and (folder.parent / "train").is_dir():
        raise GRDNetError(f"{folder}: this is a dataset's test split; calibrating on it would leak the "
                          "test set into the threshold (use a separate validation folder)")
    items = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        items += [(p, int(sub.name != "good")) for p in list_images(sub)]
    return items


def choose_threshold(scores, labels, rule: str = "f1", quantile: float = 0.99) -> float:
    """The threshold (decision: ``score >= threshold``) for `rule`.

    ``f1``: the threshold maximising F1 on these scores, placed midway between the lowest score
    it flags and the next lower score, so that the validation decisions are the same but the
    boundary sits in the gap rather than on a validation image. ``quantile``: the `quantile`
    of the good images' scores.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    if rule == "quantile":
        good = scores[labels == 0]
        if good.size == 0:
            raise GRDNetError("quantile rule needs good validation images (none found)")
        return float(np.quantile(good, quantile))
    if rule != "f1":
        raise GRDNetError(f"unknown threshold rule {rule!r}; choose from {', '.join(RULES)}")
    if not (labels == 1).any() or not (labels == 0).any():
        raise GRDNetError("F1 rule needs both good and defective validation images")
    best = image_metrics(scores, labels)["image_f1_threshold"]
    below = scores[scores < best]
    return float((best + below.max()) / 2) if below.size else float(best)


def _write_config_atomically(folder: Path, doc: dict) -> None:
    # A crash mid-write must never leave a half-written config.json: write beside it, then rename.
    fd, tmp = tempfile.mkstemp(prefix=f".{CONFIG}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(doc, indent=2, default=str))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / CONFIG)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def calibrate(model, val_data, rule: str = "f1", quantile: float | None = None, batch_size: int = 16,
              device: str = "cpu") -> dict:
    """Score `val_data` with `model`, set the threshold by `rule`, rewrite the model's config.json.

    `quantile` defaults to the model's training `threshold_quantile` (0.99). Returns the
    calibration record also stored in config.json under ``calibration``.
    """
    from .scoring import Predictor

    if rule not in RULES:
        raise GRDNetError(f"unknown threshold rule {rule!r}; choose from {', '.join(RULES)}")
    folder, doc = read_config(model)
    val = Path(val_data).resolve()
    trained_on = doc.get("training", {}).get("data")
    if trained_on and val == (Path(trained_on) / "test").resolve():
        raise GRDNetError(f"{val_data}: this is the training dataset's test split; calibrating on it would "
                          "leak the test set into the threshold")
    items = labelled_images(val)
    if not items:
        raise GRDNetError(f"{val_data}: no images found in the validation folder")
    if quantile is None:
        quantile = doc.get("training", {}).get("train_config", {}).get("threshold_quantile", 0.99)
    if not 0.0 < quantile <= 1.0:
        raise GRDNetError(f"quantile must be in (0, 1], got {quantile}")

    predictor = Predictor.load(folder, device=device)
    paths = [p for p, _ in items]
    labels = np.array([y for _, y in items])
    scores = np.array([p.score for p in predictor.predict(paths, batch_size=batch_size)])
    threshold = choose_threshold(scores, labels, rule, quantile)
    n_good, n_bad = int((labels == 0).sum()), int((labels == 1).sum())
    at = threshold_metrics(scores, labels, threshold)
    if rule == "f1":
        text = f"F1-optimal on labelled validation folder {val} ({n_good} good, {n_bad} defective images)"
    else:
        text = f"quantile {quantile} of {n_good} good images' scores in validation folder {val}"
    record = {
        "rule": rule, "quantile": quantile if rule == "quantile" else None, "data": str(val),
        "n_good": n_good, "n_defective": n_bad, "threshold": threshold,
        "validation_at_threshold": {k: at[k] for k in ("precision", "recall", "f1", "tp", "fp", "tn", "fn")},
        "previous": {"threshold": doc.get("threshold"), "threshold_rule": doc.get("threshold_rule")},
        "date": dt.datetime.now().isoformat(timespec="seconds"),
    }
    doc.update(threshold=threshold, threshold_rule=text, calibration=record)
    _write_config_atomically(folder, doc)
    return record
