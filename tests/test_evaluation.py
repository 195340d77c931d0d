"""Thresholds that never see the test set, report folders, calibration, several categories."""
import csv
import hashlib
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import precision_recall_curve, roc_curve

import grdnet
from conftest import write_dataset
from grdnet.calibration import choose_threshold, quantile_threshold, split_train_val
from grdnet.cli import main
from grdnet.errors import GRDNetError
from grdnet.evaluation import run_test
from grdnet.metrics import PixelMetrics, evaluate, image_curves, image_metrics
from grdnet.report import THUMB, Gallery, summarize


# --------------------------------------------------------------------------- helpers


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.targets = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("src", "href"):
                self.targets.append(v)


def html_targets(path: Path) -> list[str]:
    p = _Links()
    p.feed(path.read_text())
    return p.targets


def assert_links_resolve(index: Path):
    targets = html_targets(index)
    assert targets
    for t in targets:
        assert not re.match(r"^[a-z]+:", t) and not t.startswith("/"), f"not a relative link: {t}"
        assert (index.parent / t).is_file(), f"{index}: link to missing file {t}"
    return targets


def copy_model(run: Path, dest: Path) -> Path:
    shutil.copytree(run / "model", dest)
    return dest


def make_val_folder(root: Path, seed: int) -> Path:
    """A labelled validation folder (good/ + hole/) from a fresh generated test split."""
    src = write_dataset(root / "src", n_train=1, n_good=5, n_bad=5, seed=seed)
    val = root / "val"
    shutil.copytree(src / "test", val)
    return val


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- leak-free threshold


