"""Heatmap overlays for people: the anomaly map in a colour scale over the image, the contours of
the found defect regions, and the ground-truth contour when there is one."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

# A perceptually ordered blue -> cyan -> yellow -> red scale, sampled at 5 stops.
_STOPS = np.array([[0, 0, 128], [0, 160, 255], [80, 255, 160], [255, 220, 0], [220, 0, 0]], dtype=np.float32)


def colorize(anomaly_map: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8."""
    x = np.clip(anomaly_map, 0, 1) * (len(_STOPS) - 1)
    i = np.minimum(x.astype(int), len(_STOPS) - 2)
    f = (x - i)[..., None]
    return ((1 - f) * _STOPS[i] + f * _STOPS[i + 1]).astype(np.uint8)


REGION_COLOUR = (255, 0, 255)  # magenta: apart from every colour of the heat scale


def overlay(image: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray | None = None,
            alpha: float = 0.5, defects: np.ndarray | None = None) -> np.ndarray:
    """Blend the coloured map over the image (weighted by the map itself, so good regions stay
    visible); draw the contour of the defect mask `defects` (the found regions) in magenta and
    the ground-truth mask's in white when given. Returns (H, W, 3) uint8."""
    img = image.astype(np.float32)
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    if img.max() <= 1.0 and image.dtype != np.uint8:
        img = img * 255.0
    heat = colorize(anomaly_map).astype(np.float32)
    w = alpha * np.clip(anomaly_map, 0, 1)[..., None] ** 0.5
    out = (1 - w) * img + w * heat
    for outline, colour in ((defects, REGION_COLOUR), (mask, (255, 255, 255))):
        if outline is not None and outline.any():
            out[contour(outline)] = colour
    return np.clip(out, 0, 255).astype(np.uint8)


def contour(mask: np.ndarray) -> np.ndarray:
    """The pixels of `mask` on its boundary (one pixel wide)."""
    mask = np.asarray(mask, bool)
    return mask & ~ndimage.binary_erosion(mask, iterations=1)
