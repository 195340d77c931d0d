"""The training step: one Lightning module holds GRD-Net's losses and optimisation.

Each step: augment the good batch (the ROI channel moves with the image), paint synthetic
defects, update generator + segmenter on `L_tot = L_gan + w_seg * FL`, then the discriminator on
BCE. Without the GAN (`ModelConfig.gan` False) the reconstruction is absent: the segmenter alone
learns on FL. Every random draw of a step (augmentation, defects) is seeded by (seed, rank, epoch,
batch), so ranks differ and a resumed run repeats exactly what the interrupted one would have done.
The Trainer around it (data, checkpoints, loggers, DDP) is assembled in `grdnet.engine`.
"""
from __future__ import annotations

import kornia.augmentation as K
import lightning as L
import numpy as np
import torch

from .config import ModelConfig, TrainConfig, to_json_dict
from .defects import DefectSynthesizer
from .losses import (adversarial_loss, contextual_loss, discriminator_loss, latent_loss,
                     segmentation_loss)
from .model import GRDNet
from .version import __version__

_AUGMENT, _DEFECTS = 0, 1  # random streams of a training step


def _as_list(found) -> list:
    # Lightning hands back a lone optimizer or scheduler unwrapped, two or more as a list.
    return found if isinstance(found, list) else [found]


