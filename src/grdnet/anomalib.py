"""GRD-Net as an anomalib model: `GRDNet`, an `AnomalibModule` that anomalib's `Engine` fits,
validates, tests, predicts and exports with anomalib's own datamodules (`Folder`, `MVTecAD`, ...).

Nothing of the method is implemented twice: the class *is* `grdnet.training.GRDNetModule` (the
networks, synthetic defects, augmentation, losses, optimisers and schedule of `grdnet train`),
configured by `grdnet.build_config(preset, ...)`, with anomalib's batches, pre-processing, post-
processing, metrics, visualisation and export around it.

    >>> from anomalib.data import MVTecAD
    >>> from anomalib.engine import Engine
    >>> from grdnet.anomalib import GRDNet
    >>> model = GRDNet(preset="cpu", train={"steps": 300})
    >>> datamodule = MVTecAD(root="data", category="tile", train_batch_size=16, num_workers=0)
    >>> engine = Engine(accelerator="cpu", devices=1)
    >>> engine.fit(model, datamodule=datamodule)
    >>> engine.test(model, datamodule=datamodule)

Regions of interest are their own per-image field, `roi`, apart from the ground truth (`gt_mask`):
`attach_roi(datamodule, source)` makes the datamodule's batches `RoiImageBatch`es that carry one.
A batch without a ROI, like every anomalib batch, has the whole image as its ROI. In training the
ROI shapes the segmentation loss (`TrainConfig.roi_mode`, as in `grdnet train --roi`); at
validation, test and predict time, a batch's ROI multiplies its maps before they are scored (as
in `grdnet test --roi`). The exported model takes an image alone (its ROI is the whole image).

Needs the `anomalib` extra: ``pip install "grdnet[anomalib]"``. The core package never imports
this module.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

try:
    from anomalib import LearningType
    from anomalib.data import ImageBatch, ImageItem, InferenceBatch
    from anomalib.data.transforms.utils import extract_transforms_by_type
    from anomalib.metrics import Evaluator
    from anomalib.models.components import AnomalibModule
    from anomalib.post_processing import PostProcessor
    from anomalib.pre_processing import PreProcessor
    from anomalib.visualization import Visualizer
    from torchvision.transforms.v2 import Compose, Normalize, Resize
    from torchvision.tv_tensors import Mask
except ImportError as e:  # the extra is missing, or torchvision does not load beside this torch
    raise ImportError(f"grdnet.anomalib needs anomalib and torchvision ({e}); install them with "
                      "pip install 'grdnet[anomalib]'") from e

from .config import ModelConfig, TrainConfig, build_config, to_dict, to_json_dict
from .data import load_roi
from .defects import load_textures
from .engine import WeightAverage, use_cpu_layout
from .errors import GRDNetError
from .modelfile import save_model
from .roi import check_roi_size, find_rois
from .scoring import image_scores
from .training import GRDNetModule
from .version import __version__

__all__ = ["GRDNet", "GRDNetInference", "RoiImageItem", "RoiImageBatch", "RoiCollate", "attach_roi"]

log = logging.getLogger(__name__)

# ITU-R 601-2 luma, the weights of PIL's "L" conversion (how grdnet reads an RGB file for a
# one-channel model); anomalib's datasets hand every image over as RGB.
_LUMA = (0.299, 0.587, 0.114)


# ---- the ROI field -----------------------------------------------------------------------------

@dataclasses.dataclass
class RoiImageItem(ImageItem):
    """anomalib's `ImageItem` with a region of interest: `roi` (H, W), 1 where defects matter."""

    roi: torch.Tensor | None = None

    def to_numpy(self):
        # anomalib's numpy dataclasses have no ROI field: the numpy form is the plain item's.
        return ImageItem(**_fields_without_roi(self)).to_numpy()


@dataclasses.dataclass
class RoiImageBatch(ImageBatch):
    """anomalib's `ImageBatch` with a region of interest per image: `roi` (B, H, W) in {0, 1}, or
    None (every image's ROI is the whole image)."""

    item_class = RoiImageItem
    roi: torch.Tensor | None = None

    def to_numpy(self):
        return ImageBatch(**_fields_without_roi(self)).to_numpy()


def _fields_without_roi(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init and f.name != "roi"}


