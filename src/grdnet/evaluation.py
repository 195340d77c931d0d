"""`grdnet test`: score a test split, compute the metric suite, write the report."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from .data import image_size_of, load_mask, test_samples
from .roi import find_rois, roi_for_image
from .metrics import evaluate, threshold_metrics
from .regions import RegionTally
from .scoring import BasePredictor

log = logging.getLogger(__name__)


def run_test(predictor: BasePredictor, data, threshold: float | None = None, batch_size: int = 16,
             allow_missing_masks: bool = False, on_result=None, bins: int | None = 10_000,
             curves: bool = False, roi=None, roi_default=None) -> dict:
    """Evaluate `predictor` on `data/test` (MVTec AD layout); returns the report dict.

    `on_result(sample, prediction, mask)` is called for every image as it is scored (reports,
    galleries) so that full-resolution maps are never all held in memory.

    Pixel metrics come from `bins`-bin histograms (None: exact, for small data); the report's
    `binning` entry states the largest possible difference from the exact values. With
    `curves`, the report also holds the ROC and precision-recall points (numpy arrays) under
    `curves` (`overall` and `per_type`, each with `image` and `pixel`). With masks, `regions` holds
    region-level figures at the predictor's pixel threshold (`regions.RegionTally`).
    """
    samples = test_samples(data, allow_missing_masks=allow_missing_masks)
    roi_paths = find_rois([s.path for s in samples], data, roi, roi_default) if roi else [None] * len(samples)
    thr = predictor.threshold if threshold is None else threshold
    has_masks = any(s.mask_path is not None for s in samples)
    rows: list[dict] = []  # one per image, filled while `evaluate` consumes the stream
    tally = RegionTally()
    records = _scored_records(predictor, samples, roi_paths, thr, batch_size, has_masks, rows, on_result, tally)
    result = evaluate(records, bins=bins, details=True)
    overall = result["overall"]
    details = result["details"]
    scores = np.array([r["score"] for r in rows])
    labels = np.array([r["label"] for r in rows])
    report = {
        "data": str(Path(data).resolve()),
        "n_images": len(rows),
        "n_defective": int(labels.sum()),
        "image_auroc": overall.get("image_auroc"),
        "pixel_auroc": overall.get("pixel_auroc") if has_masks else None,
        "metrics": overall,
        "per_type": result["per_type"],
        "roi": {"source": str(roi), "default": str(roi_default) if roi_default else None,
                "note": "maps multiplied by the ROI; pixel metrics over ROI pixels only"} if roi else None,
        "threshold": thr,
        "threshold_source": "override" if threshold is not None else predictor.meta.get("threshold_rule"),
        "at_threshold": threshold_metrics(scores, labels, thr) if thr is not None else None,
        "regions": {"pixel_threshold": predictor.pixel_threshold_for(thr), **tally.figures()}
        if has_masks and predictor.pixel_threshold_for(thr) is not None else None,
        "binning": _binning(bins, details),
        "images": rows,
    }
    if curves:
        report["curves"] = _curves(details)
    return report


def _scored_records(predictor: BasePredictor, samples: list, roi_paths: list, threshold: float | None,
                    batch_size: int, has_masks: bool, rows: list[dict], on_result, tally: RegionTally):
    """Score `samples` batch by batch and yield `evaluate`'s records; append each image's row
    to `rows` and call `on_result` on the way. Nothing outlives its batch but the rows."""
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        rois = [None if r is None else roi_for_image(r, image_size_of(s.path)[::-1])
                for s, r in zip(chunk, roi_paths[start:start + batch_size])]
        preds = predictor.predict([s.path for s in chunk], threshold=threshold, batch_size=batch_size, roi=rois)
        for s, p, r in zip(chunk, preds, rois):
            mask = None
            # No mask in the whole split, or none for this defective image (allow_missing_masks):
            # the image counts for image metrics only. A good image's mask is all normal.
            if has_masks and (s.label == 0 or s.mask_path is not None):
                h, w = p.anomaly_map.shape
                mask = load_mask(s.mask_path, (w, h)) if s.mask_path else np.zeros((h, w), bool)
                if p.defect_mask is not None:
                    tally.add(p.defect_mask, mask if r is None else mask & r)
            rows.append({"path": str(s.path), "defect_type": s.defect_type, "label": s.label,
                         "score": p.score, "decision": int(p.is_anomalous)})
            if on_result is not None:
                on_result(s, p, mask)
            yield {"score": p.score, "label": s.label, "defect_type": s.defect_type,
                   "map": p.anomaly_map if mask is not None else None, "mask": mask, "roi": r}


def _binning(bins: int | None, details: dict) -> dict:
    """The report's `binning` entry: the histogram resolution and the error bounds it implies."""
    return {
        "bins": bins,
        "value_step": 0.0 if bins is None else 1.0 / bins,
        "error_bounds": {"overall": details["overall"]["binning_error_bounds"],
                         "per_type": {t: d["binning_error_bounds"] for t, d in details["per_type"].items()}},
    }


def _curves(details: dict) -> dict:
    """The report's `curves` entry: image and pixel curve points, overall and per defect type."""
    def pick(d):
        return {"image": d["image_curves"], "pixel": d["pixel_curves"]}

    return {"overall": pick(details["overall"]), "per_type": {t: pick(d) for t, d in details["per_type"].items()}}


def summary_lines(report: dict) -> list[str]:
    m = report["metrics"]

    def f(v):
        return "n/a" if v is None else f"{v:.4f}"

    lines = [f"images: {report['n_images']} ({report['n_defective']} defective)",
             f"image AUROC {f(m.get('image_auroc'))}  AP {f(m.get('image_ap'))}  F1-max {f(m.get('image_f1_max'))}",
             f"pixel AUROC {f(m.get('pixel_auroc'))}  AP {f(m.get('pixel_ap'))}  AUPRO@0.3 {f(m.get('aupro'))}"]
    b = report.get("binning")
    if b and b["bins"] and m.get("pixel_auroc") is not None:
        e = b["error_bounds"]["overall"]
        lines.append(f"  (pixel metrics from {b['bins']}-bin histograms: within {f(e['pixel_auroc'])} AUROC, "
                     f"{f(e['pixel_ap'])} AP, {f(e['aupro'])} AUPRO of the exact values)")
    at = report.get("at_threshold")
    if at:
        lines.append(f"at threshold {at['threshold']:.4f}: precision {f(at['precision'])} recall {f(at['recall'])} "
                     f"F1 {f(at['f1'])}")
    g = report.get("regions")
    if g and g["gt_regions"]:
        lines.append(f"regions at pixel threshold {g['pixel_threshold']:.4f}: {g['gt_regions_found']} of "
                     f"{g['gt_regions']} defect regions found ({g['gt_region_recall']:.1%}); false regions per good "
                     f"image {f(g['false_regions_per_good_image'])}, per defective image "
                     f"{f(g['false_regions_per_defective_image'])}")
    for t, v in sorted(report["per_type"].items()):
        lines.append(f"  {t:<12} image AUROC {f(v.get('image_auroc'))}  pixel AUROC {f(v.get('pixel_auroc'))}  "
                     f"AUPRO {f(v.get('aupro'))}")
    return lines


def _json_default(v):
    return v.tolist() if isinstance(v, np.ndarray) else float(v)


def write_json(report: dict, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2, default=_json_default))
