"""Procedural demo datasets in the MVTec AD layout, with real-looking test defects.

GRD-Net trains on good images only, with synthetic defects made from thresholded Perlin noise.
The demo must not be tested on that same kind of defect, so the test defects here come from their
own processes, none of them Perlin-threshold blobs:

* ``scratch``: a thin (1-3 px) straight or slightly curved line, bright or dark, fading at its ends;
* ``dent``: a small elliptical bump whose shading is lit from one side (bright flank, dark flank);
* ``stain``: a soft-edged irregular tinted blob (rust, grease, coolant, heat tint, lime residue);
* ``crack``: a dark jagged random-walk polyline, tapering, with a few side branches.

About a third of the defects are faint and/or small, but every one stays visible to a person.

Two datasets:

* :func:`make_surface_dataset`: brushed metal, every image different (brightness, tint, brushing,
  illumination gradient, sensor noise) but from one product family.
* :func:`make_roi_dataset`: a brushed metal plate (the region of interest) lying, its position
  jittered, on a conveyor belt with harmless debris (crumbs, lint, dust, scuffs). Test defects lie
  either on the plate (defective) or on the belt (labelled good: outside the ROI nothing matters).
  Per-image ROI masks are written under ``roi/``.

Masks mark exactly the changed pixels: a pixel is in the mask when its 8-bit value (any channel)
differs from the defect-free image by at least :data:`CHANGE_THRESHOLD`; smaller changes are undone,
so outside the mask a defective image equals its clean image byte for byte. The lower-level
:func:`surface_sample` and :func:`roi_sample` return the clean image, the defective image and the
mask as arrays. Everything is deterministic for a given seed.
"""
from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from .errors import GRDNetError

DEFECT_TYPES = ("scratch", "dent", "stain", "crack")
LEVELS = ("normal", "faint", "small", "faint+small")
CHANGE_THRESHOLD = 6  # 8-bit levels: a smaller change does not count as changed (and is undone)

_LUMA = np.array([0.299, 0.587, 0.114])
_LAYOUT = ("train", "test", "ground_truth", "roi", "test_manifest.csv")
_MAX_ATTEMPTS = 40


@dataclass(frozen=True)
class Sample:
    """One generated image. Arrays are uint8: images (H, W) for one channel or (H, W, 3); masks (H, W)
    in {0, 255}."""

    clean: np.ndarray  # the same image without its defect
    image: np.ndarray  # the image written to disk (equals `clean` when there is no defect)
    mask: np.ndarray  # changed pixels; all zero when there is no defect
    defect_type: str | None  # one of DEFECT_TYPES, or None
    level: str | None  # one of LEVELS, or None
    roi: np.ndarray | None = None  # region of interest (ROI dataset only)
    location: str = "none"  # "none", "surface", or for the ROI dataset "inside" / "outside"


# ----------------------------------------------------------------------------------------------
# small helpers


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _norm(a: np.ndarray) -> np.ndarray:
    a = a - a.mean()
    sd = a.std()
    return a / sd if sd > 1e-12 else a