class RoiCollate:
    """A datamodule's collate function that attaches each image's ROI: the batch is a
    `RoiImageBatch` whose `roi` is each image's ROI mask resized (nearest) to the image as the
    dataset hands it over. ROIs are found as `grdnet train --roi` finds them (`grdnet.roi.find_rois`):
    `source` is one mask for every image, or a folder mirroring `data_root` (or flat, by file stem);
    images without one take `default` if given, else the error names them."""

    def __init__(self, source, data_root=None, default=None):
        self.source, self.default = Path(source), None if default is None else Path(default)
        self.data_root = None if data_root is None else Path(data_root)
        if not self.source.exists():
            raise GRDNetError(f"{self.source}: no such ROI file or folder")
        if self.source.is_dir() and self.data_root is None:
            raise GRDNetError(f"{self.source}: a ROI folder mirrors a data folder; give data_root")
        self._found: dict[str, Path] = {}  # image path -> its ROI file, across batches
        self._masks: dict[tuple[str, tuple[int, int]], torch.Tensor] = {}  # one-file ROIs, per size

    def _roi_files(self, paths: list[str]) -> list[Path]:
        todo = [p for p in dict.fromkeys(paths) if p not in self._found]
        if todo:
            images = [Path(p) for p in todo]
            for p, roi in zip(todo, find_rois(images, self.data_root or images[0].parent, self.source, self.default)):
                check_roi_size(roi, Path(p))  # logs a size mismatch: usually the wrong ROI
                self._found[p] = roi
        return [self._found[p] for p in paths]

    def _mask(self, path: Path, hw: tuple[int, int]) -> torch.Tensor:
        key = (str(path), hw)
        if key in self._masks:
            return self._masks[key]
        roi = load_roi(path, None)  # (1, h, w) in {0, 1}; an all-zero ROI is an error naming the file
        roi = F.interpolate(roi[None], size=hw, mode="nearest")[0, 0]
        if path == self.source:  # the one ROI of a fixed camera: decode it once per image size
            self._masks[key] = roi
        return roi

    def __call__(self, items: Sequence[ImageItem]) -> RoiImageBatch:
        if any(item.image_path is None for item in items):
            raise GRDNetError("ROIs are found by image path, and these images have none")
        files = self._roi_files([str(item.image_path) for item in items])
        with_roi = [RoiImageItem(**_fields_without_roi(item),
                                 roi=Mask(self._mask(f, tuple(item.image.shape[-2:]))))
                    for item, f in zip(items, files)]
        return RoiImageBatch.collate(with_roi)


def attach_roi(datamodule, source, default=None, data_root=None):
    """Make `datamodule`'s batches carry a ROI per image (see `RoiCollate`) and return it.

    `data_root` (what a ROI folder mirrors) defaults to the datamodule's data folder: `root /
    category` for MVTecAD-style datamodules, else `root`. Geometric augmentations of the datamodule
    act before the ROI is attached and would not move it: leave them off (GRD-Net augments its
    training batches itself, ROI included, `TrainConfig.hflip`/`vflip`/`rotation`)."""
    if data_root is None and getattr(datamodule, "root", None) is not None:
        root, category = Path(datamodule.root), getattr(datamodule, "category", None)
        data_root = root / category if category and (root / category).is_dir() else root
    datamodule.external_collate_fn = RoiCollate(source, data_root, default)
    return datamodule


def _batch_roi(batch, hw: tuple[int, int]) -> torch.Tensor | None:
    """The batch's ROI as (B, 1, *hw) in {0, 1} at the model's input size, or None (no ROI)."""
    roi = getattr(batch, "roi", None)
    if roi is None:
        return None
    roi = roi.as_subclass(torch.Tensor).float()
    roi = roi[:, None] if roi.ndim == 3 else roi
    if tuple(roi.shape[-2:]) != tuple(hw):  # the pre-processor resized the images, not the ROIs
        roi = F.interpolate(roi, size=hw, mode="nearest")
    return (roi > 0.5).float()


def _to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    if x.shape[1] == channels:
        return x
    if channels == 1 and x.shape[1] == 3:
        return (x * x.new_tensor(_LUMA)[None, :, None, None]).sum(1, keepdim=True)
    if channels == 3 and x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1)
    raise GRDNetError(f"the model takes {channels}-channel images, got {x.shape[1]} channels")


# ---- the model ---------------------------------------------------------------------------------

