"""Evaluation report folders (`grdnet test MODEL DATA --out DIR`) and multi-category summaries.

One category's folder holds `report.json` (every metric, overall and per defect type, the binned
pixel metrics' error bounds, threshold and rule, model and data), `images.csv` (one row per test
image), `roc.png`, `pr.png` and `scores.png`, a `gallery/` of the worst misses and false alarms
with heatmap overlays and ground-truth contours, and `index.html`, a static page that ties them
together with relative links and works offline.

Images are scored as a stream: only the gallery candidates, downscaled, are kept (two bounded
heaps), never every anomaly map.
"""
from __future__ import annotations

import csv
import datetime as dt
import heapq
import html
import itertools
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from .data import category_dirs, open_image, pil_to_array
from .describe import describe_model
from .errors import GRDNetError
from .evaluation import run_test, write_json
from .modelfile import resolve_model_dir
from .scoring import Predictor
from .version import __version__
from .visualize import overlay

log = logging.getLogger(__name__)

THUMB = 256  # longest side of a gallery panel, in pixels (the page shows them smaller; click to enlarge)
# The figures papers print for MVTec AD, in their usual order: (key in the report, column title).
SUMMARY_COLUMNS = [("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO"),
                   ("pixel_ap", "pixel AP"), ("image_f1_max", "F1-max")]
TABLE_COLUMNS = [("image_auroc", "image AUROC"), ("image_ap", "image AP"), ("image_f1_max", "F1-max"),
                 ("pixel_auroc", "pixel AUROC"), ("pixel_ap", "pixel AP"), ("aupro", "AUPRO@0.3")]


class Gallery:
    """The `size` defective images with the lowest scores (worst misses) and the `size` good
    images with the highest scores (worst false alarms), with their maps and masks downscaled
    to gallery size. Use as `run_test`'s `on_result` hook."""

    def __init__(self, size: int = 6):
        self.size = size
        self.misses: list = []  # heap keyed by -score: its root is the highest score kept
        self.alarms: list = []  # heap keyed by score: its root is the lowest score kept
        self._order = itertools.count()

    def __call__(self, sample, pred, mask) -> None:
        if self.size <= 0:
            return
        heap, key = (self.misses, -pred.score) if sample.label == 1 else (self.alarms, pred.score)
        if len(heap) >= self.size and key <= heap[0][0]:
            return
        h, w = pred.anomaly_map.shape
        thumb = _thumb_size(w, h)
        small_map = np.asarray(Image.fromarray(pred.anomaly_map.astype(np.float32)).resize(thumb, Image.BILINEAR))
        small_mask = None
        if mask is not None and mask.any():
            # BOX keeps a thin defect visible: any covered thumbnail pixel stays in the mask.
            small_mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(thumb, Image.BOX)) > 0
        small_defects, found = None, getattr(pred, "defect_mask", None)  # duck-typed predictions have none
        if found is not None and found.any():
            small_defects = np.asarray(Image.fromarray(found.astype(np.uint8) * 255).resize(thumb, Image.BOX)) > 0
        entry = (key, next(self._order), sample, pred.score, pred.is_anomalous, small_map, small_mask, small_defects)
        if len(heap) >= self.size:
            heapq.heapreplace(heap, entry)
        else:
            heapq.heappush(heap, entry)

    def worst_misses(self) -> list:
        return sorted(self.misses, key=lambda e: (e[3], e[1]))

    def worst_alarms(self) -> list:
        return sorted(self.alarms, key=lambda e: (-e[3], e[1]))


def _thumb_size(w: int, h: int) -> tuple[int, int]:
    scale = min(4.0, THUMB / max(w, h))  # small images are enlarged (at most 4x) to be seen
    return max(1, round(w * scale)), max(1, round(h * scale))


def _render_entry(entry, path: Path) -> None:
    """Input image beside its overlay (heatmap, found regions' contours in magenta, ground-truth
    contour in white)."""
    _, _, sample, _, _, small_map, small_mask, small_defects = entry
    image = Image.fromarray(pil_to_array(open_image(sample.path), 3))
    image = np.asarray(image.resize(small_map.shape[::-1], Image.LANCZOS))
    over = overlay(image, small_map, small_mask, defects=small_defects)
    gap = np.full((image.shape[0], 6, 3), 255, np.uint8)
    Image.fromarray(np.concatenate([image, gap, over], axis=1)).save(path)


