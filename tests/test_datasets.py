"""Real-world dataset quirks: mask naming, missing/orphan/empty masks, 16-bit, palette, RGBA."""
import logging

import numpy as np
import pytest
from PIL import Image

import grdnet
from conftest import write_dataset
from grdnet import data as gdata
from grdnet.data import load_mask, open_image, pil_to_array
from grdnet.errors import GRDNetError
from grdnet.evaluation import run_test
from grdnet.metrics import evaluate


def _img(size=(40, 48), seed=0):
    return (np.random.default_rng(seed).random(size + (3,)) * 200).astype(np.uint8)


def _mask(size=(40, 48)):
    m = np.zeros(size, np.uint8)
    m[10:20, 12:22] = 255
    return m


def _layout(root, defect="crack"):
    for sub in ("test/good", f"test/{defect}", f"ground_truth/{defect}"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(_img()).save(root / "test/good/000.png")
    return root


def test_mask_names_stem_mask_or_stem_any_extension(tmp_path):
    root = _layout(tmp_path / "d")
    Image.fromarray(_img(seed=1)).save(root / "test/crack/a.png")
    Image.fromarray(_img(seed=2)).save(root / "test/crack/b.jpg")
    Image.fromarray(_mask()).save(root / "ground_truth/crack/a_mask.png")
    Image.fromarray(_mask()).save(root / "ground_truth/crack/b.bmp")
    samples = {s.path.name: s for s in gdata.test_samples(root)}
    assert samples["a.png"].mask_path.name == "a_mask.png"
    assert samples["b.jpg"].mask_path.name == "b.bmp"
    assert samples["000.png"].mask_path is None and samples["000.png"].label == 0


def test_defective_image_without_mask_is_an_error_or_skipped_with_warning(tmp_path, caplog):
    root = _layout(tmp_path / "d")
    Image.fromarray(_img(seed=1)).save(root / "test/crack/a.png")
    Image.fromarray(_img(seed=2)).save(root / "test/crack/nomask.png")
    Image.fromarray(_mask()).save(root / "ground_truth/crack/a_mask.png")
    with pytest.raises(GRDNetError, match="nomask.png.*--allow-missing-masks"):
        gdata.test_samples(root)
    with caplog.at_level(logging.WARNING, logger="grdnet"):
        samples = gdata.test_samples(root, allow_missing_masks=True)
    s = next(s for s in samples if s.path.name == "nomask.png")
    assert s.mask_path is None and s.label == 1
    assert any("nomask.png" in r.getMessage() and "image metrics only" in r.getMessage() for r in caplog.records)


def test_missing_mask_cli_error_and_flag(trained_tiny, tmp_path, capsys):
    from grdnet.cli import main

    run, _ = trained_tiny
    data = write_dataset(tmp_path / "d", n_train=1)
    (data / "ground_truth/hole/001_mask.png").unlink()
    assert main(["test", str(run), str(data)]) == 2
    assert "001.png" in capsys.readouterr().err
    assert main(["test", str(run), str(data), "--allow-missing-masks", "--out", str(tmp_path / "r")]) == 0
    rows = (tmp_path / "r" / "images.csv").read_text().splitlines()
    assert len(rows) == 1 + 8  # the image without a mask still counts for image metrics


def test_mask_without_image_warns(tmp_path, caplog):
    root = _layout(tmp_path / "d")
    Image.fromarray(_img(seed=1)).save(root / "test/crack/a.png")
    Image.fromarray(_mask()).save(root / "ground_truth/crack/a_mask.png")
    Image.fromarray(_mask()).save(root / "ground_truth/crack/ghost_mask.png")
    with caplog.at_level(logging.WARNING, logger="grdnet"):
        samples = gdata.test_samples(root)
    assert len(samples) == 2
    assert any("without an image" in r.getMessage() and "ghost_mask.png" in r.getMessage() for r in caplog.records)


def test_empty_masks_are_defective_images_without_positive_pixels(trained_tiny, tmp_path):
    run, _ = trained_tiny
    data = write_dataset(tmp_path / "d", n_train=1)
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(data / "ground_truth/hole/000_mask.png")
    p = grdnet.load(run)
    r = run_test(p, data)
    assert r["n_defective"] == 4 and r["image_auroc"] is not None
    assert 0 <= r["pixel_auroc"] <= 1 and r["metrics"]["aupro"] is not None  # 3 masks still have regions

    for i in range(4):  # now no positive pixel anywhere: pixel metrics undefined, image ones not
        Image.fromarray(np.zeros((40, 48), np.uint8)).save(data / f"ground_truth/hole/{i:03d}_mask.png")
    r = run_test(p, data)
    assert r["image_auroc"] is not None
    assert r["pixel_auroc"] is None and r["metrics"]["aupro"] is None and r["metrics"]["pixel_ap"] is None
    assert r["binning"]["error_bounds"]["overall"]["pixel_auroc"] is None


def test_evaluate_empty_mask_counts_pixels_as_normal():
    m = np.linspace(0, 1, 20).reshape(4, 5)
    pos = np.zeros((4, 5), bool)
    pos[3, 4] = True
    records = [{"score": 0.9, "label": 1, "defect_type": "x", "map": m, "mask": pos},
               {"score": 0.8, "label": 1, "defect_type": "x", "map": m, "mask": np.zeros((4, 5), bool)},
               {"score": 0.1, "label": 0, "defect_type": "good", "map": m * 0}]
    r = evaluate(records, bins=None)["overall"]
    # one positive pixel (the top value) against 59 normal ones, one of which ties with it
    assert r["pixel_auroc"] == pytest.approx(1 - 0.5 / 59)


# --------------------------------------------------------------------------- image modes


def test_16bit_images_and_masks(tmp_path):
    ramp = (np.arange(40 * 48).reshape(40, 48) * 34).astype(np.uint16)  # up to 65246
    Image.fromarray(ramp).save(tmp_path / "img16.png")
    with Image.open(tmp_path / "img16.png") as im:
        assert im.mode.startswith("I")
    img = open_image(tmp_path / "img16.png")
    assert img.mode == "L"
    a = pil_to_array(img, 3)
    assert a.shape == (40, 48, 3) and a.dtype == np.uint8
    np.testing.assert_allclose(a[..., 0], np.clip(ramp / 65535 * 255 + 0.5, 0, 255).astype(np.uint8))

    m16 = _mask().astype(np.uint16) * 257  # 0 / 65535
    Image.fromarray(m16).save(tmp_path / "m16.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "m16.png"), _mask() > 0)
    Image.fromarray((_mask() > 0).astype(np.uint16)).save(tmp_path / "m01.png")  # 0 / 1 labels
    np.testing.assert_array_equal(load_mask(tmp_path / "m01.png"), _mask() > 0)


@pytest.mark.parametrize("bits", [10, 12, 14, 16])
def test_high_bit_depth_images_keep_their_contrast(tmp_path, bits):
    """A 12-bit camera's 16-bit PNGs (values up to 4095) are scaled by 4095, not 65535 (which
    left them nearly black); likewise 10, 14 and full 16-bit images by their own range."""
    from grdnet.data import load_image
    from grdnet.serve.uploads import Upload, decode_upload

    top = 2 ** bits - 1
    ramp = np.round(np.linspace(0, top, 64 * 64)).astype(np.uint16).reshape(64, 64)
    im = Image.fromarray(ramp)
    assert im.mode == "I;16"
    im.save(tmp_path / "ramp.png")
    expected = np.clip(ramp / top * 255 + 0.5, 0, 255).astype(np.uint8)

    a = pil_to_array(open_image(tmp_path / "ramp.png"), 1)[..., 0]  # training / prediction loader
    assert a.dtype == np.uint8 and a.min() == 0 and a.max() == 255
    np.testing.assert_array_equal(a, expected)
    mid = np.abs(ramp.astype(np.int64) - (top + 1) // 2).argmin()
    assert abs(int(a.flat[mid]) - 128) <= 1
    t = load_image(tmp_path / "ramp.png", 3, None)
    assert t.shape == (3, 64, 64)
    assert float(t.min()) == 0.0 and float(t.max()) == pytest.approx(1.0)
    assert float(t[0].flatten()[mid]) == pytest.approx(0.5, abs=0.01)
    served = decode_upload(Upload("ramp.png", (tmp_path / "ramp.png").read_bytes()), 10 ** 6)
    np.testing.assert_array_equal(np.asarray(served), expected)

    # A darker image from the same camera (maximum in the top half of its range) is scaled alike:
    # it stays darker, it is not stretched to its own maximum.
    dark = (ramp // 2 + 1).astype(np.uint16)
    Image.fromarray(dark).save(tmp_path / "dark.png")
    d = pil_to_array(open_image(tmp_path / "dark.png"), 1)[..., 0]
    np.testing.assert_array_equal(d, np.clip(dark / top * 255 + 0.5, 0, 255).astype(np.uint8))
    assert 126 <= d.max() <= 129


def test_float_images_in_unit_range_keep_their_contrast(tmp_path):
    ramp = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    Image.fromarray(ramp).save(tmp_path / "f.tif")
    a = pil_to_array(open_image(tmp_path / "f.tif"), 1)[..., 0]
    assert a.min() == 0 and a.max() == 255 and abs(int(a.flat[ramp.size // 2]) - 128) <= 1
    Image.fromarray(ramp * 255).save(tmp_path / "f255.tif")  # 0..255 floats: Pillow's conversion, as before
    with Image.open(tmp_path / "f255.tif") as im:
        np.testing.assert_array_equal(pil_to_array(open_image(tmp_path / "f255.tif"), 1), pil_to_array(im, 1))


def test_palette_images_and_masks(tmp_path):
    idx = np.zeros((40, 48), np.uint8)
    idx[:, 24:] = 1
    pal = Image.new("P", (48, 40))
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putdata(idx.ravel().tolist())
    pal.save(tmp_path / "pal.png")
    a = pil_to_array(open_image(tmp_path / "pal.png"), 3)
    assert tuple(a[0, 0]) == (10, 20, 30) and tuple(a[0, 47]) == (200, 100, 50)

    # A palette mask whose defect colour is dark red: the index, not the luminance, matters.
    mask = Image.new("P", (48, 40))
    mask.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)
    mask.putdata((_mask() > 0).astype(np.uint8).ravel().tolist())
    mask.save(tmp_path / "palmask.png")
    with Image.open(tmp_path / "palmask.png") as im:
        assert im.mode == "P"
    np.testing.assert_array_equal(load_mask(tmp_path / "palmask.png"), _mask() > 0)
    red = np.zeros((40, 48, 3), np.uint8)
    red[..., 0] = _mask()
    Image.fromarray(red).save(tmp_path / "redmask.png")  # an RGB mask drawn in pure red
    np.testing.assert_array_equal(load_mask(tmp_path / "redmask.png"), _mask() > 0)


def test_rgba_images_composite_on_black(tmp_path):
    rgba = np.zeros((40, 48, 4), np.uint8)
    rgba[..., :3] = (200, 150, 100)
    rgba[:, :24, 3] = 255  # left half opaque, right half transparent
    Image.fromarray(rgba).save(tmp_path / "a.png")
    a = pil_to_array(open_image(tmp_path / "a.png"), 3)
    assert tuple(a[0, 0]) == (200, 150, 100) and tuple(a[0, 47]) == (0, 0, 0)
    g = pil_to_array(open_image(tmp_path / "a.png"), 1)
    assert g.shape == (40, 48, 1) and g[0, 47, 0] == 0 and g[0, 0, 0] > 0


def test_mixed_formats_evaluate_end_to_end(trained_tiny, tmp_path):
    """A test split of 16-bit, palette, RGBA and JPEG images with 16-bit and palette masks."""
    run, _ = trained_tiny
    root = _layout(tmp_path / "d")
    Image.fromarray((_img(seed=3)[..., 0].astype(np.uint16) * 257)).save(root / "test/good/g16.png")
    Image.fromarray(_img(seed=4)).convert("P").save(root / "test/good/gpal.png")
    rgba = np.concatenate([_img(seed=5), np.full((40, 48, 1), 255, np.uint8)], axis=2)
    Image.fromarray(rgba).save(root / "test/crack/c_rgba.png")
    Image.fromarray(_img(seed=6)).save(root / "test/crack/c_jpg.jpg")
    Image.fromarray(_mask().astype(np.uint16) * 257).save(root / "ground_truth/crack/c_rgba_mask.png")
    Image.fromarray(_mask()).convert("P").save(root / "ground_truth/crack/c_jpg_mask.png")
    r = run_test(grdnet.load(run), root)
    assert r["n_images"] == 5 and r["n_defective"] == 2
    assert r["pixel_auroc"] is not None and r["image_auroc"] is not None
