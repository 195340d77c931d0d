"""The generator's networks: residual encoder and decoder (GANomaly-style, fully convolutional);
G = encoder -> decoder -> second encoder is assembled in `grdnet.model.GRDNet`.

Each stage halves (encoder) or doubles (decoder) the resolution with two pre-activation residual
blocks (ResNet-V2): the first with a projection skip, the second with an identity skip. The latent
is convolutional: `latent_channels x latent_size x latent_size` (paper: 32 x 8 x 8).
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


def act() -> nn.Module:
    return nn.LeakyReLU(0.2, inplace=True)


class ResBlock(nn.Module):
    """Pre-activation residual block; `stride=2` halves, `up=True` doubles the resolution."""

    def __init__(self, cin: int, cout: int, stride: int = 1, up: bool = False):
        super().__init__()
        self.up = up
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        needs_projection = stride != 1 or up or cin != cout
        self.skip = nn.Conv2d(cin, cout, 1, stride, bias=False) if needs_projection else None
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn1(x))
        if self.up:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            x = h
        skip = x if self.skip is None else self.skip(h)
        h = self.conv2(self.act(self.bn2(self.conv1(h))))
        return h + skip


class ResEncoder(nn.Module):
    """Stem convolution, then one stride-2 stage per width. `latent_channels=None` returns the
    last feature map (the discriminator's trunk); otherwise a 1x1 head maps it to the latent."""

    def __init__(self, channels: int, widths: tuple[int, ...], latent_channels: int | None, unshuffle: int = 1):
        super().__init__()
        self.unshuffle = nn.PixelUnshuffle(unshuffle) if unshuffle > 1 else nn.Identity()
        self.stem = nn.Conv2d(channels * unshuffle ** 2, widths[0], 3, 1, 1, bias=False)
        stages, cin = [], widths[0]
        for w in widths:
            stages += [ResBlock(cin, w, stride=2), ResBlock(w, w)]
            cin = w
        self.stages = nn.Sequential(*stages)
        self.out_channels = cin
        self.head = None
        if latent_channels is not None:
            self.head = nn.Sequential(nn.BatchNorm2d(cin), act(), nn.Conv2d(cin, latent_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.stem(self.unshuffle(x)))
        return h if self.head is None else self.head(h)


class Decoder(nn.Module):
    """Mirror of the encoder: latent -> image in [0, 1]."""

    def __init__(self, channels: int, widths: tuple[int, ...], latent_channels: int, unshuffle: int = 1):
        super().__init__()
        self.inp = nn.Conv2d(latent_channels, widths[-1], 1)
        outs = list(reversed(widths[:-1])) + [widths[0]]
        stages, cin = [], widths[-1]
        for w in outs:
            stages += [ResBlock(cin, w, up=True), ResBlock(w, w)]
            cin = w
        self.stages = nn.Sequential(*stages)
        self.out = nn.Sequential(nn.BatchNorm2d(cin), act(), nn.Conv2d(cin, channels * unshuffle ** 2, 3, 1, 1),
                                 *([nn.PixelShuffle(unshuffle)] if unshuffle > 1 else []))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.out(self.stages(self.inp(z))))