def _fmt(v, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


# --------------------------------------------------------------------------- plots


def _plot(report: dict, curves: dict, out: Path) -> None:
    """roc.png and pr.png (image level | pixel level; overall and per type), scores.png."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # With a single defect type its curve is the overall one: draw it once.
    per_type = sorted(curves["per_type"]) if len(curves["per_type"]) > 1 else []
    kinds = {"roc": ("fpr", "tpr", "false positive rate", "true positive rate", "auroc"),
             "pr": ("recall", "precision", "recall", "precision", "ap")}
    for name, (xk, yk, xlabel, ylabel, metric) in kinds.items():
        fig = Figure(figsize=(11, 4.6))
        FigureCanvasAgg(fig)
        for ax, level in zip(fig.subplots(1, 2), ("image", "pixel")):
            ax.set_title(f"{level} level")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            if name == "roc":
                ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--")
            if curves["overall"][level] is None:
                ax.text(0.5, 0.5, "not available\n(needs both classes" + (" and masks)" if level == "pixel" else ")"),
                        ha="center", va="center", transform=ax.transAxes)
                continue
            for t in per_type:
                c = curves["per_type"][t][level]
                if c is not None:
                    v = report["per_type"][t].get(f"{level}_{metric}")
                    ax.plot(c[xk], c[yk], lw=1, alpha=0.8, label=f"{t} ({_fmt(v, 3)})")
            c = curves["overall"][level]
            v = report["metrics"].get(f"{level}_{metric}")
            ax.plot(c[xk], c[yk], lw=2.2, color="black", label=f"all ({_fmt(v, 3)})")
            ax.legend(loc="lower right" if name == "roc" else "lower left", fontsize=8,
                      title=metric.upper(), title_fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=100)

    fig = Figure(figsize=(11, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    scores = np.array([r["score"] for r in report["images"]])
    labels = np.array([r["label"] for r in report["images"]])
    edges = np.linspace(scores.min(), max(scores.max(), scores.min() + 1e-6), 41)
    for lab, colour, text in ((0, "tab:blue", "good"), (1, "tab:red", "defective")):
        if (labels == lab).any():
            ax.hist(scores[labels == lab], bins=edges, alpha=0.6, color=colour, label=f"{text} ({(labels == lab).sum()})")
    if report["threshold"] is not None:
        ax.axvline(report["threshold"], color="black", ls="--", label=f"threshold {report['threshold']:.4f}")
    ax.set_xlabel("image score")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "scores.png", dpi=100)


# --------------------------------------------------------------------------- one category


def write_report(predictor: Predictor, data, out, *, model_path=None, threshold: float | None = None,
                 allow_missing_masks: bool = False, gallery_size: int = 6, batch_size: int = 16,
                 roi=None, roi_default=None) -> dict:
    """Evaluate `predictor` on `data/test` and write the report folder `out`; returns the report
    (the `run_test` dict, with `model`, `files` and `gallery` added)."""
    out = Path(out)
    gallery = Gallery(gallery_size)
    report = run_test(predictor, data, threshold=threshold, batch_size=batch_size,
                      allow_missing_masks=allow_missing_masks, on_result=gallery, curves=True,
                      roi=roi, roi_default=roi_default)
    curves = report.pop("curves")
    report["model"] = describe_model(predictor, None if model_path is None else resolve_model_dir(model_path))
    report["created"] = dt.datetime.now().isoformat(timespec="seconds")
    report["grdnet"] = __version__
    (out / "gallery").mkdir(parents=True, exist_ok=True)

    entries = []
    for kind, items in (("miss", gallery.worst_misses()), ("alarm", gallery.worst_alarms())):
        for i, e in enumerate(items, 1):
            name = f"gallery/{kind}_{i:02d}.png"
            _render_entry(e, out / name)
            sample = e[2]
            entries.append({"kind": kind, "file": name, "path": str(sample.path), "defect_type": sample.defect_type,
                            "score": e[3], "decision": int(e[4]), "has_mask": e[6] is not None})
    report["gallery"] = entries
    report["files"] = {"report": "report.json", "images": "images.csv", "roc": "roc.png", "pr": "pr.png",
                       "scores": "scores.png", "html": "index.html"}

    with open(out / "images.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "defect_type", "label", "score", "decision"])
        for r in report["images"]:
            w.writerow([r["path"], r["defect_type"], r["label"], repr(float(r["score"])), r["decision"]])
    write_json({k: v for k, v in report.items() if k != "images"}, out / "report.json")
    _plot(report, curves, out)
    (out / "index.html").write_text(_html(report))
    return report


_CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1120px;color:#222;
padding:0 16px}
h1{font-size:1.5em;margin-bottom:4px}h2{font-size:1.2em;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{padding:4px 10px;border:1px solid #ddd;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.meta td{text-align:left}.note{color:#555;font-size:.9em}.grid{display:flex;flex-wrap:wrap;gap:12px}
.card{border:1px solid #ddd;border-radius:4px;padding:6px;font-size:.85em;width:352px}
.card img{display:block;width:100%}.bad{color:#b00;font-weight:600}.ok{color:#070;font-weight:600}
img.plot{max-width:100%;border:1px solid #eee}code{font-size:.9em;word-break:break-all}
"""


def _html(report: dict) -> str:
    """The report folder's index.html: figures, tables and gallery, linked relatively."""
    e = html.escape
    head = "".join(f"<th>{t}</th>" for _, t in TABLE_COLUMNS)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>grdnet report: {e(Path(report['data']).name)}</title>
<style>{_CSS}</style></head><body>
<h1>grdnet evaluation: {e(Path(report['data']).name)}</h1>
<table class="meta">{_about_rows(report)}</table>
<p class="note">Files: <a href="report.json">report.json</a> (all metrics) &middot;
<a href="images.csv">images.csv</a> (one row per image: path, defect type, label, score, decision)</p>
<h2>Decisions at the stored threshold</h2>
<p class="note">An image is flagged defective when its score is &ge; the threshold. The threshold was
not fitted on this test set (rule above).</p>
{_decision_table(report.get("at_threshold"))}
{_region_table(report.get("regions"))}
<h2>Metrics</h2>
<p class="note">Each defect type is scored against all good images (the usual MVTec AD breakdown).
AUPRO: area under the per-region-overlap curve up to 30% false-positive rate, normalised.</p>
<table><tr><th>defect type</th>{head}<th>images</th></tr>{_metric_rows(report)}</table>
<p class="note">{_binning_note(report["binning"])}</p>
<h2>Curves</h2>
<img class="plot" src="roc.png" alt="ROC curves">
<img class="plot" src="pr.png" alt="precision-recall curves">
<img class="plot" src="scores.png" alt="score histogram">
<h2>Worst misses: defective images with the lowest scores</h2>
<p class="note">Left: the image; right: the anomaly map over it, found defect regions outlined in magenta,
ground truth in white.</p>
{_gallery_cards(report["gallery"], "miss")}
<h2>False alarms: good images with the highest scores</h2>
{_gallery_cards(report["gallery"], "alarm")}
</body></html>
"""


def _about_rows(report: dict) -> str:
    """The table at the top: which model, which data, which threshold, when."""
    model = report["model"]
    info = [("model", model.get("path")), ("trained on", model.get("trained_on")),
            ("input", f"{model['image_size']} px, {model['channels']} channel(s), aspect {model.get('aspect', 'squeeze')}, "
                      f"score: max of the map box-filtered over {model['score_kernel']} px"),
            ("test data", report["data"]),
            ("images", f"{report['n_images']} ({report['n_defective']} defective, "
                       f"{report['n_images'] - report['n_defective']} good)"),
            ("threshold", "none" if report["threshold"] is None else f"{report['threshold']:.6f}"),
            ("threshold rule", report.get("threshold_source")),
            ("created", f"{report['created']} by grdnet {report['grdnet']}")]
    return "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in info)


def _decision_table(at: dict | None) -> str:
    if not at:
        return "<p>The model has no threshold: no decisions were made.</p>"
    return (f"<table><tr><th>threshold</th><th>precision</th><th>recall</th><th>F1</th><th>TP</th>"
            f"<th>FP</th><th>TN</th><th>FN</th></tr><tr><td>{at['threshold']:.4f}</td>"
            f"<td>{_fmt(at['precision'])}</td><td>{_fmt(at['recall'])}</td><td>{_fmt(at['f1'])}</td>"
            f"<td>{at['tp']}</td><td>{at['fp']}</td><td>{at['tn']}</td><td>{at['fn']}</td></tr></table>")


def _region_table(regions: dict | None) -> str:
    if not regions or not regions["gt_regions"]:
        return ""
    g = regions
    return (f"<h2>Defect regions at the pixel threshold</h2><p class=\"note\">A pixel is a defect pixel when its "
            f"map value is &ge; {g['pixel_threshold']:.4f}; a ground-truth region counts as found when a defect "
            f"pixel falls on it; a found region touching no ground truth is false.</p>"
            f"<table><tr><th>ground-truth regions</th><th>found</th><th>false regions per good image</th>"
            f"<th>good images with a region</th><th>false regions per defective image</th></tr>"
            f"<tr><td>{g['gt_regions']}</td><td>{g['gt_regions_found']} ({_fmt(g['gt_region_recall'], 3)})</td>"
            f"<td>{_fmt(g['false_regions_per_good_image'], 3)}</td><td>{_fmt(g['good_images_with_a_region'], 3)}</td>"
            f"<td>{_fmt(g['false_regions_per_defective_image'], 3)}</td></tr></table>")


def _metric_rows(report: dict) -> str:
    """One row for all images, then one per defect type."""
    def row(name, metrics):
        cells = "".join(f"<td>{_fmt(metrics.get(k))}</td>" for k, _ in TABLE_COLUMNS)
        return f"<tr><td>{html.escape(name)}</td>{cells}<td>{metrics['n_images']}</td></tr>"

    return "".join([row("all", report["metrics"])] + [row(t, v) for t, v in sorted(report["per_type"].items())])


def _binning_note(binning: dict) -> str:
    if binning["bins"] is None:
        return "Pixel metrics computed exactly (no binning)."
    bounds = binning["error_bounds"]["overall"]
    return (f"Pixel metrics computed from {binning['bins']}-bin histograms of the anomaly maps (value step "
            f"{binning['value_step']:g}). Largest possible difference from the exact values, from these "
            f"histograms: pixel AUROC &plusmn;{_fmt(bounds.get('pixel_auroc'), 5)}, pixel AP "
            f"&plusmn;{_fmt(bounds.get('pixel_ap'), 5)}, AUPRO &plusmn;{_fmt(bounds.get('aupro'), 5)} "
            "(per-type bounds in report.json).")


def _gallery_cards(gallery: list[dict], kind: str) -> str:
    """The gallery entries of one kind ("miss" or "alarm") as cards linking to their images."""
    e = html.escape
    items = [g for g in gallery if g["kind"] == kind]
    if not items:
        return "<p class='note'>none</p>"
    out = []
    for g in items:
        if kind == "miss":
            verdict = ("<span class='bad'>missed</span>" if not g["decision"]
                       else "<span class='ok'>detected</span> (among the lowest scores)")
        else:
            verdict = ("<span class='bad'>false alarm</span>" if g["decision"]
                       else "<span class='ok'>passed</span> (among the highest scores)")
        contour = "" if g["has_mask"] or kind == "alarm" else " &middot; no mask"
        out.append(f"<div class='card'><a href='{e(g['file'])}'><img src='{e(g['file'])}' alt='{e(g['path'])}'>"
                   f"</a><div>{e(g['defect_type'])} &middot; score {g['score']:.4f} &middot; {verdict}"
                   f"{contour}</div><code>{e(g['path'])}</code></div>")
    return "<div class='grid'>" + "".join(out) + "</div>"


# --------------------------------------------------------------------------- several categories


def is_multi_category(data) -> bool:
    """True when `data` has no test/ of its own but sub-folders that do (MVTec AD's root)."""
    return not (Path(data) / "test").is_dir() and bool(category_dirs(data, "test"))


def summarize(reports: dict[str, dict]) -> dict:
    """Per-category figures and their means (over the categories where each is defined)."""
    table = {c: {k: r["metrics"].get(k) for k, _ in SUMMARY_COLUMNS} for c, r in reports.items()}
    mean = {}
    for k, _ in SUMMARY_COLUMNS:
        vals = [row[k] for row in table.values() if row[k] is not None]
        mean[k] = float(np.mean(vals)) if vals else None
        mean[f"{k}_n"] = len(vals)
    return {"columns": [k for k, _ in SUMMARY_COLUMNS], "categories": table, "mean": mean}


def summary_markdown(summary: dict) -> str:
    """The table as papers print it: percent, one decimal, one row per category and the mean."""
    def pct(v):
        return "–" if v is None else f"{100 * v:.1f}"

    lines = ["| category | " + " | ".join(t for _, t in SUMMARY_COLUMNS) + " |",
             "|---|" + "---:|" * len(SUMMARY_COLUMNS)]
    for c, row in summary["categories"].items():
        lines.append(f"| {c} | " + " | ".join(pct(row[k]) for k, _ in SUMMARY_COLUMNS) + " |")
    mean = summary["mean"]
    lines.append("| **mean** | " + " | ".join(f"**{pct(mean[k])}**" for k, _ in SUMMARY_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def evaluate_categories(runs, root, out=None, *, threshold: float | None = None, allow_missing_masks: bool = False,
                    gallery_size: int = 6, batch_size: int = 16, device: str = "cpu") -> dict:
    """Evaluate `runs/<category>` on `root/<category>/test` for every category of `root`.

    With `out`, writes `out/<category>/` report folders, `out/summary.json`, `out/summary.md`
    and `out/index.html`. Categories without a model are skipped with a warning (and listed).
    Returns `{"summary": ..., "categories": {category: report}}`.
    """
    runs, root = Path(runs), Path(root)
    cats = category_dirs(root, "test")
    if not cats:
        raise GRDNetError(f"{root}: no category folders with a test/ split")
    reports, skipped = {}, []
    for cat in cats:
        model = runs / cat.name
        if not model.exists():
            log.warning("%s: no model for category %s; skipped", model, cat.name)
            skipped.append(cat.name)
            continue
        predictor = Predictor.load(model, device=device)
        if out is not None:
            reports[cat.name] = write_report(predictor, cat, Path(out) / cat.name, model_path=model,
                                             threshold=threshold, allow_missing_masks=allow_missing_masks,
                                             gallery_size=gallery_size, batch_size=batch_size)
        else:
            reports[cat.name] = run_test(predictor, cat, threshold=threshold, batch_size=batch_size,
                                         allow_missing_masks=allow_missing_masks)
    if not reports:
        raise GRDNetError(f"{runs}: no model for any category of {root} (expected {runs}/<category>)")
    summary = {**summarize(reports), "skipped": skipped, "runs": str(runs.resolve()), "data": str(root.resolve())}
    if out is not None:
        out = Path(out)
        write_json(summary, out / "summary.json")
        (out / "summary.md").write_text(summary_markdown(summary))
        (out / "index.html").write_text(_summary_html(summary))
    return {"summary": summary, "categories": reports}


def _summary_html(summary: dict) -> str:
    e = html.escape

    def pct(v):
        return "&ndash;" if v is None else f"{100 * v:.1f}"

    head = "".join(f"<th>{t}</th>" for _, t in SUMMARY_COLUMNS)
    rows = [f"<tr><td><a href='{e(c)}/index.html'>{e(c)}</a></td>"
            + "".join(f"<td>{pct(row[k])}</td>" for k, _ in SUMMARY_COLUMNS) + "</tr>"
            for c, row in summary["categories"].items()]
    rows.append("<tr><th>mean</th>" + "".join(f"<th>{pct(summary['mean'][k])}</th>" for k, _ in SUMMARY_COLUMNS)
                + "</tr>")
    skipped = (f"<p class='note'>No model, skipped: {e(', '.join(summary['skipped']))}</p>"
               if summary["skipped"] else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>grdnet summary</title><style>{_CSS}</style></head><body>
<h1>grdnet evaluation summary</h1>
<p class="note">Models: <code>{e(summary['runs'])}</code><br>Data: <code>{e(summary['data'])}</code></p>
<table><tr><th>category</th>{head}</tr>{''.join(rows)}</table>
<p class="note">Percent. Means over the categories where a figure is defined. Files:
<a href="summary.json">summary.json</a> &middot; <a href="summary.md">summary.md</a>; each category links to
its own report.</p>
{skipped}
</body></html>
"""