class GRDNetInference(nn.Module):
    """anomalib's `model` of `GRDNet`: image batch (B, C, S, S) in [0, 1] -> `InferenceBatch`
    with `anomaly_map` (B, 1, S, S), GRD-Net's eval-mode map (`grdnet.model.GRDNet.forward`), and
    `pred_score` (B,), grdnet's image score rule (`grdnet.scoring.image_scores`). Images of another
    size are resized to the model's and their maps back."""

    def __init__(self, net: nn.Module, cfg: ModelConfig):
        super().__init__()
        # In a tuple, so that nn.Module does not register the networks a second time: they are
        # the LightningModule's `net` (GRDNetModule's), and checkpoints keep one copy of them.
        self._net = (net,)
        self.cfg = cfg

    @property
    def net(self) -> nn.Module:
        return self._net[0]

    def forward(self, image: torch.Tensor) -> InferenceBatch:
        x = _to_channels(image, self.cfg.channels)
        s, hw = self.cfg.image_size, tuple(x.shape[-2:])
        if hw != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        maps = self.net(x).float()
        scores = image_scores(maps, self.cfg)
        if hw != (s, s):
            maps = F.interpolate(maps, size=hw, mode="bilinear", align_corners=False)
        return InferenceBatch(pred_score=scores, anomaly_map=maps)


