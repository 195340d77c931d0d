"""ONNX export: the exported file agrees with PyTorch, describes itself, and works in the CLI."""
import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import grdnet
from grdnet.cli import main
from grdnet.config import build_config
from grdnet.errors import GRDNetError
from grdnet.export import OnnxPredictor, export_onnx, resize_contract
from grdnet.modelfile import save_model
from grdnet.model import GRDNet
from grdnet.scoring import Predictor
from test_cli import _assert_clean_error, run_cli


def _random_net(cfg, seed):
    """Untrained networks whose batch-norm statistics are set from images, as training would, so
    that maps depend on the image (with default statistics they are nearly constant)."""
    torch.manual_seed(seed)
    net = GRDNet(cfg)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # running statistics = plain average over the batches below
    net.train()
    s, c = cfg.image_size, cfg.channels
    with torch.no_grad():
        for _ in range(4):
            net((torch.rand(8, 1, 1, 1) * torch.rand(8, c, s, s) + 0.5 * torch.rand(8, 1, 1, 1)).clamp(0, 1))
    return net.eval()


def _images(size, seed):
    """Ten images of several sizes and kinds: uint8 RGB and grey, float, PIL; noise and shapes."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(10):
        h, w = [(size, size), (40, 48), (70, 50), (size + 9, size - 5)][k % 4]
        a = rng.uniform(30, 220) + rng.uniform(5, 120) * rng.standard_normal((h, w, 3))
        if k % 3 == 0:
            a[h // 4:h // 2, w // 3:w // 2] = rng.uniform(0, 255)
        a = np.clip(a, 0, 255).astype(np.uint8)
        out.append([a, a[..., 0], a.astype(np.float32) / 255, Image.fromarray(a)][k % 4])
    return out


@pytest.fixture(scope="module", params=[(3, 32, 5, False), (1, 32, 5, True), (3, 64, 9, False), (1, 64, 5, False)],
                ids=["rgb32", "gray32-flips", "rgb64-kernel9-nogan", "gray64-unshuffle2"])
def exported(request, tmp_path_factory):
    channels, size, kernel, flips = request.param
    # one whose networks run at half the input size on pixel-unshuffled input
    unshuffle = 2 if (channels, size) == (1, 64) else 1
    # and one with the segmenter alone (`ModelConfig.gan` False)
    gan = (channels, size) != (3, 64)
    cfg, _ = build_config("tiny", model=dict(channels=channels, image_size=size, score_kernel=kernel,
                                             flip_average=flips, unshuffle=unshuffle, gan=gan))
    net = _random_net(cfg, seed=channels * 1000 + size)
    images = _images(size, seed=size + channels)
    scores = np.sort([p.score for p in Predictor(net, cfg).predict(images)])
    gap = int(np.diff(scores).argmax())
    assert scores[gap + 1] - scores[gap] > 1e-3, "test images must not all score alike"
    threshold = float((scores[gap] + scores[gap + 1]) / 2)  # in the widest gap: images on both sides
    folder = save_model(tmp_path_factory.mktemp("m") / "model", net, cfg,
                        {"threshold": threshold, "threshold_rule": "test: widest gap"})
    onnx_file = export_onnx(folder, folder.parent / "exported.onnx")
    return folder, onnx_file, images


def test_parity_maps_scores_labels(exported):
    folder, onnx_file, images = exported
    torch_p, onnx_p = grdnet.load(folder), grdnet.load(onnx_file)
    assert isinstance(onnx_p, OnnxPredictor) and isinstance(torch_p, Predictor)
    assert onnx_p.cfg == torch_p.cfg and onnx_p.threshold == torch_p.threshold
    a, b = torch_p.predict(images, batch_size=3), onnx_p.predict(images, batch_size=4)  # dynamic batch sizes
    labels = [p.label for p in a]
    assert set(labels) == {"good", "defective"}  # the threshold does split the images
    assert labels == [p.label for p in b]
    for x, y in zip(a, b):
        assert x.anomaly_map.shape == y.anomaly_map.shape
        assert np.abs(x.anomaly_map - y.anomaly_map).max() <= 1e-4
        assert abs(x.score - y.score) <= 1e-4
    # The raw graph outputs too, at batch 1.
    s = torch_p.cfg.image_size
    x = torch.rand(1, torch_p.cfg.channels, s, s)
    np.testing.assert_allclose(onnx_p.maps(x).numpy(), torch_p.maps(x).numpy(), atol=1e-4)


def test_parity_tiled_and_roi(exported):
    folder, onnx_file, _ = exported
    torch_p, onnx_p = grdnet.load(folder), grdnet.load(onnx_file)
    s = torch_p.cfg.image_size
    big = np.random.default_rng(5).integers(0, 256, (3 * s + 7, 2 * s + 3, 3), dtype=np.uint8)
    roi = np.zeros(big.shape[:2], bool)
    roi[s:, :s] = True
    for kw in ({"tile": True}, {"tile": True, "roi": roi}, {"roi": roi}):
        x, y = torch_p.predict(big, **kw), onnx_p.predict(big, **kw)
        assert np.abs(x.anomaly_map - y.anomaly_map).max() <= 1e-4 and abs(x.score - y.score) <= 1e-4


def test_parity_aspect_views(exported):
    folder, onnx_file, _ = exported
    torch_p, onnx_p = grdnet.load(folder), grdnet.load(onnx_file)
    s = torch_p.cfg.image_size
    wide = np.random.default_rng(6).integers(0, 256, (s + 9, 3 * s, 3), dtype=np.uint8)
    for mode in ("keep", "both"):
        torch_p.cfg = onnx_p.cfg = dataclasses.replace(torch_p.cfg, aspect=mode)
        x, y = torch_p.predict(wide), onnx_p.predict(wide)
        assert np.abs(x.anomaly_map - y.anomaly_map).max() <= 1e-4 and abs(x.score - y.score) <= 1e-4
    assert "maximum of the two maps" in resize_contract(torch_p.cfg)


def test_metadata_carries_the_contract(exported):
    folder, onnx_file, _ = exported
    props = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    cfg = grdnet.load(folder).cfg
    doc = json.loads((folder / "config.json").read_text())
    assert props["config_json"] == (folder / "config.json").read_text()
    assert props["image_size"] == str(cfg.image_size) and props["channels"] == str(cfg.channels)
    assert "[0, 1]" in props["scaling"] and "bilinear" in props["resize"]
    assert props["score_rule"].startswith(f"max_pool: maximum of the anomaly map average-pooled with a {cfg.score_kernel}x")
    assert props["flip_average"].startswith(str(cfg.flip_average).lower())
    assert float(props["threshold"]) == doc["threshold"] and props["threshold_rule"] == "test: widest gap"
    check = json.loads(props["export_check"])
    assert check["max_abs_map_diff"] <= 1e-4 and check["max_abs_score_diff"] <= 1e-4
    # Dynamic batch: the input's first dimension is symbolic, the rest fixed.
    dims = onnx.load(str(onnx_file)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [cfg.channels, cfg.image_size, cfg.image_size]


def test_bad_onnx_files_are_clear_errors(tmp_path):
    with pytest.raises(GRDNetError, match="no such ONNX file"):
        grdnet.load(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(GRDNetError, match=r"junk\.onnx: not a valid ONNX model"):
        grdnet.load(junk)
    # A valid ONNX model that grdnet did not write.
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    other = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(other))
    with pytest.raises(GRDNetError, match="without grdnet metadata"):
        grdnet.load(other)


def test_cli_export_predict_test(trained_tiny, tmp_path, capsys):
    run, data = trained_tiny
    out = tmp_path / "m.onnx"
    assert main(["export", str(run), "--format", "onnx", "--out", str(out)]) == 0
    assert "ONNX model written to" in capsys.readouterr().out and out.is_file()
    lines = {}
    for name, model in (("torch", run), ("onnx", out)):
        assert main(["predict", str(model), str(data / "test"/ "hole"), str(data / "test" / "good"),
                     "--out", str(tmp_path / name)]) == 0
        lines[name] = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(lines["onnx"]) == 8
    for x, y in zip(lines["torch"], lines["onnx"]):
        assert x["path"] == y["path"] and x["label"] == y["label"] and abs(x["score"] - y["score"]) <= 1e-4
    reports = {}
    for name, model in (("torch", run), ("onnx", out)):
        assert main(["test", str(model), str(data), "--report", str(tmp_path / f"{name}.json")]) == 0
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "threshold"):
        assert reports["onnx"][key] == pytest.approx(reports["torch"][key], abs=1e-4)


def test_cli_bad_models_are_one_line_errors(trained_tiny, tmp_path):
    run, data = trained_tiny
    corrupt = tmp_path / "bad.onnx"
    corrupt.write_bytes(b"\x08\x09" + b"\xff" * 100)
    _assert_clean_error(run_cli("predict", corrupt, data / "test" / "good", "--out", tmp_path / "o"),
                        "bad.onnx", "not a valid ONNX model")
    _assert_clean_error(run_cli("test", corrupt, data), "bad.onnx")
    image = next((data / "test" / "good").iterdir())
    _assert_clean_error(run_cli("test", image, data), str(image), "not a grdnet model")
    _assert_clean_error(run_cli("export", tmp_path, "--out", tmp_path / "x.onnx"), "not a grdnet model")


def test_unsupported_opset_is_refused(tmp_path):
    cfg, _ = build_config("tiny")
    folder = save_model(tmp_path / "model", GRDNet(cfg), cfg, {})
    with pytest.raises(GRDNetError, match="opset 7"):
        export_onnx(folder, tmp_path / "old.onnx", opset=7)
    assert not (tmp_path / "old.onnx").exists()