def test_training_threshold_never_reads_test_and_ignores_test_changes(tmp_path, monkeypatch):
    """Two datasets share train/good but have different test splits (B's is corrupt, so reading
    it would fail): the stored thresholds are identical and no test/ or ground_truth/ file is
    ever opened during training."""
    a = write_dataset(tmp_path / "a", n_train=8, n_good=2, n_bad=2)
    b = tmp_path / "b"
    shutil.copytree(a / "train", b / "train")
    for sub in ("test/good", "test/hole", "ground_truth/hole"):
        (b / sub).mkdir(parents=True)
        for i in range(3):
            (b / sub / f"{i:03d}.png").write_bytes(b"\x89PNG corrupt")

    opened = []
    real_open = Image.open

    def spy(fp, *args, **kwargs):
        opened.append(str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", spy)
    ma = grdnet.train(a, tmp_path / "ra", preset="tiny", epochs=1, progress=False)
    mb = grdnet.train(b, tmp_path / "rb", preset="tiny", epochs=1, progress=False)
    monkeypatch.undo()

    assert opened, "spy saw no image reads"
    leaked = [p for p in opened if "/test/" in p or "/ground_truth/" in p]
    assert not leaked, leaked
    ca, cb = (json.loads((m / "config.json").read_text()) for m in (ma, mb))
    assert ca["threshold"] == cb["threshold"] and ca["threshold"] is not None
    assert ca["threshold_rule"] == cb["threshold_rule"]
    assert "held-out good training images" in ca["threshold_rule"]
    assert ca["training"]["n_val"] >= 1


def test_evaluating_on_other_test_sets_uses_and_keeps_the_stored_threshold(trained_tiny, tmp_path):
    run, data = trained_tiny
    model = copy_model(run, tmp_path / "model")
    before = sha(model / "config.json")
    stored = json.loads((model / "config.json").read_text())["threshold"]
    other = write_dataset(tmp_path / "other", n_train=1, n_good=6, n_bad=3, seed=9)
    p = grdnet.load(model)
    r1 = run_test(p, data)
    assert main(["test", str(model), str(other), "--out", str(tmp_path / "rep")]) == 0
    r2 = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert r1["threshold"] == r2["threshold"] == stored
    assert r1["at_threshold"]["threshold"] == stored
    assert r2["threshold_source"] == r1["threshold_source"] == grdnet.load(model).meta["threshold_rule"]
    assert sha(model / "config.json") == before  # testing never rewrites the model
    # The override is reported as such and changes decisions only.
    r3 = run_test(p, data, threshold=0.0)
    assert r3["threshold_source"] == "override" and all(x["decision"] == 1 for x in r3["images"])
    assert [x["score"] for x in r3["images"]] == [x["score"] for x in r1["images"]]


# --------------------------------------------------------------------------- report folder


def test_report_folder_has_every_part(trained_tiny, tmp_path, capsys):
    run, data = trained_tiny
    out = tmp_path / "rep"
    legacy = tmp_path / "legacy.json"
    assert main(["test", str(run), str(data), "--out", str(out), "--report", str(legacy), "--gallery", "3"]) == 0
    assert "index.html" in capsys.readouterr().out

    for name in ("report.json", "images.csv", "roc.png", "pr.png", "scores.png", "index.html"):
        assert (out / name).is_file(), name
    for name in ("roc.png", "pr.png", "scores.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 300

    report = json.loads((out / "report.json").read_text())
    for key in ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "aupro"):
        assert key in report["metrics"] and key in report["per_type"]["hole"]
    bounds = report["binning"]["error_bounds"]
    assert report["binning"]["bins"] == 10_000
    assert set(bounds["overall"]) == {"pixel_auroc", "pixel_ap", "aupro"} and "hole" in bounds["per_type"]
    assert all(0 <= v < 1 for v in bounds["overall"].values())
    assert report["threshold"] == grdnet.load(run).threshold and report["threshold_source"]
    assert report["model"]["path"] == str((run / "model").resolve())
    assert report["data"] == str(data.resolve())
    assert "images" not in report  # they are in images.csv
    assert {"precision", "recall", "f1"} <= set(report["at_threshold"])

    legacy_report = json.loads(legacy.read_text())  # --report keeps its full content
    assert len(legacy_report["images"]) == 8 and legacy_report["metrics"] == report["metrics"]

    rows = list(csv.DictReader(open(out / "images.csv")))
    assert len(rows) == report["n_images"] == 8
    assert set(rows[0]) == {"path", "defect_type", "label", "score", "decision"}
    for r in rows:
        assert Path(r["path"]).is_file()
        assert int(r["decision"]) == int(float(r["score"]) >= report["threshold"])
        assert int(r["label"]) == int(r["defect_type"] != "good")

    misses = [g for g in report["gallery"] if g["kind"] == "miss"]
    alarms = [g for g in report["gallery"] if g["kind"] == "alarm"]
    assert len(misses) == 3 and len(alarms) == 3
    bad_scores = sorted(float(r["score"]) for r in rows if r["label"] == "1")
    good_scores = sorted((float(r["score"]) for r in rows if r["label"] == "0"), reverse=True)
    assert [g["score"] for g in misses] == pytest.approx(bad_scores[:3])
    assert [g["score"] for g in alarms] == pytest.approx(good_scores[:3])
    assert all(g["has_mask"] for g in misses)
    with Image.open(out / misses[0]["file"]) as im:
        assert im.size[1] == 4 * 40  # 48 x 40 test images enlarged 4x; image + overlay side by side
        assert im.size[0] == 2 * 4 * 48 + 6

    targets = assert_links_resolve(out / "index.html")
    for part in ("report.json", "images.csv", "roc.png", "pr.png", "scores.png",
                 *[g["file"] for g in report["gallery"]]):
        assert part in targets, part
    page = (out / "index.html").read_text()
    assert "<style>" in page and "http" not in page.lower().replace("http-equiv", "")


def test_gallery_keeps_only_the_worst_few_downscaled():
    g = Gallery(size=3)
    rng = np.random.default_rng(0)
    scores = {0: [], 1: []}
    for i in range(60):
        label = i % 2
        s = float(rng.random())
        scores[label].append(s)
        sample = SimpleNamespace(label=label, defect_type="good" if label == 0 else "hole", path=Path(f"{i}.png"))
        pred = SimpleNamespace(score=s, is_anomalous=s > 0.5, anomaly_map=rng.random((900, 1200)).astype(np.float32))
        mask = np.zeros((900, 1200), bool) if label == 0 else rng.random((900, 1200)) > 0.99
        g(sample, pred, mask)
        assert len(g.misses) <= 3 and len(g.alarms) <= 3
    assert [e[3] for e in g.worst_misses()] == sorted(scores[1])[:3]
    assert [e[3] for e in g.worst_alarms()] == sorted(scores[0], reverse=True)[:3]
    for e in g.misses + g.alarms:
        assert max(e[5].shape) == THUMB  # maps are kept at gallery size only
    assert all(e[6] is None for e in g.alarms)  # an all-normal mask draws no contour


# --------------------------------------------------------------------------- calibration


def test_choose_threshold_f1_rule_and_quantile_rule():
    scores = np.array([0.1, 0.2, 0.25, 0.3, 0.6, 0.35, 0.7, 0.8])
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    t = choose_threshold(scores, labels, "f1")
    best = image_metrics(scores, labels)
    f1 = 2 * np.sum((scores >= t) & (labels == 1)) / (np.sum(scores >= t) + labels.sum())
    assert f1 == pytest.approx(best["image_f1_max"])
    assert t == pytest.approx((best["image_f1_threshold"] + 0.3) / 2)  # midway to the next lower score
    assert choose_threshold(scores, labels, "quantile", 0.5) == pytest.approx(quantile_threshold(scores[:5], 0.5))
    with pytest.raises(GRDNetError, match="both good and defective"):
        choose_threshold(scores[:5], labels[:5], "f1")


def test_small_data_threshold_keeps_its_false_alarm_target():
    """Good images' scores, logit-normal: a threshold from n of them, then the share of new good
    images it flags, averaged over many draws. The bare 0.99 quantile of 7 scores flags about one
    in eight; the rule stays near the 1 % it is meant for, and with many images it is the quantile."""
    rng = np.random.default_rng(0)
    draws, n, mu, sigma = 4000, 7, -1.0, 0.5
    logits = rng.normal(mu, sigma, (draws, n))
    scores = 1 / (1 + np.exp(-logits))
    from scipy.stats import norm

    def flagged(thr):  # P(a new good image's score >= thr), exactly, under the same law
        return norm.sf((np.log(thr / (1 - thr)) - mu) / sigma)

    bare = np.mean([flagged(np.quantile(s, 0.99)) for s in scores])
    rule = np.mean([flagged(quantile_threshold(s, 0.99)) for s in scores])
    assert bare > 0.1 and 0.005 < rule < 0.015, (bare, rule)
    many = 1 / (1 + np.exp(-rng.normal(mu, sigma, 20000)))
    assert quantile_threshold(many, 0.99) == pytest.approx(np.quantile(many, 0.99), abs=0.003)
    assert quantile_threshold([0.3], 0.99) == 0.3  # one score: nothing to fit


def test_held_out_images_have_a_minimum():
    paths = [Path(f"{i:03d}.png") for i in range(200)]
    for n, n_val in ((4, 0), (5, 1), (12, 3), (30, 7), (50, 8), (100, 10), (200, 20)):
        train, val = split_train_val(paths[:n], 0.1, seed=0, minimum=8)
        assert (len(train), len(val)) == (n - n_val, n_val) and not set(train) & set(val)
    assert split_train_val(paths[:30], 0.1, seed=0) == split_train_val(paths[:30], 0.1, seed=0, minimum=3)


def test_calibrate_command_rewrites_config_atomically(trained_tiny, tmp_path, capsys):
    run, data = trained_tiny
    model = copy_model(run, tmp_path / "model")
    val = make_val_folder(tmp_path / "v", seed=3)
    old = json.loads((model / "config.json").read_text())

    assert main(["calibrate", str(model), str(val)]) == 0
    assert "F1" in capsys.readouterr().out
    cfg = json.loads((model / "config.json").read_text())
    paths = sorted((val / "good").iterdir()) + sorted((val / "hole").iterdir())
    labels = np.array([0] * 5 + [1] * 5)
    scores = np.array([r.score for r in grdnet.load(model).predict(paths)])
    assert cfg["threshold"] == pytest.approx(choose_threshold(scores, labels, "f1"))
    cal = cfg["calibration"]
    assert cal["rule"] == "f1" and cal["data"] == str(val.resolve())
    assert cal["n_good"] == 5 and cal["n_defective"] == 5
    assert cal["previous"]["threshold"] == old["threshold"]
    assert str(val.resolve()) in cfg["threshold_rule"] and "F1" in cfg["threshold_rule"]
    assert cal["validation_at_threshold"]["f1"] == pytest.approx(image_metrics(scores, labels)["image_f1_max"])
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "weights.safetensors"]  # no temp left
    assert {k: v for k, v in cfg.items() if k not in ("threshold", "threshold_rule", "calibration")} == \
        {k: v for k, v in old.items() if k not in ("threshold", "threshold_rule")}

    p = grdnet.load(model)
    assert p.threshold == cfg["threshold"]
    assert run_test(p, data)["threshold_source"] == cfg["threshold_rule"]

    assert main(["calibrate", str(model), str(val), "--rule", "quantile", "--quantile", "0.8"]) == 0
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["threshold"] == pytest.approx(quantile_threshold(scores[:5], 0.8))
    assert cfg["calibration"]["rule"] == "quantile" and cfg["calibration"]["quantile"] == 0.8


