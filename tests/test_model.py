import pytest
import torch

from grdnet.config import PRESETS, build_config
from grdnet.model import Discriminator, Generator, Segmenter
from grdnet.scoring import InferenceNet


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("channels", [1, 3])
def test_network_shapes(preset, channels):
    m, _ = build_config(preset, model={"channels": channels, "gan": True})
    s = m.image_size
    x = torch.rand(2, channels, s, s)
    g, d, seg = Generator(m), Discriminator(m), Segmenter(m)
    alone = Segmenter(build_config(preset, model={"channels": channels, "gan": False})[0])
    with torch.no_grad():
        x_hat, z, z_hat = g(x)
        logit, feat = d(x)
        out = seg(x_hat, x)
        out_alone = alone(None, x)  # without the GAN: the image alone
    assert x_hat.shape == x.shape and 0 <= x_hat.min() and x_hat.max() <= 1
    assert z.shape == (2, m.latent_channels, m.latent_size, m.latent_size) == z_hat.shape
    assert logit.shape == (2,) and feat.shape[0] == 2 and feat.shape[1] == m.disc_widths[-1]
    assert out.shape == (2, 2, s, s) == out_alone.shape


def test_unshuffle_runs_the_networks_at_a_fraction_of_the_input_size():
    m, _ = build_config("tiny", model={"channels": 1, "image_size": 64, "unshuffle": 2})
    g, d, seg = Generator(m), Discriminator(m), Segmenter(m)
    x = torch.rand(2, 1, 64, 64)
    seen = {}
    seg.down[0].register_forward_hook(lambda mod, inp, out: seen.update(seg_in=inp[0].shape))
    g.encoder.stem.register_forward_hook(lambda mod, inp, out: seen.update(enc_in=inp[0].shape))
    with torch.no_grad():
        x_hat, z, _ = g(x)
        out = seg(x_hat, x)
        _, feat = d(x)
    # every input pixel reaches the first layer, rearranged into channels at half the size
    assert seen == {"seg_in": (2, 8, 32, 32), "enc_in": (2, 4, 32, 32)}
    assert x_hat.shape == x.shape and out.shape == (2, 2, 64, 64)
    assert z.shape[-1] == m.latent_size == 64 // 2 // 4 and feat.shape[-1] == 8
    # a single-pixel change is seen (no resizing averages it away)
    y = x.clone()
    y[0, 0, 10, 11] += 0.5
    with torch.no_grad():
        assert not torch.allclose(g.encoder(x)[0], g.encoder(y)[0])


def test_unshuffle_must_divide_the_image_size():
    from grdnet import GRDNetError

    with pytest.raises(GRDNetError, match="divisible"):
        build_config("tiny", model={"image_size": 40, "unshuffle": 3})
    with pytest.raises(GRDNetError, match="unshuffle"):
        build_config("tiny", model={"unshuffle": 0})


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


def test_flip_average_is_the_mean_of_the_four_flipped_maps():
    m, _ = build_config("tiny", model={"flip_average": True})
    torch.manual_seed(0)
    net = InferenceNet.build(m).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        plain = [net.anomaly_map(x.flip(d)).flip(d) if d else net.anomaly_map(x) for d in ((), (-1,), (-2,), (-2, -1))]
        averaged = net(x)
        # the averaged map is flip-equivariant; a single network pass is not
        assert not torch.allclose(plain[0], plain[1], atol=1e-4)
        assert torch.allclose(net(x.flip(-1)), averaged.flip(-1), atol=1e-6)
    assert torch.allclose(averaged, torch.stack(plain).mean(0), atol=1e-6)


def test_flip_average_needs_flipped_training():
    from grdnet import GRDNetError

    with pytest.raises(GRDNetError, match="hflip and vflip"):
        build_config("cpu", model={"flip_average": True}, train={"vflip": False})


def test_bad_image_size_is_a_clear_error():
    from grdnet import GRDNetError

    with pytest.raises(GRDNetError, match="divisible"):
        build_config("cpu", model={"image_size": 100})


def test_score_scales_add_coarser_views_to_the_score_only():
    import torch.nn.functional as F

    from grdnet.scoring import Predictor, image_scores
    from test_export import _random_net

    m, _ = build_config("tiny", model={"flip_average": True, "score_scales": [1.0, 0.75, 0.5]})
    one = build_config("tiny", model={"flip_average": True})[0]
    assert m.score_sizes == (24, 16) and one.score_sizes == ()
    net = _random_net(m, seed=0)  # batch-norm statistics of its own, so that folding them matters
    single = InferenceNet(net.encoder, net.decoder, net.segmenter, flip_average=True).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        maps = net(x)
        assert maps.shape == (2, 3, 32, 32)
        assert torch.allclose(maps[:, :1], single(x), atol=1e-6)  # channel 0: the anomaly map as before
        small = F.interpolate(x, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
        assert torch.allclose(maps[:, 2:], F.interpolate(single(small), size=(32, 32), mode="bilinear"), atol=1e-6)
        assert not torch.allclose(maps[:, :1], maps[:, 2:], atol=1e-3)
    per_view = torch.stack([image_scores(maps[:, i:i + 1], one) for i in range(3)])
    assert torch.allclose(image_scores(maps, m), per_view.mean(0))
    # The predictor's CPU network (batch norms folded) computes the same; a network traced as a
    # whole would fold each batch norm once per view.
    p = Predictor(net, m)
    got_maps, got_scores = p._run(x)
    assert torch.allclose(got_maps, maps, atol=1e-5) and torch.allclose(got_scores, image_scores(maps, m), atol=1e-5)
    assert p.maps(x).shape == (2, 1, 32, 32)
    pred = p.predict((x[0].permute(1, 2, 0).numpy() * 255).astype("uint8"))
    assert pred.anomaly_map.shape == (32, 32) and abs(pred.score - float(got_scores[0])) < 1e-3  # uint8 input


@pytest.mark.parametrize("scales", [[0.5], [1.0, 0.3], [1.0, 1.5], []])
def test_bad_score_scales_are_a_clear_error(scales):
    from grdnet import GRDNetError

    with pytest.raises(GRDNetError, match="score_scales"):
        build_config("cpu", model={"score_scales": scales})
