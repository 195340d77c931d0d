"""Defect regions: the map at the pixel threshold as a mask and a list of regions, through the
Python API, the CLI, the test report and the service."""
import base64
import io
import json
import shutil

import numpy as np
import torch
from fastapi.testclient import TestClient
from PIL import Image

import grdnet
from grdnet.evaluation import run_test
from grdnet.cli import main
from grdnet.config import PRESETS, ModelConfig
from grdnet.regions import RegionTally, defect_mask, find_regions
from grdnet.scoring import BasePredictor, image_scores
from grdnet.serve import create_app


def two_blobs(h=40, w=60):
    m = np.zeros((h, w), np.float32)
    m[5:10, 4:12] = 0.8  # 5 x 8 = 40 pixels
    m[7, 6] = 0.95
    m[20:32, 40:43] = 0.6  # 12 x 3 = 36 pixels
    m[30, 10] = 0.3  # below the threshold
    return m


def test_two_blobs_are_two_regions_with_their_boxes_and_areas():
    m = two_blobs()
    regions = find_regions(m, defect_mask(m, 0.5))
    assert [(r.x, r.y, r.width, r.height, r.area) for r in regions] == [(4, 5, 8, 5, 40), (40, 20, 3, 12, 36)]
    assert regions[0].peak == np.float32(0.95) and regions[1].peak == np.float32(0.6)
    assert abs(regions[0].mean - (39 * 0.8 + 0.95) / 40) < 1e-6
    # Diagonal neighbours are one region; a gap of one pixel makes two.
    d = np.zeros((5, 5), np.float32)
    d[0, 0] = d[1, 1] = d[3, 3] = 1
    assert [r.area for r in find_regions(d, d > 0.5)] == [2, 1]


def test_nothing_outside_the_roi():
    m = two_blobs()
    roi = np.zeros(m.shape, bool)
    roi[:, :8] = True  # cuts the first blob, excludes the second
    regions = find_regions(m, defect_mask(m, 0.5, roi))
    assert [(r.x, r.y, r.width, r.height, r.area) for r in regions] == [(4, 5, 4, 5, 20)]


def test_region_tally_counts_found_and_false_regions():
    t = RegionTally()
    truth = np.zeros((20, 20), bool)
    truth[2:5, 2:5] = truth[12:15, 12:15] = True
    pred = np.zeros((20, 20), bool)
    pred[3:6, 3:6] = True  # finds the first defect
    pred[0, 18] = True  # a false region
    t.add(pred, truth)
    good = np.zeros((20, 20), bool)
    good[9, 9] = good[1, 1] = True
    t.add(good, np.zeros((20, 20), bool))
    t.add(np.zeros((20, 20), bool), np.zeros((20, 20), bool))
    f = t.figures()
    assert (f["gt_regions"], f["gt_regions_found"], f["gt_region_recall"]) == (2, 1, 0.5)
    assert f["false_regions_per_defective_image"] == 1.0
    assert f["false_regions_per_good_image"] == 1.0 and f["good_images_with_a_region"] == 0.5


