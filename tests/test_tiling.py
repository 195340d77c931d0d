"""Tiled inference for images larger than the model, and training on native-resolution crops.

The stitching is tested with stub networks whose map is a known function of the input, so that
what is checked is the tiling itself, not a trained model."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from PIL import Image
from torch import nn

import grdnet.scoring as scoring
from grdnet.config import build_config
from grdnet.data import ImageDataset, resize_to
from grdnet.scoring import Predictor, image_scores, tile_starts

CFG = build_config("tiny")[0]  # 32 px, max_pool score with a 5x5 box


class Gray(nn.Module):
    """Map = the pixel's grey level: a pointwise function, so tiles must reproduce it exactly."""

    def forward(self, x):
        return x.mean(1, keepdim=True)


class Constant(nn.Module):
    def forward(self, x):
        return torch.full_like(x[:, :1], 0.3)


class ZeroPadBlur(nn.Module):
    """7x7 box filter with zero padding: wrong within 3 px of every tile edge, like a real
    convolutional network near its borders. Badly stitched, these errors show as seams."""

    def forward(self, x):
        return F.avg_pool2d(x.mean(1, keepdim=True), 7, 1, 3, count_include_pad=True)


class Darkness(nn.Module):
    """Anomaly = how much darker than mid-grey a pixel is."""

    def forward(self, x):
        return ((0.5 - x.mean(1, keepdim=True)) * 2).clamp(0, 1)


def _seams(m: np.ndarray) -> tuple[float, float]:
    """On a uniform 0.5 image, away from the image border: (max deviation, max neighbour jump)."""
    inner = m[3:-3, 3:-3]
    jump = max(np.abs(np.diff(inner, axis=0)).max(), np.abs(np.diff(inner, axis=1)).max())
    return float(np.abs(inner - 0.5).max()), float(jump)


@given(length=st.integers(1, 600), size=st.sampled_from([16, 32, 128]), overlap=st.sampled_from([0.0, 0.25, 0.5]))
@settings(max_examples=200, deadline=None)
def test_tile_starts_cover_with_overlap(length, size, overlap):
    starts = tile_starts(length, size, overlap)
    assert starts[0] == 0 and starts == sorted(set(starts))
    if length <= size:
        assert starts == [0]
        return
    assert starts[-1] == length - size  # last tile flush with the end: every pixel covered
    gaps = np.diff(starts)
    assert gaps.max() <= size * (1 - overlap) + 1e-9  # neighbours share at least `overlap`
    assert len(starts) == 1 + int(np.ceil((length - size) / (size * (1 - overlap))))  # and no more tiles


def test_pointwise_map_is_reproduced_exactly():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (150, 170, 3), dtype=np.uint8)
    pred = Predictor(Gray(), CFG).predict(img, tile=True)
    expected = img.astype(np.float32).mean(2) / 255.0
    assert pred.anomaly_map.shape == (150, 170)
    np.testing.assert_allclose(pred.anomaly_map, expected, atol=1e-5)
    # The score rule is applied to the stitched map at native scale (5x5 box in model pixels).
    ref = float(image_scores(torch.from_numpy(expected)[None, None], CFG)[0])
    assert pred.score == pytest.approx(ref, abs=1e-5)


def test_constant_model_gives_constant_map():
    img = np.random.default_rng(1).integers(0, 256, (97, 131), dtype=np.uint8)  # grayscale, odd sizes
    m = Predictor(Constant(), CFG).predict(img, tile=True).anomaly_map
    assert m.shape == (97, 131)
    np.testing.assert_allclose(m, 0.3, atol=1e-6)


def test_blending_hides_tile_border_errors(monkeypatch):
    img = np.full((150, 170, 3), 0.5, np.float32)
    predictor = Predictor(ZeroPadBlur(), CFG)
    dev, jump = _seams(predictor.predict(img, tile=True).anomaly_map)
    assert dev < 0.05 and jump < 0.03, (dev, jump)
    # Control: plain averaging of the tiles (uniform weights) shows the seams this test catches.
    monkeypatch.setattr(scoring, "blend_window", lambda s: torch.ones(s, s))
    dev_u, jump_u = _seams(predictor.predict(img, tile=True).anomaly_map)
    assert dev_u > 0.1 and jump_u > 0.05, (dev_u, jump_u)


