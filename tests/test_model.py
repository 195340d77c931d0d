import pytest
import torch

from grdnet.config import PRESETS, build_config
from grdnet.model import Discriminator, Generator, Segmenter
from grdnet.scoring import InferenceNet


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("channels", [1, 3])
def test_network_shapes(preset, channels):
    m, _ = build_config(preset, model={"channels": channels})
    s = m.image_size
    x = torch.rand(2, channels, s, s)
    g, d, seg = Generator(m), Discriminator(m), Segmenter(m)
    with torch.no_grad():
        x_hat, z, z_hat = g(x)
        logit, feat = d(x)
        out = seg(x_hat, x)
    assert x_hat.shape == x.shape and 0 <= x_hat.min() and x_hat.max() <= 1
    assert z.shape == (2, m.latent_channels, m.latent_size, m.latent_size) == z_hat.shape
    assert logit.shape == (2,) and feat.shape[0] == 2 and feat.shape[1] == m.disc_widths[-1]
    assert out.shape == (2, 2, s, s)


def test_paper_preset_bottleneck_is_32x8x8():
    m, _ = build_config("paper")
    assert (m.image_size, m.latent_channels, m.latent_size) == (256, 32, 8)
    assert m.seg_widths == (64, 128, 256, 512, 512, 512)


def test_inference_net_skips_second_encoder_and_discriminator():
    m, _ = build_config("tiny")
    net = InferenceNet.build(m)
    names = {n.split(".")[0] for n, _ in net.named_parameters()}
    assert names == {"encoder", "decoder", "segmenter"}
    maps = net.eval()(torch.rand(3, 3, 32, 32))
    assert maps.shape == (3, 1, 32, 32) and 0 <= maps.min() and maps.max() <= 1


def test_bad_image_size_is_a_clear_error():
    from grdnet import GRDNetError

    with pytest.raises(GRDNetError, match="divisible"):
        build_config("cpu", model={"image_size": 100})