def _smooth_noise(rng, shape, sigma) -> np.ndarray:
    return _norm(ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap", truncate=3.0))


def _lowfreq(rng, size: int, cells: int = 4) -> np.ndarray:
    """Smooth field with about `cells` undulations across the image, unit std."""
    g = rng.standard_normal((cells, cells))
    return _norm(ndimage.zoom(g, size / cells, order=3, mode="nearest", grid_mode=True)[:size, :size])


def _quant(x: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _to_channels(img: np.ndarray, channels: int) -> np.ndarray:
    return img @ _LUMA if channels == 1 else img


def _level(rng) -> str:
    """About a third of the defects are faint and/or small."""
    if rng.random() >= 1 / 3:
        return "normal"
    return LEVELS[1 + int(rng.integers(0, 3))]


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _illumination(rng, size: int, plane: float, blob: float) -> np.ndarray:
    """Gentle light falloff: a linear gradient in a random direction plus a low-frequency bump."""
    yy, xx = _grid(size)
    a = rng.uniform(0, 2 * np.pi)
    ramp = ((xx - size / 2) * np.cos(a) + (yy - size / 2) * np.sin(a)) / size
    return plane * ramp + blob * _lowfreq(rng, size, 3)


def _brushed(rng, size: int, cx: float, cy: float, angle: float) -> np.ndarray:
    """Brushed-metal relief (zero mean): fine streaks along `angle` (radians), a few stronger grooves
    whose depth varies along their length, and a faint isotropic grain."""
    s = size / 128
    fine = ndimage.gaussian_filter1d(rng.standard_normal((size, size)), 7 * s, axis=1, mode="wrap",
                                     truncate=3.0)
    fine = _norm(ndimage.gaussian_filter1d(fine, 0.5, axis=0, mode="wrap"))
    rows = _norm(ndimage.gaussian_filter1d(rng.standard_normal(size), 0.6 + 0.4 * s, mode="wrap"))
    along = 1 + 0.5 * _norm(ndimage.gaussian_filter1d(rng.standard_normal(size), 12 * s, mode="wrap"))
    canvas = 0.022 * fine + 0.012 * rows[:, None] * along[None, :]
    yy, xx = _grid(size)
    c, sn = np.cos(angle), np.sin(angle)
    u = (xx - cx) * c + (yy - cy) * sn  # along the brushing
    v = -(xx - cx) * sn + (yy - cy) * c
    tex = ndimage.map_coordinates(canvas, [v + size / 2, u + size / 2], order=1, mode="grid-wrap")
    grain = 0.006 * _smooth_noise(rng, (size, size), 0.7)
    return tex + grain


def _sensor_noise(rng, size: int) -> np.ndarray:
    return rng.normal(0, 0.006, (size, size, 3)) + rng.normal(0, 0.004, (size, size, 1))


def _segments_alpha(size: int, pts0, pts1, w0, w1, g0, g1) -> np.ndarray:
    """Anti-aliased coverage (H, W) in [0, 1] of a set of line segments; width and strength are given
    at both ends of every segment and interpolated along it; overlapping segments take the max."""
    pts0, pts1 = np.asarray(pts0, float), np.asarray(pts1, float)
    w0, w1, g0, g1 = (np.asarray(a, float) for a in (w0, w1, g0, g1))
    alpha = np.zeros((size, size))
    if len(pts0) == 0:
        return alpha
    pad = max(w0.max(), w1.max()) / 2 + 2
    allx = np.concatenate([pts0[:, 0], pts1[:, 0]])
    ally = np.concatenate([pts0[:, 1], pts1[:, 1]])
    x0, x1 = max(int(np.floor(allx.min() - pad)), 0), min(int(np.ceil(allx.max() + pad)) + 1, size)
    y0, y1 = max(int(np.floor(ally.min() - pad)), 0), min(int(np.ceil(ally.max() + pad)) + 1, size)
    if x0 >= x1 or y0 >= y1:
        return alpha
    yy, xx = np.mgrid[y0:y1, x0:x1]
    px = xx.reshape(-1, 1).astype(float)
    py = yy.reshape(-1, 1).astype(float)
    dx, dy = pts1[:, 0] - pts0[:, 0], pts1[:, 1] - pts0[:, 1]
    len2 = np.maximum(dx * dx + dy * dy, 1e-9)
    t = np.clip(((px - pts0[:, 0]) * dx + (py - pts0[:, 1]) * dy) / len2, 0.0, 1.0)  # (N, S)
    dist = np.hypot(px - (pts0[:, 0] + t * dx), py - (pts0[:, 1] + t * dy))
    width = w0 + t * (w1 - w0)
    gain = g0 + t * (g1 - g0)
    cov = np.clip(width / 2 + 0.5 - dist, 0.0, 1.0) * gain
    alpha[y0:y1, x0:x1] = cov.max(axis=1).reshape(y1 - y0, x1 - x0)
    return alpha


def _polyline(pts, widths, gains):
    """Segments of one polyline given per-vertex widths and gains."""
    pts = np.asarray(pts, float)
    return pts[:-1], pts[1:], widths[:-1], widths[1:], gains[:-1], gains[1:]


def _local_lum(img: np.ndarray, center, r: int = 3) -> float:
    size = img.shape[0]
    x, y = int(np.clip(round(center[0]), 0, size - 1)), int(np.clip(round(center[1]), 0, size - 1))
    patch = img[max(y - r, 0):y + r + 1, max(x - r, 0):x + r + 1]
    return float((patch @ _LUMA).mean())


# ----------------------------------------------------------------------------------------------
# defect processes: each returns the scene (float RGB, noise-free) with the defect drawn on it


def _scratch(rng, img, s, level, center):
    size = img.shape[0]
    small, faint = "small" in level, "faint" in level
    length = (rng.uniform(9, 22) if small else rng.uniform(24, 75)) * s
    # lines are undirected: keep them at least ~25 degrees off the (horizontal) brushing
    ang = rng.uniform(np.radians(25), np.radians(155))
    d = np.array([np.cos(ang), np.sin(ang)])
    perp = np.array([-d[1], d[0]])
    c = np.asarray(center, float)
    bend = rng.uniform(-0.18, 0.18) if rng.random() < 0.5 else rng.uniform(-0.03, 0.03)
    p0, p2 = c - d * length / 2, c + d * length / 2
    p1 = c + perp * bend * length
    n = max(6, int(length / 2.5))
    t = np.linspace(0, 1, n)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
    t = t[:, 0]
    taper = np.clip(np.minimum(t, 1 - t) / rng.uniform(0.08, 0.25), 0.2, 1.0)
    vary = 0.8 + 0.2 * np.clip(ndimage.gaussian_filter1d(rng.standard_normal(n), 2.0) * 2, -1, 1)
    gains = taper * vary
    w = (rng.uniform(0.9, 1.6) if small else rng.uniform(1.0, 3.0)) * max(1.0, s ** 0.5)
    widths = w * (0.6 + 0.4 * taper)
    alpha = _segments_alpha(size, *_polyline(pts, widths, gains))
    contrast = rng.uniform(0.10, 0.14) if faint else rng.uniform(0.20, 0.38)
    lum = _local_lum(img, center)
    bright = rng.random() < (0.6 if lum > 0.4 else 0.9)
    sign = 1.0 if bright else -1.0
    return img + (sign * contrast * alpha)[..., None] * np.array([1.0, 1.0, 1.02 if bright else 1.0])


def _crack_walk(rng, start, theta0, n, step, jag):
    th = theta0 + np.cumsum(rng.normal(0, 0.12, n)) + rng.normal(0, jag, n)
    steps = step * rng.uniform(0.7, 1.3, n)[:, None] * np.stack([np.cos(th), np.sin(th)], axis=1)
    return np.vstack([start, start + np.cumsum(steps, axis=0)]), th


def _crack(rng, img, s, level, center):
    size = img.shape[0]
    small, faint = "small" in level, "faint" in level
    n = int(rng.integers(6, 11) if small else rng.integers(14, 32))
    step = rng.uniform(1.6, 2.6) * s
    theta0 = rng.uniform(0, 2 * np.pi)
    pts, th = _crack_walk(rng, np.zeros(2), theta0, n, step, rng.uniform(0.4, 0.7))
    pts = pts - pts.mean(axis=0) + np.asarray(center, float)
    t = np.linspace(0, 1, n + 1)
    w = (rng.uniform(1.0, 1.5) if small else rng.uniform(1.3, 2.6)) * max(1.0, s ** 0.5)
    widths = w * (0.35 + 0.65 * np.sin(np.pi * t) ** 0.6)
    gains = 0.75 + 0.25 * np.sin(np.pi * t)
    segs = [_polyline(pts, widths, gains)]
    n_branch = int(rng.integers(0, 2) if small else rng.integers(1, 4))
    for _ in range(n_branch):
        k = int(rng.integers(max(1, int(0.2 * n)), max(2, int(0.8 * n))))
        bt = th[min(k, n - 1)] + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2)
        bn = max(3, int(n * rng.uniform(0.25, 0.5)))
        bpts, _ = _crack_walk(rng, pts[k], bt, bn, step * 0.9, rng.uniform(0.4, 0.7))
        bw = widths[k] * 0.7 * np.linspace(1, 0.55, bn + 1)
        segs.append(_polyline(bpts, np.maximum(bw, 0.7), np.linspace(0.9, 0.6, bn + 1) * gains[k]))
    parts = [np.concatenate([sg[i] for sg in segs]) for i in range(6)]
    alpha = _segments_alpha(size, *parts)
    strength = rng.uniform(0.28, 0.38) if faint else rng.uniform(0.55, 0.85)
    # darken relative to the local brightness, but never by less than on a mid-grey surface, so a
    # crack stays visible on a dark background too
    ref = np.maximum(img, 0.45)
    return img - strength * alpha[..., None] * ref


def _dent(rng, img, s, level, center):
    size = img.shape[0]
    small, faint = "small" in level, "faint" in level
    a = (rng.uniform(3.5, 6.0) if small else rng.uniform(6.0, 13.0)) * s
    b = a * rng.uniform(0.55, 1.0)
    phi, psi = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    cx, cy = center
    r = int(np.ceil(a)) + 3
    x0, x1 = max(int(cx) - r, 0), min(int(cx) + r + 1, size)
    y0, y1 = max(int(cy) - r, 0), min(int(cy) + r + 1, size)
    out = img.copy()
    if x0 >= x1 - 2 or y0 >= y1 - 2:
        return out
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(float)
    u = (xx - cx) * np.cos(phi) + (yy - cy) * np.sin(phi)
    v = -(xx - cx) * np.sin(phi) + (yy - cy) * np.cos(phi)
    r2 = (u / a) ** 2 + (v / b) ** 2
    h = np.where(r2 < 1, (1 - r2) ** 2, 0.0)
    gy, gx = np.gradient(h)
    lit = gx * np.cos(psi) + gy * np.sin(psi)
    lit = lit / max(np.abs(lit).max(), 1e-9)
    contrast = rng.uniform(0.08, 0.11) if faint else rng.uniform(0.15, 0.28)
    shade = contrast * (0.85 * lit - 0.45 * h)
    out[y0:y1, x0:x1] += shade[..., None]
    return out


_STAIN_COLOURS = np.array([
    [0.50, 0.27, 0.10],  # rust
    [0.14, 0.12, 0.11],  # oil / grease
    [0.45, 0.37, 0.14],  # dried coolant
    [0.25, 0.30, 0.50],  # heat tint / chemical
    [0.82, 0.80, 0.72],  # lime residue
])


def _stain(rng, img, s, level, center):
    size = img.shape[0]
    small, faint = "small" in level, "faint" in level
    radius = (rng.uniform(3.5, 6.0) if small else rng.uniform(6.0, 15.0)) * s
    cx, cy = center
    r = int(np.ceil(radius * 1.8)) + 3
    x0, x1 = max(int(cx) - r, 0), min(int(cx) + r + 1, size)
    y0, y1 = max(int(cy) - r, 0), min(int(cy) + r + 1, size)
    out = img.copy()
    if x0 >= x1 - 2 or y0 >= y1 - 2:
        return out
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(float)
    theta = np.arctan2(yy - cy, xx - cx)
    rad = np.ones_like(theta)
    for k in range(2, 6):
        rad += rng.uniform(0, 0.22) / k ** 0.6 * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    rad = radius * np.maximum(rad, 0.45)
    shape = yy.shape
    wobble = ndimage.gaussian_filter(rng.standard_normal(shape), max(1.0, radius / 4), mode="reflect")
    rho = np.hypot(xx - cx, yy - cy) / rad + 0.12 * _norm(wobble)
    edge = rng.uniform(0.25, 0.6)
    alpha = _smoothstep((1 - rho) / edge)
    inner = ndimage.gaussian_filter(rng.standard_normal(shape), max(1.0, radius / 5), mode="reflect")
    alpha *= 0.8 + 0.2 * np.clip(_norm(inner), -1, 1)
    if rng.random() < 0.35:  # dried edge ("coffee ring")
        alpha = np.maximum(alpha, 0.9 * np.exp(-((rho - 0.92) / 0.1) ** 2))
    lum = _local_lum(img, center)
    weights = np.abs(_STAIN_COLOURS @ _LUMA - lum) + 0.05
    colour = _STAIN_COLOURS[rng.choice(len(_STAIN_COLOURS), p=weights / weights.sum())]
    colour = np.clip(colour + rng.normal(0, 0.03, 3), 0, 1)
    opacity = rng.uniform(0.25, 0.35) if faint else rng.uniform(0.45, 0.8)
    a = (opacity * alpha)[..., None]
    out[y0:y1, x0:x1] = out[y0:y1, x0:x1] * (1 - a) + colour * a
    return out


_DEFECTS = {"scratch": _scratch, "dent": _dent, "stain": _stain, "crack": _crack}


def _apply_defect(rng, scene, noise, clean_q, channels, kind, level, centre_fn, allow=None):
    """Draw a defect until it is visible: returns (image uint8, mask bool, level used)."""
    size = scene.shape[0]
    s = size / 128
    for attempt in range(_MAX_ATTEMPTS):
        if attempt == _MAX_ATTEMPTS // 2:
            level = "normal"  # the spot is too hard for a faint/small one: make it plain
        small, faint = "small" in level, "faint" in level
        min_px = max(5, round((8 if small else 20) * s * s))
        min_peak = 16 if faint else 32
        drawn = _DEFECTS[kind](rng, scene, s, level, centre_fn(rng))
        if allow is not None:
            drawn = scene + (drawn - scene) * allow[..., None]
        img = _quant(_to_channels(drawn + noise, channels))
        diff = np.abs(img.astype(np.int16) - clean_q.astype(np.int16))
        if diff.ndim == 3:
            diff = diff.max(axis=2)
        mask = diff >= CHANGE_THRESHOLD
        if mask.sum() >= min_px and diff.max() >= min_peak:
            img[~mask] = clean_q[~mask]
            return img, mask, level
    raise RuntimeError(f"could not draw a visible {kind} defect")  # pragma: no cover


# ----------------------------------------------------------------------------------------------
# the brushed-metal surface dataset


def _metal(rng, size: int, cx: float, cy: float, angle: float, base_range=(0.48, 0.60)) -> np.ndarray:
    base = rng.uniform(*base_range)
    tint = np.array([0.97, 1.0, 1.04]) * (1 + rng.normal(0, 0.012, 3))
    lum = base + _brushed(rng, size, cx, cy, angle)
    return lum[..., None] * tint


def _surface_scene(rng, size: int) -> np.ndarray:
    jitter = rng.uniform(-size / 2, size / 2, 2)
    angle = np.radians(rng.normal(0, 1.5))
    img = _metal(rng, size, size / 2 + jitter[0], size / 2 + jitter[1], angle)
    illum = _illumination(rng, size, rng.uniform(0.02, 0.09), rng.uniform(0.01, 0.03))
    return img + illum[..., None]


def surface_sample(rng=0, size: int = 128, channels: int = 3, defect_type: str | None = None,
                   level: str | None = None) -> Sample:
    """One brushed-metal image, clean or with a defect of `defect_type` (see :data:`DEFECT_TYPES`).

    `rng` is a seed or a ``numpy.random.Generator``; `level` forces the difficulty (one of
    :data:`LEVELS`), otherwise about a third are faint and/or small.
    """
    _check_image_args(size, channels)
    rng = np.random.default_rng(rng)
    scene = _surface_scene(rng, size)
    noise = _sensor_noise(rng, size)
    clean = _quant(_to_channels(scene + noise, channels))
    empty = np.zeros((size, size), np.uint8)
    if defect_type is None:
        return Sample(clean, clean.copy(), empty, None, None)
    _check_defect(defect_type, level)
    level = level or _level(rng)
    margin = 12 * size / 128

    def centre(r):
        return r.uniform(margin, size - margin, 2)

    img, mask, level = _apply_defect(rng, scene, noise, clean, channels, defect_type, level, centre)
    return Sample(clean, img, mask.astype(np.uint8) * 255, defect_type, level, location="surface")


# ----------------------------------------------------------------------------------------------
# the ROI dataset: a metal plate on a conveyor belt


def _rounded_rect_sdf(u, v, hw, hh, r):
    qx, qy = np.abs(u) - (hw - r), np.abs(v) - (hh - r)
    return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0) - r


