"""The Trainer around `GRDNetModule`: data, checkpoints, loggers, progress, run record, and `train()`.

Scale and faults are Lightning's business: DDP over processes, GPUs and machines, mixed precision,
loggers, and checkpoints that `train(..., resume=True)` continues from. What we add: the data
loader records its place in the epoch (a resumed epoch continues with the batches not yet seen),
checkpoints are written atomically, a resumed CSV log keeps its rows, and run.json records every
attempt.
"""
from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import math
import os
import platform
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import EMAWeightAveraging, Timer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment

from .calibration import held_out_threshold, split_train_val
from .config import ModelConfig, TrainConfig, to_dict, to_json_dict
from .data import ImageDataset, choose_crops, train_images
from .defects import load_textures
from .errors import GRDNetError
from .files import atomic_write, write_json
from .modelfile import save_model
from .roi import check_roi_size, find_rois
from .scoring import Predictor
from .training import GRDNetModule
from .version import __version__

log = logging.getLogger(__name__)

CHECKPOINT = "last.ckpt"
# Settings that may change when a run is resumed; any other difference is refused.
RESUMABLE_CHANGES = {"steps", "epochs", "max_minutes", "checkpoint_every_minutes", "checkpoint_every_n_steps",
                     "log_every_n_steps", "num_workers"}
PROGRESS_LINE_SECONDS = 30.0  # without a terminal, one progress line this often


# ---- data --------------------------------------------------------------------------------------

ROUND_BATCHES = 40  # a Lightning epoch ("round") is at least this many batches: whole passes over the data


@dataclass(frozen=True)
class Plan:
    """How long a run trains, in optimiser steps, and how the steps fall into rounds.

    A round (what Lightning calls an epoch: hooks, the plateau schedule, the loader's restart) is
    the fewest whole passes over the images that make at least `ROUND_BATCHES` batches, so a
    30-image set does not pay per-epoch work every batch and its schedule sees as many batches per
    step as a large set's. `steps` counts batches, the same on every rank (one generator and, with
    the GAN, one discriminator update each)."""

    steps: int
    batch: int  # images per batch on each rank
    per_rank: int  # images in one rank's share of one pass
    passes: int  # passes per round
    world_size: int

    @property
    def round_batches(self) -> int:
        return self.passes * self.per_rank // self.batch


