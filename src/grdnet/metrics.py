"""Image- and pixel-level anomaly-detection metrics (MVTec AD protocol).

Image level: AUROC, average precision (AP), F1-max and fixed-threshold scores.
Pixel level: AUROC, AP and AUPRO (area under the per-region-overlap curve up to
a false-positive-rate limit, Bergmann et al., "The MVTec Anomaly Detection
Dataset", IJCV 2021), accumulated map by map so that thousands of
full-resolution maps fit in memory.

Every curve metric is computed from "threshold groups": the distinct score
values (or histogram bins) in descending order, with how many positives and
negatives fall in each. Lowering the threshold past a group turns the whole
group positive at once, which is how ties are handled (the same convention as
scikit-learn, so the exact-mode numbers equal ``roc_auc_score`` and
``average_precision_score``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = ["image_metrics", "image_curves", "threshold_metrics", "PixelMetrics", "evaluate"]

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# --------------------------------------------------------------------------- helpers


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    # Own implementation: np.trapz/np.trapezoid changed names across numpy 1.x/2.x.
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) * 0.5))


def _groups_desc(values: np.ndarray, *weights: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Distinct values in descending order and the per-value sums of each weight array."""
    uniq, inverse = np.unique(values, return_inverse=True)
    sums = [np.bincount(inverse.ravel(), weights=w, minlength=uniq.size)[::-1] for w in weights]
    return uniq[::-1], sums


def _auroc(tp: np.ndarray, fp: np.ndarray) -> float | None:
    n_pos, n_neg = tp[-1], fp[-1]
    if n_pos == 0 or n_neg == 0:
        return None
    return _trapezoid(np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos])


def _average_precision(tp: np.ndarray, fp: np.ndarray) -> float | None:
    n_pos, n_neg = tp[-1], fp[-1]
    if n_pos == 0 or n_neg == 0:
        return None
    predicted = tp + fp
    # Empty groups (unused bins) have no recall step, so their precision is irrelevant.
    precision = np.divide(tp, predicted, out=np.ones_like(tp), where=predicted > 0)
    return float(np.sum(np.diff(np.r_[0.0, tp]) / n_pos * precision))


def _curves(pos: np.ndarray, neg: np.ndarray) -> dict[str, np.ndarray] | None:
    """ROC and precision-recall points from per-group counts (highest threshold first).

    Groups without any pixel or image (unused bins) add no point. None without both classes.
    """
    used = (pos + neg) > 0
    tp, fp = np.cumsum(pos[used]), np.cumsum(neg[used])
    if tp.size == 0 or tp[-1] == 0 or fp[-1] == 0:
        return None
    return {"fpr": np.r_[0.0, fp / fp[-1]], "tpr": np.r_[0.0, tp / tp[-1]],
            "recall": tp / tp[-1], "precision": tp / (tp + fp)}


def _pro_curve(fp: np.ndarray, pro_mass: np.ndarray, n_regions: int) -> tuple[np.ndarray, np.ndarray]:
    return np.r_[0.0, fp / fp[-1]], np.r_[0.0, pro_mass / n_regions]


