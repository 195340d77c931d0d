"""Procedural demo datasets: layout, masks, determinism, and that the masks mark exactly what changed."""
import csv

import numpy as np
import pytest
from PIL import Image

from grdnet.demo_data import (
    CHANGE_THRESHOLD,
    DEFECT_TYPES,
    LEVELS,
    make_roi_dataset,
    make_surface_dataset,
    roi_sample,
    surface_sample,
)
from grdnet.errors import GRDNetError

SIZE = 64


def _pngs(folder):
    return sorted(folder.glob("*.png"))


def _load(path):
    return np.asarray(Image.open(path))


def _all_arrays(root):
    return {p.relative_to(root).as_posix(): _load(p) for p in sorted(root.rglob("*.png"))}


def _check_changed_exactly(smp):
    diff = np.abs(smp.image.astype(np.int16) - smp.clean.astype(np.int16))
    if diff.ndim == 3:
        diff = diff.max(axis=2)
    m = smp.mask > 0
    assert set(np.unique(smp.mask)) <= {0, 255}
    assert m.any(), "empty mask"
    assert (diff[~m] == 0).all(), "pixels outside the mask changed"
    assert (diff[m] >= CHANGE_THRESHOLD).all(), "pixels inside the mask did not change noticeably"
    assert diff.max() >= 16, "defect too faint to see"


@pytest.fixture(scope="module")
def surface_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("surface") / "metal"
    return make_surface_dataset(root, n_train=5, n_test_good=3, n_test_defect=8, size=SIZE, seed=3)


@pytest.fixture(scope="module")
def roi_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("roi") / "plates"
    return make_roi_dataset(root, n_train=4, n_test_good=3, n_test_defect=16, size=SIZE, seed=5)


# ---- surface dataset


def test_surface_layout_and_counts(surface_root):
    root = surface_root
    assert len(_pngs(root / "train" / "good")) == 5
    assert len(_pngs(root / "test" / "good")) == 3
    for kind in DEFECT_TYPES:
        imgs = _pngs(root / "test" / kind)
        masks = _pngs(root / "ground_truth" / kind)
        assert len(imgs) == 2
        assert [p.stem + "_mask" for p in imgs] == [m.stem for m in masks]
    assert sorted(p.name for p in (root / "test").iterdir()) == sorted(["good", *DEFECT_TYPES])


def test_surface_images_and_masks(surface_root):
    root = surface_root
    for p in root.rglob("*.png"):
        img = Image.open(p)
        assert img.size == (SIZE, SIZE)
        assert img.mode == ("L" if "ground_truth" in p.parts else "RGB")
    for kind in DEFECT_TYPES:
        for img_path in _pngs(root / "test" / kind):
            mask = _load(root / "ground_truth" / kind / f"{img_path.stem}_mask.png")
            assert mask.shape == _load(img_path).shape[:2]
            assert mask.dtype == np.uint8
            assert set(np.unique(mask)) <= {0, 255}
            assert (mask > 0).sum() >= 5


def test_good_images_differ_but_look_alike(surface_root):
    imgs = [_load(p).astype(float) for p in _pngs(surface_root / "train" / "good")]
    for a, b in zip(imgs, imgs[1:]):
        assert not np.array_equal(a, b)
        assert abs(a.mean() - b.mean()) < 40  # one product family, not unrelated pictures
    assert all(np.ptp(a.reshape(-1, 3).mean(0)) > 1 for a in imgs)  # tinted: really RGB


def test_surface_deterministic(tmp_path, surface_root):
    again = make_surface_dataset(tmp_path / "again", n_train=5, n_test_good=3, n_test_defect=8, size=SIZE, seed=3)
    a, b = _all_arrays(surface_root), _all_arrays(again)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    other = make_surface_dataset(tmp_path / "other", n_train=1, n_test_good=0, n_test_defect=0, size=SIZE, seed=4)
    assert not np.array_equal(_load(other / "train/good/000.png"), a["train/good/000.png"])


