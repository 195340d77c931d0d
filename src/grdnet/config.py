"""Configuration: one dataclass for the networks, one for training, and the presets.

The dataclass defaults are the `paper` preset (GRD-Net as published, ../GRDNET.md). A preset is a
column of the tables below; `build_config(preset, ...)` is the one way to get a config. Everything
a saved model needs to be rebuilt lives in `ModelConfig`. Why each `cpu` value differs from the
paper's is measured in docs/EXPERIMENTS.md.
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

    image_size: int = 256  # model input side S, pixels
    channels: int = 3  # 1 (grayscale) or 3 (RGB); `grdnet.train` sets it from the data
    gen_widths: tuple[int, ...] = (64, 128, 256, 512, 512)  # generator stages (stride 2 each)
    latent_channels: int = 32  # channels of the convolutional latent z
    disc_widths: tuple[int, ...] = (64, 128, 256, 512, 512)  # discriminator stages
    seg_widths: tuple[int, ...] = (64, 128, 256, 512, 512, 512)  # U-Net levels (len - 1 poolings)
    score_kernel: int = 21  # image score: max of the map box-filtered with this side, model pixels
    flip_average: bool = False  # map = mean over the image and its 3 flips (needs hflip + vflip training)
    aspect: str = "squeeze"  # non-square images: "squeeze" to S x S, "keep" ratio (tiles), "both" (max)
    unshuffle: int = 1  # networks see the input pixel-unshuffled by this factor (S/f cost, every pixel)
    gan: bool = True  # False: the segmenter alone on the image alone (no generator, no discriminator)

    def __post_init__(self):
        self.gen_widths = tuple(self.gen_widths)
        self.disc_widths = tuple(self.disc_widths)
        self.seg_widths = tuple(self.seg_widths)
        if self.channels not in (1, 3):
            raise GRDNetError(f"channels must be 1 or 3, got {self.channels}")
        if self.unshuffle < 1:
            raise GRDNetError(f"unshuffle must be a positive integer, got {self.unshuffle}")
        step = self.unshuffle * 2 ** max(len(self.gen_widths), len(self.seg_widths) - 1)
        if self.image_size % step:
            raise GRDNetError(
                f"image_size {self.image_size} must be divisible by {step}: 2**stages "
                f"({len(self.gen_widths)} generator stages, {len(self.seg_widths) - 1} U-Net poolings)"
                + (f" times unshuffle {self.unshuffle}" if self.unshuffle > 1 else ""))
        if self.aspect not in ("squeeze", "keep", "both"):
            raise GRDNetError(f"aspect must be 'squeeze', 'keep' or 'both', got {self.aspect!r}")

    @property
    def latent_size(self) -> int:
        return self.image_size // self.unshuffle // 2 ** len(self.gen_widths)


@dataclass
class TrainConfig:
    """Optimisation, synthetic defects, augmentation, loss weights and bookkeeping."""

    # The training length: `steps` optimiser steps (batches) or `epochs` passes over the training
    # images; with both, the longer, so that a preset gives small sets a fixed amount of training
    # and large sets enough passes over their many images.
    steps: int | None = None
    epochs: int | None = 200
    max_minutes: float | None = None  # wall-clock cap on training
    batch_size: int = 8
    lr: float = 1e-4  # Adam learning rate (generator, discriminator)
    betas: tuple[float, float] = (0.5, 0.999)  # Adam betas
    seg_lr: float | None = None  # the segmenter's learning rate; None: lr
    ema_decay: float | None = None  # exponential moving average of the weights, per batch; None: off
    plateau_patience: int = 3  # epochs without improvement before the learning rate drops
    plateau_factor: float = 0.904837418  # learning-rate factor on a plateau (e**-0.1)
    w_adv: float = 1.0  # weight of the adversarial (feature-matching) loss
    w_con: float = 50.0  # weight of the contextual loss
    w_enc: float = 1.0  # weight of the latent loss
    w_l1: float = 1.0  # contextual loss = w_l1 * L1 + w_ssim * (1 - SSIM)
    w_ssim: float = 1.0
    w_seg: float = 1.0  # weight of the segmentation (focal) loss
    ssim_window: int = 11  # SSIM window side, pixels
    focal_gamma: float = 2.0
    focal_alpha: float | None = None  # None: both classes weighted equally
    roi_mode: str = "target"  # how a ROI enters the focal loss: "target" | "prediction" | "none"
    defect_prob: float = 0.75  # share of training images given a synthetic defect
    perlin_min_exp: int = 0  # Perlin noise cells per side: 2**k, k drawn in [min_exp, max_exp]
    perlin_max_exp: int = 5
    perlin_threshold: float = 0.5  # Perlin mask threshold (higher: smaller defects)
    perlin_threshold_low: float | None = None  # when set, the threshold is drawn from [low, threshold]
    min_defect_pixels: int = 25  # masks with fewer pixels are drawn again
    line_share: float = 0.0  # share of masks drawn as thin strokes (scratches, cracks)
    band_share: float = 0.0  # share of masks drawn as straight-edged bands; the rest are Perlin blobs
    beta_min: float = 0.5  # opacity of the painted defect, drawn in [beta_min, beta_max]
    beta_max: float = 1.0
    texture_dir: str | None = None  # folder of texture images for the "noise" source
    sources: tuple[str, ...] = ("noise",)  # defect sources: "noise", "shade", "self" (one per sample)
    rotation: float = 90.0  # augmentation: rotation drawn in [-rotation, +rotation] degrees
    hflip: bool = True  # augmentation: random horizontal flips
    vflip: bool = True  # augmentation: random vertical flips
    brightness: float = 0.0  # augmentation: brightness shifted by a draw in [-b, b] (intensities 0..1); 0: off
    contrast: float = 0.0  # augmentation: contrast scaled by a draw in [1 - c, 1 + c]; 0: off
    train_crops: bool | str = False  # True: native-resolution crops (scored with tiles) instead of resizing;
    # "both": half the samples each way, scored in both views (the larger score; see scoring.image_views);
    # "auto": crops when the images are much larger than the model (data.choose_crops), else resized
    val_fraction: float = 0.1  # good training images held out to calibrate the threshold
    val_min: int = 8  # at least this many held out (at most a quarter of the images); see calibration.py
    threshold_quantile: float = 0.99  # the share of good images the threshold is meant to pass
    num_workers: int = 0  # data-loader worker processes
    seed: int = 0
    checkpoint_every_minutes: float = 5.0  # 0: off
    checkpoint_every_n_steps: int = 0  # optimiser steps (two per batch with the GAN); 0: off
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
        if min(self.line_share, self.band_share) < 0 or self.line_share + self.band_share > 1:
            raise GRDNetError(f"line_share ({self.line_share}) and band_share ({self.band_share}) are shares: "
                              "each at least 0, together at most 1")
        if self.steps is None and self.epochs is None:
            raise GRDNetError("set the training length by steps, by epochs or by both (the longer of the two)")
        if min(n for n in (self.steps, self.epochs) if n is not None) < 1:
            raise GRDNetError(f"the training length must be positive, got steps={self.steps}, epochs={self.epochs}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise GRDNetError(f"max_minutes must be a positive number of minutes (or null for no cap), got "
                              f"{self.max_minutes}")
        if not (0 <= self.brightness <= 1 and 0 <= self.contrast < 1):
            raise GRDNetError(f"brightness must be in [0, 1] and contrast in [0, 1), got {self.brightness} and "
                              f"{self.contrast}")
        if self.train_crops not in (False, True, "both", "auto"):
            raise GRDNetError(f"train_crops must be false, true, \"both\" or \"auto\", got {self.train_crops!r}")
        if self.roi_mode not in ("target", "prediction", "none"):
            raise GRDNetError(f"roi_mode must be target, prediction or none, got {self.roi_mode!r}")


# The presets, one column each: `paper` (GRD-Net as published; the dataclass defaults), `cpu`
# (the segmenter alone, narrow, 128 px unshuffled to 64; the longer of 2,500 steps and 120 passes:
# 30-image sets gain nothing past 2,000-4,000 steps, which fit 20 minutes on 2 cores without bf16,
# while the whole magnetic_tile rises to about 5,000 steps, 120 passes of its 685 images; lighting
# augmentation as wide as real drift; native crops for images 3 times the model or larger; docs/RESULTS.md), `grd-cpu`
# (GRD-Net whole: `cpu` with a half-width generator and discriminator; 1,250 steps, each about twice
# a `cpu` step: the same minutes), `tiny` (tests). The `cpu` column's generator and discriminator
# widths serve `{"model": {"gan": true}}` only.
PRESET_NAMES = ("paper", "cpu", "grd-cpu", "tiny")
MODEL_TABLE = {
    #                    paper                          cpu                     grd-cpu                 tiny
    "image_size":       (256,                           128,                    128,                    32),
    "channels":         (3,                             3,                      3,                      3),
    "gen_widths":       ((64, 128, 256, 512, 512),      (32, 64, 128, 256),     (16, 32, 64, 128),      (8, 16)),
    "latent_channels":  (32,                            32,                     16,                     8),
    "disc_widths":      ((64, 128, 256, 512, 512),      (32, 64, 128, 256),     (16, 32, 64, 128),      (8, 16)),
    "seg_widths":       ((64, 128, 256, 512, 512, 512), (16, 32, 64, 128, 128), (16, 32, 64, 128, 128), (8, 16, 16)),
    "score_kernel":     (21,                            5,                      5,                      5),
    "flip_average":     (False,                         True,                   True,                   False),
    "aspect":           ("squeeze",                     "both",                 "both",                 "squeeze"),
    "unshuffle":        (1,                             2,                      2,                      1),
    "gan":              (True,                          False,                  True,                   True),
}
TRAIN_TABLE = {
    #                            paper         cpu                         grd-cpu                     tiny
    "steps":                    (None,         2500,                       1250,                       3),
    "epochs":                   (200,          120,                        None,                       None),
    "max_minutes":              (None,         None,                       None,                       None),
    "batch_size":               (8,            16,                         16,                         4),
    "lr":                       (1e-4,         1e-4,                       1e-4,                       1e-3),
    "betas":                    ((0.5, 0.999), (0.5, 0.999),               (0.5, 0.999),               (0.5, 0.999)),
    "seg_lr":                   (None,         1e-3,                       1e-3,                       None),
    "ema_decay":                (None,         0.99,                       0.99,                       None),
    "plateau_patience":         (3,            3,                          3,                          3),
    "plateau_factor":           (0.904837418,  0.904837418,                0.904837418,                0.904837418),
    "w_adv":                    (1.0,          1.0,                        1.0,                        1.0),
    "w_con":                    (50.0,         50.0,                       50.0,                       50.0),
    "w_enc":                    (1.0,          1.0,                        1.0,                        1.0),
    "w_l1":                     (1.0,          1.0,                        1.0,                        1.0),
    "w_ssim":                   (1.0,          1.0,                        1.0,                        1.0),
    "w_seg":                    (1.0,          1.0,                        1.0,                        1.0),
    "ssim_window":              (11,           11,                         11,                         11),
    "focal_gamma":              (2.0,          2.0,                        2.0,                        2.0),
    "focal_alpha":              (None,         None,                       None,                       None),
    "roi_mode":                 ("target",     "target",                   "target",                   "target"),
    "defect_prob":              (0.75,         0.75,                       0.75,                       0.75),
    "perlin_min_exp":           (0,            0,                          0,                          0),
    "perlin_max_exp":           (5,            4,                          4,                          5),
    "perlin_threshold":         (0.5,          0.5,                        0.5,                        0.5),
    "perlin_threshold_low":     (None,         0.1,                        0.1,                        None),
    "min_defect_pixels":        (25,           25,                         25,                         25),
    "line_share":               (0.0,          0.3,                        0.3,                        0.0),
    "band_share":               (0.0,          0.2,                        0.2,                        0.0),
    "beta_min":                 (0.5,          0.5,                        0.5,                        0.5),
    "beta_max":                 (1.0,          1.0,                        1.0,                        1.0),
    "texture_dir":              (None,         None,                       None,                       None),
    "sources":                  (("noise",),   ("noise", "shade", "self"), ("noise", "shade", "self"), ("noise",)),
    "rotation":                 (90.0,         0.0,                        0.0,                        90.0),
    "hflip":                    (True,         True,                       True,                       True),
    "vflip":                    (True,         True,                       True,                       True),
    "brightness":               (0.0,          0.4,                        0.4,                        0.0),
    "contrast":                 (0.0,          0.5,                        0.5,                        0.0),
    "train_crops":              (False,        "auto",                     "auto",                     False),
    "val_fraction":             (0.1,          0.1,                        0.1,                        0.1),
    "val_min":                  (8,            8,                          8,                          8),
    "threshold_quantile":       (0.99,         0.99,                       0.99,                       0.99),
    "num_workers":              (0,            0,                          0,                          0),
    "seed":                     (0,            0,                          0,                          0),
    "checkpoint_every_minutes": (5.0,          5.0,                        5.0,                        0.0),
    "checkpoint_every_n_steps": (0,            0,                          0,                          0),
    "log_every_n_steps":        (10,           10,                         10,                         10),
}


# name -> (model table, train table): every field of `ModelConfig` and `TrainConfig`.
PRESETS: dict[str, tuple[dict, dict]] = {
    name: ({k: v[i] for k, v in MODEL_TABLE.items()}, {k: v[i] for k, v in TRAIN_TABLE.items()})
    for i, name in enumerate(PRESET_NAMES)}


def _checked(cls, table: dict, where: str) -> dict:
    unknown = sorted(set(table) - {f.name for f in fields(cls)})
    if unknown:
        raise GRDNetError(f"{where}: unknown {cls.__name__} option(s): {', '.join(unknown)}")
    return table


def read_config_file(config_file) -> dict:
    """A config file as a dict with "model" and/or "train" sections: JSON, YAML (.yaml, .yml), or
    the `run.json` a training run wrote (which also holds "data", "roi", "trainer", ...: a run is
    repeatable from its own record)."""
    path = Path(config_file)
    try:
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except (OSError, ValueError) as e:  # yaml.YAMLError and json.JSONDecodeError are ValueErrors
        raise GRDNetError(f"{path}: cannot read config ({e})") from None
    if not isinstance(data, dict) or not (set(data) <= {"model", "train"} or is_run_record(data)):
        raise GRDNetError(f"{path}: expected an object with 'model' and/or 'train' sections (or a run's run.json)")
    for section in ("model", "train"):
        if not isinstance(data.get(section, {}), dict):
            raise GRDNetError(f"{path}: the '{section}' section must be an object of option: value")
    return data


def is_run_record(data: dict) -> bool:
    """Whether a config document is a run's run.json (written by `grdnet train`)."""
    return {"grdnet", "model", "train", "attempts"} <= set(data)


