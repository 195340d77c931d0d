import pytest
import torch

from grdnet.config import TrainConfig
from grdnet.errors import GRDNetError
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


def test_shade_source_keeps_the_texture_and_changes_the_tone():
    syn = DefectSynthesizer(TrainConfig(sources=("shade",)))
    x = 0.2 + 0.6 * torch.rand(16, 1, 32, 32)
    s = syn.sources(x, _gen(0))
    ratio = s / x  # a smooth gain: neighbouring pixels share nearly the same factor
    assert (ratio[..., 1:] - ratio[..., :-1]).abs().mean() < 0.1 * (ratio - 1).abs().mean()
    assert (ratio < 1).float().mean() > 0.5  # mostly darker, like holes and stains
    assert s.min() >= 0 and s.max() <= 1


def test_self_source_is_another_image_of_the_batch_shifted():
    syn = DefectSynthesizer(TrainConfig(sources=("self",)))
    x = torch.rand(6, 1, 16, 16)
    s = syn.sources(x, _gen(1))
    pool = {tuple(sorted(img.flatten().tolist())) for img in x}
    assert all(tuple(sorted(img.flatten().tolist())) in pool for img in s)  # same pixels, moved
    assert not torch.equal(s, x)


def test_mixed_sources_draw_every_kind():
    x = torch.zeros(64, 1, 16, 16)  # a shaded black image stays black; a colour field does not
    syn = DefectSynthesizer(TrainConfig(sources=("noise", "shade")))
    shaded = syn.sources(x, _gen(2)).flatten(1).amax(1) == 0
    assert 16 < int(shaded.sum()) < 48


def test_unknown_source_kind_is_an_error():
    with pytest.raises(GRDNetError, match="sources"):
        TrainConfig(sources=("nois",))
    with pytest.raises(GRDNetError, match="sources"):
        TrainConfig(sources=())


def test_threshold_range_adds_large_defects():
    def areas(cfg):
        return DefectSynthesizer(cfg).masks(400, 64, _gen(4)).flatten(1).mean(1)

    fixed = areas(TrainConfig(perlin_max_exp=4))
    ranged = areas(TrainConfig(perlin_max_exp=4, perlin_threshold_low=0.1))
    assert fixed.max() < 0.2  # the paper's threshold: small blobs only
    assert (ranged > 0.2).float().mean() > 0.15 and (ranged < 0.05).float().mean() > 0.2


def _interior_share(masks):
    """Share of mask pixels whose whole 3x3 neighbourhood is in the mask: ~0 for strokes."""
    inner = -torch.nn.functional.max_pool2d(-masks, 3, stride=1, padding=1)
    return inner.flatten(1).sum(1) / masks.flatten(1).sum(1).clamp(min=1)


def test_line_masks_are_thin_strokes_and_band_masks_straight_strips():
    syn = DefectSynthesizer(TrainConfig(line_share=1.0))
    lines = syn.masks(200, 64, _gen(5))
    assert (lines.flatten(1).sum(1) >= 25).all()  # the minimum area holds for strokes too
    assert _interior_share(lines).max() < 0.25 and lines.mean() < 0.08
    blobs = DefectSynthesizer(TrainConfig(perlin_max_exp=4, perlin_threshold_low=0.1)).masks(200, 64, _gen(5))
    assert _interior_share(blobs).quantile(0.75) > 0.4
    # the same shapes at 4x the size (4x wider): area share similar, as thin at 64 px
    big = DefectSynthesizer(TrainConfig(line_share=1.0)).masks(200, 256, _gen(5))
    small = (torch.nn.functional.avg_pool2d(big, 4) >= 0.5).float()
    assert 0.5 < big.mean() / lines.mean() < 2 and _interior_share(small).quantile(0.9) < 0.2

    bands = DefectSynthesizer(TrainConfig(band_share=1.0)).masks(200, 64, _gen(6))[:, 0]
    area = bands.flatten(1).mean(1)
    assert area.min() > 0.005 and area.max() < 0.75 and area.mean() > 0.15
    # a strip is convex: along every row and column its pixels form one run
    for m in bands:
        for line in torch.cat([m, m.T]):
            runs = (line[1:] > line[:-1]).sum() + line[0]
            assert runs <= 1


def test_shape_shares_are_validated():
    with pytest.raises(GRDNetError, match="shares"):
        TrainConfig(line_share=0.7, band_share=0.4)
    with pytest.raises(GRDNetError, match="shares"):
        TrainConfig(line_share=-0.1)