def _plate_sdf(size, cx, cy, angle, hw, hh, r):
    yy, xx = _grid(size)
    c, sn = np.cos(angle), np.sin(angle)
    u = (xx - cx) * c + (yy - cy) * sn
    v = -(xx - cx) * sn + (yy - cy) * c
    return _rounded_rect_sdf(u, v, hw, hh, r)


def _belt(rng, size: int) -> np.ndarray:
    s = size / 128
    yy, xx = _grid(size)
    base = rng.uniform(0.17, 0.23)
    tint = np.array([0.94, 1.0, 1.0]) * (1 + rng.normal(0, 0.01, 3))
    period = 9 * s
    ribs = 0.03 * (np.abs(np.sin(np.pi * (xx + rng.uniform(0, period)) / period)) ** 3 - 0.42)
    grain = 0.022 * _smooth_noise(rng, (size, size), 0.8 * s)
    wear = ndimage.gaussian_filter1d(rng.standard_normal((size, size)), 14 * s, axis=1, mode="wrap")
    wear = 0.012 * _norm(ndimage.gaussian_filter1d(wear, 1.0, axis=0, mode="wrap"))
    return (base + ribs + grain + wear)[..., None] * tint


def _window(size: int, cx: float, cy: float, r: float):
    """Pixel grid (yy, xx) of the square window of half-width `r` around (cx, cy), clipped to the
    image, with its slices; None when it falls outside."""
    x0, x1 = max(int(np.floor(cx - r)), 0), min(int(np.ceil(cx + r)) + 1, size)
    y0, y1 = max(int(np.floor(cy - r)), 0), min(int(np.ceil(cy + r)) + 1, size)
    if x0 >= x1 or y0 >= y1:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(float)
    return yy, xx, (slice(y0, y1), slice(x0, x1))