def test_surface_grayscale(tmp_path):
    root = make_surface_dataset(tmp_path / "gray", n_train=2, n_test_good=1, n_test_defect=4, size=SIZE,
                                channels=1)
    for p in root.rglob("*.png"):
        assert Image.open(p).mode == "L"
    for kind in DEFECT_TYPES:
        (img_path,) = _pngs(root / "test" / kind)
        assert _load(root / "ground_truth" / kind / "000_mask.png").shape == _load(img_path).shape


@pytest.mark.parametrize("kind", DEFECT_TYPES)
@pytest.mark.parametrize("channels", [1, 3])
def test_surface_sample_changes_exactly_the_mask(kind, channels):
    for seed in range(6):
        smp = surface_sample(seed, size=SIZE if seed % 2 else 128, channels=channels, defect_type=kind)
        assert smp.defect_type == kind and smp.level in LEVELS
        assert smp.image.shape == smp.clean.shape == ((smp.mask.shape) if channels == 1 else (*smp.mask.shape, 3))
        _check_changed_exactly(smp)


@pytest.mark.parametrize("level", LEVELS)
def test_every_level_is_visible(level):
    for kind in DEFECT_TYPES:
        _check_changed_exactly(surface_sample(11, size=128, defect_type=kind, level=level))


def test_about_a_third_are_hard():
    levels = [surface_sample(i, size=SIZE, defect_type=DEFECT_TYPES[i % 4]).level for i in range(60)]
    hard = sum(lv != "normal" for lv in levels)
    assert 8 <= hard <= 32


def test_clean_sample_has_no_defect():
    smp = surface_sample(1, size=SIZE)
    assert np.array_equal(smp.clean, smp.image)
    assert not smp.mask.any() and smp.defect_type is None
    # the clean image is the same whatever defect is drawn on it
    assert np.array_equal(surface_sample(1, size=SIZE, defect_type="stain").clean, smp.clean)


def test_bad_arguments(tmp_path):
    with pytest.raises(GRDNetError):
        surface_sample(0, size=SIZE, defect_type="hole")
    with pytest.raises(GRDNetError):
        surface_sample(0, size=SIZE, channels=2)
    with pytest.raises(GRDNetError):
        make_surface_dataset(tmp_path / "x", n_train=-1)
    with pytest.raises(GRDNetError):
        roi_sample(0, size=SIZE, defect_type="dent", location="nowhere")


def test_existing_dataset_is_refused_unless_overwrite(tmp_path):
    root = make_surface_dataset(tmp_path / "d", n_train=3, n_test_good=1, n_test_defect=0, size=SIZE)
    with pytest.raises(GRDNetError):
        make_surface_dataset(root, n_train=1, n_test_good=1, n_test_defect=0, size=SIZE)
    make_surface_dataset(root, n_train=1, n_test_good=1, n_test_defect=0, size=SIZE, overwrite=True)
    assert len(_pngs(root / "train" / "good")) == 1  # no stale images left behind


# ---- ROI dataset


