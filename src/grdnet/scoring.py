"""Inference: anomaly maps, image scores and decisions, from a saved model or trained networks.

`BasePredictor` is the one code path used by the Python API, the CLI, the test command and the
service; its subclasses only compute maps and scores: `Predictor` runs `grdnet.model.GRDNet` in
PyTorch, in eval mode, without autograd; `grdnet.export.OnnxPredictor` runs the exported ONNX graph.

An image is scored in one or two views (`image_views`): the whole image squeezed to the model
size, native-resolution tiles, or tiles of the image at its own aspect ratio. Each view's map
comes from the network (which averages flips, `ModelConfig.flip_average`); the image's map is
the pixel-wise maximum of its views' maps and its score the largest of their scores.
"""
from __future__ import annotations

import copy
import functools
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .config import ModelConfig
from .data import array_to_tensor, open_image, pil_to_array, resize_to, short_side_size
from .errors import GRDNetError
from .model import INFERENCE_PARTS, GRDNet
from .regions import Region, defect_mask, find_regions

ImageInput = Union[str, Path, np.ndarray, Image.Image]


def image_scores(maps: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Image scores (B,) from maps (B, 1, H, W): the maximum of the map box-filtered with a
    `cfg.score_kernel`-pixel side (DRAEM's protocol; robust to single hot pixels)."""
    kernel = cfg.score_kernel
    pooled = F.avg_pool2d(maps, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    return pooled.flatten(1).amax(1)


def image_views(cfg: ModelConfig, hw: tuple[int, int], tile: bool | str) -> tuple[str, ...]:
    """The views an image of size `hw` is scored in:

    - "squeeze": the whole image resized to the model size (one network pass, batched);
    - "native": overlapping model-size tiles at the image's own resolution (`tile`, for images
      larger than the model);
    - "keep": the image resized so that its shorter side is the model size, then tiles.

    `ModelConfig.aspect` "keep" scores the "keep" view alone; "both" adds it to the first view of
    non-square images (squeezing a 600 x 240 image shrinks a crack across it 2.5x more than along).
    `tile` "both" (a model trained on whole images and crops alike) scores an image larger than
    the model whole and as native tiles: a defect larger than a tile shows in the first, one a few
    pixels wide in the second.
    """
    if cfg.aspect == "keep":
        return ("keep",)
    large = max(hw) > cfg.image_size
    first = ("squeeze", "native") if tile == "both" and large else ("native",) if tile and large else ("squeeze",)
    return (*first, "keep") if cfg.aspect == "both" and hw[0] != hw[1] else first


@dataclass
class Prediction:
    """The result for one image. `anomaly_map` has the input image's own size (H, W);
    `defect_mask` and `regions` are the map at `pixel_threshold`, inside the ROI if one was given,
    on an image decided defective (one decided good has none)."""

    score: float
    is_anomalous: bool
    threshold: float | None
    anomaly_map: np.ndarray = field(repr=False)
    path: str | None = None
    pixel_threshold: float | None = None
    roi: np.ndarray | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return "defective" if self.is_anomalous else "good"

    @functools.cached_property
    def defect_mask(self) -> np.ndarray | None:
        """(H, W) bool: the pixels whose map value reaches `pixel_threshold` (None without one);
        all False on an image decided good, so that regions always explain a defective decision."""
        if self.pixel_threshold is None:
            return None
        if self.threshold is not None and not self.is_anomalous:
            return np.zeros(self.anomaly_map.shape, bool)
        return defect_mask(self.anomaly_map, self.pixel_threshold, self.roi)

    @functools.cached_property
    def regions(self) -> list[Region]:
        """The defect mask's 8-connected regions (box, area, peak and mean score), highest peak first."""
        mask = self.defect_mask
        return [] if mask is None else find_regions(self.anomaly_map, mask)


def to_numpy_image(item: ImageInput, channels: int) -> tuple[np.ndarray, str | None]:
    """Any supported input -> uint8/float (H, W, C) array with the model's channels, and its path."""
    if isinstance(item, (str, Path)):
        return pil_to_array(open_image(item), channels), str(item)
    if isinstance(item, Image.Image):
        return pil_to_array(item, channels), None
    a = np.asarray(item)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an image array (H, W), (H, W, 1|3|4), got shape {a.shape}")
    a = a[..., :3] if a.shape[2] == 4 else a
    if a.dtype != np.uint8:
        a = a.astype(np.float32)
        if a.max() > 1.0:
            raise ValueError("float image arrays must be in [0, 1]; pass uint8 for 0..255")
    if a.shape[2] != channels:
        a = a.mean(2, keepdims=True) if channels == 1 else np.repeat(a, 3, axis=2)
    return a, None


class BasePredictor:
    """Everything inference does around the network: input conversion, batching, resizing, ROI,
    tiling and decisions. Subclasses differ only in `_run`, which computes maps and scores
    (`Predictor`: PyTorch; `grdnet.export.OnnxPredictor`: ONNX Runtime).

    `tile=True` scores images larger than the model size as overlapping tiles at native
    resolution (see `predict`), `tile="both"` whole and as tiles (the larger score); `None` in
    `load` means "as the model was trained".
    """

    def __init__(self, cfg: ModelConfig, threshold: float | None = None, meta: dict | None = None,
                 tile: bool | str = False, tile_overlap: float = 0.25):
        if not 0.0 <= tile_overlap < 1.0:
            raise ValueError(f"tile_overlap must be in [0, 1), got {tile_overlap}")
        self.cfg, self.threshold, self.meta = cfg, threshold, meta or {}
        self.tile, self.tile_overlap = tile, tile_overlap
        # None: the image threshold in use is also the pixel threshold (see `predict`).
        self.pixel_threshold: float | None = self.meta.get("pixel_threshold")

    def _run(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, S, S) in [0, 1] -> (anomaly maps (B, 1, S, S) float, image scores (B,))."""
        raise NotImplementedError

    def pixel_threshold_for(self, threshold: float | None = None, pixel_threshold: float | None = None):
        """The pixel threshold in use: `pixel_threshold`, else the predictor's, else the image
        threshold in use (`threshold`, else the predictor's); None without any."""
        return next((t for t in (pixel_threshold, self.pixel_threshold, threshold, self.threshold)
                     if t is not None), None)

    def maps(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) in [0, 1] at model size -> anomaly maps (B, 1, S, S)."""
        return self._run(batch)[0][:, :1]

    def predict(self, images: ImageInput | Sequence[ImageInput], threshold: float | None = None,
                batch_size: int = 16, roi=None, tile: bool | str | None = None,
                pixel_threshold: float | None = None) -> Prediction | list[Prediction]:
        """Score one image or a list. `threshold` overrides the stored image threshold,
        `pixel_threshold` the pixel threshold of the defect mask and regions (default: the
        predictor's `pixel_threshold` if set, else the image threshold in use: a map pixel at the
        level that flags an image). `roi`, optional: a bool (H, W) array for every
        image, or a list with one per image (None: no ROI); the map is zeroed outside it before
        scoring and regions lie inside it (a user's explicit choice: the model needs no ROI).

        `tile` (default: the predictor's setting): an image larger than the model size is cut
        into overlapping model-size tiles at its own resolution (no downscaling, so small defects
        keep their size); the tile maps are blended with a smooth window into one map, and the
        score rule is applied to that map. Smaller images take the usual whole-image path.
        `tile="both"` scores a large image both ways: the map is the pixel-wise maximum, the
        score the larger one.
        """
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        rois = list(roi) if isinstance(roi, (list, tuple)) else [roi] * len(items)
        if len(rois) != len(items):
            raise ValueError(f"{len(rois)} ROIs for {len(items)} images")
        tile = self.tile if tile is None else tile
        out: list[Prediction] = []
        for start in range(0, len(items), batch_size):
            end = start + batch_size
            out.extend(self._predict_batch(items[start:end], threshold, rois[start:end], tile, batch_size))
        pixel_thr = self.pixel_threshold_for(threshold, pixel_threshold)
        for p, r in zip(out, rois):
            p.pixel_threshold, p.roi = pixel_thr, None if r is None else np.asarray(r, dtype=bool)
        return out[0] if single else out

    def _predict_batch(self, items, threshold, rois, tile: bool | str, batch_size: int) -> list[Prediction]:
        thr = self.threshold if threshold is None else threshold
        arrays = [to_numpy_image(it, self.cfg.channels) for it in items]
        rois = [None if r is None else np.asarray(r, dtype=bool) for r in rois]
        for (a, path), r in zip(arrays, rois):
            if r is not None and r.shape != a.shape[:2]:
                raise GRDNetError(f"{path or 'image'}: ROI is {r.shape[1]}x{r.shape[0]} but the image is "
                                  f"{a.shape[1]}x{a.shape[0]}")
        views = [image_views(self.cfg, a.shape[:2], tile) for a, _ in arrays]
        squeezed = self._squeezed_maps([i for i, v in enumerate(views) if "squeeze" in v], arrays, rois)
        results = []
        for i, ((a, path), roi) in enumerate(zip(arrays, rois)):
            found = [squeezed[i] if v == "squeeze" else self._tiled_map(a, roi, batch_size, keep_aspect=v == "keep")
                     for v in views[i]]
            full = found[0][0] if len(found) == 1 else np.maximum.reduce([m for m, _ in found])
            results.append(self._decide(full, max(score for _, score in found), thr, path))
        return results

    def _squeezed_maps(self, which: list[int], arrays, rois) -> dict[int, tuple[np.ndarray, float]]:
        """The "squeeze" view of the images `which`, in one batch: index -> (map at the image's
        own size, score)."""
        if not which:
            return {}
        maps, scores = self._run(torch.stack([array_to_tensor(arrays[i][0], self.cfg.image_size) for i in which]))
        if any(rois[i] is not None for i in which):
            ones = torch.ones(1, *maps.shape[-2:])
            roi_t = torch.stack([ones if rois[i] is None else resize_to(
                torch.from_numpy(rois[i].astype(np.float32))[None], maps.shape[-2:], mode="nearest")
                for i in which])
            maps = maps[:, :1] * roi_t.to(maps.device)
            scores = image_scores(maps, self.cfg)
        out = {}
        for i, m, score in zip(which, maps, scores.float().cpu().numpy()):
            full = resize_map(m[:1], arrays[i][0].shape[:2])
            out[i] = (full if rois[i] is None else full * rois[i], float(score))
        return out

    @staticmethod
    def _decide(full: np.ndarray, score: float, thr: float | None, path: str | None) -> Prediction:
        return Prediction(score, bool(thr is not None and score >= thr), thr, full, path)

    def _tiled_map(self, a: np.ndarray, roi: np.ndarray | None, batch_size: int,
                   keep_aspect: bool = False) -> tuple[np.ndarray, float]:
        """One large image -> (stitched (H, W) map at its own resolution, image score). With
        `keep_aspect` the image is first resized so that its shorter side is one tile."""
        s = self.cfg.image_size
        img = array_to_tensor(a, None)
        own_hw = tuple(img.shape[-2:])
        if keep_aspect:
            img = resize_to(img, short_side_size(own_hw, s))
        h, w = img.shape[-2:]
        if h < s or w < s:  # a long, thin image: pad the short side up to one tile
            img = F.pad(img[None], (0, max(0, s - w), 0, max(0, s - h)), mode="replicate")[0]
        ys, xs = tile_starts(img.shape[1], s, self.tile_overlap), tile_starts(img.shape[2], s, self.tile_overlap)
        corners = [(y, x) for y in ys for x in xs]
        win = blend_window(s)
        acc = torch.zeros(img.shape[1:])
        weight = torch.zeros(img.shape[1:])
        for start in range(0, len(corners), batch_size):
            chunk = corners[start:start + batch_size]
            maps = self._run(torch.stack([img[:, y:y + s, x:x + s] for y, x in chunk]))[0].float().cpu()
            for (y, x), m in zip(chunk, maps):
                acc[y:y + s, x:x + s] += m[0] * win
                weight[y:y + s, x:x + s] += win
        full = (acc / weight)[:h, :w].clamp(0, 1)
        if roi is not None:
            full = full * resize_to(torch.from_numpy(roi.astype(np.float32))[None], (h, w), mode="nearest")[0]
        # One map pixel is one model pixel here: the score rule (kernel in model pixels) applies
        # to the stitched map as is.
        score = float(image_scores(full[None, None], self.cfg)[0])
        full = resize_map(full[None], own_hw)  # back to the image's own size, as the whole-image view
        return (full if roi is None else full * roi), score


def tile_starts(length: int, size: int, overlap: float) -> list[int]:
    """Tile offsets along one axis: the fewest tiles of `size` that cover `length` with at least
    `overlap` (fraction) between neighbours, spread evenly, the last one flush with the end."""
    if length <= size:
        return [0]
    n = math.ceil((length - size) / (size * (1.0 - overlap))) + 1
    return [int(round(v)) for v in np.linspace(0, length - size, n)]


def blend_window(size: int) -> torch.Tensor:
    """Separable sine-squared (Hann) weights (size, size), near zero at a tile's edges and never
    zero: tile edges, where convolutions see padding, count least, so the blend has no seams."""
    w = torch.sin(math.pi * (torch.arange(size, dtype=torch.float32) + 0.5) / size) ** 2
    return w[:, None] * w[None, :]


class Predictor(BasePredictor):
    """Scores images with a trained GRD-Net, in PyTorch. On the CPU, `net` is a fused,
    channels-last copy of the network given (see `cpu_inference_net`).

    >>> p = Predictor.load("runs/tile")
    >>> result = p.predict("part.png")          # also a numpy array, a PIL image, or a list
    >>> result.score, result.label, result.anomaly_map.shape
    """

    def __init__(self, net: GRDNet, cfg: ModelConfig, threshold: float | None = None,
                 meta: dict | None = None, device: str | torch.device = "cpu", tile: bool | str = False,
                 tile_overlap: float = 0.25):
        super().__init__(cfg, threshold, meta, tile, tile_overlap)
        self.device = torch.device(device)
        net = net.to(self.device).eval()
        self.net = cpu_inference_net(net) if self.device.type == "cpu" else net

    @classmethod
    def load(cls, path, device: str | torch.device = "cpu", tile: bool | str | None = None) -> "Predictor":
        """Load a model folder (or a training run folder holding one)."""
        from .modelfile import load_model

        net, cfg, meta = load_model(path)
        return cls(net, cfg, meta.get("threshold"), meta, device, tile=trained_on_tiles(meta) if tile is None else tile)

    @torch.inference_mode()
    def _run(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = batch.to(self.device)
        if self.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        maps = self.net(x).float()
        return maps, image_scores(maps, self.cfg)


def cpu_inference_net(net: GRDNet) -> GRDNet:
    """A copy of `net`'s inference parts (eval mode) for CPU inference: batch norms folded into
    the convolutions before them, weights in channels-last layout. Measured at the `cpu` preset
    about 2x faster than plain eager at batch 1 and 1.1-1.3x at batch 16 (benchmarks/speed.py
    --only variants); torch.compile gained at most ~20% more, at batch 1 only, after a cold
    compile of about a minute per batch shape, so it is not used (docs/EXPERIMENTS.md). A copy,
    so that networks shared with a training run are left alone; any other network (a map function
    of one's own) is used as it is."""
    if not isinstance(net, GRDNet):
        return net
    with torch.device("meta"):  # a shell whose parts are all replaced below: no weights allocated
        fast = GRDNet(net.cfg)
    for name in INFERENCE_PARTS:
        part = getattr(net, name)
        setattr(fast, name, None if part is None else _folded(part))
    return fast.eval().to(memory_format=torch.channels_last)


def _folded(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` with its batch norms folded (torch.fx), or, where it cannot be traced
    (the segmenter's optional input), a copy whose traceable children are folded."""
    with warnings.catch_warnings():  # the module imports deprecated torch.jit helpers it does not use here
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.fx.experimental.optimization import fuse

    try:
        return fuse(module)
    except Exception:  # symbolic tracing fails on control flow that depends on the inputs
        clone = copy.deepcopy(module)
        for name, child in module.named_children():
            if any(isinstance(m, torch.nn.BatchNorm2d) for m in child.modules()):
                setattr(clone, name, _folded(child))
        return clone


def trained_on_tiles(meta: dict) -> bool | str:
    """Whether a model was trained on native-resolution crops, so tiled inference fits it: True,
    False, or "both" (whole images and crops; scored both ways)."""
    crops = meta.get("training", {}).get("train_config", {}).get("train_crops", False)
    return "both" if crops == "both" else bool(crops)


def resize_map(m: torch.Tensor, hw: tuple[int, int]) -> np.ndarray:
    """(1, S, S) map -> (H, W) float32 numpy at the image's own size."""
    if tuple(m.shape[-2:]) != tuple(hw):
        m = F.interpolate(m[None], size=tuple(hw), mode="bilinear", align_corners=False)[0]
    return m[0].clamp(0, 1).cpu().numpy().astype(np.float32)
