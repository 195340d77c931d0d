"""Training: one Lightning module holds the GAN + segmentation logic; `train()` runs it.

Each step: augment the good batch (the ROI channel moves with the image), paint synthetic
defects, update generator + segmenter on `L_tot = L_gan + FL`, then the discriminator on BCE
(a model without the GAN, `ModelConfig.gan` False: the segmenter alone on FL).

Scale and faults are Lightning's business: DDP over processes, GPUs and machines, mixed precision,
loggers, and checkpoints that `train(..., resume=True)` continues from. What we add: every random
draw of a step (augmentation, defects) is seeded by (seed, rank, epoch, batch), so ranks differ and
a resumed run repeats exactly what the interrupted one would have done; the data loader records its
place in the epoch; checkpoints are written atomically.
"""
from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import os
import platform
import re
import shutil
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
import kornia.augmentation as K
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint, Timer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment

from . import __version__
from .config import ModelConfig, TrainConfig, to_dict
from .data import ImageDataset, train_images
from .defects import DefectSynthesizer, load_textures
from .errors import GRDNetError
from .roi import check_roi_size, find_rois
from .losses import (adversarial_loss, contextual_loss, discriminator_loss, latent_loss,
                     segmentation_loss)
from .model import Discriminator, Generator, Segmenter
from .modelfile import save_model
from .scoring import InferenceNet, Predictor

log = logging.getLogger(__name__)

CHECKPOINT = "last.ckpt"
# Settings that may change when a run is resumed; any other difference is refused.
RESUMABLE_CHANGES = {"epochs", "max_minutes", "checkpoint_every_minutes", "checkpoint_every_n_steps",
                     "log_every_n_steps", "num_workers"}
_AUGMENT, _DEFECTS = 0, 1  # random streams of a training step


def _plain(cfg) -> dict:
    """A config as JSON types only: checkpoints then load with `torch.load(weights_only=True)`."""
    return json.loads(json.dumps(to_dict(cfg)))