def _debris(rng, belt: np.ndarray) -> np.ndarray:
    """Harmless belt debris, different in every image: scuffs, dust specks, crumbs, lint fibres."""
    size = belt.shape[0]
    s = size / 128
    out = belt.copy()
    # scuffs: faint, soft, lighter elongated patches
    for _ in range(int(rng.poisson(0.6))):
        cx, cy = rng.uniform(0, size, 2)
        a, b, phi = rng.uniform(6, 18) * s, rng.uniform(2, 5) * s, rng.uniform(0, np.pi)
        win = _window(size, cx, cy, 2.2 * a)
        if win is None:
            continue
        yy, xx, sl = win
        u = (xx - cx) * np.cos(phi) + (yy - cy) * np.sin(phi)
        v = -(xx - cx) * np.sin(phi) + (yy - cy) * np.cos(phi)
        out[sl] += rng.uniform(0.03, 0.06) * np.exp(-(u / a) ** 2 - (v / b) ** 2)[..., None]
    # dust specks: tiny light dots
    for _ in range(int(rng.poisson(7))):
        cx, cy = rng.uniform(0, size, 2)
        rad = rng.uniform(0.3, 0.9) * max(1.0, s)
        gain = rng.uniform(0.08, 0.25)
        win = _window(size, cx, cy, rad + 1)
        if win is None:
            continue
        yy, xx, sl = win
        out[sl] += (np.clip(rad + 0.5 - np.hypot(xx - cx, yy - cy), 0, 1) * gain)[..., None]
    # crumbs: small irregular light-brown bits with a tiny shadow
    for _ in range(int(rng.poisson(1.5))):
        cx, cy = rng.uniform(0, size, 2)
        rad = rng.uniform(0.9, 2.3) * s
        ph = rng.uniform(0, 2 * np.pi, 2)
        colour = np.array([0.70, 0.58, 0.40]) * rng.uniform(0.8, 1.15)
        win = _window(size, cx, cy, 1.5 * rad + 3)
        if win is None:
            continue
        yy, xx, sl = win
        ang = np.arctan2(yy - cy, xx - cx)
        irregular = 1 + 0.25 * np.cos(3 * ang + ph[0]) + 0.15 * np.cos(5 * ang + ph[1])
        cov = np.clip(rad * irregular + 0.5 - np.hypot(xx - cx, yy - cy), 0, 1)
        shadow = ndimage.shift(cov, (0.8 * s, 0.8 * s), order=1) * (1 - cov)
        patch = out[sl] * (1 - 0.4 * shadow)[..., None]
        out[sl] = patch * (1 - cov[..., None]) + colour * cov[..., None]
    # lint fibres: thin curly light threads
    for _ in range(int(rng.poisson(0.9))):
        n = 8
        length = rng.uniform(6, 18) * s
        th = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.45, n))
        pts = np.vstack([np.zeros(2), np.cumsum((length / n) * np.stack([np.cos(th), np.sin(th)], 1), 0)])
        pts += rng.uniform(0, size, 2)
        w = np.full(n + 1, rng.uniform(0.7, 1.0))
        cov = _segments_alpha(size, *_polyline(pts, w, np.full(n + 1, rng.uniform(0.5, 0.85))))
        colour = np.array([0.62, 0.64, 0.70]) * rng.uniform(0.85, 1.1)
        out = out * (1 - cov[..., None]) + colour * cov[..., None]
    return out


