"""Synthetic defects (DRAEM-style), generated as batched tensors on the training device.

A binary mask M is drawn per sample; inside M the image is blended with an anomaly source S:
`X_n = X * (1 - M) + M * ((1 - beta) * X + beta * S)`. Mask shapes (`TrainConfig.line_share`,
`band_share` give the shares of the last two):

* a Perlin-noise field at a random scale, thresholded: blobs (holes, stains, dents);
* thin wandering strokes, one to three: scratches and cracks;
* a straight-edged band across the image at any angle: a strip of another finish (uneven
  grinding, misaligned coating), which blobs never resemble.

The anomaly source S is drawn per sample from the kinds listed in `TrainConfig.sources`:

* ``noise``: a random two-colour field modulated by a second noise field (DRAEM's colour blobs);
  replaced by a crop of a user texture when a texture folder is given;
* ``shade``: the image itself, darkened or brightened by a random gain under a smooth noise field:
  the texture stays, the tone changes (holes, stains, burns, uneven surface);
* ``self``: another image of the batch, flipped and shifted: the product's own texture out of place
  (transplanted material, misaligned structure).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import TrainConfig


def _fade(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin(batch: int, size: int, res: torch.Tensor, generator: torch.Generator | None = None,
           device=None) -> torch.Tensor:
    """Batched 2-D Perlin noise (B, size, size), roughly in [-0.7, 0.7].

    `res` is (B, 2) integer lattice cells per axis for each sample: every sample has its own scale,
    computed without a Python loop over samples by gathering each sample's lattice gradients.
    """
    max_res = int(res.max())
    angles = torch.rand(batch, max_res + 1, max_res + 1, generator=generator, device=device) * (2 * math.pi)
    grads = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, R+1, R+1, 2)
    coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    gy = coords[None, :, None] * res[:, 0, None, None].float()  # (B, S, 1)
    gx = coords[None, None, :] * res[:, 1, None, None].float()  # (B, 1, S)
    iy, ix = gy.floor().long(), gx.floor().long()
    fy, fx = gy - iy, gx - ix
    flat = grads.reshape(batch, -1, 2)
    stride = max_res + 1

    def corner(dy: int, dx: int) -> torch.Tensor:
        idx = ((iy + dy) * stride + (ix + dx)).reshape(batch, -1)  # (B, S*S)
        g = torch.gather(flat, 1, idx[..., None].expand(-1, -1, 2)).reshape(batch, size, size, 2)
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    u, v = _fade(fx), _fade(fy)
    top = torch.lerp(corner(0, 0), corner(0, 1), u)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), u)
    return torch.lerp(top, bottom, v)


def line_masks(batch: int, size: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Thin strokes (B, S, S) in {0, 1}: 1-3 per mask (the first always, the others with
    probability 0.5 and 0.3), each a slowly turning random walk 0.3-1 image side long, 1-2 px
    wide at 64 px (widths scale with the size, so the shapes are the same at every size)."""
    n, steps = 3, 2 * size  # half-pixel steps
    start = torch.rand(batch, n, 1, 2, generator=generator, device=device) * size
    heading = torch.rand(batch, n, 1, generator=generator, device=device) * (2 * math.pi)
    # the heading's total drift over a stroke does not depend on the size
    drift = torch.randn(batch, n, steps, generator=generator, device=device) * (0.08 * math.sqrt(64 / size))
    theta = heading + drift.cumsum(-1)
    points = start + 0.5 * torch.stack([torch.sin(theta), torch.cos(theta)], -1).cumsum(2)  # (B, n, steps, 2)
    length = torch.empty(batch, n, 1, device=device).uniform_(0.3, 1.0, generator=generator) * steps
    drawn = torch.arange(steps, device=device) < length
    keep = torch.tensor([1.0, 0.5, 0.3], device=device)[None, :, None]
    drawn &= torch.rand(batch, n, 1, generator=generator, device=device) < keep
    ij = points.round().long()
    drawn &= ((ij >= 0) & (ij < size)).all(-1)
    flat = (ij[..., 0].clamp(0, size - 1) * size + ij[..., 1].clamp(0, size - 1)).flatten(1)
    out = torch.zeros(batch, size * size, device=device).scatter_(1, flat, drawn.flatten(1).float())
    out = out.view(batch, 1, size, size)
    width = torch.randint(1, 3, (batch,), generator=generator, device=device) * max(1, size // 64)
    for w in width.unique().tolist():
        if w > 1:  # widen by a w x w max filter
            pick = width == w
            out[pick] = F.max_pool2d(out[pick], w, stride=1, padding=w // 2)[..., :size, :size]
    return out[:, 0]


def band_masks(batch: int, size: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Straight-edged bands (B, S, S) in {0, 1}: a strip 10-50% of the image side wide, through a
    random point, at any angle."""
    theta = torch.rand(batch, 1, 1, generator=generator, device=device) * math.pi
    centre = torch.rand(batch, 2, 1, 1, generator=generator, device=device) * size
    width = torch.empty(batch, 1, 1, device=device).uniform_(0.1, 0.5, generator=generator) * size
    coords = torch.arange(size, device=device, dtype=torch.float32) + 0.5
    y, x = coords[None, :, None] - centre[:, 0], coords[None, None, :] - centre[:, 1]
    return ((y * torch.cos(theta) - x * torch.sin(theta)).abs() < width / 2).float()


@dataclass
class DefectBatch:
    image: torch.Tensor  # X_n, the defaced image (B, C, H, W)
    mask: torch.Tensor  # M, (B, 1, H, W) in {0, 1}


class DefectSynthesizer:
    """Paints Perlin-shaped defects onto a batch. Deterministic for a given `torch.Generator`."""

    def __init__(self, cfg: TrainConfig, textures: torch.Tensor | None = None):
        self.cfg = cfg
        self.textures = textures  # (N, C, H, W) in [0, 1], already at model size, or None

    def _random_res(self, batch: int, gen, device) -> torch.Tensor:
        lo, hi = self.cfg.perlin_min_exp, self.cfg.perlin_max_exp
        return 2 ** torch.randint(lo, hi + 1, (batch, 2), generator=gen, device=device)

    def _thresholds(self, batch: int, gen, device) -> torch.Tensor | float:
        lo, hi = self.cfg.perlin_threshold_low, self.cfg.perlin_threshold
        if lo is None:
            return hi
        return torch.empty(batch, 1, 1, device=device).uniform_(lo, hi, generator=gen)

    def _perlin_masks(self, batch: int, size: int, gen=None, device=None) -> torch.Tensor:
        noise = perlin(batch, size, self._random_res(batch, gen, device), gen, device)
        return (noise > self._thresholds(batch, gen, device)).float()

    def masks(self, batch: int, size: int, gen=None, device=None) -> torch.Tensor:
        """Binary masks (B, 1, S, S); each has at least `min_defect_pixels` pixels, redrawn if not."""
        lines, bands = self.cfg.line_share, self.cfg.band_share
        shape = None  # per sample: 0 Perlin blob, 1 strokes, 2 band
        if lines or bands:
            u = torch.rand(batch, generator=gen, device=device)
            shape = (u < lines).long() + 2 * ((u >= lines) & (u < lines + bands)).long()
        out = torch.zeros(batch, size, size, device=device)
        todo = torch.arange(batch, device=device)
        for _ in range(20):  # redraw only the too-small masks; almost all pass on the first draw
            if shape is None:
                m = self._perlin_masks(len(todo), size, gen, device)
            else:  # each shape drawn only for the samples that get it
                m = torch.empty(len(todo), size, size, device=device)
                for kind, draw in ((0, self._perlin_masks), (1, line_masks), (2, band_masks)):
                    pick = shape[todo] == kind
                    if pick.any():
                        m[pick] = draw(int(pick.sum()), size, gen, device)
            out[todo] = m
            small = m.flatten(1).sum(1) < self.cfg.min_defect_pixels
            todo = todo[small]
            if len(todo) == 0:
                break
        if len(todo):  # pathological settings: fall back to a centred square of the minimum area
            side = max(1, math.ceil(math.sqrt(self.cfg.min_defect_pixels)))
            c = size // 2
            out[todo, c - side // 2:c - side // 2 + side, c - side // 2:c - side // 2 + side] = 1
        return out[:, None]

    def _noise_source(self, batch: int, channels: int, size: int, gen=None, device=None) -> torch.Tensor:
        if self.textures is not None:
            idx = torch.randint(len(self.textures), (batch,), generator=gen, device=self.textures.device)
            tex = self.textures[idx].to(device)
            flip = torch.rand(batch, generator=gen, device=device) < 0.5
            tex = torch.where(flip[:, None, None, None], tex.flip(-1), tex)
            k = int(torch.randint(4, (1,), generator=gen, device=device))
            return torch.rot90(tex, k, dims=(-2, -1))
        c1 = torch.rand(batch, channels, 1, 1, generator=gen, device=device)
        c2 = torch.rand(batch, channels, 1, 1, generator=gen, device=device)
        res = self._random_res(batch, gen, device).clamp(min=2)
        mix = (perlin(batch, size, res, gen, device)[:, None] / 1.4 + 0.5).clamp(0, 1)
        return torch.lerp(c1, c2, mix)

    def _shade_source(self, x: torch.Tensor, gen=None) -> torch.Tensor:
        b, _, size, _ = x.shape
        # log-gain in [-1.5, 0.7]: mostly darker (x0.22 .. x2), as most surface defects are
        log_gain = torch.empty(b, 1, 1, 1, device=x.device).uniform_(-1.5, 0.7, generator=gen)
        res = self._random_res(b, gen, x.device).clamp(min=2)
        field = (perlin(b, size, res, gen, x.device)[:, None] / 1.4 + 0.5).clamp(0, 1)
        return (x * torch.exp(log_gain * (0.5 + field))).clamp(0, 1)

    def _self_source(self, x: torch.Tensor, gen=None) -> torch.Tensor:
        b, _, size, _ = x.shape
        other = x[torch.randperm(b, generator=gen, device=x.device)] if b > 1 else x
        other = other.flip(-1) if bool(torch.rand(1, generator=gen, device=x.device) < 0.5) else other
        dy, dx = (int(v) for v in torch.randint(size // 4, 3 * size // 4, (2,), generator=gen, device=x.device))
        return torch.roll(other, (dy, dx), dims=(-2, -1))

    def sources(self, x: torch.Tensor, gen=None) -> torch.Tensor:
        """Anomaly sources S (B, C, H, W) in [0, 1] for the batch `x`, one kind per sample."""
        b, c, size, _ = x.shape
        kinds = self.cfg.sources
        made = {"noise": lambda: self._noise_source(b, c, size, gen, x.device),
                "shade": lambda: self._shade_source(x, gen),
                "self": lambda: self._self_source(x, gen)}
        if len(kinds) == 1:
            return made[kinds[0]]()
        pick = torch.randint(len(kinds), (b,), generator=gen, device=x.device)
        out = torch.empty_like(x)
        for i, kind in enumerate(kinds):
            chosen = pick == i
            if chosen.any():
                out[chosen] = made[kind]()[chosen]
        return out

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None = None) -> DefectBatch:
        b, c, h, w = x.shape
        assert h == w, "the model works on square images"
        dev = x.device
        mask = self.masks(b, h, gen, dev)
        has_defect = (torch.rand(b, generator=gen, device=dev) < self.cfg.defect_prob).float()
        mask = mask * has_defect[:, None, None, None]
        beta = torch.empty(b, 1, 1, 1, device=dev).uniform_(self.cfg.beta_min, self.cfg.beta_max, generator=gen)
        src = self.sources(x, gen)
        blended = (1 - beta) * x + beta * src
        return DefectBatch(image=x * (1 - mask) + mask * blended, mask=mask)


def load_textures(folder, channels: int, size: int) -> torch.Tensor:
    """Every image of a texture folder, resized to the model size (N, C, S, S)."""
    from .data import list_images, load_image

    paths = list_images(folder)
    if not paths:
        from .errors import GRDNetError
        raise GRDNetError(f"{folder}: texture folder holds no images")
    return torch.stack([load_image(p, channels, size) for p in paths])