def file_section(config_file, section: str) -> dict:
    """One section ("model" or "train") of a config file; {} when there is no file."""
    return {} if config_file is None else read_config_file(config_file).get(section, {})


def build_config(preset: str = "cpu", model: dict | None = None, train: dict | None = None,
                 config_file: str | Path | None = None) -> tuple[ModelConfig, TrainConfig]:
    """Model and training config from a preset, a JSON file ({"model": {...}, "train": {...}})
    and explicit overrides, applied in that order. A layer that sets only `steps` clears the
    earlier layers' `epochs` and the other way round: `--steps N` trains N steps whatever the preset."""
    if preset not in PRESETS:
        raise GRDNetError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    m, t = dict(PRESETS[preset][0]), dict(PRESETS[preset][1])
    layers = [(file_section(config_file, "model"), file_section(config_file, "train"), str(config_file))] \
        if config_file is not None else []
    for model_layer, train_layer, where in [*layers, (model or {}, train or {}, "override")]:
        m.update(_checked(ModelConfig, model_layer, where))
        train_layer = _checked(TrainConfig, train_layer, where)
        for length, other in (("steps", "epochs"), ("epochs", "steps")):
            if train_layer.get(length) is not None and other not in train_layer:
                t[other] = None  # a length given by steps replaces one by epochs, and the other way round
        t.update(train_layer)
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


def to_json_dict(cfg) -> dict:
    """A config as JSON types only (tuples as lists): checkpoints then load with `weights_only=True`."""
    return json.loads(json.dumps(to_dict(cfg)))
