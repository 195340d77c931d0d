import torch

from grdnet.config import TrainConfig
from grdnet.defects import DefectSynthesizer, perlin


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_perlin_per_sample_scale_and_range():
    res = torch.tensor([[1, 1], [32, 32]])
    n = perlin(2, 64, res, _gen(0))
    assert n.shape == (2, 64, 64) and n.abs().max() < 1.0
    # a coarse lattice varies slowly, a fine one quickly
    rough = lambda a: (a[:, 1:] - a[:, :-1]).abs().mean()  # noqa: E731
    assert rough(n[1]) > 4 * rough(n[0])


def test_masks_binary_reproducible_and_rate():
    cfg = TrainConfig(defect_prob=0.75)
    syn = DefectSynthesizer(cfg)
    x = torch.rand(256, 3, 32, 32)
    a, b = syn(x, _gen(1)), syn(x, _gen(1))
    c = syn(x, _gen(2))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.image, b.image)
    assert not torch.equal(a.mask, c.mask)
    assert set(a.mask.unique().tolist()) <= {0.0, 1.0}
    has = (a.mask.flatten(1).sum(1) > 0).float()
    assert 0.65 < has.mean().item() < 0.85
    assert (a.mask.flatten(1).sum(1)[has.bool()] >= cfg.min_defect_pixels).all()


def test_defects_change_only_masked_pixels():
    syn = DefectSynthesizer(TrainConfig(defect_prob=1.0))
    x = torch.rand(8, 1, 32, 32)
    d = syn(x, _gen(3))
    outside = d.mask.expand_as(x) == 0
    assert torch.equal(d.image[outside], x[outside])
    assert (d.image[~outside] - x[~outside]).abs().mean() > 0.05
    assert d.image.min() >= 0 and d.image.max() <= 1


def test_texture_sources_are_used():
    tex = torch.zeros(2, 3, 32, 32)
    tex[:, 0] = 1.0  # pure red textures
    syn = DefectSynthesizer(TrainConfig(defect_prob=1.0, beta_min=1.0, beta_max=1.0), textures=tex)
    x = torch.zeros(4, 3, 32, 32)
    d = syn(x, _gen(0))
    inside = d.mask[:, 0] > 0
    assert torch.allclose(d.image[:, 0][inside], torch.ones(1)) and d.image[:, 1].max() == 0
