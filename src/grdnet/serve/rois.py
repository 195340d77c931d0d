"""Regions of interest in the service: the masks the page's ROI editor downloads (`POST /roi`)
and the ROI masks uploaded with a prediction (`roi` in `POST /predict`, `/predict/batch`).

Both follow `grdnet roi` and `--roi` exactly: masks are made by the same `roi.make_roi` and
written the same way (8-bit grayscale PNG, 255 inside, 0 outside), and uploaded masks are read
with the same rule as ROI files (`data.mask_from_image`) and resized to their image like
`roi.roi_for_image` does (nearest neighbour).
"""
from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from ..data import mask_from_image
from ..errors import GRDNetError
from ..roi import check_shapes, make_roi
from .uploads import Upload, UploadError, decode_upload

# Bounds on one shapes document from a client (the request body limit bounds its bytes; these
# bound the drawing work): far more than anyone draws by hand.
MAX_SHAPES = 1000
MAX_POINTS = 100_000  # polygon vertices and rectangle corners, all shapes together


def mask_png(mask: np.ndarray) -> bytes:
    """A bool mask as the PNG `grdnet roi` writes (the same call, so the same file)."""
    buf = io.BytesIO()
    Image.fromarray((mask * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def roi_from_shapes(width: int, height: int, shapes: str, max_pixels: int) -> np.ndarray:
    """The mask of a shapes document (the `grdnet roi --shapes` JSON) at width x height.
    Raises `UploadError`: 413 for a mask over `max_pixels` or too many shapes, 422 for anything
    malformed or an empty ROI."""
    if width * height > max_pixels:
        raise UploadError(413, f"a {width}x{height} ROI ({width * height} pixels) is over the limit of "
                               f"{max_pixels} pixels")
    try:
        doc = json.loads(shapes)
    except (json.JSONDecodeError, RecursionError) as e:
        reason = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
        raise UploadError(422, f"shapes: not valid JSON ({reason})") from None
    try:
        rects, polygons = check_shapes(doc)
    except GRDNetError as e:
        raise UploadError(422, str(e)) from None
    points = 2 * len(rects) + sum(len(p) // 2 for p in polygons)
    if len(rects) + len(polygons) > MAX_SHAPES or points > MAX_POINTS:
        raise UploadError(413, f"{len(rects) + len(polygons)} shapes with {points} points; the limits are "
                               f"{MAX_SHAPES} shapes and {MAX_POINTS} points")
    try:
        return make_roi((width, height), rects, polygons)
    except GRDNetError as e:  # a shape with the wrong number of coordinates, or an empty ROI
        raise UploadError(422, str(e)) from None


def decode_roi(roi: Upload, image_hw: tuple[int, int], max_pixels: int) -> tuple[np.ndarray, dict]:
    """An uploaded ROI mask -> (bool (H, W) at the image's size, what the response says about it).
    A ROI of another size is resized (nearest neighbour), as `--roi` files are; an all-black ROI
    is refused (422): nothing would be inspected. Upload errors as for images."""
    name = f"ROI {roi.name}"
    img = decode_upload(Upload(name, roi.data), max_pixels)
    try:
        mask = mask_from_image(img)
    except Exception as e:  # exotic modes Pillow cannot convert
        raise UploadError(422, f"{name}: cannot read {img.mode} image as a mask ({e})") from None
    if not mask.any():
        raise UploadError(422, f"{name}: the mask is all black (nothing would be inspected); "
                               "white marks where to inspect")
    own = (mask.shape[1], mask.shape[0])
    if mask.shape != tuple(image_hw):
        mask = np.asarray(Image.fromarray(mask).resize((image_hw[1], image_hw[0]), Image.NEAREST))
        if not mask.any():  # a thin ROI can vanish when shrunk
            raise UploadError(422, f"{name}: the {own[0]}x{own[1]} ROI is empty once resized to the "
                                   f"{image_hw[1]}x{image_hw[0]} image")
    return mask, {"filename": roi.name, "coverage": round(float(mask.mean()), 6),
                  "resized_from": None if own == (image_hw[1], image_hw[0]) else list(own)}


def roi_png(width: int, height: int, shapes: str, max_pixels: int) -> tuple[bytes, float]:
    """`POST /roi`: (the mask PNG of a shapes document, the fraction of the image inside it)."""
    mask = roi_from_shapes(width, height, shapes, max_pixels)
    return mask_png(mask), float(mask.mean())