def _manifest(root):
    with open(root / "test_manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_roi_layout_and_manifest(roi_root):
    root = roi_root
    rows = _manifest(root)
    assert len(rows) == 3 + 16
    listed = {r["path"] for r in rows}
    on_disk = {p.relative_to(root).as_posix() for p in (root / "test").rglob("*.png")}
    assert listed == on_disk
    assert len(_pngs(root / "train" / "good")) == 4
    inside = [r for r in rows if r["location"] == "inside"]
    outside = [r for r in rows if r["location"] == "outside"]
    good = [r for r in rows if r["location"] == "none"]
    assert len(inside) == len(outside) == 8 and len(good) == 3
    assert {r["defect_type"] for r in inside} == {r["defect_type"] for r in outside} == set(DEFECT_TYPES)
    for r in inside:
        assert r["label"] == "defect" and r["path"].startswith(f"test/{r['defect_type']}/")
        assert r["mask"] == f"ground_truth/{r['defect_type']}/{r['path'].split('/')[-1][:-4]}_mask.png"
    for r in outside + good:
        assert r["label"] == "good" and r["path"].startswith("test/good/") and r["mask"] == ""
    assert len(_pngs(root / "test" / "good")) == 3 + 8
    masks = {p.relative_to(root).as_posix() for p in (root / "ground_truth").rglob("*.png")}
    assert masks == {r["mask"] for r in inside}


def test_roi_masks_for_every_image(roi_root):
    root = roi_root
    for img_path in list((root / "train").rglob("*.png")) + list((root / "test").rglob("*.png")):
        roi_path = root / "roi" / img_path.relative_to(root)
        assert roi_path.exists(), roi_path
        roi = _load(roi_path)
        assert roi.shape == _load(img_path).shape[:2]
        assert set(np.unique(roi)) == {0, 255}
        frac = (roi > 0).mean()
        assert 0.15 < frac < 0.5  # a plate, with background around it
    n_roi = len(list((root / "roi").rglob("*.png")))
    assert n_roi == len(list((root / "train").rglob("*.png"))) + len(list((root / "test").rglob("*.png")))


def test_roi_inside_defects_lie_within_roi(roi_root):
    root = roi_root
    for r in _manifest(root):
        if r["location"] != "inside":
            continue
        mask = _load(root / r["mask"]) > 0
        roi = _load(root / "roi" / r["path"]) > 0
        assert mask.any() and not (mask & ~roi).any()


def test_roi_deterministic(tmp_path, roi_root):
    again = make_roi_dataset(tmp_path / "again", n_train=4, n_test_good=3, n_test_defect=16, size=SIZE, seed=5)
    a, b = _all_arrays(roi_root), _all_arrays(again)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert (roi_root / "test_manifest.csv").read_bytes() == (again / "test_manifest.csv").read_bytes()


def test_roi_plate_moves_between_images(roi_root):
    rois = [_load(p) > 0 for p in _pngs(roi_root / "roi" / "train" / "good")]
    centres = [np.argwhere(r).mean(axis=0) for r in rois]
    assert max(np.abs(c - centres[0]).max() for c in centres) > 0.5


@pytest.mark.parametrize("kind", DEFECT_TYPES)
@pytest.mark.parametrize("location", ["inside", "outside"])
def test_roi_sample_defect_placement(kind, location):
    for seed in range(4):
        smp = roi_sample(seed, size=SIZE if seed % 2 else 128, defect_type=kind, location=location)
        assert smp.location == location
        _check_changed_exactly(smp)
        mask, roi = smp.mask > 0, smp.roi > 0
        if location == "inside":
            assert not (mask & ~roi).any()
        else:
            assert not (mask & roi).any()
            assert np.array_equal(smp.image[roi], smp.clean[roi])  # the plate is untouched


def test_roi_grayscale(tmp_path):
    root = make_roi_dataset(tmp_path / "g", n_train=1, n_test_good=1, n_test_defect=2, size=SIZE, channels=1)
    for p in (root / "train").rglob("*.png"):
        assert Image.open(p).mode == "L"
    for p in (root / "test").rglob("*.png"):
        assert Image.open(p).mode == "L"


def test_roi_training_background_has_debris():
    """Harmless debris (bright crumbs, lint, dust) lies on the belt in most good images."""
    from scipy import ndimage

    with_debris = 0
    for seed in range(8):
        smp = roi_sample(seed, size=128)
        assert not smp.mask.any()
        belt = ~ndimage.binary_dilation(smp.roi > 0, iterations=4)
        lum = smp.image.astype(float).mean(axis=2)[belt]
        with_debris += (lum.max() - np.median(lum)) > 50
    assert with_debris >= 4
