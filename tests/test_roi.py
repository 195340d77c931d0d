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
from grdnet.model import GRDNet
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
    p = grdnet.Predictor(GRDNet(m), m, 0.5)
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



def _part_on_belt(rng, size=32):
    """A bright part (the ROI) at a jittered place on a dark background."""
    img = 0.25 + 0.03 * rng.standard_normal((size, size))
    y0, x0 = rng.integers(2, 8, size=2)
    h, w = 16 + rng.integers(0, 6, size=2)
    roi = np.zeros((size, size), bool)
    roi[y0:y0 + h, x0:x0 + w] = True
    img[roi] = 0.7 + 0.03 * rng.standard_normal(roi.sum())
    return img, roi


def _u8(a):
    return (np.clip(a, 0, 1) * 255).astype(np.uint8)


def test_target_mode_learns_to_ignore_defects_outside_the_roi(tmp_path):
    """The paper's claim at test scale: trained with ROI masks (`target`), the segmenter stays
    silent on a defect outside the part and still answers inside it; trained without ROI masks it
    answers on both. No ROI is given at inference. (Measured over several seeds when this test
    was written: outside response target/none 0.54-0.60, target inside/outside >= 2. Since the
    schedule steps per round of >= 40 batches, 50 epochs left seed 1 at 0.80: 100 epochs.)"""
    rng = np.random.default_rng(0)
    data = tmp_path / "d"
    for d in ("train/good", "roi/train/good"):
        (data / d).mkdir(parents=True)
    for i in range(192):
        img, roi = _part_on_belt(rng)
        Image.fromarray(_u8(img)).save(data / "train/good" / f"{i:03d}.png")
        Image.fromarray(_u8(roi.astype(float))).save(data / "roi/train/good" / f"{i:03d}.png")
    probes = []  # (image, defect mask, defect lies outside the part)
    for i in range(16):
        img, roi = _part_on_belt(rng)
        where = ~roi if i % 2 == 0 else roi
        ys, xs = np.nonzero(where)
        k = rng.integers(len(ys))
        y, x = min(ys[k], 27), min(xs[k], 27)
        defect = np.zeros_like(roi)
        defect[y:y + 4, x:x + 4] = True
        defect &= where
        img[defect] = rng.uniform(0, 1, defect.sum())
        probes.append((_u8(img), defect, i % 2 == 0))

    def responses(model):
        maps = model.predict([p[0] for p in probes])
        outside = np.mean([r.anomaly_map[p[1]].mean() for r, p in zip(maps, probes) if p[2]])
        inside = np.mean([r.anomaly_map[p[1]].mean() for r, p in zip(maps, probes) if not p[2]])
        return outside, inside

    common = dict(preset="tiny", epochs=100, progress=False, train={"batch_size": 32, "lr": 1e-3, "seed": 1})
    t_out, t_in = responses(grdnet.load(grdnet.train(data, tmp_path / "target", roi=data / "roi", **common)))
    n_out, n_in = responses(grdnet.load(grdnet.train(data, tmp_path / "none", **common)))
    assert t_out < 0.75 * n_out, (t_out, n_out)
    assert t_in > 1.5 * t_out, (t_in, t_out)
    assert n_out > 0.5 * n_in, (n_out, n_in)  # without ROI masks, outside defects are detected too
