"""Training: one Lightning module holds the GAN + segmentation logic; `train()` runs it.

Each step: augment the good batch (the ROI channel moves with the image), paint synthetic
defects, update generator + segmenter on `L_tot = L_gan + FL`, then the discriminator on BCE.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import math
import platform
import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch
import kornia.augmentation as K
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from . import __version__
from .config import ModelConfig, TrainConfig, to_dict
from .data import ImageDataset, train_images
from .defects import DefectSynthesizer, load_textures
from .errors import GRDNetError
from .losses import (adversarial_loss, contextual_loss, discriminator_loss, latent_loss,
                     segmentation_loss)
from .model import Discriminator, Generator, Segmenter
from .scoring import InferenceNet, Predictor, image_scores

log = logging.getLogger(__name__)


class GRDNetModule(L.LightningModule):
    """Generator G, discriminator C and segmenter Delta, trained jointly (manual optimisation)."""

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, textures: torch.Tensor | None = None):
        super().__init__()
        self.automatic_optimization = False
        self.model_cfg, self.train_cfg = model_cfg, train_cfg
        self.generator = Generator(model_cfg)
        self.discriminator = Discriminator(model_cfg)
        self.segmenter = Segmenter(model_cfg)
        self.defects = DefectSynthesizer(train_cfg, textures)
        t = train_cfg
        self.augment = K.AugmentationSequential(
            *([K.RandomHorizontalFlip()] if t.hflip else []),
            *([K.RandomVerticalFlip()] if t.vflip else []),
            *([K.RandomAffine(degrees=t.rotation, padding_mode="reflection", p=1.0)] if t.rotation > 0 else []),
        )
        self._epoch_loss = []

    def inference_net(self) -> InferenceNet:
        return InferenceNet(self.generator.encoder, self.generator.decoder, self.segmenter)

    def configure_optimizers(self):
        t = self.train_cfg
        g_opt = torch.optim.Adam(list(self.generator.parameters()) + list(self.segmenter.parameters()),
                                 lr=t.lr, betas=t.betas)
        d_opt = torch.optim.Adam(self.discriminator.parameters(), lr=t.lr, betas=t.betas)
        sched = [torch.optim.lr_scheduler.ReduceLROnPlateau(o, mode="min", factor=t.plateau_factor,
                                                           patience=t.plateau_patience) for o in (g_opt, d_opt)]
        return [g_opt, d_opt], sched

    def _defect_generator(self, batch_idx: int) -> torch.Generator:
        """Synthetic defects seeded by (seed, rank, epoch, batch): reproducible and different per rank."""
        gen = torch.Generator(device=self.device)
        step = self.current_epoch * 1_000_003 + batch_idx
        gen.manual_seed((self.train_cfg.seed * 7_919 + self.global_rank) * 2_147_483_647 + step)
        return gen

    def training_step(self, batch: torch.Tensor, batch_idx: int):
        t, c = self.train_cfg, self.model_cfg.channels
        with torch.no_grad():
            if len(self.augment):
                batch = self.augment(batch)
            x, roi = batch[:, :c].clamp(0, 1), (batch[:, c:] > 0.5).float()
            defects = self.defects(x, self._defect_generator(batch_idx))
        g_opt, d_opt = self.optimizers()

        # Generator + segmenter: reconstruct the clean image from the defaced one, locate the defect.
        self.toggle_optimizer(g_opt)
        x_hat, z, z_hat = self.generator(defects.image)
        _, feat_real = self.discriminator(x)
        _, feat_fake = self.discriminator(x_hat)
        l_adv = adversarial_loss(feat_real.detach(), feat_fake)
        l_con = contextual_loss(x, x_hat, t)
        l_enc = latent_loss(z, z_hat)
        l_gan = t.w_adv * l_adv + t.w_con * l_con + t.w_enc * l_enc
        seg_logits = self.segmenter(x_hat, defects.image)
        l_seg = segmentation_loss(seg_logits, defects.mask, roi, t)
        total = l_gan + t.w_seg * l_seg
        g_opt.zero_grad(set_to_none=True)
        self.manual_backward(total)
        g_opt.step()
        self.untoggle_optimizer(g_opt)

        # Discriminator: real X -> 1, reconstruction -> 0.
        self.toggle_optimizer(d_opt)
        logit_real, _ = self.discriminator(x)
        logit_fake, _ = self.discriminator(x_hat.detach())
        l_disc = discriminator_loss(logit_real, logit_fake)
        d_opt.zero_grad(set_to_none=True)
        self.manual_backward(l_disc)
        d_opt.step()
        self.untoggle_optimizer(d_opt)

        losses = {"loss": total, "l_adv": l_adv, "l_con": l_con, "l_enc": l_enc, "l_gan": l_gan,
                  "l_seg": l_seg, "l_disc": l_disc}
        self.log_dict({k: v.detach() for k, v in losses.items()}, prog_bar=False, on_step=True, sync_dist=False)
        self.log("seg", l_seg.detach(), prog_bar=True)
        self.log("con", l_con.detach(), prog_bar=True)
        self._epoch_loss.append(total.detach())
        return total.detach()

    def on_train_epoch_end(self):
        if not self._epoch_loss:
            return
        mean = torch.stack(self._epoch_loss).mean()
        mean = self.all_gather(mean).mean() if self.trainer.world_size > 1 else mean
        self._epoch_loss.clear()
        self.log("epoch_loss", mean, on_epoch=True)
        for sched in self.lr_schedulers():
            sched.step(mean)
        self.log("lr", self.optimizers()[0].param_groups[0]["lr"])


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


def train(data, out, model_cfg: ModelConfig, train_cfg: TrainConfig, *, accelerator: str = "auto",
          devices="auto", num_nodes: int = 1, strategy: str = "auto", precision: str | None = None,
          progress: bool = True, command: list[str] | None = None) -> Path:
    """Train on `data/train/good` and write the run folder `out`; returns the model folder.

    The run folder holds `run.json` (configs, versions, command), `logs/metrics.csv` (every loss),
    `checkpoints/` and, once training has finished, `model/`.
    """
    out = Path(out)
    paths = train_images(data)
    train_paths, val_paths = split_train_val(paths, train_cfg.val_fraction, train_cfg.seed)
    if len(train_paths) < 1:
        raise GRDNetError(f"{data}: no training images left after the validation split")
    L.seed_everything(train_cfg.seed, workers=True, verbose=False)
    out.mkdir(parents=True, exist_ok=True)
    run_info = {
        "grdnet": __version__, "torch": torch.__version__, "lightning": L.__version__,
        "python": platform.python_version(), "started": dt.datetime.now().isoformat(timespec="seconds"),
        "command": command or sys.argv, "data": str(Path(data).resolve()),
        "model": to_dict(model_cfg), "train": to_dict(train_cfg),
    }
    (out / "run.json").write_text(json.dumps(run_info, indent=2, default=str))

    dataset = ImageDataset(train_paths, model_cfg.channels, model_cfg.image_size, crop=train_cfg.train_crops)
    batch_size = min(train_cfg.batch_size, len(dataset))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                         num_workers=train_cfg.num_workers,
                                         persistent_workers=train_cfg.num_workers > 0)
    textures = None
    if train_cfg.texture_dir:
        textures = load_textures(train_cfg.texture_dir, model_cfg.channels, model_cfg.image_size)
    module = GRDNetModule(model_cfg, train_cfg, textures)

    callbacks = []
    if train_cfg.checkpoint_every_minutes > 0:
        callbacks.append(ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=0,
                                         train_time_interval=dt.timedelta(minutes=train_cfg.checkpoint_every_minutes)))
    max_time = None
    if train_cfg.max_minutes is not None:
        max_time = dt.timedelta(minutes=train_cfg.max_minutes)
    trainer = L.Trainer(
        accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
        precision=precision or "32-true", max_epochs=train_cfg.epochs, max_time=max_time,
        logger=CSVLogger(out, name="logs", version=""), callbacks=callbacks,
        enable_checkpointing=bool(callbacks), enable_progress_bar=progress,
        log_every_n_steps=train_cfg.log_every_n_steps, enable_model_summary=False, num_sanity_val_steps=0,
    )
    t0 = dt.datetime.now()
    trainer.fit(module, loader)
    minutes = (dt.datetime.now() - t0).total_seconds() / 60
    if trainer.interrupted:
        raise GRDNetError(f"{out}: training was interrupted; no model was written")
    if trainer.global_rank != 0:
        return out / "model"

    predictor = Predictor(module.inference_net(), model_cfg, device=module.device, tile=train_cfg.train_crops)
    cal = calibrate_threshold(predictor, val_paths or train_paths, train_cfg.threshold_quantile)
    if not val_paths:
        log.warning("too few training images to hold out a validation split: threshold calibrated on "
                    "training images (expect more false alarms)")
    meta = {
        **cal,
        "training": {"data": str(Path(data).resolve()), "n_train": len(train_paths), "n_val": len(val_paths),
                     "epochs": trainer.current_epoch, "steps": trainer.global_step, "minutes": round(minutes, 2),
                     "train_config": to_dict(train_cfg), "grdnet": __version__,
                     "finished": dt.datetime.now().isoformat(timespec="seconds")},
    }
    from .modelfile import save_model
    return save_model(out / "model", module.inference_net(), model_cfg, meta)