def test_defect_on_a_tile_border_is_found():
    h, w = 150, 170
    img = np.full((h, w, 3), 128, np.uint8)
    starts = tile_starts(w, CFG.image_size, 0.25)
    edge = starts[2] + CFG.image_size  # right edge of the third tile column: a seam
    img[70:77, edge - 3:edge + 3] = 0  # a 7x6 px dark defect straddling it
    predictor = Predictor(Darkness(), CFG, threshold=0.5)
    tiled = predictor.predict(img, tile=True)
    assert tiled.is_anomalous and tiled.score > 0.7
    peak = np.unravel_index(tiled.anomaly_map.argmax(), tiled.anomaly_map.shape)
    assert 70 <= peak[0] < 77 and edge - 3 <= peak[1] < edge + 3
    assert tiled.anomaly_map[70:77, edge - 3:edge + 3].min() > 0.95  # the defect's full strength
    assert tiled.anomaly_map[:60].max() < 1e-6  # and nothing elsewhere
    # Without tiles the image is shrunk to 32 px and the small defect fades below the threshold.
    whole = predictor.predict(img, tile=False)
    assert not whole.is_anomalous and whole.score < tiled.score
    good = predictor.predict(np.full((h, w, 3), 128, np.uint8), tile=True)
    assert not good.is_anomalous


def test_tiling_long_thin_image_small_images_and_roi():
    predictor = Predictor(Gray(), CFG)
    rng = np.random.default_rng(2)
    thin = rng.integers(0, 256, (20, 300), dtype=np.uint8)  # shorter than a tile: padded, then cropped back
    small = rng.integers(0, 256, (24, 30), dtype=np.uint8)  # smaller than the model: the usual path
    roi = np.zeros((20, 300), bool)
    roi[:, 100:200] = True
    a, b = predictor.predict([thin, small], tile=True)
    np.testing.assert_allclose(a.anomaly_map, thin / 255.0, atol=1e-5)
    assert b.anomaly_map.shape == (24, 30)
    assert b.score == pytest.approx(predictor.predict(small, tile=False).score)
    r = predictor.predict(thin, tile=True, roi=roi)
    assert r.anomaly_map[:, :100].max() == 0 and np.allclose(r.anomaly_map[:, 100:200], thin[:, 100:200] / 255, atol=1e-5)


def test_tiles_are_batched(monkeypatch):
    predictor = Predictor(Gray(), CFG)
    sizes = []
    run = predictor._run
    monkeypatch.setattr(predictor, "_run", lambda b: (sizes.append(len(b)), run(b))[1])
    predictor.predict(np.zeros((100, 100), np.uint8), tile=True, batch_size=5)
    assert sum(sizes) == len(tile_starts(100, 32, 0.25)) ** 2 and max(sizes) == 5


def _write(path, a):
    Image.fromarray(a).save(path)
    return path


def test_crop_dataset_keeps_native_resolution(tmp_path):
    rng = np.random.default_rng(3)
    big = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    small = rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)
    roi = np.zeros((90, 120), np.uint8)
    roi[:, :60] = 255
    paths = [_write(tmp_path / "big.png", big), _write(tmp_path / "small.png", small)]
    ds = ImageDataset(paths, 3, 32, rois=[_write(tmp_path / "roi.png", roi), None], crop=True)
    torch.manual_seed(0)
    for _ in range(20):
        item = ds[0]
        assert item.shape == (4, 32, 32)
        crop = (item[:3] * 255).round().byte().permute(1, 2, 0).numpy()
        # The crop is a window of the original pixels (no resampling), and its ROI moves with it.
        hits = [(y, x) for y in range(90 - 31) for x in range(120 - 31)
                if (big[y, x] == crop[0, 0]).all() and (big[y:y + 32, x:x + 32] == crop).all()]
        assert hits
        y, x = hits[0]
        np.testing.assert_array_equal(item[3].numpy(), roi[y:y + 32, x:x + 32] / 255)
    s = ds[1]  # 20 x 40 padded to 32 x 40, then cropped
    assert s.shape == (4, 32, 32) and s[3].min() == 1
    whole = ImageDataset(paths, 3, 32)
    assert whole[0].shape == (4, 32, 32)


def test_training_on_crops_gives_a_tiling_model(tmp_path):
    import grdnet
    from conftest import write_dataset

    data = write_dataset(tmp_path / "data", n_train=6, n_good=1, n_bad=1, size=(48, 64))
    model = grdnet.train(data, tmp_path / "run", preset="tiny", epochs=1, progress=False,
                         train={"train_crops": True})
    predictor = grdnet.load(model)
    assert predictor.tile  # trained on crops -> tiled inference by default
    assert not grdnet.load(model, tile=False).tile
    assert predictor.predict(data / "test" / "hole" / "000.png").anomaly_map.shape == (48, 64)
    both = grdnet.train(data, tmp_path / "both", preset="tiny", steps=2, progress=False,
                        train={"train_crops": "both"})
    assert grdnet.load(both).tile == "both"


