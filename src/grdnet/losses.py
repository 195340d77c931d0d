"""Every GRD-Net loss, in one place.

Generator: `L_gan = w_adv * L_adv + w_con * L_con + w_enc * L_enc` (paper: 1, 50, 1) with
`L_con = w_l1 * L1(X, X_hat) + w_ssim * (1 - SSIM(X, X_hat))`. Discriminator: BCE on logits.
Segmentation: focal loss, shaped by the region of interest (see `segmentation_loss`).
SSIM and focal terms are computed in fp32 so mixed precision cannot underflow them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from kornia.losses import binary_focal_loss_with_logits
from kornia.metrics import ssim

from .config import TrainConfig


def contextual_loss(x: torch.Tensor, x_hat: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    x, x_hat = x.float(), x_hat.float()
    l1 = (x - x_hat).abs().mean()
    dssim = 1.0 - ssim(x, x_hat, cfg.ssim_window).mean()
    return cfg.w_l1 * l1 + cfg.w_ssim * dssim


def adversarial_loss(features_real: torch.Tensor, features_fake: torch.Tensor) -> torch.Tensor:
    """GANomaly feature matching: squared distance between the discriminator's feature maps."""
    return F.mse_loss(features_fake.float(), features_real.float())


def latent_loss(z: torch.Tensor, z_hat: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(z_hat.float(), z.float())


def discriminator_loss(logit_real: torch.Tensor, logit_fake: torch.Tensor) -> torch.Tensor:
    real = F.binary_cross_entropy_with_logits(logit_real.float(), torch.ones_like(logit_real, dtype=torch.float32))
    fake = F.binary_cross_entropy_with_logits(logit_fake.float(), torch.zeros_like(logit_fake, dtype=torch.float32))
    return real + fake


def anomaly_logit(seg_logits: torch.Tensor) -> torch.Tensor:
    """Two-class softmax logits -> the binary logit of the anomaly class (same probability)."""
    return (seg_logits[:, 1:2] - seg_logits[:, 0:1]).float()


def segmentation_loss(seg_logits: torch.Tensor, mask: torch.Tensor, roi: torch.Tensor | None,
                      cfg: TrainConfig, mode: str | None = None) -> torch.Tensor:
    """Focal loss of the predicted anomaly map against the synthetic defect mask M.

    ROI modes (GRDNET.md, "The ROI attention module"):
    - `target`: FL(map, M * ROI) over the whole map: outside the ROI the target is "good",
      so the network learns to stay silent there (works with ROI-free inference).
    - `prediction`: the paper's Eq. 5, FL(map * ROI, M). Outside the ROI the masked prediction
      is constant, so its loss has no gradient; we drop those pixels (weight = ROI), which has
      the same gradient and avoids log(0) where a synthetic defect crosses the ROI border.
    - `none`: FL(map, M), the ROI is ignored.
    """
    mode = mode or cfg.roi_mode
    logit = anomaly_logit(seg_logits)
    mask = mask.float()
    if roi is None or mode == "none":
        target, weight = mask, None
    elif mode == "target":
        target, weight = mask * roi, None
    elif mode == "prediction":
        target, weight = mask, roi.float()
    else:
        raise ValueError(f"unknown ROI mode {mode!r}")
    per_pixel = binary_focal_loss_with_logits(logit, target, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma,
                                              reduction="none")
    if weight is None:
        return per_pixel.mean()
    return (per_pixel * weight).sum() / weight.sum().clamp(min=1.0)
