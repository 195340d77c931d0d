"""GRD-Net: the generator G = (encoder E1, decoder, encoder E2), the discriminator C and the
segmenter Delta in one module, and its eval-mode anomaly map.

`forward(x)` is inference: x (B, C, S, S) in [0, 1] -> anomaly probability map (B, 1, S, S), the
segmenter's verdict on the pair (X_hat, X), X_hat = Dec(E1(X)). Only E1, the decoder and the
segmenter are needed for it (`INFERENCE_PARTS`: what a model file holds); E2 and C serve the
training losses and are built with `training=True`. Without the GAN (`ModelConfig.gan` False) the
segmenter alone maps the image alone. Nothing here knows of optimisers or losses (`grdnet.training`).
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .discriminator import Discriminator
from .generator import Decoder, ResEncoder
from .segmenter import Segmenter

INFERENCE_PARTS = ("encoder", "decoder", "segmenter")


class GRDNet(nn.Module):
    def __init__(self, cfg: ModelConfig, training: bool = False):
        super().__init__()
        self.cfg = cfg
        gan, c, w, z, f = cfg.gan, cfg.channels, cfg.gen_widths, cfg.latent_channels, cfg.unshuffle
        self.encoder = ResEncoder(c, w, z, f) if gan else None
        self.decoder = Decoder(c, w, z, f) if gan else None
        self.encoder2 = ResEncoder(c, w, z, f) if gan and training else None
        self.discriminator = Discriminator(cfg) if gan and training else None
        self.segmenter = Segmenter(cfg)

    @property
    def has_gan(self) -> bool:
        return self.encoder is not None

    def generate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """G: `z = E1(x)`, `x_hat = Dec(z)`, `z_hat = E2(x_hat)` (training only)."""
        z = self.encoder(x)
        x_hat = self.decoder(z)
        return x_hat, z, self.encoder2(x_hat)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor | None:
        """X_hat = Dec(E1(x)); None for a model without the GAN."""
        return self.decoder(self.encoder(x)) if self.has_gan else None

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        """The map of x alone (B, 1, S, S), one network pass."""
        return torch.softmax(self.segmenter(self.reconstruct(x), x), dim=1)[:, 1:2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The anomaly map (B, 1, S, S); with `ModelConfig.flip_average`, the mean of the maps of
        x and its horizontal, vertical and double flip, each flipped back."""
        if not self.cfg.flip_average:
            return self.anomaly_map(x)
        b = x.shape[0]
        # One batch of four views: the same network cost as four calls, better use of the cores.
        m = self.anomaly_map(torch.cat([x, x.flip(-1), x.flip(-2), x.flip(-2, -1)]))
        return (m[:b] + m[b:2 * b].flip(-1) + m[2 * b:3 * b].flip(-2) + m[3 * b:].flip(-2, -1)) / 4

    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights inference needs (what a model file holds), detached, on the CPU."""
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
                if k.split(".", 1)[0] in INFERENCE_PARTS}
