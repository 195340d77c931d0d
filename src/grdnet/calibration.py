"""`grdnet calibrate`: set a model's decision threshold from a labelled validation folder.

Training stores a threshold meant to pass 99 % of good images, estimated from the scores of good
training images held out from training (`held_out_threshold`, `quantile_threshold`; with few
images a prediction bound, not the bare empirical quantile). Where labelled defective images exist that
are *not* the test set, this module replaces it with the threshold that maximises F1 on them, or
with the quantile of that folder's good images. The test split is refused: a threshold fitted
on the test set makes every figure computed on it optimistic.

The validation folder has the layout of an MVTec AD test split, `good/` plus one folder per
defect type; masks are not needed.
"""
from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import numpy as np

from .data import list_images
from .errors import GRDNetError
from .files import write_json
from .metrics import image_metrics, threshold_metrics
from .modelfile import CONFIG, read_config
from .scoring import Predictor

log = logging.getLogger(__name__)

RULES = ("f1", "quantile")


def check_rule(rule: str) -> None:
    if rule not in RULES:
        raise GRDNetError(f"unknown threshold rule {rule!r}; choose from {', '.join(RULES)}")


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
        return quantile_threshold(good, quantile)
    check_rule(rule)
    if not (labels == 1).any() or not (labels == 0).any():
        raise GRDNetError("F1 rule needs both good and defective validation images")
    best = image_metrics(scores, labels)["image_f1_threshold"]
    below = scores[scores < best]
    return float((best + below.max()) / 2) if below.size else float(best)


def quantile_threshold(good_scores, quantile: float) -> float:
    """A threshold meant to pass the share `quantile` of good images, from good images' scores.

    The larger of two estimates: the empirical `quantile` of the scores, and the one-sided
    prediction bound for one more good image's score under a logit-normal fit,
    ``logit^-1(m + t(quantile; n-1) * s * sqrt(1 + 1/n))`` (m, s: mean and standard deviation of
    the n scores' logits; t: Student's t quantile). With few images the empirical quantile is little
    more than their maximum (the 0.99 quantile of 3 scores passes far fewer than 99 % of good images);
    the bound widens with the uncertainty of m and s. With many images the two agree where the
    logits are normal, and the empirical quantile is the larger where the tail is heavier.
    """
    scores = np.asarray(good_scores, dtype=np.float64)
    empirical = float(np.quantile(scores, quantile))
    if scores.size < 2 or quantile >= 1.0:
        return empirical
    from scipy.stats import t as student_t

    p = np.clip(scores, 1e-6, 1 - 1e-6)
    logits, n = np.log(p / (1 - p)), p.size
    bound = logits.mean() + student_t.ppf(quantile, n - 1) * logits.std(ddof=1) * np.sqrt(1 + 1 / n)
    return max(empirical, float(1 / (1 + np.exp(-bound))))


def split_train_val(paths: list[Path], fraction: float, seed: int, minimum: int = 0) -> tuple[list[Path], list[Path]]:
    """Hold out good training images for threshold calibration (never the test split): `fraction`
    of them, but at least `minimum` as long as that is at most a quarter; none from under 5 images."""
    n = len(paths)
    n_val = max(int(round(n * fraction)), min(minimum, n // 4)) if n >= 5 else 0
    order = np.random.default_rng(seed).permutation(n)
    val = sorted(paths[i] for i in order[:n_val])
    train = sorted(paths[i] for i in order[n_val:])
    return train, val


def held_out_threshold(predictor: Predictor, val_paths: list[Path], train_paths: list[Path], quantile: float,
                       batch_size: int = 16) -> dict:
    """The training-time threshold: `quantile_threshold` of the held-out good images' scores (the
    training images' when none could be held out). Documented in the model's config.json."""
    paths = val_paths or train_paths
    if not val_paths:
        log.warning("too few training images to hold out a validation split: threshold calibrated on "
                    "training images (expect more false alarms)")
    scores = np.array([p.score for p in predictor.predict(list(paths), batch_size=batch_size)])
    return {"threshold": quantile_threshold(scores, quantile),
            "threshold_rule": f"quantile {quantile} of {len(scores)} held-out good training images' scores "
                              "(the larger of the empirical quantile and a logit-normal prediction bound)",
            "val_scores": {"n": len(scores), "mean": float(scores.mean()), "max": float(scores.max()),
                           "empirical_quantile": float(np.quantile(scores, quantile))}}


def calibrate(model, val_data, rule: str = "f1", quantile: float | None = None, batch_size: int = 16,
              device: str = "cpu") -> dict:
    """Score `val_data` with `model`, set the threshold by `rule`, rewrite the model's config.json.

    `quantile` defaults to the model's training `threshold_quantile` (0.99). Returns the
    calibration record also stored in config.json under ``calibration``.
    """
    check_rule(rule)
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
    write_json(folder / CONFIG, doc)
    return record