def plan_training(n_images: int, train_cfg: TrainConfig, world_size: int = 1) -> Plan:
    """The run's length and rounds. `epochs` E means E passes: the batches that show each image E
    times (rounded to the nearest step); with `steps` set too, the longer of the two."""
    per_rank = -(-n_images // world_size)  # ranks pad their shares to equal length, like DistributedSampler
    batch = max(1, min(train_cfg.batch_size, per_rank))
    by_passes = 0 if train_cfg.epochs is None else math.floor(train_cfg.epochs * per_rank / batch + 0.5)
    steps = max(1, train_cfg.steps or 0, by_passes)
    passes = 1
    while passes * per_rank // batch < ROUND_BATCHES:
        passes += 1
    return Plan(steps=steps, batch=batch, per_rank=per_rank, passes=passes, world_size=world_size)


class RoundSampler(torch.utils.data.Sampler):
    """This rank's indices for one round: `passes` permutations of the dataset, each drawn from
    (seed, round * passes + pass) and the same on every rank; each rank takes every world_size-th
    index of each (padded to equal shares), so shards never overlap. With one pass per round the
    order is exactly `DistributedSampler`'s. `start` drops the head of the next round (mid-round
    resume)."""

    start = 0

    def __init__(self, n: int, plan: Plan, rank: int, seed: int):
        self.n, self.plan, self.rank, self.seed, self.epoch = n, plan, rank, seed, 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls it before each round
        self.epoch = epoch

    def __len__(self) -> int:
        return self.plan.passes * self.plan.per_rank

    def __iter__(self):
        p, indices = self.plan, []
        total = p.per_rank * p.world_size
        for k in range(p.passes):
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch * p.passes + k)
            order = torch.randperm(self.n, generator=g).tolist()
            order += (order * (total // self.n + 1))[:total - self.n]
            indices += order[self.rank:total:p.world_size]
        indices, self.start = indices[self.start:], 0
        return iter(indices)


class ResumableLoader(torch.utils.data.DataLoader):
    """A DataLoader that knows its place in the round. Lightning saves `state_dict()` in every
    checkpoint and hands it back on resume (its stateful-loader protocol), so a resumed round
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


class TrainData(L.LightningDataModule):
    """Builds the loader once the process group exists, when this process's rank is known."""

    def __init__(self, dataset, train_cfg: TrainConfig):
        super().__init__()
        self.dataset, self.train_cfg = dataset, train_cfg

    def train_dataloader(self):
        t = self.trainer
        plan = plan_training(len(self.dataset), self.train_cfg, t.world_size)
        workers = self.train_cfg.num_workers
        return ResumableLoader(self.dataset, batch_size=plan.batch,
                               sampler=RoundSampler(len(self.dataset), plan, t.global_rank, self.train_cfg.seed),
                               drop_last=True, num_workers=workers, persistent_workers=workers > 0)


# ---- checkpoints, weights, logs ----------------------------------------------------------------

class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints through `grdnet.files.atomic_write`: a kill at any moment leaves the previous or
    the new checkpoint, never a torn one (Lightning's writer stages through the system temp folder
    and moves the file; across filesystems that is an unsynced copy)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        with atomic_write(path) as f:
            torch.save(checkpoint, f)


class WeightAverage(EMAWeightAveraging):
    """Lightning's EMA, kept on the training device."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Lightning builds the average before the module is moved to the accelerator: keep it on the
        # training device, or every step would copy all weights from the GPU to the CPU.
        self._device = self._device or trainer.strategy.root_device
        super().setup(trainer, pl_module, stage)


class StepCheckpoint(L.Callback):
    """`last.ckpt` every `minutes`, every `n_steps` optimiser steps and at the last step, written
    inside the step (Lightning's ModelCheckpoint ignores its time interval under manual
    optimisation). The last step's checkpoint lets `--resume` extend a finished run exactly: one
    written after the fit, once Lightning's loops have closed the round, would say the round was over."""

    def __init__(self, path: Path, minutes: float, n_steps: int):
        self.path, self.seconds, self.n_steps = path, minutes * 60, n_steps
        self._last = time.monotonic()

    def on_train_start(self, trainer, pl_module):
        self._last = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # Callbacks before this one (the Timer, the weight average) have done this step's work.
        due = trainer.should_stop or trainer.global_step >= trainer.max_steps
        due = due or (self.n_steps > 0 and trainer.global_step % self.n_steps == 0)
        if self.seconds > 0:  # rank 0's clock decides for every rank: saving is collective
            due = due or trainer.strategy.broadcast(time.monotonic() - self._last >= self.seconds)
        if due:
            trainer.save_checkpoint(self.path, weights_only=False)  # full state, to resume
            self._last = time.monotonic()


class ResumedCSVLogger(CSVLogger):
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


def make_loggers(out: Path, names, keep_below_step: int | None, mlflow_run_id: str | None) -> list:
    """CSV always; TensorBoard and MLflow on request, with a clear error if the package is missing."""
    from importlib.util import find_spec

    loggers = [ResumedCSVLogger(out, name="logs", version="", keep_below_step=keep_below_step)]
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


class LineProgress(L.Callback):
    """Progress for logs and pipes (no terminal): one line every `seconds`, not a redrawn bar."""

    def __init__(self, steps: int, seconds: float | None = None, stream=None):
        self.steps, self.seconds = steps, PROGRESS_LINE_SECONDS if seconds is None else seconds
        self.stream, self._last = stream, 0.0

    def on_train_start(self, trainer, pl_module):
        self._last = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.monotonic()
        if now - self._last < self.seconds or not trainer.is_global_zero:
            return
        self._last = now
        metrics = trainer.progress_bar_metrics
        losses = " ".join(f"{k} {float(v):.4f}" for k, v in metrics.items() if k in ("seg", "con"))
        print(f"step {pl_module.batches_trained:,}/{self.steps:,} {losses}".rstrip(), file=self.stream or sys.stdout,
              flush=True)


def describe_plan(plan: Plan, n_images: int, train_cfg: TrainConfig) -> str:
    """One line saying what a run will do, printed before it starts."""
    images = plan.batch * plan.world_size
    text = (f"training: {plan.steps:,} steps of {images} images ({plan.steps * images / n_images:,.1f} passes over "
            f"{n_images:,} training images, rounds of {plan.round_batches} batches)")
    if train_cfg.steps is not None and train_cfg.epochs is not None:
        text += f", the longer of {train_cfg.steps:,} steps and {train_cfg.epochs:,} passes"
    if train_cfg.max_minutes is not None:
        text += f", stopped after {train_cfg.max_minutes:g} minutes if not done by then"
    return text


class SpeedReport(L.Callback):
    """Once the first steps are timed, one line: the speed here and the minutes the plan needs."""

    WARMUP, MEASURE = 3, 20  # batches not timed (first-call costs), then batches timed

    def __init__(self, plan: Plan, max_minutes: float | None, stream=None):
        self.plan, self.max_minutes, self.stream = plan, max_minutes, stream
        self._seen, self._t0 = 0, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._seen += 1
        if self._seen == self.WARMUP:
            self._t0 = time.monotonic()
        if self._seen != self.WARMUP + self.MEASURE or not trainer.is_global_zero:
            return
        rate = self.MEASURE / (time.monotonic() - self._t0)
        left = self.plan.steps - pl_module.batches_trained
        text = f"{rate:.2f} steps/s here: about {left / rate / 60:.1f} more minutes for {left:,} steps"
        if self.max_minutes is not None and left / rate / 60 > self.max_minutes:
            stop = int(rate * self.max_minutes * 60)
            text += f" (the {self.max_minutes:g}-minute budget stops it after about {stop:,})"
        print(text, file=self.stream or sys.stdout, flush=True)


class RunRecord(L.Callback):
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
        write_json(self.path, doc)


def read_checkpoint(path: Path, model_cfg: ModelConfig, train_cfg: TrainConfig) -> dict:
    """Our part of a checkpoint, after checking that it belongs to this run's settings."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # unpickling errors have many types; the message is what matters
        raise GRDNetError(f"{path}: cannot read checkpoint ({str(e).splitlines()[0]})") from None
    state = ckpt.get("grdnet") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise GRDNetError(f"{path}: not a grdnet training checkpoint")
    model_now, train_now = to_json_dict(model_cfg), to_json_dict(train_cfg)
    diffs = [f"model.{k}: {v!r} -> {model_now.get(k)!r}" for k, v in state["model"].items() if model_now.get(k) != v]
    diffs += [f"train.{k}: {v!r} -> {train_now.get(k)!r}" for k, v in state["train"].items()
              if k not in RESUMABLE_CHANGES and train_now.get(k) != v]
    if diffs:
        raise GRDNetError(f"{path}: the run was trained with other settings ({'; '.join(diffs)}); resume "
                          "with the run's own settings (see run.json)")
    return state


# ---- devices, strategy, precision --------------------------------------------------------------

def environment() -> dict:
    """Versions of Python, grdnet's dependencies and the accelerator stack, for run.json."""
    from importlib import metadata

    try:
        names = [re.match(r"[A-Za-z0-9_.\-]+", r).group(0) for r in metadata.requires("grdnet") or []
                 if "extra ==" not in r]
    except metadata.PackageNotFoundError:
        names = ["torch", "lightning", "kornia", "numpy", "pillow", "scipy", "safetensors"]
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


def resolve_strategy(strategy, accelerator: str, devices, num_nodes: int):
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
    """The precision to train in. Default: fp32 on GPUs; on CPUs with native bf16, bf16-mixed
    (faster with no measured loss of quality: docs/PERFORMANCE.md); fp32 on other CPUs."""
    on_cpu = _on_cpu(accelerator)
    if precision is None:
        precision = "bf16-mixed" if on_cpu and native_cpu_bf16() else "32-true"
    precision = str(precision)
    if on_cpu and precision in ("16-mixed", "16", "16-true", "half"):
        raise GRDNetError(f"precision {precision} needs a GPU (there is no fp16 autocast on CPU); "
                          "on CPU use 32-true or bf16-mixed (the default where the CPU has native bf16)")
    return precision


# ---- one training run --------------------------------------------------------------------------

@dataclass
class Launch:
    """Where and how the Trainer runs (Lightning's settings, see `train`)."""

    accelerator: str = "auto"
    devices: object = "auto"
    num_nodes: int = 1
    strategy: object = "auto"
    precision: str | None = None
    deterministic: bool = False


def _dataset(data, paths: list[Path], model_cfg: ModelConfig, train_cfg: TrainConfig, roi, roi_default) -> ImageDataset:
    rois = None
    if roi is not None:
        rois = find_rois(paths, data, roi, roi_default)
        for r, p in zip(rois, paths):
            check_roi_size(r, p)
    return ImageDataset(paths, model_cfg.channels, model_cfg.image_size, rois=rois, crop=train_cfg.train_crops,
                        keep_aspect=model_cfg.aspect == "keep")


def _module(model_cfg: ModelConfig, train_cfg: TrainConfig, accelerator: str) -> GRDNetModule:
    textures = None
    if train_cfg.texture_dir:
        textures = load_textures(train_cfg.texture_dir, model_cfg.channels, model_cfg.image_size)
    module = GRDNetModule(model_cfg, train_cfg, textures)
    use_cpu_layout(module, accelerator)  # before the trainer starts: the weight average copies the layout
    return module


def _callbacks(out: Path, train_cfg: TrainConfig, plan: Plan, progress: bool) -> list:
    """Timer (its elapsed time is saved in checkpoints), weight average, checkpoints, progress lines,
    the speed line, and the last step's checkpoint."""
    t = train_cfg
    found: list = [Timer(duration=dt.timedelta(minutes=t.max_minutes) if t.max_minutes is not None else None,
                         verbose=False)]
    # Lightning's averaging callback keeps the average in checkpoints (resume restores both) and
    # copies it into the module when training ends, so everything after fit sees the averaged weights.
    if t.ema_decay:
        found.append(WeightAverage(decay=t.ema_decay))
    if progress and not sys.stdout.isatty():
        found.append(LineProgress(plan.steps))
    if progress:
        found.append(SpeedReport(plan, t.max_minutes))
    if t.checkpoint_every_minutes > 0 or t.checkpoint_every_n_steps > 0:
        found.append(StepCheckpoint(out / "checkpoints" / CHECKPOINT, t.checkpoint_every_minutes,
                                    t.checkpoint_every_n_steps))
    return found


def _run_info(data, launch: Launch, model_cfg, train_cfg, command, roi, roi_default) -> dict:
    return {
        "grdnet": __version__, "torch": torch.__version__, "lightning": L.__version__, **environment(),
        "started": dt.datetime.now().isoformat(timespec="seconds"), "command": command or sys.argv,
        "data": str(Path(data).resolve()), "seed": train_cfg.seed, "deterministic": launch.deterministic,
        "trainer": {"accelerator": launch.accelerator, "devices": launch.devices, "num_nodes": launch.num_nodes,
                    "strategy": str(launch.strategy), "precision": launch.precision},
        "model": to_dict(model_cfg), "train": to_dict(train_cfg),
        "roi": {"source": str(roi) if roi else None, "default": str(roi_default) if roi_default else None,
                "mode": train_cfg.roi_mode},
    }


def _trainer(launch: Launch, train_cfg: TrainConfig, max_steps: int, loggers: list, callbacks: list,
             progress: bool) -> L.Trainer:
    deterministic = None
    if launch.deterministic:  # on GPU, ops without a deterministic kernel only warn
        deterministic = True if launch.accelerator == "cpu" or not torch.cuda.is_available() else "warn"
    try:
        return L.Trainer(
            accelerator=launch.accelerator, devices=launch.devices, num_nodes=launch.num_nodes,
            strategy=launch.strategy, precision=launch.precision, max_epochs=-1, max_steps=max_steps,
            deterministic=deterministic, logger=loggers, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
            use_distributed_sampler=False, enable_checkpointing=False,
            enable_progress_bar=progress and sys.stdout.isatty(), log_every_n_steps=train_cfg.log_every_n_steps,
            enable_model_summary=False, num_sanity_val_steps=0,
        )
    except (MisconfigurationException, ValueError) as e:
        raise GRDNetError(f"invalid training setup: {e}") from None


def _clear_stale(out: Path) -> None:
    """A new run replaces what an earlier run left in `out` (an MLflow database keeps its old runs)."""
    stale = [p for p in (out / "checkpoints", out / "model", out / "logs" / "metrics.csv", out / "logs" / "tensorboard")
             if p.exists()]
    if stale:
        log.warning("%s: replacing the earlier run's %s", out, ", ".join(str(p.relative_to(out)) for p in stale))
        for p in stale:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _fit(trainer: L.Trainer, out: Path, datamodule, module, resume: bool) -> None:
    """Fit, continuing the last checkpoint on `resume`."""
    ckpt_dir = out / "checkpoints"
    if _launch_rank_zero():  # settings are checked: now touch the run folder
        if not resume:
            _clear_stale(out)
        for tmp in ckpt_dir.glob(".*.tmp-*"):  # left by a kill inside a checkpoint write
            tmp.unlink(missing_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated.*")
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_dir / CHECKPOINT if resume else None,
                    weights_only=True)
    if trainer.interrupted:
        raise GRDNetError(f"{out}: training was interrupted; no model was written")


def _summary(data, trainer: L.Trainer, module: GRDNetModule, plan: Plan, seconds: float, n_train: int,
             n_val: int, precision: str, roi) -> dict:
    """What the model's config.json records of its training: `steps` done (of `planned_steps`),
    `epochs` as passes over the training images, and what stopped it."""
    steps = module.batches_trained
    return {"data": str(Path(data).resolve()), "n_train": n_train, "n_val": n_val, "steps": steps,
            "planned_steps": plan.steps, "stopped_by": "steps" if steps >= plan.steps else "max_minutes",
            "epochs": round(steps * plan.batch * plan.world_size / n_train, 2),
            "rounds": math.ceil(steps / plan.round_batches), "batch_size": plan.batch,
            "optimizer_steps": trainer.global_step, "minutes": round(seconds / 60, 2), "seconds": round(seconds, 3),
            "world_size": trainer.world_size,
            "precision": precision, "train_config": to_dict(module.train_cfg), "grdnet": __version__,
            "roi": {"source": str(roi) if roi else None, "mode": module.train_cfg.roi_mode},
            "finished": dt.datetime.now().isoformat(timespec="seconds")}


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
    - `loggers`: extra loggers besides CSV: "tensorboard", "mlflow". `callbacks`: extra Lightning callbacks.
    - `progress`: a progress bar on a terminal, elsewhere a line every 30 seconds.
    - `roi`: a folder of per-image ROI masks mirroring `data`, or one mask for all images;
      `roi_default` serves images without one.
    """
    out = Path(out)
    launch = Launch(accelerator, devices, num_nodes, resolve_strategy(strategy, accelerator, devices, num_nodes),
                    resolve_precision(precision, accelerator), deterministic)
    train_paths, val_paths = split_train_val(train_images(data), train_cfg.val_fraction, train_cfg.seed,
                                            train_cfg.val_min)
    if not train_paths:
        raise GRDNetError(f"{data}: no training images left after the validation split")
    crops_line = None
    if train_cfg.train_crops == "auto":  # resolved here, so checkpoints and the model record the choice
        crops, crops_line = choose_crops(train_paths, model_cfg.image_size)
        train_cfg = replace(train_cfg, train_crops=crops)
    resumed = _resumable(out, model_cfg, train_cfg) if resume else None
    L.seed_everything(train_cfg.seed, workers=True, verbose=False)
    out.mkdir(parents=True, exist_ok=True)
    dataset = _dataset(data, train_paths, model_cfg, train_cfg, roi, roi_default)
    module = _module(model_cfg, train_cfg, accelerator)
    plan = plan_training(len(dataset), train_cfg, _world_size(accelerator, devices, num_nodes))
    if progress and _launch_rank_zero():
        if crops_line:
            print(crops_line, flush=True)
        print(describe_plan(plan, len(dataset), train_cfg), flush=True)

    run_doc = json.loads((out / "run.json").read_text()) if resume and (out / "run.json").is_file() else {}
    found = _callbacks(out, train_cfg, plan, progress)
    loggers = make_loggers(out, loggers, resumed["batches_trained"] if resumed else None, run_doc.get("mlflow_run_id"))
    record = RunRecord(out / "run.json", _run_info(data, launch, model_cfg, train_cfg, command, roi, roi_default), resume)
    was_deterministic = torch.are_deterministic_algorithms_enabled()  # the Trainer sets it process-wide
    try:
        # Lightning counts every optimiser's steps: two per batch with the GAN.
        max_steps = plan.steps * (2 if module.net.has_gan else 1)
        trainer = _trainer(launch, train_cfg, max_steps, loggers, [*found, record, *(callbacks or [])], progress)
        _fit(trainer, out, TrainData(dataset, train_cfg), module, resume)
    finally:
        if deterministic:  # a library call should not leave the process in deterministic mode
            torch.use_deterministic_algorithms(was_deterministic)
    if not trainer.is_global_zero:
        return None

    # Rank 0 alone calibrates over the whole validation split: identical whatever the number of
    # training processes, and no padded duplicates from sharding to skew the quantile.
    predictor = Predictor(module.net, model_cfg, device=module.device, tile=train_cfg.train_crops)
    calibration = held_out_threshold(predictor, val_paths, train_paths, train_cfg.threshold_quantile)
    seconds = found[0].time_elapsed("train")
    meta = {**calibration, "training": _summary(data, trainer, module, plan, seconds, len(train_paths), len(val_paths),
                                                launch.precision, roi)}
    return save_model(out / "model", module.net, model_cfg, meta)


def _resumable(out: Path, model_cfg: ModelConfig, train_cfg: TrainConfig) -> dict:
    ckpt = out / "checkpoints" / CHECKPOINT
    if not ckpt.is_file():
        raise GRDNetError(f"{out}: nothing to resume: no checkpoint {ckpt} (the run stopped before its "
                          "first checkpoint, or checkpoints are off); start it again without --resume")
    return read_checkpoint(ckpt, model_cfg, train_cfg)