class SquarePredictor(BasePredictor):
    """A network stand-in whose map is one bright square in the middle of the model's view."""

    def _run(self, batch):
        s = self.cfg.image_size
        maps = torch.zeros(batch.shape[0], 1, s, s)
        maps[:, :, s // 4:s // 2, s // 4:s // 2] = 0.9
        return maps, image_scores(maps, self.cfg)


def square_predictor(meta=None):
    cfg = ModelConfig(**{**PRESETS["tiny"][0], "channels": 1})
    return SquarePredictor(cfg, threshold=0.5, meta={"pixel_threshold": 0.7} if meta is None else meta)


def test_predictions_carry_mask_and_regions_at_the_pixel_threshold():
    p = square_predictor().predict(np.zeros((32, 32), np.uint8))  # the model's size: the map as it is
    assert p.pixel_threshold == 0.7
    assert p.defect_mask.shape == (32, 32) and p.defect_mask.sum() == 8 * 8
    (r,) = p.regions
    assert (r.x, r.y, r.width, r.height, r.area) == (8, 8, 8, 8, 64)
    # An override above the map's peak: no region; a model without a pixel threshold uses its image threshold.
    assert square_predictor().predict(np.zeros((32, 32), np.uint8), pixel_threshold=0.95).regions == []
    assert square_predictor(meta={}).predict(np.zeros((32, 32), np.uint8)).pixel_threshold == 0.5
    decided_good = square_predictor().predict(np.zeros((32, 32), np.uint8), threshold=0.95)
    assert decided_good.label == "good" and decided_good.regions == [] and not decided_good.defect_mask.any()
    roi = np.zeros((32, 32), bool)
    roi[:, 20:] = True
    assert square_predictor().predict(np.zeros((32, 32), np.uint8), roi=roi).regions == []


def test_service_returns_regions_and_mask():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(buf, "PNG")
    with TestClient(create_app(square_predictor())) as c:
        r = c.post("/predict", params={"mask": "true"}, files={"file": ("a.png", buf.getvalue(), "image/png")})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["pixel_threshold"] == 0.7
        assert [(g["x"], g["y"], g["width"], g["height"], g["area"]) for g in body["regions"]] == [(8, 8, 8, 8, 64)]
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["defect_mask_png"]))))
        assert mask.shape == (32, 32) and (mask == 255).sum() == 64 and mask[10, 10] == 255
        r = c.post("/predict/batch", params={"pixel_threshold": 0.95},
                   files=[("files", ("a.png", buf.getvalue(), "image/png"))])
        assert r.json()["results"][0]["regions"] == [] and r.json()["results"][0].get("defect_mask_png") is None
        # The request's threshold decides, and a good decision has no region.
        r = c.post("/predict", params={"threshold": 0.95}, files={"file": ("a.png", buf.getvalue(), "image/png")})
        assert (r.json()["label"], r.json()["regions"]) == ("good", [])
    with TestClient(create_app(square_predictor(meta={}))) as c:  # no pixel threshold: the threshold in use
        r = c.post("/predict", params={"threshold": 0.2}, files={"file": ("a.png", buf.getvalue(), "image/png")})
        assert r.json()["pixel_threshold"] == 0.2 and len(r.json()["regions"]) == 1


def test_cli_writes_masks_and_regions_and_test_reports_them(trained_tiny, tmp_path, capsys):
    run, data = trained_tiny
    threshold = json.loads((run / "model" / "config.json").read_text())["threshold"]
    # Threshold 0 flags every image; pixel threshold 0 makes every pixel a defect pixel.
    assert main(["predict", str(run), str(data / "test" / "hole"), "--out", str(tmp_path / "p"),
                 "--threshold", "0", "--pixel-threshold", "0"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert len(lines) == 4 and all(x["pixel_threshold"] == 0 for x in lines)
    first = lines[0]
    h, w = np.asarray(Image.open(first["path"])).shape[:2]
    assert first["regions"] == [{"x": 0, "y": 0, "width": w, "height": h, "area": w * h,
                                 "peak": first["regions"][0]["peak"], "mean": first["regions"][0]["mean"]}]
    assert np.asarray(Image.open(first["defect_mask"])).min() == 255
    # An image decided good has no region, whatever the pixel threshold.
    assert main(["predict", str(run), str(data / "test" / "hole"), "--out", str(tmp_path / "q"),
                 "--threshold", "1", "--pixel-threshold", "0"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert all(x["label"] == "good" and x["regions"] == [] for x in lines)
    assert np.asarray(Image.open(lines[0]["defect_mask"])).max() == 0
    report = run_test(grdnet.load(run), data)
    g = report["regions"]
    assert g["gt_regions"] == 4 and 0 <= g["gt_region_recall"] <= 1 and g["pixel_threshold"] == threshold

def test_top_level_api_offers_what_the_cli_offers(trained_tiny, tmp_path):
    run, data = trained_tiny
    model = tmp_path / "model"
    shutil.copytree(run / "model", model)  # calibrate rewrites it; the session's model stays as it is
    one = grdnet.predict(model, data / "test" / "hole" / "000.png", threshold=0.0, pixel_threshold=0.0)
    assert one.defect_mask.all() and len(one.regions) == 1
    report = grdnet.test(model, data, out=tmp_path / "report")
    assert report["regions"]["gt_regions"] == 4
    assert "Defect regions at the pixel threshold" in (tmp_path / "report" / "index.html").read_text()
    val = tmp_path / "val"
    shutil.copytree(data / "test", val)
    record = grdnet.calibrate(model, val, rule="quantile")
    assert json.loads((model / "config.json").read_text())["threshold"] == record["threshold"]