class GRDNetModule(L.LightningModule):
    """GRD-Net trained jointly with manual optimisation: generator + segmenter on one optimiser,
    the discriminator on another (the segmenter alone on one without the GAN)."""

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, textures: torch.Tensor | None = None):
        super().__init__()
        self.automatic_optimization = False
        self.model_cfg, self.train_cfg = model_cfg, train_cfg
        self.net = GRDNet(model_cfg, training=True)
        self.defects = DefectSynthesizer(train_cfg, textures)
        t = train_cfg
        self.augment = K.AugmentationSequential(
            *([K.RandomHorizontalFlip()] if t.hflip else []),
            *([K.RandomVerticalFlip()] if t.vflip else []),
            *([K.RandomAffine(degrees=t.rotation, padding_mode="reflection", p=1.0)] if t.rotation > 0 else []),
        )
        # Lighting that drifts between good images: on the image channels only, never the ROI's.
        self.lighting = (K.ColorJiggle(brightness=t.brightness, contrast=t.contrast, p=1.0)
                         if t.brightness or t.contrast else None)
        # Running sum of this epoch's step losses (for the plateau schedule), and batches trained in total.
        self._loss_sum, self._loss_count, self._loss_epoch = torch.zeros(()), 0, 0
        self.batches_trained = 0

    def configure_optimizers(self):
        t, net = self.train_cfg, self.net
        groups = [{"params": net.segmenter.parameters(), "lr": t.seg_lr or t.lr}]
        if net.has_gan:  # the generator G = (E1, decoder, E2) shares the segmenter's optimiser
            groups.insert(0, {"params": [p for m in (net.encoder, net.decoder, net.encoder2) for p in m.parameters()]})
        opts = [torch.optim.Adam(groups, lr=t.lr, betas=t.betas)]
        if net.has_gan:
            opts.append(torch.optim.Adam(net.discriminator.parameters(), lr=t.lr, betas=t.betas))
        sched = [torch.optim.lr_scheduler.ReduceLROnPlateau(o, mode="min", factor=t.plateau_factor,
                                                           patience=t.plateau_patience) for o in opts]
        return opts, sched

    # ---- random streams ------------------------------------------------------------------------

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
            if len(self.augment):
                batch = self.augment(batch)
            if self.lighting is not None:
                c = self.model_cfg.channels
                batch = torch.cat([self.lighting(batch[:, :c]), batch[:, c:]], dim=1)
            return batch

    # ---- the step ------------------------------------------------------------------------------

    def _reconstruction(self, x: torch.Tensor, defaced: torch.Tensor) -> tuple[torch.Tensor | None, dict]:
        """X_hat of the defaced image and the generator's losses; (None, {}) without the GAN."""
        if not self.net.has_gan:
            return None, {}
        t = self.train_cfg
        x_hat, z, z_hat = self.net.generate(defaced)
        _, feat_real = self.net.discriminator(x)
        _, feat_fake = self.net.discriminator(x_hat)
        l_adv = adversarial_loss(feat_real.detach(), feat_fake)
        l_con = contextual_loss(x, x_hat, t)
        l_enc = latent_loss(z, z_hat)
        return x_hat, {"l_adv": l_adv, "l_con": l_con, "l_enc": l_enc,
                       "l_gan": t.w_adv * l_adv + t.w_con * l_con + t.w_enc * l_enc}

    def _discriminator_step(self, x: torch.Tensor, x_hat: torch.Tensor | None, losses: dict) -> None:
        """Discriminator: real X -> 1, reconstruction -> 0 (nothing to do without the GAN)."""
        if x_hat is None:
            return
        d_opt = _as_list(self.optimizers())[1]
        self.toggle_optimizer(d_opt)
        logit_real, _ = self.net.discriminator(x)
        logit_fake, _ = self.net.discriminator(x_hat.detach())
        losses["l_disc"] = discriminator_loss(logit_real, logit_fake)
        d_opt.zero_grad(set_to_none=True)
        self.manual_backward(losses["l_disc"])
        d_opt.step()
        self.untoggle_optimizer(d_opt)

    def training_step(self, batch: torch.Tensor, batch_idx: int):
        t, c = self.train_cfg, self.model_cfg.channels
        with torch.no_grad():
            if len(self.augment) or self.lighting is not None:
                batch = self._augment(batch, batch_idx)
            x, roi = batch[:, :c].clamp(0, 1), (batch[:, c:] > 0.5).float()
            defects = self.defects(x, self._defect_generator(batch_idx))

        # Generator + segmenter: reconstruct the clean image from the defaced one, locate the defect.
        g_opt = _as_list(self.optimizers())[0]
        self.toggle_optimizer(g_opt)
        x_hat, losses = self._reconstruction(x, defects.image)
        l_seg = segmentation_loss(self.net.segmenter(x_hat, defects.image), defects.mask, roi, t)
        total = losses.get("l_gan", 0.0) + t.w_seg * l_seg
        g_opt.zero_grad(set_to_none=True)
        self.manual_backward(total)
        g_opt.step()
        self.untoggle_optimizer(g_opt)
        self._discriminator_step(x, x_hat, losses)

        losses.update(loss=total, l_seg=l_seg)
        self._log_step(losses)
        # The epoch's schedule step happens inside its last step, before that step's checkpoint:
        # a checkpoint never holds an epoch whose end is still to do.
        if batch_idx + 1 == self.trainer.num_training_batches:
            self._end_epoch()
        return total.detach()

    def _log_step(self, losses: dict) -> None:
        self.log_dict({k: v.detach() for k, v in losses.items()}, prog_bar=False, on_step=True, sync_dist=False)
        self.log("seg", losses["l_seg"].detach(), prog_bar=True)
        if "l_con" in losses:
            self.log("con", losses["l_con"].detach(), prog_bar=True)
        self._loss_sum = self._loss_sum.to(losses["loss"].device) + losses["loss"].detach().float()
        self._loss_count += 1
        self._loss_epoch = self.current_epoch
        self.batches_trained += 1

    # ---- epochs and checkpoints ----------------------------------------------------------------

    def on_train_epoch_start(self):
        if self._loss_epoch != self.current_epoch:  # left from an epoch cut short by the time budget
            self._loss_sum, self._loss_count = torch.zeros(()), 0

    def _end_epoch(self):
        mean = self._loss_sum / self._loss_count
        # Every rank steps its schedulers on the same all-ranks mean, so learning rates stay equal.
        mean = self.all_gather(mean).mean() if self.trainer.world_size > 1 else mean
        self._loss_sum, self._loss_count = torch.zeros((), device=mean.device), 0
        self.log("epoch_loss", mean, on_step=False, on_epoch=True, sync_dist=True)  # equal on all ranks
        for sched in _as_list(self.lr_schedulers()):
            sched.step(mean)
        self.log("lr", _as_list(self.optimizers())[0].param_groups[0]["lr"], on_step=False, on_epoch=True,
                 sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Runs on every rank (saving is collective); only rank 0 writes the file.
        sums = self._loss_sum.reshape(1).to(self.device)
        sums = self.all_gather(sums).reshape(-1) if self.trainer.world_size > 1 else sums
        checkpoint["grdnet"] = {
            "grdnet": __version__, "model": to_json_dict(self.model_cfg), "train": to_json_dict(self.train_cfg),
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
