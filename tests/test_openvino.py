"""OpenVINO export: the IR agrees with PyTorch, carries the contract, works in the CLI and the
service; INT8 runs within its tolerance; bad files are one-line errors. Skipped without openvino."""
import contextlib
import io
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import grdnet
from grdnet import export
from grdnet.cli import main
from grdnet.config import build_config
from grdnet.errors import GRDNetError
from grdnet.export import OpenVinoPredictor, export_openvino
from grdnet.model import GRDNet
from grdnet.modelfile import save_model
from grdnet.scoring import Predictor
from test_cli import _assert_clean_error, run_cli

try:
    import openvino as ov
except ImportError:
    ov = None
needs_openvino = pytest.mark.skipif(ov is None, reason='openvino not installed (pip install "grdnet[openvino]")')


@pytest.fixture(scope="module")
def traced_once():
    """The ONNX trace (most of an export's time) done once per model folder for this module:
    every export below still converts, quantises, checks and writes its own IR."""
    real, cache = export._checked_onnx, {}

    def cached(folder, opset, out):
        key = (str(folder), opset)
        if key not in cache:
            cache[key] = real(folder, opset, out)
        return cache[key]

    mp = pytest.MonkeyPatch()
    mp.setattr(export, "_checked_onnx", cached)
    yield
    mp.undo()


def _cli(*args) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main([str(a) for a in args])
    return rc, buf.getvalue()


@pytest.fixture(scope="module")
def exported(trained_tiny, traced_once, tmp_path_factory):
    """The tiny model exported by the CLI, in fp32 and in INT8: (run, data, fp32 .xml, int8 .xml, messages)."""
    run, data = trained_tiny
    out = tmp_path_factory.mktemp("ov")
    rc, fp32_msg = _cli("export", run, "--format", "openvino", "--out", out / "m.xml")
    assert rc == 0
    rc, int8_msg = _cli("export", run, "--format", "openvino", "--int8", "--out", out / "m8.xml")
    assert rc == 0
    return run, data, out / "m.xml", out / "m8.xml", (fp32_msg, int8_msg)


def _images(data):
    paths = sorted((data / "test").rglob("*.png"))
    rng = np.random.default_rng(3)
    return paths + [rng.integers(0, 256, (70, 50, 3), dtype=np.uint8), rng.integers(0, 256, (40, 48), dtype=np.uint8)]


@needs_openvino
def test_fp32_matches_pytorch(exported):
    run, data, xml, _, (message, _) = exported
    assert "OpenVINO model written to" in message and "m.bin" in message
    assert xml.is_file() and xml.with_suffix(".bin").is_file()
    assert not [p for p in xml.parent.iterdir() if p.name.startswith(".")]  # no staging leftovers
    torch_p, ov_p = grdnet.load(run), grdnet.load(xml)
    assert isinstance(ov_p, OpenVinoPredictor) and isinstance(torch_p, Predictor)
    assert ov_p.cfg == torch_p.cfg and ov_p.threshold == torch_p.threshold
    images = _images(data)
    a, b = torch_p.predict(images, batch_size=3), ov_p.predict(images, batch_size=4)  # dynamic batch sizes
    for x, y in zip(a, b):
        assert x.label == y.label and x.anomaly_map.shape == y.anomaly_map.shape
        assert np.abs(x.anomaly_map - y.anomaly_map).max() <= 1e-4 and abs(x.score - y.score) <= 1e-4
    s = torch_p.cfg.image_size
    big = np.random.default_rng(5).integers(0, 256, (3 * s + 7, 2 * s + 3, 3), dtype=np.uint8)
    roi = np.zeros(big.shape[:2], bool)
    roi[s:, :s] = True
    for kw in ({"tile": True}, {"tile": True, "roi": roi}, {"roi": roi}):
        x, y = torch_p.predict(big, **kw), ov_p.predict(big, **kw)
        assert np.abs(x.anomaly_map - y.anomaly_map).max() <= 1e-4 and abs(x.score - y.score) <= 1e-4


