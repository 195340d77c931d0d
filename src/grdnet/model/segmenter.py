"""Segmentation network Delta: DRAEM's discriminative U-Net on the concatenation (x_hat, x), or on
x alone in a model without the GAN (`ModelConfig.gan` False).

Each level is two conv-BN-ReLU layers; max-pooling down, bilinear upsampling + conv up, skip
connections by concatenation; two output channels (softmax; channel 1 = anomaly).
With `ModelConfig.unshuffle` f > 1 the U-Net runs on the pixel-unshuffled input at 1/f of its
size and its logits are upsampled back.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from ..config import ModelConfig


def double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class Up(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
        self.fuse = double_conv(cout + cskip, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.reduce(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))
        return self.fuse(torch.cat([x, skip], dim=1))


class Segmenter(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        w, f = cfg.seg_widths, cfg.unshuffle
        self.unshuffle = nn.PixelUnshuffle(f) if f > 1 else nn.Identity()
        self.down = nn.ModuleList([double_conv((2 if cfg.gan else 1) * cfg.channels * f * f, w[0])] +
                                  [double_conv(w[i - 1], w[i]) for i in range(1, len(w))])
        self.up = nn.ModuleList([Up(w[i], w[i - 1], w[i - 1]) for i in range(len(w) - 1, 0, -1)])
        self.out = nn.Conv2d(w[0], 2, 3, 1, 1)

    def forward(self, x_hat: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, 2, H, W); softmax channel 1 is the anomaly probability. `x_hat` is None
        for a model without the GAN."""
        h, skips = self.unshuffle(x if x_hat is None else torch.cat([x_hat, x], dim=1)), []
        for i, block in enumerate(self.down):
            h = block(h if i == 0 else F.max_pool2d(h, 2))
            skips.append(h)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            h = block(h, skip)
        h = self.out(h)
        if h.shape[-2:] != x.shape[-2:]:  # `unshuffle`: the U-Net worked at 1/f of the input size
            h = F.interpolate(h, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return h