def _roi_scene(rng, size: int):
    """(scene float RGB, ROI bool, signed distance to the plate edge)."""
    s = size / 128
    belt = _debris(rng, _belt(rng, size))
    cx, cy = size / 2 + rng.uniform(-8, 8, 2) * s
    angle = np.radians(np.clip(rng.normal(0, 2.0), -5, 5))
    hw, hh, rr = 0.30 * size, 0.23 * size, 0.07 * size
    sdf = _plate_sdf(size, cx, cy, angle, hw, hh, rr)
    shadow_sdf = _plate_sdf(size, cx + 2.5 * s, cy + 3.0 * s, angle, hw, hh, rr)
    shadow = np.clip(0.5 - shadow_sdf / (3 * s), 0, 1)
    belt = belt * (1 - 0.5 * shadow)[..., None]
    plate = _metal(rng, size, cx, cy, angle, base_range=(0.56, 0.66))
    gy, gx = np.gradient(sdf)
    rim = np.exp(-((sdf + 1.3 * s) / (0.9 * s)) ** 2)
    plate = plate + (0.14 * rim * -(gx + gy) / np.sqrt(2))[..., None]  # bevel lit from top-left
    cover = np.clip(0.5 - sdf, 0, 1)[..., None]
    scene = belt * (1 - cover) + plate * cover
    scene = scene + _illumination(rng, size, rng.uniform(0.02, 0.07), rng.uniform(0.01, 0.02))[..., None]
    return scene, sdf <= 0, sdf