def test_calibrate_refuses_the_test_split(trained_tiny, tmp_path, capsys):
    run, data = trained_tiny
    model = copy_model(run, tmp_path / "model")
    before = sha(model / "config.json")
    assert main(["calibrate", str(model), str(data / "test")]) == 2
    assert "test split" in capsys.readouterr().err
    assert main(["calibrate", str(model), str(data)]) == 2  # a dataset root
    assert "dataset root" in capsys.readouterr().err
    assert sha(model / "config.json") == before


def test_train_with_val_data_sets_the_f1_threshold(tmp_path):
    data = write_dataset(tmp_path / "d", n_train=6)
    val = make_val_folder(tmp_path / "v", seed=4)
    model = grdnet.train(data, tmp_path / "run", preset="tiny", epochs=1, progress=False, val_data=val)
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["calibration"]["rule"] == "f1" and cfg["calibration"]["data"] == str(val.resolve())
    assert "held-out" in cfg["calibration"]["previous"]["threshold_rule"]
    with pytest.raises(GRDNetError, match="no good/"):
        grdnet.train(data, tmp_path / "run2", preset="tiny", epochs=1, progress=False, val_data=data)
    assert not (tmp_path / "run2").exists()  # refused before training


# --------------------------------------------------------------------------- several categories


def test_all_categories_train_and_summary(tmp_path, capsys):
    root = tmp_path / "mvtec"
    for i, name in enumerate(("bottle", "tile")):
        write_dataset(root / name, n_train=6, n_good=3, n_bad=3, seed=i)
    (root / "license.txt").write_text("not a category")
    runs = tmp_path / "runs"

    assert main(["train", str(root), "--out", str(runs), "--preset", "tiny", "--no-progress"]) == 2
    assert "--all-categories" in capsys.readouterr().err
    assert main(["train", str(root), "--out", str(runs), "--preset", "tiny", "--epochs", "1", "--no-progress",
                 "--all-categories"]) == 0
    assert sorted(p.name for p in runs.iterdir()) == ["bottle", "tile"]
    capsys.readouterr()
    assert main(["train", str(root), "--out", str(runs), "--preset", "tiny", "--all-categories"]) == 0
    assert capsys.readouterr().out.count("already trained") == 2

    out = tmp_path / "eval"
    assert main(["test", str(runs), str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| bottle |" in printed and "**mean**" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["categories"]) == ["bottle", "tile"]
    for cat in ("bottle", "tile"):
        rep = json.loads((out / cat / "report.json").read_text())
        for k in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_f1_max"):
            assert summary["categories"][cat][k] == rep["metrics"][k]
        assert_links_resolve(out / cat / "index.html")
    for k in summary["columns"]:
        assert summary["mean"][k] == pytest.approx(np.mean([summary["categories"][c][k] for c in ("bottle", "tile")]))
    md = (out / "summary.md").read_text().splitlines()
    assert md[0].startswith("| category | image AUROC | pixel AUROC | AUPRO | pixel AP | F1-max |")
    assert len(md) == 2 + 2 + 1
    assert f"{100 * summary['mean']['image_auroc']:.1f}" in md[-1]
    targets = assert_links_resolve(out / "index.html")
    assert {"bottle/index.html", "tile/index.html", "summary.json", "summary.md"} <= set(targets)


def test_summary_mean_skips_undefined_figures():
    reports = {"a": {"metrics": {"image_auroc": 0.8, "pixel_auroc": None, "aupro": None, "pixel_ap": None,
                                 "image_f1_max": 0.5}},
               "b": {"metrics": {"image_auroc": 0.6, "pixel_auroc": 0.9, "aupro": 0.7, "pixel_ap": 0.2,
                                 "image_f1_max": 0.7}}}
    s = summarize(reports)
    assert s["mean"]["image_auroc"] == pytest.approx(0.7) and s["mean"]["image_auroc_n"] == 2
    assert s["mean"]["pixel_auroc"] == pytest.approx(0.9) and s["mean"]["pixel_auroc_n"] == 1


# --------------------------------------------------------------------------- curves


def test_image_curves_match_sklearn():
    rng = np.random.default_rng(1)
    labels = rng.random(200) < 0.3
    scores = np.round(rng.random(200) + labels * 0.4, 2)  # ties included
    c = image_curves(scores, labels)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(c["fpr"], fpr)
    np.testing.assert_allclose(c["tpr"], tpr)
    precision, recall, _ = precision_recall_curve(labels, scores)
    np.testing.assert_allclose(c["precision"], precision[:-1][::-1])
    np.testing.assert_allclose(c["recall"], recall[:-1][::-1])
    assert image_curves([0.1, 0.2], [0, 0]) is None


def test_pixel_curves_and_evaluate_details():
    rng = np.random.default_rng(2)
    pm = PixelMetrics(bins=None)
    maps, masks = [], []
    for _ in range(4):
        mask = rng.random((12, 10)) < 0.2
        m = np.clip(rng.random((12, 10)) * 0.7 + mask * 0.3, 0, 1)
        pm.update(m, mask)
        maps.append(m)
        masks.append(mask)
    c = pm.curves()
    fpr, tpr, _ = roc_curve(np.concatenate([x.ravel() for x in masks]), np.concatenate([x.ravel() for x in maps]),
                            drop_intermediate=False)
    np.testing.assert_allclose(c["fpr"], fpr)
    np.testing.assert_allclose(c["tpr"], tpr)
    records = [{"score": float(m.max()), "label": 1, "defect_type": "x", "map": m, "mask": k}
               for m, k in zip(maps, masks)] + [{"score": 0.1, "label": 0, "defect_type": "good",
                                                 "map": np.zeros((12, 10)), "mask": None}]
    plain = evaluate(records)
    full = evaluate(records, details=True)
    assert set(plain) == {"overall", "per_type"} and full["overall"] == plain["overall"]
    d = full["details"]["overall"]
    assert set(d) == {"binning_error_bounds", "image_curves", "pixel_curves"}
    assert set(full["details"]["per_type"]) == {"x"}
    assert d["binning_error_bounds"]["pixel_auroc"] >= 0