class GRDNetModule(L.LightningModule):
    """Generator G, discriminator C and segmenter Delta, trained jointly (manual optimisation);
    Delta alone when `ModelConfig.gan` is False."""

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, textures: torch.Tensor | None = None):
        super().__init__()
        self.automatic_optimization = False
        self.model_cfg, self.train_cfg = model_cfg, train_cfg
        self.generator = Generator(model_cfg) if model_cfg.gan else None
        self.discriminator = Discriminator(model_cfg) if model_cfg.gan else None
        self.segmenter = Segmenter(model_cfg)
        self.defects = DefectSynthesizer(train_cfg, textures)
        t = train_cfg
        self.augment = K.AugmentationSequential(
            *([K.RandomHorizontalFlip()] if t.hflip else []),
            *([K.RandomVerticalFlip()] if t.vflip else []),
            *([K.RandomAffine(degrees=t.rotation, padding_mode="reflection", p=1.0)] if t.rotation > 0 else []),
        )
        # Running sum of this epoch's step losses (for the plateau schedule), and batches trained in total.
        self._loss_sum, self._loss_count, self._loss_epoch = torch.zeros(()), 0, 0
        self.batches_trained = 0

    def inference_net(self) -> InferenceNet:
        g = self.generator
        return InferenceNet(None if g is None else g.encoder, None if g is None else g.decoder, self.segmenter,
                            self.model_cfg.flip_average, self.model_cfg.score_sizes)

    def configure_optimizers(self):
        t = self.train_cfg
        seg = {"params": self.segmenter.parameters(), "lr": t.seg_lr or t.lr}
        if self.generator is None:
            opts = [torch.optim.Adam([seg], lr=t.lr, betas=t.betas)]
        else:
            opts = [torch.optim.Adam([{"params": self.generator.parameters()}, seg], lr=t.lr, betas=t.betas),
                    torch.optim.Adam(self.discriminator.parameters(), lr=t.lr, betas=t.betas)]
        sched = [torch.optim.lr_scheduler.ReduceLROnPlateau(o, mode="min", factor=t.plateau_factor,
                                                           patience=t.plateau_patience) for o in opts]
        return opts, sched

    @staticmethod
    def _all(found) -> list:
        # Lightning hands back a lone optimizer or scheduler unwrapped, two or more as a list.
        return found if isinstance(found, list) else [found]

    def _step_seed(self, batch_idx: int, stream: int) -> int:
        """Seed of one random stream of one step: a hash of (seed, rank, epoch, batch, stream)."""
        key = [self.train_cfg.seed % 2 ** 32, self.global_rank, self.current_epoch, batch_idx, stream]
        return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0])

    def _defect_generator(self, batch_idx: int) -> torch.Generator:
        """Synthetic defects seeded by (seed, rank, epoch, batch): reproducible and different per rank."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self._step_seed(batch_idx, _DEFECTS))
        return gen

    def _augment(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        # kornia draws from the global RNG, which `seed_everything` made equal on every rank: draw
        # from a forked RNG seeded per step instead, so ranks differ and a resume replays exactly.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self._step_seed(batch_idx, _AUGMENT))
            return self.augment(batch)

    def training_step(self, batch: torch.Tensor, batch_idx: int):
        t, c = self.train_cfg, self.model_cfg.channels
        with torch.no_grad():
            if len(self.augment):
                batch = self._augment(batch, batch_idx)
            x, roi = batch[:, :c].clamp(0, 1), (batch[:, c:] > 0.5).float()
            defects = self.defects(x, self._defect_generator(batch_idx))
        opts = self._all(self.optimizers())
        g_opt = opts[0]

        # Generator + segmenter: reconstruct the clean image from the defaced one, locate the defect.
        self.toggle_optimizer(g_opt)
        if self.generator is None:  # the segmenter alone, on the defaced image alone
            x_hat, losses, l_gan = None, {}, 0.0
        else:
            x_hat, z, z_hat = self.generator(defects.image)
            _, feat_real = self.discriminator(x)
            _, feat_fake = self.discriminator(x_hat)
            l_adv = adversarial_loss(feat_real.detach(), feat_fake)
            l_con = contextual_loss(x, x_hat, t)
            l_enc = latent_loss(z, z_hat)
            l_gan = t.w_adv * l_adv + t.w_con * l_con + t.w_enc * l_enc
            losses = {"l_adv": l_adv, "l_con": l_con, "l_enc": l_enc, "l_gan": l_gan}
        seg_logits = self.segmenter(x_hat, defects.image)
        l_seg = segmentation_loss(seg_logits, defects.mask, roi, t)
        total = l_gan + t.w_seg * l_seg
        g_opt.zero_grad(set_to_none=True)
        self.manual_backward(total)
        g_opt.step()
        self.untoggle_optimizer(g_opt)

        if self.discriminator is not None:  # Discriminator: real X -> 1, reconstruction -> 0.
            d_opt = opts[1]
            self.toggle_optimizer(d_opt)
            logit_real, _ = self.discriminator(x)
            logit_fake, _ = self.discriminator(x_hat.detach())
            losses["l_disc"] = discriminator_loss(logit_real, logit_fake)
            d_opt.zero_grad(set_to_none=True)
            self.manual_backward(losses["l_disc"])
            d_opt.step()
            self.untoggle_optimizer(d_opt)

        losses.update(loss=total, l_seg=l_seg)
        self.log_dict({k: v.detach() for k, v in losses.items()}, prog_bar=False, on_step=True, sync_dist=False)
        self.log("seg", l_seg.detach(), prog_bar=True)
        if "l_con" in losses:
            self.log("con", l_con.detach(), prog_bar=True)
        self._loss_sum = self._loss_sum.to(total.device) + total.detach().float()
        self._loss_count += 1
        self._loss_epoch = self.current_epoch
        self.batches_trained += 1
        # The epoch's schedule step happens inside its last step, before that step's checkpoint:
        # a checkpoint never holds an epoch whose end is still to do.
        if batch_idx + 1 == self.trainer.num_training_batches:
            self._end_epoch()
        return total.detach()

    def on_train_epoch_start(self):
        if self._loss_epoch != self.current_epoch:  # left from an epoch cut short by the time budget
            self._loss_sum, self._loss_count = torch.zeros(()), 0

    def _end_epoch(self):
        mean = self._loss_sum / self._loss_count
        # Every rank steps its schedulers on the same all-ranks mean, so learning rates stay equal.
        mean = self.all_gather(mean).mean() if self.trainer.world_size > 1 else mean
        self._loss_sum, self._loss_count = torch.zeros((), device=mean.device), 0
        self.log("epoch_loss", mean, on_step=False, on_epoch=True, sync_dist=True)  # equal on all ranks
        for sched in self._all(self.lr_schedulers()):
            sched.step(mean)
        self.log("lr", self._all(self.optimizers())[0].param_groups[0]["lr"], on_step=False, on_epoch=True,
                 sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Runs on every rank (saving is collective); only rank 0 writes the file.
        sums = self._loss_sum.reshape(1).to(self.device)
        sums = self.all_gather(sums).reshape(-1) if self.trainer.world_size > 1 else sums
        checkpoint["grdnet"] = {
            "grdnet": __version__, "model": _plain(self.model_cfg), "train": _plain(self.train_cfg),
            "batches_trained": self.batches_trained,
            "epoch_loss": {"sums": sums.cpu(), "count": self._loss_count, "epoch": self._loss_epoch},
        }
        # Log rows up to this step reach the disk with the checkpoint: a resumed log has no gap.
        for logger in self.trainer.loggers:
            logger.save()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("grdnet", {})
        self.batches_trained = state.get("batches_trained", 0)
        loss = state.get("epoch_loss")
        if loss:
            sums = loss["sums"]
            own = sums[self.global_rank] if len(sums) == self.trainer.world_size else sums.mean()
            self._loss_sum, self._loss_count, self._loss_epoch = own.clone(), loss["count"], loss["epoch"]


class _WeightAverage(EMAWeightAveraging):
    """Lightning's EMA, plus: the checkpoint written after training keeps the last step's weights
    for resuming (Lightning has by then copied the average into the module), so that extending a
    finished run continues exactly where it stopped."""

    _last_step_state: dict | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Lightning builds the average before the module is moved to the accelerator: keep it on the
        # training device, or every step would copy all weights from the GPU to the CPU.
        self._device = self._device or trainer.strategy.root_device
        super().setup(trainer, pl_module, stage)

    def on_train_end(self, trainer, pl_module) -> None:
        self._last_step_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._last_step_state is not None:
            checkpoint["current_model_state"] = self._last_step_state


class _EpochSampler(torch.utils.data.DistributedSampler):
    """This rank's shard of a permutation drawn per epoch from (seed, epoch), the same permutation on
    every rank, so shards never overlap. `start` drops the head of the next shard (mid-epoch resume)."""

    start = 0

    def __iter__(self):
        indices = list(super().__iter__())[self.start:]
        self.start = 0
        return iter(indices)


class _ResumableLoader(torch.utils.data.DataLoader):
    """A DataLoader that knows its place in the epoch. Lightning saves `state_dict()` in every
    checkpoint and hands it back on resume (its stateful-loader protocol), so a resumed epoch
    continues with the batches not yet seen instead of starting over."""

    _resume: tuple[int, int] | None = None
    _place: tuple[int, int] = (0, 0)

    def __iter__(self):
        epoch, done = self.sampler.epoch, 0  # Lightning calls set_epoch before the first batch
        if self._resume is not None and self._resume[0] == epoch:
            done = self._resume[1]
            self.sampler.start = done * self.batch_size
        self._resume, self._place = None, (epoch, done)
        for batch in super().__iter__():
            done += 1
            self._place = (epoch, done)
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self._place[0], "batches": self._place[1]}

    def load_state_dict(self, state: dict) -> None:
        self._resume = (int(state["epoch"]), int(state["batches"]))


class _TrainData(L.LightningDataModule):
    """Builds the loader once the process group exists, when this process's rank is known."""

    def __init__(self, dataset, batch_size: int, seed: int, num_workers: int):
        super().__init__()
        self.dataset, self.batch_size, self.seed, self.num_workers = dataset, batch_size, seed, num_workers

    def train_dataloader(self):
        t = self.trainer
        sampler = _EpochSampler(self.dataset, num_replicas=t.world_size, rank=t.global_rank, shuffle=True,
                                seed=self.seed)
        return _ResumableLoader(self.dataset, batch_size=min(self.batch_size, len(sampler)), sampler=sampler,
                                drop_last=True, num_workers=self.num_workers,
                                persistent_workers=self.num_workers > 0)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside its target, syncs it to disk, then renames it
    over the target: a crash at any moment leaves the previous or the new checkpoint, never a torn
    one. (Lightning's writer stages the file through fsspec in the system temp folder and moves it;
    across filesystems that move is a copy, and nothing is synced.)"""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            self._commit(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @staticmethod
    def _commit(tmp: Path, path: Path) -> None:
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _CSVLogger(CSVLogger):
    """Lightning's CSV logger, except that a resumed run keeps the rows logged before its checkpoint
    (Lightning's writer would start `metrics.csv` afresh). Rows after the checkpoint are dropped:
    the resumed run logs those steps again."""

    def __init__(self, *args, keep_below_step: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._keep_below = keep_below_step

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is not None or self._keep_below is None:
            return super().experiment
        path = Path(self.log_dir) / "metrics.csv"
        rows = []
        if path.is_file():
            with open(path, newline="") as f:
                rows = [{k: v for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)
                        if r.get("step") and int(float(r["step"])) < self._keep_below]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Experiment logs directory.*")
            writer = super().experiment
        writer.metrics.extend(rows)
        writer.save()
        return writer


def split_train_val(paths: list[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Hold out good training images for threshold calibration (never the test split)."""
    n_val = int(round(len(paths) * fraction)) if len(paths) >= 5 else 0
    order = np.random.default_rng(seed).permutation(len(paths))
    val = sorted(paths[i] for i in order[:n_val])
    train = sorted(paths[i] for i in order[n_val:])
    return train, val


def calibrate_threshold(predictor: Predictor, paths: list[Path], quantile: float, batch_size: int = 16) -> dict:
    """Threshold = the `quantile` of the held-out good images' scores: by construction about
    (1 - quantile) of good images are flagged. Documented in the model's config.json."""
    scores = np.array([p.score for p in predictor.predict(list(paths), batch_size=batch_size)])
    return {"threshold": float(np.quantile(scores, quantile)),
            "threshold_rule": f"quantile {quantile} of {len(scores)} held-out good training images' scores",
            "val_scores": {"n": len(scores), "mean": float(scores.mean()), "max": float(scores.max())}}


def environment() -> dict:
    """Versions of Python, grdnet's dependencies and the accelerator stack, for run.json."""
    from importlib import metadata

    try:
        names = [re.match(r"[A-Za-z0-9_.\-]+", r).group(0) for r in metadata.requires("grdnet") or []
                 if "extra ==" not in r]
    except metadata.PackageNotFoundError:
        names = ["torch", "lightning", "torchmetrics", "kornia", "numpy", "pillow", "scipy", "safetensors"]
    packages = {}
    for name in [*names, "tensorboard", "tensorboardX", "mlflow", "mlflow-skinny"]:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    env = {"python": platform.python_version(), "platform": platform.platform(), "packages": packages}
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return env


def _launch_rank_zero() -> bool:
    """Rank 0 as far as the launcher's environment tells, before Lightning sets up the process group
    (Lightning's own launcher, torchrun and SLURM all set one of these in the other processes)."""
    return all(int(os.environ.get(v, "0") or 0) == 0 for v in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def _world_size(accelerator: str, devices, num_nodes: int) -> int:
    if isinstance(devices, int) and devices > 0:
        n = devices
    elif isinstance(devices, (list, tuple)):
        n = len(devices)
    elif isinstance(devices, str) and devices not in ("auto", "-1"):
        n = len([d for d in devices.split(",") if d.strip()]) if "," in devices else int(devices)
    elif accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        n = torch.cuda.device_count()
    else:
        n = 1
    return n * num_nodes


def _resolve_strategy(strategy, accelerator: str, devices, num_nodes: int):
    """DDP with `find_unused_parameters`: each of our two backward passes per step leaves the other
    network's (toggled-off) parameters without gradients, which plain DDP treats as an error."""
    if isinstance(strategy, str) and any(k in strategy for k in ("spawn", "fork", "notebook")) or \
            getattr(strategy, "_start_method", "popen") != "popen":
        # Spawned processes take the trained state with them when they end: the final checkpoint,
        # the threshold calibration and the model folder need it in this process.
        raise GRDNetError(f"strategy {strategy} is not supported: use ddp (Lightning then starts the other "
                          "processes by running the same command), or launch under torchrun or SLURM")
    if strategy == "auto" and _world_size(accelerator, devices, num_nodes) > 1:
        strategy = "ddp"
    return "ddp_find_unused_parameters_true" if strategy == "ddp" else strategy


def _on_cpu(accelerator: str) -> bool:
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())


def use_cpu_layout(module: torch.nn.Module, accelerator: str) -> None:
    """On CPUs, keep weights channels-last: oneDNN's convolutions are faster on that layout
    (one-off timings: 8-11% per training step)."""
    if _on_cpu(accelerator):
        module.to(memory_format=torch.channels_last)


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX); elsewhere oneDNN emulates
    it, more slowly than fp32."""
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def resolve_precision(precision: str | None, accelerator: str) -> str:
    """The precision to train in. Default: fp32 on GPUs; on CPUs with native bf16, bf16-mixed,
    which trains the `cpu` preset 1.3x (a bare step) to 2.1x (whole runs: 93 epochs in 20 minutes
    instead of 45) faster with no measured loss of quality (docs/PERFORMANCE.md, docs/EXPERIMENTS.md
    run 18); fp32 on other CPUs."""
    on_cpu = _on_cpu(accelerator)
    if precision is None:
        precision = "bf16-mixed" if on_cpu and native_cpu_bf16() else "32-true"
    precision = str(precision)
    if on_cpu and precision in ("16-mixed", "16", "16-true", "half"):
        raise GRDNetError(f"precision {precision} needs a GPU (there is no fp16 autocast on CPU); "
                          "on CPU use 32-true or bf16-mixed (the default where the CPU has native bf16)")
    return precision


def _loggers(out: Path, names, keep_below_step: int | None, mlflow_run_id: str | None) -> list:
    """CSV always; TensorBoard and MLflow on request, with a clear error if the package is missing."""
    from importlib.util import find_spec

    loggers = [_CSVLogger(out, name="logs", version="", keep_below_step=keep_below_step)]
    for name in dict.fromkeys(names or []):
        if name == "csv":
            continue
        if name == "tensorboard":
            if find_spec("tensorboard") is None and find_spec("tensorboardX") is None:
                raise GRDNetError("--logger tensorboard needs the tensorboard package (pip install tensorboard)")
            from lightning.pytorch.loggers import TensorBoardLogger
            loggers.append(TensorBoardLogger(out / "logs", name="tensorboard", version="", default_hp_metric=False))
        elif name == "mlflow":
            if find_spec("mlflow") is None:
                raise GRDNetError("--logger mlflow needs the mlflow package (pip install mlflow)")
            from lightning.pytorch.loggers import MLFlowLogger
            # MLflow 3 refuses the plain-folder store that Lightning defaults to: default to SQLite.
            uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(out / 'logs' / 'mlflow.db').resolve()}"
            loggers.append(MLFlowLogger(experiment_name="grdnet", run_name=out.name, tracking_uri=uri,
                                        run_id=mlflow_run_id))
        else:
            raise GRDNetError(f"unknown logger {name!r}; choose from csv, tensorboard, mlflow")
    return loggers


class _RunRecord(L.Callback):
    """Rank 0 writes run.json once training state is restored: configs, versions, command and one
    entry per attempt (a resumed run adds one, with the epoch and step it continued from)."""

    def __init__(self, path: Path, info: dict, resume: bool):
        self.path, self.info, self.resume = path, info, resume

    def on_train_start(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        doc = self.info
        if self.resume and self.path.is_file():
            doc = json.loads(self.path.read_text())
        attempt = {"started": dt.datetime.now().isoformat(timespec="seconds"), "command": self.info["command"],
                   "start_epoch": trainer.current_epoch, "start_step": trainer.global_step,
                   "start_batches": pl_module.batches_trained, "world_size": trainer.world_size,
                   "precision": self.info["trainer"]["precision"]}
        doc.setdefault("attempts", []).append(attempt)
        for lg in trainer.loggers:
            if lg.__class__.__name__ == "MLFlowLogger":
                doc["mlflow_run_id"] = lg.run_id
        _write_json(self.path, doc)


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    os.replace(tmp, path)


def _read_checkpoint(path: Path, model_cfg: ModelConfig, train_cfg: TrainConfig) -> dict:
    """Our part of a checkpoint, after checking that it belongs to this run's settings."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # unpickling errors have many types; the message is what matters
        raise GRDNetError(f"{path}: cannot read checkpoint ({str(e).splitlines()[0]})") from None
    state = ckpt.get("grdnet") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise GRDNetError(f"{path}: not a grdnet training checkpoint")
    diffs = [f"model.{k}: {v!r} -> {_plain(model_cfg).get(k)!r}" for k, v in state["model"].items()
             if _plain(model_cfg).get(k) != v]
    diffs += [f"train.{k}: {v!r} -> {_plain(train_cfg).get(k)!r}" for k, v in state["train"].items()
              if k not in RESUMABLE_CHANGES and _plain(train_cfg).get(k) != v]
    if diffs:
        raise GRDNetError(f"{path}: the run was trained with other settings ({'; '.join(diffs)}); resume "
                          "with the run's own settings (see run.json)")
    return state


