"""Discriminator C: the residual encoder trunk followed by a single real/fake logit.

Its last feature map is what the generator's feature-matching (adversarial) loss compares.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .generator import ResEncoder, act


class Discriminator(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.trunk = ResEncoder(cfg.channels, cfg.disc_widths, latent_channels=None, unshuffle=cfg.unshuffle)
        c = self.trunk.out_channels
        self.head = nn.Sequential(nn.BatchNorm2d(c), act(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logit of shape (B,), feature map)."""
        features = self.trunk(x)
        return self.head(features).squeeze(1), features