@needs_openvino
def test_ir_carries_the_contract(exported):
    run, _, xml, _, _ = exported
    model = ov.Core().read_model(str(xml))
    props = {k: model.get_rt_info(["grdnet", k]).astype(str) for k in model.get_rt_info()["grdnet"]}
    assert props["config_json"] == (run / "model" / "config.json").read_text()
    doc = json.loads(props["config_json"])
    assert props["format"] == "grdnet-openvino" and props["precision"] == "fp32"
    assert float(props["threshold"]) == doc["threshold"]
    assert "[0, 1]" in props["scaling"] and "bilinear" in props["resize"] and props["score_rule"].startswith("max_pool")
    check = json.loads(props["export_check"])
    assert check["max_abs_map_diff"] <= 1e-4 and check["max_abs_score_diff"] <= 1e-4
    assert check["onnx_check"]["max_abs_map_diff"] <= 1e-4
    # dynamic batch, fixed image shape
    shape = model.inputs[0].get_partial_shape()
    assert shape[0].is_dynamic and [d.get_length() for d in list(shape)[1:]] == [3, 32, 32]
    assert grdnet.load(xml).meta["openvino"]["format"] == "grdnet-openvino"


@needs_openvino
def test_cli_test_and_predict_accept_xml(exported, tmp_path):
    run, data, xml, _, _ = exported
    reports = {}
    for name, model in (("torch", run), ("openvino", xml)):
        rc, _ = _cli("test", model, data, "--report", tmp_path / f"{name}.json")
        assert rc == 0
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "threshold"):
        assert reports["openvino"][key] == pytest.approx(reports["torch"][key], abs=1e-4)
    rc, text = _cli("predict", xml, data / "test" / "hole", "--out", tmp_path / "pred")
    lines = [json.loads(x) for x in text.strip().splitlines()]
    assert rc == 0 and len(lines) == 4 and all(x["label"] in ("good", "defective") for x in lines)


@needs_openvino
def test_service_serves_xml(exported):
    from fastapi.testclient import TestClient

    from grdnet.serve import ServeSettings, create_app

    _, data, xml, _, _ = exported
    with TestClient(create_app(grdnet.load(xml), ServeSettings(model_name="m.xml"))) as client:
        image = next((data / "test" / "hole").iterdir())
        resp = client.post("/predict", files={"file": (image.name, image.read_bytes(), "image/png")})
        assert resp.status_code == 200, resp.text
        assert resp.json()["label"] in ("good", "defective")
        assert client.get("/model").json()["image_size"] == 32


@needs_openvino
def test_int8_export_within_its_tolerance(exported):
    run, data, _, xml8, (_, message) = exported
    assert "OpenVINO INT8 model written to" in message and "calibrated on 12 images" in message
    p8 = grdnet.load(xml8)
    check = json.loads(p8.meta["openvino"]["export_check"])
    assert check["precision"] == "int8" and check["calibration"]["folder"].endswith("train/good")
    assert check["max_abs_score_diff"] <= export.INT8_SCORE_TOLERANCE
    assert check["mean_abs_score_diff"] <= export.INT8_MEAN_SCORE_TOLERANCE
    assert check["synthetic_defects"]["images"] == check["good_images"]["images"] > 0
    assert check["mean_abs_map_diff"] <= export.INT8_MEAN_MAP_TOLERANCE
    assert xml8.with_suffix(".bin").stat().st_size < xml8.with_name("m.bin").stat().st_size / 2  # int8 weights
    a, b = grdnet.load(run).predict(_images(data)), p8.predict(_images(data))
    assert max(abs(x.score - y.score) for x, y in zip(a, b)) <= 0.1