def _fit(out: Path, datamodule, module, *, resume: bool, accelerator, devices, num_nodes, strategy, precision,
         deterministic: bool, loggers: list, callbacks: list, train_cfg: TrainConfig, progress: bool) -> L.Trainer:
    """Build the Trainer, clear what a replaced run left in `out`, fit; then checkpoint the final state."""
    ckpt_dir = out / "checkpoints"
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    try:
        trainer = L.Trainer(
            accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
            precision=precision, max_epochs=train_cfg.epochs,
            deterministic=(True if accelerator == "cpu" or not torch.cuda.is_available() else "warn")
            if deterministic else None,
            logger=loggers, callbacks=callbacks, plugins=[AtomicCheckpointIO()], use_distributed_sampler=False,
            enable_checkpointing=checkpointing, enable_progress_bar=progress,
            log_every_n_steps=train_cfg.log_every_n_steps, enable_model_summary=False, num_sanity_val_steps=0,
        )
    except (MisconfigurationException, ValueError) as e:
        raise GRDNetError(f"invalid training setup: {e}") from None

    if _launch_rank_zero():  # settings are checked: now touch the run folder
        # A new run replaces what an earlier run left here (an MLflow database keeps its old runs).
        stale = [ckpt_dir, out / "model", out / "logs" / "metrics.csv", out / "logs" / "tensorboard"]
        stale = [p for p in stale if p.exists()] if not resume else []
        if stale:
            log.warning("%s: replacing the earlier run's %s", out, ", ".join(str(p.relative_to(out)) for p in stale))
            for p in stale:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        for tmp in ckpt_dir.glob(".*.tmp-*"):  # left by a kill inside a checkpoint write
            tmp.unlink(missing_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
        warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated.*")
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_dir / CHECKPOINT if resume else None,
                    weights_only=True)
    if trainer.interrupted:
        raise GRDNetError(f"{out}: training was interrupted; no model was written")
    if checkpointing:  # the final state too, so that --resume can extend a finished run
        trainer.save_checkpoint(ckpt_dir / CHECKPOINT, weights_only=False)  # full state, to resume
    return trainer


