"""Configuration: one dataclass for the networks, one for training, and the presets.

A preset is a plain table of numbers; `build_config(preset, **overrides)` is the one way to
get a config. Everything a saved model needs to be rebuilt lives in `ModelConfig`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import GRDNetError


@dataclass
class ModelConfig:
    """Networks, preprocessing and the score rule: everything inference needs."""

    image_size: int = 128
    channels: int = 3
    gen_widths: tuple[int, ...] = (32, 64, 128, 256)  # one per stride-2 stage; size / 2**len == latent_size
    latent_channels: int = 32
    disc_widths: tuple[int, ...] = (32, 64, 128, 256)
    seg_widths: tuple[int, ...] = (32, 64, 128, 256, 256)  # U-Net levels; len - 1 poolings
    score_rule: str = "max_pool"  # "max_pool": max of the box-filtered map; "topk_mean": mean of top k%
    score_kernel: int = 21  # box filter side for "max_pool", in model pixels
    score_topk: float = 0.01  # fraction of pixels for "topk_mean"
    # Average the map over the image and its horizontal, vertical and double flip (4 network
    # passes): the segmenter's noise differs between the views, a defect's response does not.
    # For models trained with both flips (TrainConfig hflip, vflip), as the presets are.
    flip_average: bool = False
    # The image score is the mean of the score rule over the map at each of these fractions of
    # image_size (the image downscaled, scored, its map resized back); the first must be 1.0, and
    # only its map is the anomaly map (heatmap, pixel metrics). Coarser views judge large,
    # low-contrast defects (a region of another finish) on more context, and small ones worse; not
    # in a preset: on magnetic_tile (1.0, 0.75) raised image AUROC mostly away from the defects
    # (docs/EXPERIMENTS.md runs 37, 39).
    score_scales: tuple[float, ...] = (1.0,)
    # How an image of another shape meets the square model input. "squeeze": the whole image
    # resized to image_size x image_size (the paper's). "keep": aspect ratio kept, shorter side
    # resized to image_size; training takes random image_size crops of it and inference scores it
    # as overlapping tiles. "both": trained as "squeeze"; inference also scores the "keep" view and
    # takes the pixel-wise maximum of the two maps and the larger score: squeezing a 600 x 240 px
    # image into a square shrinks a crack across it 2.5x more than its length, the aspect-kept
    # view does not; square images have one view. Measured on magnetic_tile (EXPERIMENTS.md runs
    # 53-58): "keep" locates thin defects better and large regions of another finish worse than
    # "squeeze"; "both" keeps the better of each.
    aspect: str = "squeeze"
    # Pixel unshuffle factor f: every network rearranges its (C, S, S) input into (C * f**2, S / f,
    # S / f) (`torch.nn.PixelUnshuffle`) before its first convolution; the decoder shuffles its
    # output back and the segmenter's map is upsampled to S. The networks then cost what they cost
    # at S / f but see every pixel of S: fine texture that resizing to S / f would average away.
    # With the GAN, on magnetic_tile image_size 128 with f = 2 against 64 px raised pixel AUROC by
    # 0.015 and lowered image AUROC by 0.02 at 20 minutes (docs/EXPERIMENTS.md run 65); with the
    # segmenter alone (`gan` False) it raised both, and is the `cpu` preset's (runs 81-82).
    unshuffle: int = 1
    # False: the segmenter alone, shown the image alone (C input channels instead of the pair
    # (X_hat, X)); no generator or discriminator is built, trained or run. A departure from GRD-Net
    # for CPUs, in the `cpu` preset only: on magnetic_tile at 20 CPU minutes the map did not use the
    # reconstruction (the segmenter shown (X, X) did as well), while the GAN took 60% of each step;
    # the segmenter trained alone, twice the batches in less time, raised pixel AUROC by 0.033 on
    # each of three seeds (docs/EXPERIMENTS.md runs 75 and 78), and could afford 128 px (run 81).
    gan: bool = True

    def __post_init__(self):
        self.gen_widths = tuple(self.gen_widths)
        self.disc_widths = tuple(self.disc_widths)
        self.seg_widths = tuple(self.seg_widths)
        if self.channels not in (1, 3):
            raise GRDNetError(f"channels must be 1 or 3, got {self.channels}")
        if self.unshuffle < 1:
            raise GRDNetError(f"unshuffle must be a positive integer, got {self.unshuffle}")
        step = self.unshuffle * 2 ** max(len(self.gen_widths), len(self.seg_widths) - 1)  # every view must pool this far
        if self.image_size % step:
            raise GRDNetError(
                f"image_size {self.image_size} must be divisible by {step}: 2**stages "
                f"({len(self.gen_widths)} generator stages, {len(self.seg_widths) - 1} U-Net poolings)"
                + (f" times unshuffle {self.unshuffle}" if self.unshuffle > 1 else ""))
        if self.score_rule not in ("max_pool", "topk_mean"):
            raise GRDNetError(f"score_rule must be 'max_pool' or 'topk_mean', got {self.score_rule!r}")
        self.score_scales = tuple(float(v) for v in self.score_scales)
        if not self.score_scales or self.score_scales[0] != 1.0 or any(
                not 0 < v <= 1 or (v * self.image_size) % step for v in self.score_scales):
            raise GRDNetError(f"score_scales {list(self.score_scales)}: the first must be 1.0, each in (0, 1], and "
                              f"each times image_size {self.image_size} a multiple of {step}")

        if self.aspect not in ("squeeze", "keep", "both"):
            raise GRDNetError(f"aspect must be 'squeeze', 'keep' or 'both', got {self.aspect!r}")
        if self.aspect == "keep" and len(self.score_scales) > 1:
            raise GRDNetError("score_scales needs whole-image views: it cannot be combined with aspect 'keep'")

    @property
    def latent_size(self) -> int:
        return self.image_size // self.unshuffle // 2 ** len(self.gen_widths)

    @property
    def score_sizes(self) -> tuple[int, ...]:
        """Input sizes of the coarser views of `score_scales` (none by default)."""
        return tuple(round(v * self.image_size) for v in self.score_scales[1:])


@dataclass
class TrainConfig:
    """Optimisation, synthetic defects, augmentation and loss weights."""

    epochs: int = 200
    max_minutes: float | None = None
    batch_size: int = 8
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.999)
    # The segmenter is a plain supervised U-Net: it can learn faster than the GAN tolerates.
    seg_lr: float | None = None  # None: same as lr
    # Keep an exponential moving average of all weights (decay per batch) and save it as the model:
    # the segmenter's map at any moment follows the GAN's latest swings; the average is steadier.
    ema_decay: float | None = None
    plateau_patience: int = 3
    plateau_factor: float = 0.904837418  # e**-0.1, the paper's schedule
    # Loss weights (paper: w_adv 1, w_con 50, w_enc 1; contextual = wa*L1 + wb*(1-SSIM)).
    w_adv: float = 1.0
    w_con: float = 50.0
    w_enc: float = 1.0
    w_l1: float = 1.0
    w_ssim: float = 1.0
    w_seg: float = 1.0
    ssim_window: int = 11
    focal_gamma: float = 2.0
    focal_alpha: float | None = None  # None: both classes weighted equally
    roi_mode: str = "target"  # "target" | "prediction" | "none"
    # Synthetic defects (DRAEM-style Perlin masks).
    defect_prob: float = 0.75
    perlin_min_exp: int = 0
    perlin_max_exp: int = 5
    perlin_threshold: float = 0.5
    # When set, each mask's threshold is drawn from [perlin_threshold_low, perlin_threshold]: lower
    # thresholds give larger defects (0.5: ~1% of the image, 0.1: ~35%), so that the segmenter also
    # learns to fill large regions (uneven finish, stains, missing coating), not only small blobs.
    perlin_threshold_low: float | None = None
    min_defect_pixels: int = 25
    # Shares of masks drawn as thin strokes (scratches, cracks) and as straight-edged bands across
    # the image (a strip of another finish); the rest are Perlin blobs.
    line_masks: float = 0.0
    band_masks: float = 0.0
    beta_min: float = 0.5
    beta_max: float = 1.0
    texture_dir: str | None = None
    # Anomaly source kinds, one drawn per sample: "noise" (DRAEM colour blobs, or texture_dir crops),
    # "shade" (the image darkened/brightened), "self" (another training image's texture, shifted).
    sources: tuple[str, ...] = ("noise",)
    # Augmentation.
    rotation: float = 90.0  # degrees, uniform in [-rotation, +rotation]
    hflip: bool = True
    vflip: bool = True
    # Train on random model-size crops at native resolution instead of whole images resized (for
    # images much larger than the model size); the model is then scored with tiled inference.
    train_crops: bool = False
    # Data and bookkeeping.
    val_fraction: float = 0.1  # good training images held out to calibrate the threshold
    threshold_quantile: float = 0.99
    num_workers: int = 0
    seed: int = 0
    checkpoint_every_minutes: float = 5.0
    checkpoint_every_n_steps: int = 0  # also checkpoint every N optimiser steps (two per batch: G and D); 0: off
    log_every_n_steps: int = 10

    def __post_init__(self):
        self.betas = tuple(self.betas)
        self.sources = tuple(self.sources)
        if not self.sources or not set(self.sources) <= {"noise", "shade", "self"}:
            raise GRDNetError(f"sources must be a non-empty list of noise, shade, self; got {list(self.sources)}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise GRDNetError(f"ema_decay must be between 0 and 1 (or null for none), got {self.ema_decay}")
        if self.perlin_threshold_low is not None and self.perlin_threshold_low > self.perlin_threshold:
            raise GRDNetError(f"perlin_threshold_low ({self.perlin_threshold_low}) must not exceed "
                              f"perlin_threshold ({self.perlin_threshold})")
        if min(self.line_masks, self.band_masks) < 0 or self.line_masks + self.band_masks > 1:
            raise GRDNetError(f"line_masks ({self.line_masks}) and band_masks ({self.band_masks}) are shares: "
                              "each at least 0, together at most 1")
        if self.roi_mode not in ("target", "prediction", "none"):
            raise GRDNetError(f"roi_mode must be target, prediction or none, got {self.roi_mode!r}")


# Presets: (model table, training table). `paper` follows GRDNET.md; `cpu` is narrower and
# smaller so that a 2-core CPU learns something useful in minutes; `tiny` is for tests.
# Every departure of `cpu` from `paper` was measured (docs/EXPERIMENTS.md): the segmenter alone,
# without the GAN (`gan` False: the map did not use the reconstruction at CPU budgets, and the
# segmenter alone trains twice the batches in less time), on 128 px pixel-unshuffled to 64 px
# (`unshuffle` 2: the cost of 64 px, every pixel of 128; a 5x5 score filter), the segmenter's
# learning rate 1e-3 (`lr` 1e-4 is the GAN's, if `gan` is switched back on; 1e-3 breaks the GAN),
# three anomaly-source kinds, Perlin cells of at
# least 4 px with thresholds down to 0.1 (defects from 1% to a third of the image), strokes and
# bands among the mask shapes, no rotation (industrial cameras are fixed; flips stay), an
# exponential moving average of the weights, maps averaged over the four flips of the image
# (4x the inference cost of one pass), and non-square images also scored at their own aspect
# ratio (`aspect` "both": about 2-3x the inference cost again on such images).
PRESETS: dict[str, tuple[dict, dict]] = {
    "paper": (
        dict(image_size=256, gen_widths=(64, 128, 256, 512, 512), latent_channels=32,
             disc_widths=(64, 128, 256, 512, 512), seg_widths=(64, 128, 256, 512, 512, 512),
             score_kernel=21),
        dict(epochs=200, batch_size=8, lr=1e-4),
    ),
    "cpu": (
        dict(image_size=128, unshuffle=2, gan=False, seg_widths=(16, 32, 64, 128, 128),
             score_kernel=5, flip_average=True, aspect="both"),
        dict(epochs=200, batch_size=16, lr=1e-4, seg_lr=1e-3, sources=("noise", "shade", "self"),
             perlin_max_exp=4, perlin_threshold_low=0.1, line_masks=0.3, band_masks=0.2, rotation=0.0,
             ema_decay=0.99),
    ),
    "tiny": (
        dict(image_size=32, gen_widths=(8, 16), latent_channels=8,
             disc_widths=(8, 16), seg_widths=(8, 16, 16), score_kernel=5),
        dict(epochs=1, batch_size=4, lr=1e-3, checkpoint_every_minutes=0.0),
    ),
}


def _coerce(cls, table: dict, where: str):
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(table) - names)
    if unknown:
        raise GRDNetError(f"{where}: unknown {cls.__name__} option(s): {', '.join(unknown)}")
    return table


def file_section(config_file, section: str) -> dict:
    """One section ("model" or "train") of a JSON config file; {} when there is no file."""
    if config_file is None:
        return {}
    path = Path(config_file)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise GRDNetError(f"{path}: cannot read config ({e})") from None
    if not isinstance(data, dict) or not set(data) <= {"model", "train"}:
        raise GRDNetError(f"{path}: expected a JSON object with 'model' and/or 'train' sections")
    return data.get(section, {})


def build_config(preset: str = "cpu", model: dict | None = None, train: dict | None = None,
                 config_file: str | Path | None = None) -> tuple[ModelConfig, TrainConfig]:
    """Model and training config from a preset, a JSON file ({"model": {...}, "train": {...}})
    and explicit overrides, applied in that order."""
    if preset not in PRESETS:
        raise GRDNetError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    m, t = dict(PRESETS[preset][0]), dict(PRESETS[preset][1])
    if config_file is not None:
        m.update(_coerce(ModelConfig, file_section(config_file, "model"), str(config_file)))
        t.update(_coerce(TrainConfig, file_section(config_file, "train"), str(config_file)))
    m.update(_coerce(ModelConfig, model or {}, "override"))
    t.update(_coerce(TrainConfig, train or {}, "override"))
    try:
        model_cfg, train_cfg = ModelConfig(**m), TrainConfig(**t)
    except TypeError as e:
        raise GRDNetError(f"invalid config: {e}") from None
    if model_cfg.flip_average and not (train_cfg.hflip and train_cfg.vflip):
        raise GRDNetError("flip_average scores flipped images too: train with hflip and vflip, "
                          "or set flip_average to false")
    return model_cfg, train_cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
