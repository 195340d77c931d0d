import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from grdnet.metrics import PixelMetrics, evaluate, image_metrics, threshold_metrics


def _random_pixels(rng, n_maps=6, shape=(24, 20), decimals=2, with_roi=True):
    """Random maps (rounded so that many values tie), blob-ish masks and ROIs."""
    data = []
    for _ in range(n_maps):
        mask = rng.random(shape) < 0.15
        values = np.where(mask, rng.random(shape) * 0.6 + 0.4, rng.random(shape) * 0.7)
        roi = rng.random(shape) < 0.8 if with_roi else None
        data.append((np.round(values, decimals), mask, roi))
    return data


def _feed(data, bins, fpr_limit=0.3):
    pm = PixelMetrics(bins=bins, fpr_limit=fpr_limit)
    for values, mask, roi in data:
        pm.update(values, mask, roi)
    return pm


# --------------------------------------------------------------------------- image level


def test_image_metrics_match_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(5):
        labels = rng.integers(0, 2, 200)
        scores = rng.integers(0, 15, 200) / 7.0 + labels * rng.random() * 2  # many ties
        result = image_metrics(scores, labels)
        assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
        assert result["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-6)


def test_image_metrics_single_class_gives_none():
    result = image_metrics([0.1, 0.5, 0.3], [0, 0, 0])
    assert result["image_auroc"] is None and result["image_ap"] is None
    assert result["image_f1_max"] is None and result["image_f1_threshold"] is None
    result = image_metrics([0.1, 0.5, 0.3], [1, 1, 1])
    assert result["image_auroc"] is None and result["image_ap"] is None
    assert result["image_f1_max"] == 1.0 and result["image_f1_threshold"] == 0.1


def test_f1_max_small_example():
    # Descending: 0.9(+) 0.8(-) 0.7(+) 0.6(+) 0.5(-), P = 3, F1 = 2TP / (TP + FP + P):
    # t=0.9: 2/4 = .5   t=0.8: 2/5 = .4   t=0.7: 4/6   t=0.6: 6/7 (max)   t=0.5: 6/8
    result = image_metrics([0.5, 0.9, 0.7, 0.8, 0.6], [0, 1, 1, 0, 1])
    assert result["image_f1_max"] == pytest.approx(6 / 7)
    assert result["image_f1_threshold"] == 0.6
    # The threshold really reaches F1-max with the same >= rule.
    at = threshold_metrics([0.5, 0.9, 0.7, 0.8, 0.6], [0, 1, 1, 0, 1], result["image_f1_threshold"])
    assert at["f1"] == pytest.approx(6 / 7)


def test_threshold_metrics_small_example():
    # score >= 0.35 -> predicted [F, T, T, T] against labels [0, 0, 1, 1]
    result = threshold_metrics([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.35)
    assert (result["tp"], result["fp"], result["tn"], result["fn"]) == (2, 1, 1, 0)
    assert result["precision"] == pytest.approx(2 / 3)
    assert result["recall"] == 1.0
    assert result["f1"] == pytest.approx(0.8)
    assert result["threshold"] == 0.35
    nothing = threshold_metrics([0.1, 0.2], [0, 1], 0.9)
    assert nothing["precision"] == 0.0 and nothing["f1"] == 0.0 and nothing["fn"] == 1


def test_labels_are_validated():
    with pytest.raises(ValueError):
        image_metrics([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError):
        image_metrics([0.1, 0.2], [0, 1, 1])


# --------------------------------------------------------------------------- pixel level


def test_exact_pixel_auroc_ap_match_sklearn_with_ties_and_roi():
    rng = np.random.default_rng(1)
    data = _random_pixels(rng)
    values = np.concatenate([v[r] for v, _, r in data])
    labels = np.concatenate([m[r] for _, m, r in data])
    result = _feed(data, bins=None).compute()
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(labels, values), abs=1e-6)
    assert result["pixel_ap"] == pytest.approx(average_precision_score(labels, values), abs=1e-6)


def test_binned_matches_exact_on_quantised_maps():
    # Binned mode is exact mode on maps moved to their bin (here: bin centres) - the
    # meaning of error_bound.
    rng = np.random.default_rng(2)
    data = _random_pixels(rng, decimals=6)
    bins = 50
    quantised = [((np.floor(v * bins) + 0.5) / bins, m, r) for v, m, r in data]
    binned = _feed(data, bins=bins)
    assert binned.error_bound == pytest.approx(1 / bins)
    exact_q = _feed(quantised, bins=None).compute()
    for key, value in binned.compute().items():
        assert value == pytest.approx(exact_q[key], abs=1e-9), key


@pytest.mark.parametrize("bins", [20, 200, 10_000])
def test_binned_close_to_exact_within_stated_bounds(bins):
    rng = np.random.default_rng(3)
    data = _random_pixels(rng, decimals=6)
    exact = _feed(data, bins=None).compute()
    binned_pm = _feed(data, bins=bins)
    binned, bounds = binned_pm.compute(), binned_pm.binning_error_bounds()
    for key in ("pixel_auroc", "pixel_ap", "aupro"):
        assert abs(binned[key] - exact[key]) <= bounds[key] + 1e-12, key
    if bins == 10_000:  # fine bins: the bounds themselves are small
        assert max(bounds.values()) < 2e-3
        assert _feed(data, bins=None).binning_error_bounds() == dict.fromkeys(bounds, 0.0)


def _hand_example():
    # Two regions: A = (0,0),(1,0) (size 2), B = (1,3) (size 1); 9 normal pixels.
    mask = np.array([[1, 0, 0, 0], [1, 0, 0, 1], [0, 0, 0, 0]], dtype=bool)
    values = np.array(
        [
            [0.9, 0.8, 0.1, 0.1],
            [0.1, 0.5, 0.1, 0.6],
            [0.1, 0.1, 0.1, 0.1],
        ]
    )
    return values, mask


@pytest.mark.parametrize("bins", [None, 10, 10_000])
def test_aupro_hand_worked(bins):
    # Region A = {0.9, 0.1}, region B = {0.6}; normals: 0.8, 0.5 and seven at 0.1.
    # Thresholds (score >= t), FPR over 9 normals, PRO = mean of the two region fractions:
    #   t=0.9: FPR 0,   PRO (1/2 + 0)/2 = 0.25
    #   t=0.8: FPR 1/9, PRO 0.25
    #   t=0.6: FPR 1/9, PRO (1/2 + 1)/2 = 0.75
    #   t=0.5: FPR 2/9, PRO 0.75
    #   t=0.1: FPR 1,   PRO 1
    # Segment (2/9, .75) -> (1, 1) at FPR 0.3: PRO = .75 + .25 * (0.3 - 2/9) / (7/9) = 0.775.
    # Area to 0.3: 1/9 * .25 + 1/9 * .75 + (0.3 - 2/9) * (.75 + .775) / 2
    #            = 1/9 + (0.7/9) * 0.7625 = 1.53375 / 9;  divided by 0.3 -> 1.53375 / 2.7 = 409/720.
    values, mask = _hand_example()
    pm = PixelMetrics(bins=bins, fpr_limit=0.3)
    pm.update(values, mask)
    assert pm.n_regions == 2
    assert pm.compute()["aupro"] == pytest.approx(409 / 720, abs=1e-9)


def test_aupro_full_fpr_range():
    # Same curve integrated to FPR 1: 1/9 * .25 + 1/9 * .75 + (7/9) * (.75 + 1)/2 = 1/9 + 12.25/18.
    values, mask = _hand_example()
    pm = PixelMetrics(bins=None, fpr_limit=1.0)
    pm.update(values, mask)
    assert pm.compute()["aupro"] == pytest.approx(1 / 9 + 12.25 / 18, abs=1e-9)


def test_regions_are_eight_connected():
    # The two pixels touch only diagonally: one region, not two.
    mask = np.array([[1, 0], [0, 1]], dtype=bool)
    pm = PixelMetrics(bins=None)
    pm.update(np.full((2, 2), 0.5), mask)
    assert pm.n_regions == 1


@pytest.mark.parametrize("bins", [None, 100])
def test_perfect_map_gives_aupro_one(bins):
    rng = np.random.default_rng(4)
    pm = PixelMetrics(bins=bins)
    for _ in range(3):
        mask = rng.random((16, 16)) < 0.2
        pm.update(mask.astype(float), mask)
    result = pm.compute()
    assert result["aupro"] == pytest.approx(1.0)
    assert result["pixel_auroc"] == pytest.approx(1.0)
    assert result["pixel_ap"] == pytest.approx(1.0)


@pytest.mark.parametrize("bins", [None, 100])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_constant_map_gives_half_fpr_limit(bins, fpr_limit):
    # A constant map has a single threshold group: the curve goes (0, 0) -> (1, 1) in one
    # straight segment, i.e. PRO = FPR. Its area up to L is L^2 / 2, divided by L: L / 2
    # (0.15 for the default 0.3). AUROC is 0.5 and AP the defective-pixel share.
    rng = np.random.default_rng(5)
    pm = PixelMetrics(bins=bins, fpr_limit=fpr_limit)
    n_pos = n_all = 0
    for _ in range(3):
        mask = rng.random((12, 12)) < 0.3
        pm.update(np.full((12, 12), 0.42), mask)
        n_pos, n_all = n_pos + mask.sum(), n_all + mask.size
    result = pm.compute()
    assert result["aupro"] == pytest.approx(fpr_limit / 2)
    assert result["pixel_auroc"] == pytest.approx(0.5)
    assert result["pixel_ap"] == pytest.approx(n_pos / n_all)


@pytest.mark.parametrize("bins", [None, 100])
def test_roi_restricted_pixel_metrics_hand_worked(bins):
    values = np.array([[0.5, 0.2, 0.7], [0.3, 0.8, 0.1]])
    mask = np.array([[1, 1, 0], [0, 0, 0]], dtype=bool)
    roi = np.array([[1, 0, 1], [1, 0, 1]], dtype=bool)
    # Inside the ROI: defective 0.5 (the region {(0,0),(0,1)} cut to {(0,0)}); normal 0.7, 0.3, 0.1.
    #   AUROC: 0.5 beats 0.3 and 0.1, not 0.7 -> 2/3.
    #   AP: descending 0.7(-), 0.5(+) -> one recall step of 1 at precision 1/2 -> 0.5.
    #   PRO (fpr_limit 0.5): t=0.7 -> (1/3, 0); t=0.5 -> (1/3, 1); then flat at 1.
    #     area to 0.5 = (0.5 - 1/3) * 1 = 1/6; / 0.5 -> 1/3.
    pm = PixelMetrics(bins=bins, fpr_limit=0.5)
    pm.update(values, mask, roi)
    result = pm.compute()
    assert result["pixel_auroc"] == pytest.approx(2 / 3)
    assert result["pixel_ap"] == pytest.approx(0.5)
    assert result["aupro"] == pytest.approx(1 / 3)
    # Without the ROI: defective 0.5, 0.2 vs normal 0.7, 0.3, 0.8, 0.1 -> (2 + 1) / 8.
    pm = PixelMetrics(bins=bins, fpr_limit=0.5)
    pm.update(values, mask)
    assert pm.compute()["pixel_auroc"] == pytest.approx(3 / 8)


def test_region_outside_roi_is_not_counted():
    mask = np.array([[1, 0, 0], [0, 0, 1]], dtype=bool)
    roi = np.array([[1, 1, 1], [1, 1, 0]], dtype=bool)  # hides the (1,2) region
    values = np.array([[0.9, 0.1, 0.1], [0.1, 0.1, 0.0]])
    pm = PixelMetrics(bins=None)
    pm.update(values, mask, roi)
    assert pm.n_regions == 1
    assert pm.compute()["aupro"] == pytest.approx(1.0)


def test_undefined_pixel_metrics_are_none():
    assert PixelMetrics(bins=None).compute() == {"pixel_auroc": None, "pixel_ap": None, "aupro": None}
    pm = PixelMetrics(bins=100)
    pm.update(np.random.default_rng(6).random((8, 8)), np.zeros((8, 8), dtype=bool))
    assert pm.compute() == {"pixel_auroc": None, "pixel_ap": None, "aupro": None}


def test_shapes_are_validated():
    pm = PixelMetrics()
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(4, 4\)"):
        pm.update(np.zeros((4, 4)), np.zeros((4, 5), dtype=bool))
    with pytest.raises(ValueError, match="roi"):
        pm.update(np.zeros((4, 4)), np.zeros((4, 4), dtype=bool), np.ones((3, 4), dtype=bool))
    with pytest.raises(ValueError, match="2-D"):
        pm.update(np.zeros((1, 4, 4)), np.zeros((1, 4, 4), dtype=bool))


# --------------------------------------------------------------------------- evaluate


def test_evaluate_per_type_structure():
    rng = np.random.default_rng(7)

    def record(defect_type, with_map=True, shape=(10, 12)):
        label = int(defect_type != "good")
        mask = (rng.random(shape) < 0.2) & bool(label)
        return {
            "score": float(rng.random() + label * 0.5),
            "label": label,
            "defect_type": defect_type,
            "map": np.clip(rng.random(shape) * 0.6 + mask * 0.4, 0, 1) if with_map else None,
            "mask": mask if label else None,  # good images may omit the mask
            "roi": None,
        }

    # A good image after the defective ones still counts for every type.
    records = [record("good"), record("scratch"), record("good"), record("hole", shape=(9, 7)),
               record("scratch", with_map=False), record("hole"), record("good")]
    result = evaluate(iter(records), bins=None)

    assert set(result) == {"overall", "per_type"}
    assert set(result["per_type"]) == {"scratch", "hole"}
    keys = {"image_auroc", "image_ap", "image_f1_max", "image_f1_threshold",
            "pixel_auroc", "pixel_ap", "aupro", "n_images"}
    assert set(result["overall"]) == keys
    assert result["overall"]["n_images"] == 7
    for name in ("scratch", "hole"):
        subset = [r for r in records if r["defect_type"] in ("good", name)]
        metrics = result["per_type"][name]
        assert set(metrics) == keys
        assert metrics["n_images"] == 5
        expected = image_metrics([r["score"] for r in subset], [r["label"] for r in subset])
        for key, value in expected.items():
            assert metrics[key] == pytest.approx(value)
        pm = PixelMetrics(bins=None)
        for r in subset:
            if r["map"] is not None:
                pm.update(r["map"], r["mask"] if r["mask"] is not None else np.zeros_like(r["map"], bool))
        for key, value in pm.compute().items():
            assert metrics[key] == pytest.approx(value)
    all_scores = [r["score"] for r in records]
    assert result["overall"]["image_auroc"] == pytest.approx(
        roc_auc_score([r["label"] for r in records], all_scores)
    )


def test_evaluate_image_only_and_label_checks():
    records = [
        {"score": 0.1, "label": 0, "defect_type": "good", "map": None, "mask": None, "roi": None},
        {"score": 0.9, "label": 1, "defect_type": "crack", "map": None, "mask": None, "roi": None},
    ]
    result = evaluate(records)
    assert result["overall"]["image_auroc"] == 1.0
    assert result["overall"]["pixel_auroc"] is None and result["per_type"]["crack"]["aupro"] is None
    with pytest.raises(ValueError, match="defect_type"):
        evaluate([{"score": 0.1, "label": 1, "defect_type": "good"}])
    with pytest.raises(ValueError, match="mask"):
        evaluate([{"score": 0.1, "label": 1, "defect_type": "crack", "map": np.zeros((2, 2))}])