@needs_openvino
def test_int8_calibration_data_override_and_errors(exported, tmp_path):
    run, data, _, _, _ = exported
    out = tmp_path / "c.xml"
    assert export_openvino(run, out, int8=True, calibration_data=data, calibration_images=4) == out
    assert json.loads(grdnet.load(out).meta["openvino"]["export_check"])["calibration"]["images"] == 4
    cfg, _ = build_config("tiny")
    bare = save_model(tmp_path / "bare", GRDNet(cfg), cfg, {})  # records no training data
    with pytest.raises(GRDNetError, match="does not record its training data"):
        export_openvino(bare, tmp_path / "b.xml", int8=True)
    with pytest.raises(GRDNetError, match="no such calibration folder"):
        export_openvino(bare, tmp_path / "b.xml", int8=True, calibration_data=tmp_path / "nowhere")
    with pytest.raises(GRDNetError, match="ending in .xml"):
        export_openvino(bare, tmp_path / "b.onnx")
    assert not list(tmp_path.glob("b.*"))


@needs_openvino
def test_failed_check_writes_nothing(exported, tmp_path, monkeypatch):
    run, _, _, _, _ = exported
    monkeypatch.setattr(export, "PARITY_TOLERANCE", -1.0)
    with pytest.raises(GRDNetError, match="disagrees with PyTorch.*nothing written"):
        export_openvino(run, tmp_path / "x.xml")
    assert list(tmp_path.iterdir()) == []


@needs_openvino
def test_bad_xml_files_are_clear_errors(exported, tmp_path):
    _, data, xml, _, _ = exported
    with pytest.raises(GRDNetError, match="no such OpenVINO file"):
        grdnet.load(tmp_path / "missing.xml")
    junk = tmp_path / "junk.xml"
    junk.write_text("<net><layers>garbage")
    junk.with_suffix(".bin").write_bytes(b"\0" * 16)
    with pytest.raises(GRDNetError, match=r"junk\.xml: not a valid OpenVINO model"):
        grdnet.load(junk)
    lone = tmp_path / "lone.xml"
    lone.write_bytes(xml.read_bytes())  # without its .bin
    with pytest.raises(GRDNetError, match=r"lone\.bin is missing"):
        grdnet.load(lone)
    # A valid IR that grdnet did not write.
    ops = getattr(ov, "opset13", None) or __import__("openvino.runtime.opset13", fromlist=["relu"])  # < 2025
    x = ops.parameter([1, 3], np.float32, name="x")
    ov.save_model(ov.Model([ops.relu(x)], [x], "other"), str(tmp_path / "other.xml"))
    with pytest.raises(GRDNetError, match="without grdnet metadata"):
        grdnet.load(tmp_path / "other.xml")
    _assert_clean_error(run_cli("predict", junk, data / "test" / "good", "--out", tmp_path / "o"),
                        "junk.xml", "not a valid OpenVINO model")
    _assert_clean_error(run_cli("test", junk, data), "junk.xml")


def test_missing_openvino_is_a_clear_error(tmp_path, monkeypatch):
    xml = tmp_path / "m.xml"
    xml.write_text("<net/>")
    monkeypatch.setitem(sys.modules, "openvino", None)  # import fails as if not installed
    with pytest.raises(GRDNetError, match=r'm\.xml: OpenVINO is not installed; pip install "grdnet\[openvino\]"'):
        grdnet.load(xml)
    cfg, _ = build_config("tiny")
    folder = save_model(tmp_path / "model", GRDNet(cfg), cfg, {})
    with pytest.raises(GRDNetError, match=r'pip install "grdnet\[openvino\]"'):
        export_openvino(folder, tmp_path / "x.xml")
    assert not (tmp_path / "x.xml").exists()


def test_cli_export_flags_need_openvino_format(trained_tiny):
    run, _ = trained_tiny
    res = run_cli("export", run, "--int8")
    _assert_clean_error(res, "--int8 and --calibration-data are for --format openvino")