class GRDNet(GRDNetModule, AnomalibModule):
    """GRD-Net as an anomalib model, configured like `grdnet train`: a preset of
    `grdnet.build_config` (`paper`, `cpu`, `grd-cpu`, `tiny`), a JSON config file and overrides,
    e.g. ``GRDNet("cpu", train={"steps": 300}, model={"channels": 1})``.

    The training length is the config's (`TrainConfig.steps`, or `epochs`, and `max_minutes`;
    where a preset sets both, `steps`: the trainer arguments are fixed before the datamodule's size
    is known, so the longer of the two cannot be chosen here): the model hands it to anomalib's `Engine` as its trainer arguments, which take precedence over
    the Engine's own (anomalib logs the override). Validation, which computes anomalib's
    normalisation and thresholds, runs once, after the last training step. With `ema_decay` the
    model brings the weight average of `grdnet train` as a callback. The datamodule's
    `train_batch_size` is the batch size (a warning says when it differs from the config's).

    `model={"channels": 1}` (grayscale data) reduces anomalib's RGB images to luma inside the model,
    so exported graphs still take RGB. `pre_processor` defaults to a resize to the model size, no
    normalisation (the networks take [0, 1]); the other components are anomalib's defaults.
    """

    def __init__(
        self,
        preset: str = "cpu",
        model: dict | None = None,
        train: dict | None = None,
        config_file: str | None = None,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        model_cfg, train_cfg = build_config(preset, model, train, config_file)
        textures = None
        if train_cfg.texture_dir:
            textures = load_textures(train_cfg.texture_dir, model_cfg.channels, model_cfg.image_size)
        # The initial weights are drawn from the config's seed, as `grdnet train` draws them,
        # without touching the caller's random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(train_cfg.seed)
            # GRDNetModule builds the networks, defects and augmentation; its super().__init__()
            # is AnomalibModule's, which builds default components, replaced below as asked.
            super().__init__(model_cfg, train_cfg, textures)
        s = model_cfg.image_size
        self.pre_processor = self._resolve_component(pre_processor, nn.Module,
                                                     lambda: self.configure_pre_processor((s, s)))
        if post_processor is not True:
            self.post_processor = self._resolve_component(post_processor, nn.Module, self.configure_post_processor)
        if evaluator is not True:
            self.evaluator = self._resolve_component(evaluator, Evaluator, self.configure_evaluator)
        if visualizer is not True:
            self.visualizer = self._resolve_component(visualizer, Visualizer, self.configure_visualizer)
        self.model = GRDNetInference(self.net, model_cfg)
        # Plain data only, fully resolved: `load_from_checkpoint` rebuilds the same model, and
        # checkpoints load with weights_only=True. AnomalibModule's save_hyperparameters() also
        # collected GRDNetModule's arguments (dataclasses, a tensor): they go, and saving again
        # resets the initial copy that loggers record.
        for name in ("model_cfg", "train_cfg", "textures"):
            self.hparams.pop(name, None)
        self.save_hyperparameters({"preset": preset, "model": to_json_dict(model_cfg),
                                   "train": to_json_dict(train_cfg), "config_file": None})
        if not torch.cuda.is_available():  # a CPU run: channels-last weights, as `grdnet train`
            use_cpu_layout(self, "cpu")

    # ---- what anomalib asks of a model -------------------------------------------------------

    @property
    def learning_type(self) -> LearningType:
        return LearningType.ONE_CLASS

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        t = self.train_cfg
        # Lightning counts every optimiser's steps: two per batch with the GAN.
        per_batch = 2 if self.net.has_gan else 1
        args: dict[str, Any] = {"num_sanity_val_steps": 0}
        if t.steps is not None:
            # One validation (anomalib's thresholds and normalisation), after the last batch.
            args.update(max_steps=t.steps * per_batch, max_epochs=-1, val_check_interval=t.steps,
                        check_val_every_n_epoch=None)
        else:
            args.update(max_epochs=t.epochs, check_val_every_n_epoch=t.epochs)
        if t.max_minutes is not None:
            args["max_time"] = dt.timedelta(minutes=t.max_minutes)
        return args

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize to the model size (default 256 x 256, the `paper` preset's); no normalisation:
        GRD-Net's networks and synthetic defects work on intensities in [0, 1]."""
        return PreProcessor(transform=Compose([Resize(image_size or (256, 256), antialias=True)]))

    def configure_post_processor(self) -> PostProcessor:
        return PostProcessor()

    def configure_callbacks(self):
        found = list(super().configure_callbacks())
        if self.train_cfg.ema_decay:
            found.append(WeightAverage(decay=self.train_cfg.ema_decay))
        return found

    # ---- steps -------------------------------------------------------------------------------

    def on_train_start(self) -> None:
        transform = self.pre_processor.transform if self.pre_processor else None
        if transform is not None and extract_transforms_by_type(transform, Normalize):
            raise GRDNetError("GRD-Net takes images in [0, 1]: remove Normalize from the pre-processor")
        loader = self.trainer.train_dataloader
        size = getattr(loader, "batch_size", None)
        if size is not None and size != self.train_cfg.batch_size:
            warnings.warn(f"the datamodule's train_batch_size is {size}, the config's batch_size "
                          f"{self.train_cfg.batch_size}: training uses {size}", stacklevel=1)

    def training_step(self, batch, batch_idx: int):
        """GRDNetModule's step (augmentation, defects, both updates) on the batch's images and
        ROIs, stacked as `grdnet train`'s loader stacks them: image channels, then the ROI."""
        x = _to_channels(batch.image.as_subclass(torch.Tensor), self.model_cfg.channels)
        roi = _batch_roi(batch, tuple(x.shape[-2:]))
        roi = torch.ones_like(x[:, :1]) if roi is None else roi
        return super().training_step(torch.cat([x, roi], dim=1), batch_idx)

    def _predict(self, batch):
        out = self.model(batch.image)
        maps, scores = out.anomaly_map, out.pred_score
        roi = _batch_roi(batch, tuple(maps.shape[-2:]))
        if roi is not None:  # as grdnet's predictors: the map zeroed outside the ROI, then scored
            maps = maps * roi.to(maps.device)
            scores = image_scores(maps, self.model_cfg)
        return batch.update(pred_score=scores, anomaly_map=maps)

    def validation_step(self, batch, *args, **kwargs):
        return self._predict(batch)

    def test_step(self, batch, batch_idx: int, *args, **kwargs):
        return self._predict(batch)

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0):
        return self._predict(batch)

    # ---- checkpoints: both parents' records ---------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        GRDNetModule.on_save_checkpoint(self, checkpoint)
        AnomalibModule.on_save_checkpoint(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        AnomalibModule.on_load_checkpoint(self, checkpoint)
        if self._trainer is not None:  # a resumed fit: restore the plateau schedule's running loss
            GRDNetModule.on_load_checkpoint(self, checkpoint)

    # ---- to grdnet's own tools ---------------------------------------------------------------

    def save_grdnet_model(self, folder, threshold: float | None = None) -> Path:
        """Write the networks as a grdnet model folder (safetensors + config.json), which
        `grdnet test`, `predict`, `serve` and `export` take like one `grdnet train` wrote.
        `threshold` is a raw score (grdnet's scale, not anomalib's normalised one); None: no
        decision threshold (scores and maps only)."""
        meta = {"threshold": threshold,
                "training": {"trainer": "anomalib", "steps": self.batches_trained, "grdnet": __version__,
                             "train_config": to_dict(self.train_cfg),
                             "finished": dt.datetime.now().isoformat(timespec="seconds")}}
        return save_model(folder, self.net, self.model_cfg, meta)