def test_auto_crops_follow_the_image_to_model_size_ratio(tmp_path):
    import grdnet
    from conftest import write_dataset
    from grdnet.data import CROP_FACTOR, choose_crops

    paths = [_write(tmp_path / f"{i}.png", np.zeros((h, 200), np.uint8)) for i, h in enumerate((60, 95, 100))]
    assert not choose_crops(paths, 32)[0]  # median shorter side 95 < 3 x 32
    crops, line = choose_crops(paths, 31)
    assert crops and "95 px" in line and f"{CROP_FACTOR:g} times" in line
    small = write_dataset(tmp_path / "small", n_train=6, n_good=1, n_bad=1, size=(48, 64))
    large = write_dataset(tmp_path / "large", n_train=6, n_good=1, n_bad=1, size=(100, 120))
    for data, tiled in ((small, False), (large, True)):
        model = grdnet.train(data, tmp_path / f"run-{tiled}", preset="tiny", steps=2, progress=False,
                             train={"train_crops": "auto"})
        assert grdnet.load(model).tile is tiled  # the choice is recorded in the model, not "auto"
    with pytest.raises(ValueError, match="resolve"):
        ImageDataset(paths, 1, 32, crop="auto")


def test_both_views_dataset_mixes_whole_images_and_native_crops(tmp_path):
    rng = np.random.default_rng(4)
    big = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    path = _write(tmp_path / "big.png", big)
    ds = ImageDataset([path], 3, 32, crop="both")
    whole = ImageDataset([path], 3, 32)[0]
    torch.manual_seed(0)
    kinds = []
    for _ in range(40):
        item = ds[0]
        assert item.shape == (4, 32, 32) and item[3].min() == 1
        if torch.allclose(item, whole, atol=1 / 255):
            kinds.append("whole")
        else:  # otherwise a window of the original pixels
            crop = (item[:3] * 255).round().byte().permute(1, 2, 0).numpy()
            assert any((big[y:y + 32, x:x + 32] == crop).all() for y in range(59) for x in range(89))
            kinds.append("crop")
    assert 10 <= kinds.count("whole") <= 30
    from grdnet.errors import GRDNetError

    with pytest.raises(GRDNetError, match='train_crops must be false, true, "both" or "auto"'):
        build_config("tiny", train={"train_crops": "yes"})


def test_both_views_score_an_image_whole_and_as_tiles(monkeypatch):
    img = np.full((100, 100), 128, np.uint8)
    img[10:13, 10:13] = 255  # 3 px: tiles see it at full strength, the whole image resized barely
    predictor = Predictor(Gray(), CFG, tile="both")
    seen = []
    run = predictor._run
    monkeypatch.setattr(predictor, "_run", lambda b: (seen.append(len(b)), run(b))[1])
    pred = predictor.predict(img)
    assert sum(seen) == 1 + len(tile_starts(100, 32, 0.25)) ** 2  # one whole pass, then the tiles
    tiled = Predictor(Gray(), CFG, tile=True).predict(img)
    whole = Predictor(Gray(), CFG).predict(img)
    assert pred.score == pytest.approx(max(tiled.score, whole.score))
    np.testing.assert_allclose(pred.anomaly_map, np.maximum(tiled.anomaly_map, whole.anomaly_map))
    assert tiled.score > whole.score
    assert len(Predictor(Gray(), CFG, tile="both").predict(np.zeros((32, 32), np.uint8)).anomaly_map) == 32
    assert scoring.image_views(CFG, (20, 20), "both") == ("squeeze",)  # not larger than the model


def test_roi_of_the_wrong_size_is_a_clear_error():
    from grdnet.errors import GRDNetError

    with pytest.raises(GRDNetError, match="ROI is 10x20 but the image is 170x150"):
        Predictor(Gray(), CFG).predict(np.zeros((150, 170), np.uint8), tile=True, roi=np.ones((20, 10), bool))


KEEP = dataclasses.replace(CFG, aspect="keep")


