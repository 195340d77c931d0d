"""Inference: anomaly maps, image scores and decisions, from a saved model or trained networks.

`Predictor` is the one code path used by the Python API, the CLI, the test command and the
service: it runs only the networks inference needs (encoder, decoder, segmenter), in eval mode,
without autograd.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from PIL import Image

from .config import ModelConfig
from .data import array_to_tensor, open_image, pil_to_array
from .model.generator import Decoder, ResEncoder
from .model.segmenter import Segmenter

ImageInput = Union[str, Path, np.ndarray, Image.Image]


class InferenceNet(nn.Module):
    """x (B, C, S, S) in [0, 1] -> anomaly probability map (B, 1, S, S).

    Holds (and shares, when built from a training run) the generator's first encoder and
    decoder and the segmenter: the networks inference needs.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, segmenter: nn.Module):
        super().__init__()
        self.encoder, self.decoder, self.segmenter = encoder, decoder, segmenter

    @classmethod
    def build(cls, cfg: ModelConfig) -> "InferenceNet":
        return cls(ResEncoder(cfg.channels, cfg.gen_widths, cfg.latent_channels),
                   Decoder(cfg.channels, cfg.gen_widths, cfg.latent_channels), Segmenter(cfg))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_hat = self.decoder(self.encoder(x))
        return torch.softmax(self.segmenter(x_hat, x), dim=1)[:, 1:2]


def image_scores(maps: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Image score from model-resolution maps (B, 1, S, S): by default the maximum of the
    box-filtered map (DRAEM's protocol), robust to single hot pixels."""
    if cfg.score_rule == "topk_mean":
        flat = maps.flatten(1)
        k = max(1, int(round(cfg.score_topk * flat.shape[1])))
        return flat.topk(k, dim=1).values.mean(1)
    k = cfg.score_kernel
    pooled = F.avg_pool2d(maps, k, stride=1, padding=k // 2, count_include_pad=False)
    return pooled.flatten(1).amax(1)


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


class Predictor:
    """Scores images with a trained GRD-Net.

    >>> p = Predictor.load("runs/tile")
    >>> result = p.predict("part.png")          # also a numpy array, a PIL image, or a list
    >>> result.score, result.label, result.anomaly_map.shape
    """

    def __init__(self, net: InferenceNet, cfg: ModelConfig, threshold: float | None = None,
                 meta: dict | None = None, device: str | torch.device = "cpu"):
        self.cfg, self.threshold, self.meta = cfg, threshold, meta or {}
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()

    @classmethod
    def load(cls, path, device: str | torch.device = "cpu") -> "Predictor":
        """Load a model folder (or a training run folder holding one)."""
        from .modelfile import load_model

        net, cfg, meta = load_model(path)
        return cls(net, cfg, meta.get("threshold"), meta, device)

    @torch.inference_mode()
    def maps(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) in [0, 1] at model size -> anomaly maps (B, 1, S, S)."""
        return self.net(batch.to(self.device)).float()

    def predict(self, images: ImageInput | Sequence[ImageInput], threshold: float | None = None,
                batch_size: int = 16, roi=None) -> Prediction | list[Prediction]:
        """Score one image or a list. `threshold` overrides the stored one. `roi`, optional: a
        bool (H, W) array for every image, or a list with one per image; the map is zeroed
        outside it before scoring (a user's explicit choice: the model needs no ROI)."""
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        rois = list(roi) if isinstance(roi, (list, tuple)) else [roi] * len(items)
        if len(rois) != len(items):
            raise ValueError(f"{len(rois)} ROIs for {len(items)} images")
        out: list[Prediction] = []
        for start in range(0, len(items), batch_size):
            end = start + batch_size
            out.extend(self._predict_batch(items[start:end], threshold, rois[start:end]))
        return out[0] if single else out

    def _predict_batch(self, items, threshold, rois) -> list[Prediction]:
        thr = self.threshold if threshold is None else threshold
        arrays = [to_numpy_image(it, self.cfg.channels) for it in items]
        batch = torch.stack([array_to_tensor(a, self.cfg.image_size) for a, _ in arrays])
        maps = self.maps(batch)
        if any(r is not None for r in rois):
            size = maps.shape[-2:]
            maps = maps * torch.stack([
                torch.ones(1, *size) if r is None else
                F.interpolate(torch.from_numpy(np.asarray(r, dtype=np.float32))[None, None], size=size,
                              mode="nearest")[0]
                for r in rois]).to(maps.device)
        scores = image_scores(maps, self.cfg).cpu().numpy()
        results = []
        for (a, path), m, s, r in zip(arrays, maps, scores, rois):
            full = resize_map(m, a.shape[:2])
            if r is not None:
                full = full * np.asarray(r, dtype=bool)
            results.append(Prediction(float(s), bool(thr is not None and s >= thr), thr, full, path))
        return results


def resize_map(m: torch.Tensor, hw: tuple[int, int]) -> np.ndarray:
    """(1, S, S) map -> (H, W) float32 numpy at the image's own size."""
    if tuple(m.shape[-2:]) != tuple(hw):
        m = F.interpolate(m[None], size=tuple(hw), mode="bilinear", align_corners=False)[0]
    return m[0].clamp(0, 1).cpu().numpy().astype(np.float32)
