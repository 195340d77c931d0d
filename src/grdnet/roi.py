"""Regions of interest: finding each image's ROI mask, and making ROI masks.

A ROI is a binary image (white = defects matter here). For training, the ROI only shapes the
segmentation loss (see `losses.segmentation_loss`); at test/predict time it is optional and, when
given, multiplies the map and restricts the pixel metrics.

Sources: a folder mirroring the images (`ROI/<path relative to the data root>/<stem>.<any ext>`,
or flat `ROI/<stem>.<ext>`), or one image used for every image (a fixed camera).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .data import IMAGE_EXTENSIONS, image_size_of, load_mask, open_image, pil_to_array
from .errors import GRDNetError

log = logging.getLogger(__name__)


def _index(folder: Path) -> dict[str, Path]:
    """Every image under `folder`, keyed by its path relative to `folder` without extension."""
    return {str(p.relative_to(folder).with_suffix("")): p for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS}


def find_rois(images: list[Path], data_root, source, default=None) -> list[Path]:
    """The ROI file of each image. `source` is a folder (mirroring `data_root`) or one image file;
    images without a ROI take `default` if given, else the error lists them."""
    source = Path(source)
    if source.is_file():
        return [source] * len(images)
    if not source.is_dir():
        raise GRDNetError(f"{source}: no such ROI file or folder")
    index, root = _index(source), Path(data_root)
    found, missing = [], []
    for img in images:
        rel = str(img.relative_to(root).with_suffix("")) if img.is_relative_to(root) else img.stem
        hit = index.get(rel) or index.get(img.stem)
        if hit is None:
            if default is None:
                missing.append(img)
            hit = Path(default) if default is not None else None
        found.append(hit)
    if missing:
        names = ", ".join(str(p) for p in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise GRDNetError(f"{source}: no ROI for {len(missing)} image(s): {names} (give --roi-default FILE "
                          "to use one ROI for those)")
    return found


def check_roi_size(roi_path: Path, image_path: Path) -> None:
    """ROIs are resized to their image like the image is resized to the model: a size mismatch
    is allowed (one ROI drawn at another resolution) but logged, since a wrong aspect ratio
    usually means the wrong ROI."""
    rs, is_ = image_size_of(roi_path), image_size_of(image_path)
    if rs != is_:
        log.warning("%s: ROI is %dx%d but %s is %dx%d; resizing the ROI", roi_path, *rs, image_path.name, *is_)


def roi_for_image(roi_path, image_hw: tuple[int, int]) -> np.ndarray:
    """The ROI as a bool (H, W) array at the image's size (nearest-neighbour resize)."""
    mask = load_mask(roi_path)
    if not mask.any():
        raise GRDNetError(f"{roi_path}: ROI mask is empty (all zero)")
    if mask.shape != tuple(image_hw):
        mask = np.asarray(Image.fromarray(mask).resize((image_hw[1], image_hw[0]), Image.NEAREST))
    return mask


def make_roi(size: tuple[int, int], rects=(), polygons=(), reference=None, threshold: float | None = None,
             invert: bool = False) -> np.ndarray:
    """A ROI mask (H, W) bool of `size` (width, height): the union of rectangles (x0, y0, x1, y1),
    polygons ([x, y, x, y, ...]) and, when `reference` is given, of its pixels brighter than
    `threshold` (0..255; Otsu's threshold when None), or darker with `invert`."""
    w, h = size
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for r in rects:
        if len(r) != 4:
            raise GRDNetError(f"a rectangle needs x0,y0,x1,y1, got {r}")
        draw.rectangle(list(map(float, r)), fill=255)
    for poly in polygons:
        if len(poly) < 6 or len(poly) % 2:
            raise GRDNetError(f"a polygon needs at least 3 x,y points, got {poly}")
        draw.polygon(list(map(float, poly)), fill=255)
    mask = np.asarray(canvas) > 0
    if reference is not None:
        gray = pil_to_array(open_image(reference), 1)[..., 0]
        if gray.shape != (h, w):
            raise GRDNetError(f"{reference}: reference is {gray.shape[1]}x{gray.shape[0]}, ROI size is {w}x{h}")
        t = otsu(gray) if threshold is None else threshold
        mask |= (gray < t) if invert else (gray > t)
    if not mask.any():
        raise GRDNetError("the ROI is empty: nothing would be inspected")
    return mask


def otsu(gray: np.ndarray) -> float:
    """Otsu's threshold of a uint8 image: the level that best separates two brightness classes."""
    hist = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    p = hist / hist.sum()
    omega, mu = np.cumsum(p), np.cumsum(p * np.arange(256))
    between = (mu[-1] * omega - mu) ** 2 / np.clip(omega * (1 - omega), 1e-12, None)
    return float(np.argmax(between)) + 0.5


def parse_shapes(text: str | None) -> tuple[list, list]:
    """Rectangles and polygons from JSON: {"rects": [[x0,y0,x1,y1], ...], "polygons": [[x,y,...], ...]}."""
    if not text:
        return [], []
    path = Path(text)
    try:
        doc = json.loads(path.read_text() if path.is_file() else text)
    except (OSError, json.JSONDecodeError) as e:
        raise GRDNetError(f"ROI shapes: not valid JSON ({e})") from None
    return check_shapes(doc)


def check_shapes(doc) -> tuple[list, list]:
    """(rects, polygons) of a parsed shapes document, checked: every shape a list of finite
    numbers (the service passes documents from uploads; `make_roi` checks the counts)."""
    if not isinstance(doc, dict) or not set(doc) <= {"rects", "polygons"}:
        raise GRDNetError('ROI shapes: expected {"rects": [...], "polygons": [...]}')
    out = []
    for key in ("rects", "polygons"):
        shapes = doc.get(key, [])
        if not isinstance(shapes, list):
            raise GRDNetError(f'ROI shapes: "{key}" must be a list of coordinate lists')
        for shape in shapes:
            if not isinstance(shape, list) or not all(_coordinate(v) for v in shape):
                raise GRDNetError(f'ROI shapes: each of "{key}" must be a list of finite numbers, got '
                                  f"{json.dumps(shape)[:80]}")
        out.append(shapes)
    return out[0], out[1]


def _coordinate(v) -> bool:
    """A number a drawing can use: not a bool, not NaN or infinite, and within PIL's int range
    (JSON integers have no bound)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 2 ** 31 and math.isfinite(v)