def test_keep_aspect_tiles_the_image_scaled_alike_both_ways(monkeypatch):
    img = np.tile(np.linspace(100, 255, 150, dtype=np.float32), (60, 1)).astype(np.uint8)  # 60 x 150
    img[20:40, 60:80] = 0  # a square, which must stay square in the tiles
    predictor = Predictor(Gray(), KEEP)
    seen = []
    run = predictor._run
    monkeypatch.setattr(predictor, "_run", lambda b: (seen.append(b.clone()), run(b))[1])
    pred = predictor.predict(img)  # no tile flag needed: an aspect "keep" model always tiles
    scaled = resize_to(torch.from_numpy(img / 255.0).float()[None], (32, 80))  # shorter side 60 -> 32
    tiles = torch.cat(seen)
    assert tiles.shape == (len(tile_starts(80, 32, 0.25)), 3, 32, 32)  # grey repeated to the model's RGB
    for t, x in zip(tiles, tile_starts(80, 32, 0.25)):
        torch.testing.assert_close(t, scaled[:, :, x:x + 32].expand(3, -1, -1))
    dark = (scaled[0] < 0.02).nonzero()
    height, width = (dark.max(0).values - dark.min(0).values + 1).tolist()
    assert abs(height - width) <= 1  # squeezed into 32 x 32, the square would be 2.5x taller than wide
    # The score rule runs on the blended map at the scaled size, whose box is in model pixels.
    assert pred.score == pytest.approx(float(image_scores(scaled[None], KEEP)[0]), abs=1e-5)
    assert pred.anomaly_map.shape == (60, 150)
    np.testing.assert_allclose(pred.anomaly_map[:, 100:], img[:, 100:] / 255.0, atol=0.03)


def test_keep_aspect_roi_and_square_images():
    predictor = Predictor(Gray(), KEEP)
    img = np.full((50, 100), 200, np.uint8)
    roi = np.zeros((50, 100), bool)
    roi[:, 50:] = True
    r = predictor.predict(img, roi=roi)
    assert r.anomaly_map[:, :50].max() == 0 and r.anomaly_map[:, 52:].min() > 0.75
    square = np.random.default_rng(4).integers(0, 256, (32, 32), dtype=np.uint8)
    assert predictor.predict(square).score == pytest.approx(Predictor(Gray(), CFG).predict(square).score)


def test_keep_aspect_dataset_and_config(tmp_path):
    from grdnet.errors import GRDNetError

    rng = np.random.default_rng(5)
    paths = [_write(tmp_path / "wide.png", rng.integers(0, 256, (40, 100, 3), dtype=np.uint8)),
             _write(tmp_path / "tall.png", rng.integers(0, 256, (120, 48, 3), dtype=np.uint8))]
    ds = ImageDataset(paths, 3, 32, keep_aspect=True)
    assert [tuple(c.shape) for c in ds.cache] == [(4, 32, 80), (4, 80, 32)]
    assert ds[0].shape == ds[1].shape == (4, 32, 32)
    with pytest.raises(GRDNetError, match="aspect must be"):
        build_config("tiny", model={"aspect": "crop"})


def test_training_with_aspect_keep_gives_a_tiling_model(tmp_path):
    import grdnet
    from conftest import write_dataset

    data = write_dataset(tmp_path / "data", n_train=6, n_good=1, n_bad=1, size=(48, 96))
    model = grdnet.train(data, tmp_path / "run", preset="tiny", epochs=1, progress=False,
                         model={"aspect": "keep"})
    predictor = grdnet.load(model)
    assert predictor.cfg.aspect == "keep"
    assert predictor.predict(data / "test" / "hole" / "000.png").anomaly_map.shape == (48, 96)


def test_aspect_both_is_the_max_of_the_squeezed_and_aspect_kept_views():
    h, w = 40, 200
    img = np.full((h, w), 128, np.uint8)
    img[5:35, 100:102] = 0  # a thin dark crack: squeezed to 32 x 32 its width shrinks 5x more than its length
    squeeze, keep = Predictor(Darkness(), CFG), Predictor(Darkness(), KEEP)
    both = Predictor(Darkness(), dataclasses.replace(CFG, aspect="both"))
    s, k, b = squeeze.predict(img), keep.predict(img), both.predict(img)
    assert k.score > 2 * s.score  # the aspect-kept view scales it by 0.8 both ways, not 0.16 across
    assert b.score == pytest.approx(max(s.score, k.score))
    np.testing.assert_allclose(b.anomaly_map, np.maximum(s.anomaly_map, k.anomaly_map), atol=1e-6)
    square = np.random.default_rng(6).integers(0, 256, (50, 50), dtype=np.uint8)  # one view only
    assert both.predict(square).score == squeeze.predict(square).score