def roi_sample(rng=0, size: int = 128, channels: int = 3, defect_type: str | None = None,
               location: str = "inside", level: str | None = None) -> Sample:
    """One plate-on-belt image with its ROI (the plate), clean or with a defect of `defect_type`
    drawn ``"inside"`` the ROI (on the plate) or ``"outside"`` it (on the belt)."""
    _check_image_args(size, channels)
    rng = np.random.default_rng(rng)
    s = size / 128
    scene, roi, sdf = _roi_scene(rng, size)
    noise = _sensor_noise(rng, size)
    clean = _quant(_to_channels(scene + noise, channels))
    roi_u8 = roi.astype(np.uint8) * 255
    empty = np.zeros((size, size), np.uint8)
    if defect_type is None:
        return Sample(clean, clean.copy(), empty, None, None, roi=roi_u8)
    _check_defect(defect_type, level)
    if location not in ("inside", "outside"):
        raise GRDNetError(f"location must be 'inside' or 'outside', got {location!r}")
    level = level or _level(rng)
    if location == "inside":
        allow = roi.astype(float)
        spots = np.argwhere(sdf <= -6 * s)
    else:
        # a faint mark on the dark belt would be invisible: outside ones are never faint
        level = "small" if "small" in level else "normal"
        allow = (sdf > 1.0).astype(float)  # one pixel clear of the ROI
        edge = 8 * s
        yy, xx = _grid(size)
        inner = (xx >= edge) & (xx < size - edge) & (yy >= edge) & (yy < size - edge)
        spots = np.argwhere((sdf >= 5 * s) & inner)

    def centre(r):
        y, x = spots[int(r.integers(0, len(spots)))]
        return np.array([x, y], float) + r.uniform(-0.5, 0.5, 2)

    img, mask, level = _apply_defect(rng, scene, noise, clean, channels, defect_type, level, centre, allow)
    return Sample(clean, img, mask.astype(np.uint8) * 255, defect_type, level, roi=roi_u8, location=location)


