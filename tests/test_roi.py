import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import grdnet
from grdnet import GRDNetError
from grdnet.cli import main
from grdnet.config import build_config
from grdnet.roi import find_rois, make_roi, otsu
from grdnet.training import GRDNetModule


def _write_rois(data, shape=(40, 48), box=(5, 5, 30, 40)):
    out = data / "roi" / "train" / "good"
    out.mkdir(parents=True)
    for p in sorted((data / "train" / "good").iterdir()):
        m = np.zeros(shape, np.uint8)
        m[box[0]:box[2], box[1]:box[3]] = 255
        Image.fromarray(m).save(out / f"{p.stem}.png")
    return data / "roi"


def test_roi_moves_with_the_image_under_augmentation():
    m, t = build_config("tiny", train={"rotation": 90.0, "hflip": True, "vflip": True})
    mod = GRDNetModule(m, t)
    torch.manual_seed(0)
    roi = torch.zeros(16, 1, 32, 32)
    roi[:, :, 4:14, 6:26] = 1  # asymmetric, so any flip or rotation shows
    image = roi.expand(-1, 3, -1, -1)  # the image *is* its ROI: they must stay identical
    out = mod.augment(torch.cat([image, roi], dim=1))
    moved = (out[:, 3:] > 0.5).float()
    assert not torch.equal(moved, roi)  # augmentation did something
    assert ((out[:, :1] > 0.5).float() != moved).float().mean() < 0.005


def test_find_rois_mirror_flat_single_and_missing(tiny_dataset, tmp_path):
    imgs = sorted((tiny_dataset / "train" / "good").iterdir())
    roi_dir = _write_rois(tiny_dataset)
    assert [r.stem for r in find_rois(imgs, tiny_dataset, roi_dir)] == [p.stem for p in imgs]
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in imgs[:3]:
        (flat / f"{p.stem}.bmp").write_bytes((roi_dir / "train/good" / f"{p.stem}.png").read_bytes())
    with pytest.raises(GRDNetError, match=f"no ROI for {len(imgs) - 3} image"):
        find_rois(imgs, tiny_dataset, flat)
    default = roi_dir / "train/good" / f"{imgs[0].stem}.png"
    got = find_rois(imgs, tiny_dataset, flat, default=default)
    assert got[:3] == [flat / f"{p.stem}.bmp" for p in imgs[:3]] and set(got[3:]) == {default}
    assert find_rois(imgs, tiny_dataset, default) == [default] * len(imgs)


def test_train_with_roi_and_test_with_roi(tiny_dataset, tmp_path):
    roi_dir = _write_rois(tiny_dataset)
    run = grdnet.train(tiny_dataset, tmp_path / "run", preset="tiny", epochs=1, progress=False, roi=roi_dir)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["training"]["roi"]["mode"] == "target" and cfg["training"]["roi"]["source"] == str(roi_dir)
    one = roi_dir / "train/good/000.png"
    from grdnet.evaluation import run_test

    with_roi = run_test(grdnet.load(run), tiny_dataset, roi=one)
    assert with_roi["roi"]["source"] == str(one)
    scores = [r["score"] for r in with_roi["images"]]
    assert all(0 <= s <= 1 for s in scores)


def test_roi_zeroes_the_map_outside():
    m, _ = build_config("tiny")
    p = grdnet.Predictor(__import__("grdnet.scoring", fromlist=["InferenceNet"]).InferenceNet.build(m), m, 0.5)
    img = (np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)
    roi = np.zeros((40, 48), bool)
    roi[10:20, 10:30] = True
    r = p.predict(img, roi=roi)
    assert (r.anomaly_map[~roi] == 0).all() and r.anomaly_map[roi].max() > 0


def test_empty_roi_is_an_error(tiny_dataset, tmp_path):
    roi_dir = _write_rois(tiny_dataset)
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(roi_dir / "train/good/003.png")
    with pytest.raises(GRDNetError, match="003.png.*empty"):
        grdnet.train(tiny_dataset, tmp_path / "run", preset="tiny", epochs=1, progress=False, roi=roi_dir)


def test_roi_of_other_size_is_resized_with_warning(tiny_dataset, tmp_path, caplog):
    roi_dir = _write_rois(tiny_dataset, shape=(20, 24), box=(2, 2, 15, 20))
    with caplog.at_level(logging.WARNING):
        grdnet.train(tiny_dataset, tmp_path / "run", preset="tiny", epochs=1, progress=False, roi=roi_dir)
    assert any("ROI is 24x20" in r.message and "resizing" in r.message for r in caplog.records)


def test_make_roi_shapes_and_threshold():
    m = make_roi((10, 8), rects=[(0, 0, 4, 3)], polygons=[[9, 7, 9, 5, 7, 7]])
    assert m.shape == (8, 10) and m[0, 0] and m[3, 4] and not m[5, 0] and m[7, 9]
    gray = np.zeros((8, 10), np.uint8)
    gray[:, 5:] = 200
    assert 0 < otsu(gray) < 200
    with pytest.raises(GRDNetError, match="empty"):
        make_roi((10, 8))


def test_roi_cli(tmp_path, capsys):
    ref = tmp_path / "ref.png"
    a = np.zeros((30, 40), np.uint8)
    a[5:25, 10:30] = 220
    Image.fromarray(a).save(ref)
    assert main(["roi", "--out", str(tmp_path / "roi.png"), "--from-image", str(ref)]) == 0
    out = json.loads(capsys.readouterr().out)
    mask = np.asarray(Image.open(tmp_path / "roi.png")) > 0
    assert mask.shape == (30, 40) and mask[5:25, 10:30].all() and mask.sum() == 400
    assert abs(out["coverage"] - 400 / 1200) < 1e-3 and (tmp_path / "roi_preview.png").is_file()
    assert main(["roi", "--out", str(tmp_path / "r2.png"), "--size", "20x10", "--rect", "0,0,4,4"]) == 0
    assert main(["roi", "--out", str(tmp_path / "r3.png"), "--rect", "0,0,4,4"]) == 2