def _aupro(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    # fpr is non-decreasing and starts at 0, so x[:i] is the part of the curve within the limit
    # and x[i - 1] <= fpr_limit < x[i] makes the interpolation well defined.
    i = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x, y = fpr[:i], pro[:i]
    if i < fpr.size:
        y_lim = pro[i - 1] + (pro[i] - pro[i - 1]) * (fpr_limit - fpr[i - 1]) / (fpr[i] - fpr[i - 1])
        x, y = np.r_[x, fpr_limit], np.r_[y, y_lim]
    return _trapezoid(x, y) / fpr_limit


def _box_bound(x: np.ndarray, y: np.ndarray, x_limit: float) -> float:
    """Largest possible area change when each segment of a monotone curve is replaced.

    Between two consecutive binned points the exact curve is some monotone path inside
    the box they span; a full box can move the area by at most half its size relative
    to the chord, a box cut by ``x_limit`` by at most its whole (cut) size.
    """
    width = np.clip(np.minimum(x[1:], x_limit) - x[:-1], 0.0, None)
    factor = np.where(x[1:] <= x_limit, 0.5, 1.0)
    return float(np.sum(width * np.diff(y) * factor) / x_limit)


def _as_labels(labels: Any, n: int) -> np.ndarray:
    labels = np.asarray(labels).ravel()
    if labels.size != n:
        raise ValueError(f"scores and labels differ in length: {n} vs {labels.size}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (good) or 1 (defective)")
    return labels.astype(bool)


def _as_scores(scores: Any) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    return scores


# --------------------------------------------------------------------------- image level


def image_metrics(scores: Any, labels: Any) -> dict[str, float | None]:
    """Threshold-free image-level metrics.

    Args:
        scores: one anomaly score per image (any range; higher means more anomalous).
        labels: 0 (good) or 1 (defective) per image.

    Returns:
        ``image_auroc`` and ``image_ap`` (equal to scikit-learn's ``roc_auc_score`` and
        ``average_precision_score``, ties included; None when only one class is present),
        ``image_f1_max`` (best F1 over all thresholds) and ``image_f1_threshold`` (the
        score threshold reaching it with the rule ``score >= threshold``; the highest such
        threshold if several tie; both None when there is no defective image).
    """
    scores = _as_scores(scores)
    labels = _as_labels(labels, scores.size)
    result: dict[str, float | None] = dict.fromkeys(
        ("image_auroc", "image_ap", "image_f1_max", "image_f1_threshold")
    )
    if scores.size == 0:
        return result
    thresholds, (pos, neg) = _groups_desc(scores, labels.astype(np.float64), (~labels).astype(np.float64))
    tp, fp = np.cumsum(pos), np.cumsum(neg)
    result["image_auroc"] = _auroc(tp, fp)
    result["image_ap"] = _average_precision(tp, fp)
    n_pos = tp[-1]
    if n_pos > 0:
        # F1 = 2TP / (2TP + FP + FN) = 2TP / (TP + FP + P)
        f1 = 2.0 * tp / (tp + fp + n_pos)
        best = int(np.argmax(f1))
        result["image_f1_max"] = float(f1[best])
        result["image_f1_threshold"] = float(thresholds[best])
    return result


def image_curves(scores: Any, labels: Any) -> dict[str, np.ndarray] | None:
    """Image-level ROC (``fpr``, ``tpr``, from (0, 0)) and precision-recall (``recall``,
    ``precision``) points, one per distinct score, highest first. None unless both classes occur."""
    scores = _as_scores(scores)
    labels = _as_labels(labels, scores.size)
    if scores.size == 0:
        return None
    _, (pos, neg) = _groups_desc(scores, labels.astype(np.float64), (~labels).astype(np.float64))
    return _curves(pos, neg)


def threshold_metrics(scores: Any, labels: Any, threshold: float) -> dict[str, float | int]:
    """Confusion counts and precision/recall/F1 at a fixed threshold (``score >= threshold``).

    Precision, recall and F1 are 0.0 where their denominator is zero.
    """
    scores = _as_scores(scores)
    labels = _as_labels(labels, scores.size)
    predicted = scores >= threshold
    tp = int(np.sum(predicted & labels))
    fp = int(np.sum(predicted & ~labels))
    fn = int(np.sum(~predicted & labels))
    tn = int(np.sum(~predicted & ~labels))
    return {
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "threshold": float(threshold),
    }


# --------------------------------------------------------------------------- pixel level


class PixelMetrics:
    """Accumulates anomaly maps and ground-truth masks for pixel AUROC, AP and AUPRO.

    Args:
        bins: ``None`` for exact mode, which keeps every (in-ROI) pixel value and is meant for
            small data and tests. Otherwise map values are clipped to [0, 1] and counted in
            ``bins`` equal bins, so memory stays O(bins) whatever the number of maps.
        fpr_limit: upper false-positive-rate limit of the AUPRO integral, in (0, 1].

    Binned mode gives exactly the metrics of the maps with every value rounded down to a
    multiple of ``error_bound`` (= 1 / bins): the ROC, precision-recall and PRO curves are
    the exact curves sampled only at thresholds ``k * error_bound``. How much that can move
    each metric depends on how many pixels share a bin; :meth:`binning_error_bounds` states
    it for the accumulated data.

    The PRO curve keeps, instead of one histogram per ground-truth region, one histogram of
    ``1 / region size`` per pixel: the mean over regions of the fraction of each region above
    a threshold is the sum of that histogram above the threshold divided by the number of
    regions, so it is the same number without memory growing with the region count.
    """

    def __init__(self, bins: int | None = 10_000, fpr_limit: float = 0.3) -> None:
        if bins is not None and (int(bins) != bins or bins < 1):
            raise ValueError(f"bins must be a positive integer or None, got {bins!r}")
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")
        self.bins = None if bins is None else int(bins)
        self.fpr_limit = float(fpr_limit)
        self.n_regions = 0
        self.n_maps = 0
        if self.bins is None:
            self._values: list[np.ndarray] = []
            self._positive: list[np.ndarray] = []
            self._region_weight: list[np.ndarray] = []
        else:
            self._pos_hist = np.zeros(self.bins, dtype=np.int64)
            self._neg_hist = np.zeros(self.bins, dtype=np.int64)
            self._pro_hist = np.zeros(self.bins, dtype=np.float64)

    @property
    def error_bound(self) -> float:
        """Bin width (0.0 in exact mode): the most any map value is moved by binning.

        It bounds the threshold resolution, not the metrics directly: binned results are the
        exact results for maps quantised to this step. See :meth:`binning_error_bounds`.
        """
        return 0.0 if self.bins is None else 1.0 / self.bins

    def update(self, anomaly_map: Any, mask: Any, roi: Any = None) -> None:
        """Add one image.

        Args:
            anomaly_map: (H, W) float array, values in [0, 1].
            mask: (H, W) ground truth, non-zero/True where defective.
            roi: optional (H, W) bool array; only pixels inside it count, and each
                ground-truth region (8-connected component of ``mask``) is cut to it.
                A region with no pixel inside the ROI is not counted.
        """
        anomaly_map = np.asarray(anomaly_map, dtype=np.float64)
        mask = np.asarray(mask).astype(bool)
        if anomaly_map.ndim != 2:
            raise ValueError(f"anomaly map must be 2-D (H, W), got shape {anomaly_map.shape}")
        if mask.shape != anomaly_map.shape:
            raise ValueError(f"mask shape {mask.shape} differs from anomaly map shape {anomaly_map.shape}")
        if roi is not None:
            roi = np.asarray(roi).astype(bool)
            if roi.shape != anomaly_map.shape:
                raise ValueError(f"roi shape {roi.shape} differs from anomaly map shape {anomaly_map.shape}")
        if not np.isfinite(anomaly_map).all():
            raise ValueError("anomaly map contains NaN or infinite values")

        regions, n_labels = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        if roi is not None:
            regions = np.where(roi, regions, 0)
        sizes = np.bincount(regions.ravel(), minlength=n_labels + 1)[1:]
        kept = sizes > 0
        weight_of_label = np.zeros(n_labels + 1)
        weight_of_label[1:][kept] = 1.0 / sizes[kept]

        if roi is None:
            values, region_ids = anomaly_map.ravel(), regions.ravel()
        else:
            values, region_ids = anomaly_map[roi], regions[roi]
        positive = region_ids > 0
        weight = weight_of_label[region_ids]

        self.n_regions += int(kept.sum())
        self.n_maps += 1
        if self.bins is None:
            self._values.append(values.copy())
            self._positive.append(positive)
            self._region_weight.append(weight)
        else:
            index = np.minimum((np.clip(values, 0.0, 1.0) * self.bins).astype(np.int64), self.bins - 1)
            self._pos_hist += np.bincount(index[positive], minlength=self.bins)
            self._neg_hist += np.bincount(index[~positive], minlength=self.bins)
            self._pro_hist += np.bincount(index, weights=weight, minlength=self.bins)

    def merge(self, other: PixelMetrics) -> PixelMetrics:
        """A new accumulator holding the data of both (neither input is changed).

        Exact-mode arrays are shared, not copied.
        """
        if (self.bins, self.fpr_limit) != (other.bins, other.fpr_limit):
            raise ValueError(
                f"cannot merge PixelMetrics(bins={self.bins}, fpr_limit={self.fpr_limit}) with "
                f"PixelMetrics(bins={other.bins}, fpr_limit={other.fpr_limit})"
            )
        merged = PixelMetrics(self.bins, self.fpr_limit)
        merged.n_regions = self.n_regions + other.n_regions
        merged.n_maps = self.n_maps + other.n_maps
        if self.bins is None:
            merged._values = self._values + other._values
            merged._positive = self._positive + other._positive
            merged._region_weight = self._region_weight + other._region_weight
        else:
            merged._pos_hist = self._pos_hist + other._pos_hist
            merged._neg_hist = self._neg_hist + other._neg_hist
            merged._pro_hist = self._pro_hist + other._pro_hist
        return merged

    def _groups(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Positive count, negative count and PRO mass per threshold group, highest first."""
        if self.bins is not None:
            return (
                self._pos_hist[::-1].astype(np.float64),
                self._neg_hist[::-1].astype(np.float64),
                self._pro_hist[::-1],
            )
        if not self._values:
            return None
        positive = np.concatenate(self._positive)
        _, (pos, neg, pro) = _groups_desc(
            np.concatenate(self._values),
            positive.astype(np.float64),
            (~positive).astype(np.float64),
            np.concatenate(self._region_weight),
        )
        return pos, neg, pro

    def compute(self) -> dict[str, float | None]:
        """``pixel_auroc``, ``pixel_ap`` and ``aupro``.

        AUROC and AP are None unless both normal and defective pixels were seen; AUPRO is
        None without normal pixels or ground-truth regions. AUPRO is the area under the PRO
        curve from FPR 0 to ``fpr_limit`` (interpolated there) divided by ``fpr_limit``:
        1.0 for a perfect map, ``fpr_limit / 2`` for a constant map.
        """
        result: dict[str, float | None] = {"pixel_auroc": None, "pixel_ap": None, "aupro": None}
        groups = self._groups()
        if groups is None:
            return result
        pos, neg, pro = groups
        tp, fp = np.cumsum(pos), np.cumsum(neg)
        if tp[-1] + fp[-1] == 0:
            return result
        result["pixel_auroc"] = _auroc(tp, fp)
        result["pixel_ap"] = _average_precision(tp, fp)
        if fp[-1] > 0 and self.n_regions > 0:
            fpr, pro_curve = _pro_curve(fp, np.cumsum(pro), self.n_regions)
            result["aupro"] = _aupro(fpr, pro_curve, self.fpr_limit)
        return result

    def curves(self) -> dict[str, np.ndarray] | None:
        """Pixel-level ROC and precision-recall points (see :func:`image_curves`); None unless
        both normal and defective pixels were seen. In binned mode, one point per used bin."""
        groups = self._groups()
        return None if groups is None else _curves(groups[0], groups[1])

    def binning_error_bounds(self) -> dict[str, float | None]:
        """Largest possible |binned - exact| for each metric, given the accumulated histograms.

        0.0 in exact mode; None where the metric itself is undefined. The bounds come from
        pixels sharing a bin, whose order the histograms no longer know:

        - ``pixel_auroc``: half the fraction of (defective, normal) pixel pairs in the same bin.
        - ``pixel_ap``: sum over bins of (defective pixels in the bin / all defective) times the
          spread between the best and worst precision any order within the bin could give.
        - ``aupro``: the exact PRO curve between two binned points is a monotone path in the
          box they span; the sum of those boxes' possible area changes, divided by fpr_limit.
        """
        values = self.compute()
        bounds: dict[str, float | None] = {
            key: (None if values[key] is None else 0.0) for key in ("pixel_auroc", "pixel_ap", "aupro")
        }
        if self.bins is None:
            return bounds
        pos, neg, pro = self._groups()
        tp, fp = np.cumsum(pos), np.cumsum(neg)
        if values["pixel_auroc"] is not None:
            fpr, tpr = np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]]
            bounds["pixel_auroc"] = _box_bound(fpr, tpr, 1.0)
            seen_before = tp + fp - pos - neg
            tp_before = tp - pos
            hit = pos > 0
            # Best case: the bin's positives ranked before its negatives; worst case: the
            # first positive ranked after all of them. The binned value lies in between.
            best = tp[hit] / (seen_before[hit] + pos[hit])
            worst = (tp_before[hit] + 1) / (seen_before[hit] + 1 + neg[hit])
            bounds["pixel_ap"] = float(np.sum(pos[hit] / tp[-1] * (best - worst)))
        if values["aupro"] is not None:
            fpr, pro_curve = _pro_curve(fp, np.cumsum(pro), self.n_regions)
            bounds["aupro"] = _box_bound(fpr, pro_curve, self.fpr_limit)
        return bounds


# --------------------------------------------------------------------------- whole evaluation


def evaluate(
    records: Iterable[Mapping[str, Any]], bins: int | None = 10_000, fpr_limit: float = 0.3,
    details: bool = False,
) -> dict[str, Any]:
    """Image and pixel metrics over a stream of test images, overall and per defect type.

    Args:
        records: dicts with ``score`` (float), ``label`` (0/1), ``defect_type`` (``"good"``
            exactly for label 0), and optionally ``map``, ``mask``, ``roi`` ((H, W) arrays).
            A record without ``map`` counts for image metrics only; a good image may omit
            ``mask`` (taken as all normal), a defective one with a map may not.
        bins: passed to :class:`PixelMetrics` (None for exact mode).
        fpr_limit: AUPRO integration limit.
        details: also return, under ``"details"``, for ``"overall"`` and each type in
            ``"per_type"``: ``binning_error_bounds`` (:meth:`PixelMetrics.binning_error_bounds`),
            ``image_curves`` (:func:`image_curves`) and ``pixel_curves``
            (:meth:`PixelMetrics.curves`).

    Returns:
        ``{"overall": metrics, "per_type": {defect_type: metrics}}`` where metrics holds the
        keys of :func:`image_metrics` and :meth:`PixelMetrics.compute` plus ``n_images``.
        Each defect type is scored against all good images (the usual MVTec AD per-category
        breakdown), so its ``n_images`` counts its own images plus the good ones.
    """
    good, by_type = _accumulate(records, bins, fpr_limit)
    names = sorted(by_type)
    per_type = {
        name: _summarize(good.scores, by_type[name].scores, good.pixels.merge(by_type[name].pixels), details)
        for name in names
    }
    all_pixels = good.pixels
    for name in names:
        all_pixels = all_pixels.merge(by_type[name].pixels)
    all_defective = [s for name in names for s in by_type[name].scores]
    overall = _summarize(good.scores, all_defective, all_pixels, details)
    result: dict[str, Any] = {"overall": overall[0], "per_type": {k: v[0] for k, v in per_type.items()}}
    if details:
        result["details"] = {"overall": overall[1], "per_type": {k: v[1] for k, v in per_type.items()}}
    return result


@dataclass
class _Group:
    """The scores and pixel accumulator of one group of images: the good ones, or one defect type's."""

    scores: list[float]
    pixels: PixelMetrics


def _accumulate(
    records: Iterable[Mapping[str, Any]], bins: int | None, fpr_limit: float,
) -> tuple[_Group, dict[str, _Group]]:
    """Read the records once, into the good images' group and one group per defect type."""
    # Good images go in one accumulator that is merged into every type's at the end: each map
    # is binned once, and a type first seen after some good images still gets all of them.
    good = _Group([], PixelMetrics(bins, fpr_limit))
    by_type: dict[str, _Group] = {}
    for i, record in enumerate(records):
        label, defect_type = record["label"], str(record["defect_type"])
        if label not in (0, 1) or (label == 0) != (defect_type == "good"):
            raise ValueError(
                f"record {i}: label {label} does not fit defect_type {defect_type!r} "
                "(good images must have label 0 and defect_type 'good')"
            )
        if label == 0:
            group = good
        else:
            group = by_type.setdefault(defect_type, _Group([], PixelMetrics(bins, fpr_limit)))
        group.scores.append(float(record["score"]))
        anomaly_map = record.get("map")
        if anomaly_map is not None:
            mask = record.get("mask")
            if mask is None:
                if label == 1:
                    raise ValueError(f"record {i}: defective image has an anomaly map but no mask")
                mask = np.zeros(np.shape(anomaly_map), dtype=bool)
            group.pixels.update(anomaly_map, mask, record.get("roi"))
    return good, by_type


def _summarize(good_scores: list[float], defective_scores: list[float], pixels: PixelMetrics,
               details: bool) -> tuple[dict, dict]:
    """The metrics of the good images against `defective_scores`, `pixels` holding the maps of
    both; and, with `details`, their error bounds and curves (else an empty dict)."""
    labels = np.r_[np.zeros(len(good_scores)), np.ones(len(defective_scores))]
    scores = good_scores + defective_scores
    metrics = {**image_metrics(scores, labels), **pixels.compute(), "n_images": len(labels)}
    extra = {}
    if details:
        extra = {"binning_error_bounds": pixels.binning_error_bounds(),
                 "image_curves": image_curves(scores, labels), "pixel_curves": pixels.curves()}
    return metrics, extra
