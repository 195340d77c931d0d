"""Inference: anomaly maps, image scores and decisions, from a saved model or trained networks.

`BasePredictor` is the one code path used by the Python API, the CLI, the test command and the
service; its subclasses only compute maps and scores: `Predictor` runs the networks inference needs
(encoder, decoder, segmenter) in PyTorch, in eval mode, without autograd; `grdnet.export.OnnxPredictor`
runs the exported ONNX graph.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from PIL import Image

from .config import ModelConfig
from .data import array_to_tensor, open_image, pil_to_array, resize_to, short_side_size
from .errors import GRDNetError
from .model.generator import Decoder, ResEncoder
from .model.segmenter import Segmenter

ImageInput = Union[str, Path, np.ndarray, Image.Image]


class InferenceNet(nn.Module):
    """x (B, C, S, S) in [0, 1] -> anomaly probability maps (B, 1 + len(score_sizes), S, S).

    Holds (and shares, when built from a training run) the generator's first encoder and
    decoder and the segmenter: the networks inference needs (the segmenter alone, encoder and
    decoder None, for a model without the GAN). Channel 0 is the anomaly map of x;
    each further channel is the map of x downscaled to one of `score_sizes`, resized back to S,
    used only for the image score (`ModelConfig.score_scales`). With `flip_average`, each map is
    the mean of the maps of the view and its three flips, each flipped back
    (`ModelConfig.flip_average`).
    """

    def __init__(self, encoder: nn.Module | None, decoder: nn.Module | None, segmenter: nn.Module,
                 flip_average: bool = False, score_sizes: tuple[int, ...] = ()):
        super().__init__()
        self.encoder, self.decoder, self.segmenter = encoder, decoder, segmenter
        self.flip_average, self.score_sizes = flip_average, tuple(score_sizes)

    @classmethod
    def build(cls, cfg: ModelConfig) -> "InferenceNet":
        if not cfg.gan:
            return cls(None, None, Segmenter(cfg), cfg.flip_average, cfg.score_sizes)
        return cls(ResEncoder(cfg.channels, cfg.gen_widths, cfg.latent_channels, cfg.unshuffle),
                   Decoder(cfg.channels, cfg.gen_widths, cfg.latent_channels, cfg.unshuffle), Segmenter(cfg),
                   cfg.flip_average, cfg.score_sizes)

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        """The map of x alone (B, 1, S, S), without flip averaging."""
        x_hat = None if self.encoder is None else self.decoder(self.encoder(x))
        return torch.softmax(self.segmenter(x_hat, x), dim=1)[:, 1:2]

    def view_map(self, x: torch.Tensor) -> torch.Tensor:
        """The map of x (B, 1, S, S), flip-averaged if the model is configured so."""
        if not self.flip_average:
            return self.anomaly_map(x)
        b = x.shape[0]
        # One batch of four views: the same network cost as four calls, better use of the cores.
        views = torch.cat([x, x.flip(-1), x.flip(-2), x.flip(-2, -1)])
        m = self.anomaly_map(views)
        return (m[:b] + m[b:2 * b].flip(-1) + m[2 * b:3 * b].flip(-2) + m[3 * b:].flip(-2, -1)) / 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = [self.view_map(x)]
        for s in self.score_sizes:
            small = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
            maps.append(F.interpolate(self.view_map(small), size=x.shape[-2:], mode="bilinear", align_corners=False))
        return maps[0] if len(maps) == 1 else torch.cat(maps, 1)  # no copy for the usual single view


def image_scores(maps: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Image scores (B,) from model-resolution maps (B, n, S, S): the score rule on each channel
    (by default the maximum of the box-filtered map, DRAEM's protocol, robust to single hot
    pixels), averaged over the channels (the views of `ModelConfig.score_scales`)."""
    b, n = maps.shape[:2]
    maps = maps.reshape(b * n, 1, *maps.shape[-2:])
    if cfg.score_rule == "topk_mean":
        flat = maps.flatten(1)
        k = max(1, int(round(cfg.score_topk * flat.shape[1])))
        scores = flat.topk(k, dim=1).values.mean(1)
    else:
        k = cfg.score_kernel
        pooled = F.avg_pool2d(maps, k, stride=1, padding=k // 2, count_include_pad=False)
        scores = pooled.flatten(1).amax(1)
    return scores.reshape(b, n).mean(1)


@dataclass
class Prediction:
    """The result for one image. `anomaly_map` has the input image's own size (H, W)."""

    score: float
    is_anomalous: bool
    threshold: float | None
    anomaly_map: np.ndarray = field(repr=False)
    path: str | None = None

    @property
    def label(self) -> str:
        return "defective" if self.is_anomalous else "good"


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
    resolution (see `predict`); `None` in `load` means "as the model was trained".
    """

    def __init__(self, cfg: ModelConfig, threshold: float | None = None, meta: dict | None = None,
                 tile: bool = False, tile_overlap: float = 0.25):
        if not 0.0 <= tile_overlap < 1.0:
            raise ValueError(f"tile_overlap must be in [0, 1), got {tile_overlap}")
        self.cfg, self.threshold, self.meta = cfg, threshold, meta or {}
        self.tile, self.tile_overlap = tile, tile_overlap

    def _run(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, S, S) in [0, 1] -> (maps (B, n, S, S) float, image scores (B,)); channel 0 is the
        anomaly map, the others the coarser views of `ModelConfig.score_scales`."""
        raise NotImplementedError

    def maps(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) in [0, 1] at model size -> anomaly maps (B, 1, S, S)."""
        return self._run(batch)[0][:, :1]

    def predict(self, images: ImageInput | Sequence[ImageInput], threshold: float | None = None,
                batch_size: int = 16, roi=None, tile: bool | None = None) -> Prediction | list[Prediction]:
        """Score one image or a list. `threshold` overrides the stored one. `roi`, optional: a
        bool (H, W) array for every image, or a list with one per image (None: no ROI); the map
        is zeroed outside it before scoring (a user's explicit choice: the model needs no ROI).

        `tile` (default: the predictor's setting): an image larger than the model size is cut
        into overlapping model-size tiles at its own resolution (no downscaling, so small defects
        keep their size); the tile maps are blended with a smooth window into one map, and the
        score rule is applied to that map. Smaller images take the usual whole-image path.
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
        return out[0] if single else out

    def _predict_batch(self, items, threshold, rois, tile: bool, batch_size: int) -> list[Prediction]:
        thr = self.threshold if threshold is None else threshold
        size = self.cfg.image_size
        arrays = [to_numpy_image(it, self.cfg.channels) for it in items]
        rois = [None if r is None else np.asarray(r, dtype=bool) for r in rois]
        for (a, path), r in zip(arrays, rois):
            if r is not None and r.shape != a.shape[:2]:
                raise GRDNetError(f"{path or 'image'}: ROI is {r.shape[1]}x{r.shape[0]} but the image is "
                                  f"{a.shape[1]}x{a.shape[0]}")
        results: list[Prediction | None] = [None] * len(arrays)
        aspect = self.cfg.aspect
        whole = [] if aspect == "keep" else [
            i for i, (a, _) in enumerate(arrays) if not (tile and max(a.shape[:2]) > size)]
        for i in sorted(set(range(len(arrays))) - set(whole)):
            a, path = arrays[i]
            full, score = self._tiled_map(a, rois[i], batch_size, keep_aspect=aspect == "keep")
            results[i] = self._decide(full, score, thr, path)
        if whole:
            batch = torch.stack([array_to_tensor(arrays[i][0], size) for i in whole])
            maps, scores = self._run(batch)
            if any(rois[i] is not None for i in whole):
                ones = torch.ones(1, *maps.shape[-2:])
                roi_t = torch.stack([ones if rois[i] is None else resize_to(
                    torch.from_numpy(rois[i].astype(np.float32))[None], maps.shape[-2:], mode="nearest")
                    for i in whole])
                maps = maps * roi_t.to(maps.device)
                scores = image_scores(maps, self.cfg)
            scores = scores.float().cpu().numpy()
            for i, m, s in zip(whole, maps, scores):
                full = resize_map(m[:1], arrays[i][0].shape[:2])
                if rois[i] is not None:
                    full = full * rois[i]
                results[i] = self._decide(full, float(s), thr, arrays[i][1])
        if aspect == "both":  # the second view, of every image that is not square (ModelConfig.aspect)
            for i, (a, path) in enumerate(arrays):
                if a.shape[0] != a.shape[1]:
                    full, score = self._tiled_map(a, rois[i], batch_size, keep_aspect=True)
                    first = results[i]
                    results[i] = self._decide(np.maximum(first.anomaly_map, full), max(first.score, score), thr, path)
        return results

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
        # One map pixel is one model pixel here: the score rule (kernel in model pixels, or a
        # fraction of pixels) applies to the stitched map as is. Only the anomaly map is
        # stitched: the coarser views of score_scales are whole-image views.
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

    def __init__(self, net: InferenceNet, cfg: ModelConfig, threshold: float | None = None,
                 meta: dict | None = None, device: str | torch.device = "cpu", tile: bool = False,
                 tile_overlap: float = 0.25):
        super().__init__(cfg, threshold, meta, tile, tile_overlap)
        self.device = torch.device(device)
        net = net.to(self.device).eval()
        self.net = cpu_inference_net(net) if self.device.type == "cpu" else net

    @classmethod
    def load(cls, path, device: str | torch.device = "cpu", tile: bool | None = None) -> "Predictor":
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


def cpu_inference_net(net: InferenceNet) -> nn.Module:
    """A copy of `net` (eval mode) for CPU inference: batch norms folded into the convolutions
    before them, weights in channels-last layout. Measured at the `cpu` preset about 2x faster
    than plain eager at batch 1 and 1.1-1.3x at batch 16 (benchmarks/speed.py --only variants,
    docs/PERFORMANCE.md). torch.compile gained at most ~20% more, at batch 1 only, after a cold
    compile of about a minute per batch shape, so it is not used. A copy, so that networks shared
    with a training run are left alone; `net` itself if it cannot be traced."""
    with warnings.catch_warnings():  # the module imports deprecated torch.jit helpers it does not use here
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.fx.experimental.optimization import fuse

    # Each network is folded on its own: traced as a whole, a network called once per score
    # scale would have its batch norms folded into the same convolution once per call.
    try:
        parts = [None if m is None else fuse(m) for m in (net.encoder, net.decoder, net.segmenter)]
    except Exception:  # tracing fails on data-dependent control flow: keep the plain network
        return net
    return InferenceNet(*parts, net.flip_average, net.score_sizes).to(memory_format=torch.channels_last)


def trained_on_tiles(meta: dict) -> bool:
    """Whether a model was trained on native-resolution crops, so tiled inference fits it."""
    return bool(meta.get("training", {}).get("train_config", {}).get("train_crops", False))


def resize_map(m: torch.Tensor, hw: tuple[int, int]) -> np.ndarray:
    """(1, S, S) map -> (H, W) float32 numpy at the image's own size."""
    if tuple(m.shape[-2:]) != tuple(hw):
        m = F.interpolate(m[None], size=tuple(hw), mode="bilinear", align_corners=False)[0]
    return m[0].clamp(0, 1).cpu().numpy().astype(np.float32)