# ----------------------------------------------------------------------------------------------
# writing datasets


def _check_image_args(size, channels):
    if not isinstance(size, (int, np.integer)) or size < 32:
        raise GRDNetError(f"size must be an integer of at least 32, got {size!r}")
    if channels not in (1, 3):
        raise GRDNetError(f"channels must be 1 or 3, got {channels!r}")


def _check_defect(defect_type, level):
    if defect_type not in DEFECT_TYPES:
        raise GRDNetError(f"defect_type must be one of {', '.join(DEFECT_TYPES)}, got {defect_type!r}")
    if level is not None and level not in LEVELS:
        raise GRDNetError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")


def _check_counts(**counts):
    for name, n in counts.items():
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise GRDNetError(f"{name} must be a non-negative integer, got {n!r}")
    if counts.get("n_train", 1) < 1:
        raise GRDNetError("n_train must be at least 1")


def _prepare_root(root, overwrite: bool) -> Path:
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise GRDNetError(f"{root} exists and is not a folder")
    existing = [root / name for name in _LAYOUT if (root / name).exists()]
    if existing:
        if not overwrite:
            raise GRDNetError(f"{root} already holds a dataset ({existing[0].name} exists); "
                              "choose an empty folder or pass overwrite=True")
        for p in existing:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, compress_level=1)


def _rng(seed: int, split: int, i: int):
    return np.random.default_rng([seed, split, i])


def _check_seed(seed):
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise GRDNetError(f"seed must be a non-negative integer, got {seed!r}")


