import pytest
import torch

from grdnet.config import PRESETS, build_config
from grdnet.model import Discriminator, GRDNet, Segmenter


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("channels", [1, 3])
def test_network_shapes(preset, channels):
    m, _ = build_config(preset, model={"channels": channels, "gan": True})
    s = m.image_size
    x = torch.rand(2, channels, s, s)
    g, d, seg = GRDNet(m, training=True), Discriminator(m), Segmenter(m)
    alone = Segmenter(build_config(preset, model={"channels": channels, "gan": False})[0])
    with torch.no_grad():
        x_hat, z, z_hat = g.generate(x)
        logit, feat = d(x)
        out = seg(x_hat, x)
        out_alone = alone(None, x)  # without the GAN: the image alone
    assert x_hat.shape == x.shape and 0 <= x_hat.min() and x_hat.max() <= 1
    assert z.shape == (2, m.latent_channels, m.latent_size, m.latent_size) == z_hat.shape
    assert logit.shape == (2,) and feat.shape[0] == 2 and feat.shape[1] == m.disc_widths[-1]
    assert out.shape == (2, 2, s, s) == out_alone.shape


def test_unshuffle_runs_the_networks_at_a_fraction_of_the_input_size():
    m, _ = build_config("tiny", model={"channels": 1, "image_size": 64, "unshuffle": 2})
    g, d, seg = GRDNet(m, training=True), Discriminator(m), Segmenter(m)
    x = torch.rand(2, 1, 64, 64)
    seen = {}
    seg.down[0].register_forward_hook(lambda mod, inp, out: seen.update(seg_in=inp[0].shape))
    g.encoder.stem.register_forward_hook(lambda mod, inp, out: seen.update(enc_in=inp[0].shape))
    with torch.no_grad():
        x_hat, z, _ = g.generate(x)
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
    net = GRDNet(m)
    names = {n.split(".")[0] for n, _ in net.named_parameters()}
    assert names == {"encoder", "decoder", "segmenter"}
    maps = net.eval()(torch.rand(3, 3, 32, 32))
    assert maps.shape == (3, 1, 32, 32) and 0 <= maps.min() and maps.max() <= 1


def test_flip_average_is_the_mean_of_the_four_flipped_maps():
    m, _ = build_config("tiny", model={"flip_average": True})
    torch.manual_seed(0)
    net = GRDNet(m).eval()
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


def test_cpu_predictor_folds_batch_norms_and_computes_the_same():
    from grdnet.scoring import Predictor, image_scores
    from test_export import _random_net

    m, _ = build_config("tiny", model={"flip_average": True})
    net = _random_net(m, seed=0)  # batch-norm statistics of its own, so that folding them matters
    images = (torch.rand(2, 32, 32, 3) * 255).round().to(torch.uint8)
    x = images.permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        maps = net(x)
    p = Predictor(net, m)
    def batch_norms(module):
        return sum(isinstance(mod, torch.nn.BatchNorm2d) for mod in module.modules())

    # every batch norm after a convolution is folded, the segmenter's too (only the generator's
    # pre-activation ones, before their convolution, stay)
    assert p.net is not net and batch_norms(p.net.segmenter) == 0 < batch_norms(net.segmenter)
    assert batch_norms(p.net) < batch_norms(net)
    got_maps, got_scores = p._run(x)
    assert torch.allclose(got_maps, maps, atol=1e-5)
    assert torch.allclose(got_scores, image_scores(maps, m), atol=1e-5)
    assert p.maps(x).shape == (2, 1, 32, 32)
    pred = p.predict(images[0].numpy())
    assert pred.anomaly_map.shape == (32, 32) and abs(pred.score - float(got_scores[0])) < 1e-5  # uint8 input


def test_old_model_files_with_retired_score_options_load(tmp_path):
    import json

    from grdnet import GRDNetError
    from grdnet.modelfile import load_model, save_model

    m, _ = build_config("tiny")
    folder = save_model(tmp_path / "model", GRDNet(m), m, {})
    doc = json.loads((folder / "config.json").read_text())
    doc["model"].update(score_rule="max_pool", score_topk=0.01, score_scales=[1.0])
    (folder / "config.json").write_text(json.dumps(doc))
    assert load_model(folder)[1] == m
    doc["model"]["score_scales"] = [1.0, 0.5]
    (folder / "config.json").write_text(json.dumps(doc))
    with pytest.raises(GRDNetError, match="score_scales"):
        load_model(folder)


def test_presets_are_complete_tables_and_paper_is_the_default():
    import dataclasses

    from grdnet.config import ModelConfig, TrainConfig

    for name, (model, train) in PRESETS.items():
        assert set(model) == {f.name for f in dataclasses.fields(ModelConfig)}, name
        assert set(train) == {f.name for f in dataclasses.fields(TrainConfig)}, name
    assert build_config("paper") == (ModelConfig(), TrainConfig())
    assert build_config("cpu")[0] != ModelConfig()