def train(data, out, model_cfg: ModelConfig, train_cfg: TrainConfig, *, accelerator: str = "auto",
          devices="auto", num_nodes: int = 1, strategy: str = "auto", precision: str | None = None,
          resume: bool = False, deterministic: bool = False, loggers=(), callbacks: list | None = None,
          progress: bool = True, command: list[str] | None = None, roi=None,
          roi_default=None) -> Path | None:
    """Train on `data/train/good` and write the run folder `out`; returns the model folder (None on
    ranks other than 0, which write nothing).

    The run folder holds `run.json` (configs, versions, command, attempts), `logs/metrics.csv`
    (every loss), `checkpoints/last.ckpt` and, once training has finished, `model/`.

    - `devices`, `num_nodes`, `strategy`: Lightning's; more than one process means DDP. Each rank
      trains on its own shard with its own augmentation and defects; gradients are averaged.
    - `precision`: Lightning's ("bf16-mixed", "16-mixed" on GPU); fp16 on CPU is refused. Default:
      fp32, except bf16-mixed on CPUs with native bf16 (see `resolve_precision`).
    - `resume`: continue the run in `out` from its last checkpoint (weights, optimisers, schedulers,
      epoch and step, place in the epoch, time budget used). The settings must match the run's.
    - `deterministic`: deterministic algorithms; with the same seed, identical weights on the same
      machine (on GPU, ops without a deterministic kernel only warn).
    - `loggers`: extra loggers besides CSV: "tensorboard", "mlflow".
    - `callbacks`: extra Lightning callbacks.
    - `roi`: a folder of per-image ROI masks mirroring `data`, or one mask for all images;
      `roi_default` serves images without one.
    """
    out = Path(out)
    ckpt_dir, ckpt_path = out / "checkpoints", out / "checkpoints" / CHECKPOINT
    precision = resolve_precision(precision, accelerator)
    resumed = None
    if resume:
        if not ckpt_path.is_file():
            raise GRDNetError(f"{out}: nothing to resume: no checkpoint {ckpt_path} (the run stopped before its "
                              "first checkpoint, or checkpoints are off); start it again without --resume")
        resumed = _read_checkpoint(ckpt_path, model_cfg, train_cfg)
    paths = train_images(data)
    train_paths, val_paths = split_train_val(paths, train_cfg.val_fraction, train_cfg.seed)
    if len(train_paths) < 1:
        raise GRDNetError(f"{data}: no training images left after the validation split")
    L.seed_everything(train_cfg.seed, workers=True, verbose=False)
    out.mkdir(parents=True, exist_ok=True)

    rois = None
    if roi is not None:
        rois = find_rois(train_paths, data, roi, roi_default)
        for r, p in zip(rois, train_paths):
            check_roi_size(r, p)
    dataset = ImageDataset(train_paths, model_cfg.channels, model_cfg.image_size, rois=rois,
                           crop=train_cfg.train_crops, keep_aspect=model_cfg.aspect == "keep")
    datamodule = _TrainData(dataset, train_cfg.batch_size, train_cfg.seed, train_cfg.num_workers)
    textures = None
    if train_cfg.texture_dir:
        textures = load_textures(train_cfg.texture_dir, model_cfg.channels, model_cfg.image_size)
    module = GRDNetModule(model_cfg, train_cfg, textures)
    use_cpu_layout(module, accelerator)  # before the trainer starts: the weight average copies the layout

    strategy = _resolve_strategy(strategy, accelerator, devices, num_nodes)
    max_time = dt.timedelta(minutes=train_cfg.max_minutes) if train_cfg.max_minutes is not None else None
    timer = Timer(duration=max_time, verbose=False)  # its elapsed time is saved in checkpoints
    ckpt_callbacks = []
    if train_cfg.checkpoint_every_minutes > 0:
        ckpt_callbacks.append(ModelCheckpoint(
            dirpath=ckpt_dir, save_last=True, save_top_k=0,
            train_time_interval=dt.timedelta(minutes=train_cfg.checkpoint_every_minutes)))
    if train_cfg.checkpoint_every_n_steps > 0:
        ckpt_callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                                              every_n_train_steps=train_cfg.checkpoint_every_n_steps))
    # Lightning's averaging callback keeps the average in checkpoints (resume restores both) and
    # copies it into the module when training ends, so everything below sees the averaged weights.
    averaging = [_WeightAverage(decay=train_cfg.ema_decay)] if train_cfg.ema_decay else []
    run_info = {
        "grdnet": __version__, "torch": torch.__version__, "lightning": L.__version__, **environment(),
        "started": dt.datetime.now().isoformat(timespec="seconds"), "command": command or sys.argv,
        "data": str(Path(data).resolve()), "seed": train_cfg.seed, "deterministic": deterministic,
        "trainer": {"accelerator": accelerator, "devices": devices, "num_nodes": num_nodes,
                    "strategy": str(strategy), "precision": precision},
        "model": to_dict(model_cfg), "train": to_dict(train_cfg),
        "roi": {"source": str(roi) if roi else None, "default": str(roi_default) if roi_default else None,
                "mode": train_cfg.roi_mode},
    }
    mlflow_run_id = None
    if resume and (out / "run.json").is_file():
        mlflow_run_id = json.loads((out / "run.json").read_text()).get("mlflow_run_id")
    keep_below = resumed["batches_trained"] if resumed else None
    was_deterministic = torch.are_deterministic_algorithms_enabled()  # the Trainer sets it process-wide
    try:
        trainer = _fit(out, datamodule, module, resume=resume, accelerator=accelerator, devices=devices,
                       num_nodes=num_nodes, strategy=strategy, precision=precision, deterministic=deterministic,
                       loggers=_loggers(out, loggers, keep_below, mlflow_run_id),
                       callbacks=[timer, *averaging, *ckpt_callbacks,
                                  _RunRecord(out / "run.json", run_info, resume), *(callbacks or [])],
                       train_cfg=train_cfg, progress=progress)
    finally:
        if deterministic:  # a library call should not leave the process in deterministic mode
            torch.use_deterministic_algorithms(was_deterministic)
    if not trainer.is_global_zero:
        return None

    # Rank 0 alone calibrates over the whole validation split: one pass over a few thousand images
    # at most, identical whatever the number of training processes, and no padded duplicates from
    # sharding to skew the quantile.
    predictor = Predictor(module.inference_net(), model_cfg, device=module.device, tile=train_cfg.train_crops)
    cal = calibrate_threshold(predictor, val_paths or train_paths, train_cfg.threshold_quantile)
    if not val_paths:
        log.warning("too few training images to hold out a validation split: threshold calibrated on "
                    "training images (expect more false alarms)")
    seconds = timer.time_elapsed("train")
    meta = {
        **cal,
        "training": {"data": str(Path(data).resolve()), "n_train": len(train_paths), "n_val": len(val_paths),
                     "epochs": trainer.current_epoch, "steps": trainer.global_step,
                     "batches": module.batches_trained, "minutes": round(seconds / 60, 2),
                     "seconds": round(seconds, 3),
                     "world_size": trainer.world_size, "precision": precision,
                     "train_config": to_dict(train_cfg), "grdnet": __version__,
                     "roi": {"source": str(roi) if roi else None, "mode": train_cfg.roi_mode},
                     "finished": dt.datetime.now().isoformat(timespec="seconds")},
    }
    return save_model(out / "model", module.inference_net(), model_cfg, meta)