def make_surface_dataset(root, n_train: int = 200, n_test_good: int = 40, n_test_defect: int = 60,
                         size: int = 128, channels: int = 3, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a brushed-metal dataset in the MVTec AD layout under `root` and return `root`.

    ``train/good/NNN.png``, ``test/good/NNN.png``, ``test/<type>/NNN.png`` and
    ``ground_truth/<type>/NNN_mask.png`` (uint8 0/255) for the types in :data:`DEFECT_TYPES`, the
    defective images split evenly between them. `channels` 1 writes grayscale (mode L) PNGs, 3 RGB.
    A folder that already holds a dataset is refused unless `overwrite` (which replaces it).
    """
    _check_image_args(size, channels)
    _check_counts(n_train=n_train, n_test_good=n_test_good, n_test_defect=n_test_defect)
    _check_seed(seed)
    root = _prepare_root(root, overwrite)
    for i in range(n_train):
        _save(surface_sample(_rng(seed, 0, i), size, channels).image, root / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test_good):
        _save(surface_sample(_rng(seed, 1, i), size, channels).image, root / "test" / "good" / f"{i:03d}.png")
    (root / "test" / "good").mkdir(parents=True, exist_ok=True)
    counters = dict.fromkeys(DEFECT_TYPES, 0)
    for i in range(n_test_defect):
        kind = DEFECT_TYPES[i % len(DEFECT_TYPES)]
        smp = surface_sample(_rng(seed, 2, i), size, channels, defect_type=kind)
        stem = f"{counters[kind]:03d}"
        counters[kind] += 1
        _save(smp.image, root / "test" / kind / f"{stem}.png")
        _save(smp.mask, root / "ground_truth" / kind / f"{stem}_mask.png")
    return root


def make_roi_dataset(root, n_train: int = 200, n_test_good: int = 40, n_test_defect: int = 80,
                     size: int = 128, channels: int = 3, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a plate-on-conveyor dataset with per-image ROI masks under `root` and return `root`.

    The ROI is the plate. Of the `n_test_defect` defect images (types split evenly), half carry the
    defect on the plate: ``test/<type>/NNN.png`` with ``ground_truth/<type>/NNN_mask.png``; the other
    half carry it on the belt, outside the ROI, and are good: they go to ``test/good/`` with no mask.
    ROI masks mirror the images: ``roi/train/good/NNN.png``, ``roi/test/<type>/NNN.png`` (uint8 0/255).
    ``test_manifest.csv`` lists every test image: path (relative to root), label (good | defect),
    defect_type (none or a type), location (none | inside | outside) and mask (relative path or empty).
    """
    _check_image_args(size, channels)
    _check_counts(n_train=n_train, n_test_good=n_test_good, n_test_defect=n_test_defect)
    _check_seed(seed)
    root = _prepare_root(root, overwrite)
    for i in range(n_train):
        smp = roi_sample(_rng(seed, 10, i), size, channels)
        _save(smp.image, root / "train" / "good" / f"{i:03d}.png")
        _save(smp.roi, root / "roi" / "train" / "good" / f"{i:03d}.png")

    specs = [(None, "none")] * n_test_good
    for i in range(n_test_defect):
        kind = DEFECT_TYPES[i % len(DEFECT_TYPES)]
        specs.append((kind, "inside" if (i // len(DEFECT_TYPES)) % 2 == 0 else "outside"))
    order = np.random.default_rng([seed, 11]).permutation(len(specs))  # mix the good folder
    counters: dict[str, int] = {}
    rows = []
    (root / "test" / "good").mkdir(parents=True, exist_ok=True)
    for j in order:
        kind, location = specs[j]
        smp = roi_sample(_rng(seed, 12, int(j)), size, channels, defect_type=kind, location=location)
        folder = kind if location == "inside" else "good"
        stem = f"{counters.get(folder, 0):03d}"
        counters[folder] = counters.get(folder, 0) + 1
        rel = f"test/{folder}/{stem}.png"
        _save(smp.image, root / rel)
        _save(smp.roi, root / "roi" / "test" / folder / f"{stem}.png")
        mask_rel = ""
        if location == "inside":
            mask_rel = f"ground_truth/{folder}/{stem}_mask.png"
            _save(smp.mask, root / mask_rel)
        rows.append((rel, "defect" if location == "inside" else "good", kind or "none", location, mask_rel))
    rows.sort()
    with open(root / "test_manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "defect_type", "location", "mask"])
        w.writerows(rows)
    return root
