import json
import subprocess
import sys

import numpy as np
from PIL import Image

from grdnet.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "grdnet.cli", *map(str, args)], capture_output=True, text=True)


def test_cli_round_trip_train_test_predict(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(tiny_dataset), "--out", str(run), "--preset", "tiny", "--epochs", "2",
                 "--no-progress"]) == 0
    report = tmp_path / "report.json"
    assert main(["test", str(run), str(tiny_dataset), "--report", str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["n_images"] == 8 and 0 <= r["image_auroc"] <= 1 and 0 <= r["pixel_auroc"] <= 1
    capsys.readouterr()
    out = tmp_path / "pred"
    assert main(["predict", str(run), str(tiny_dataset / "test" / "hole"), "--out", str(out)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 4 and all(x["label"] in ("good", "defective") for x in lines)
    assert all((out / f"{i:03d}_overlay.png").is_file() for i in range(4))
    assert Image.open(out / "000_overlay.png").size == (48, 40)


def _assert_clean_error(res, *fragments):
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("error:"), res.stderr
    for f in fragments:
        assert f in err, err


def test_error_data_without_train_good(tmp_path):
    (tmp_path / "empty").mkdir()
    _assert_clean_error(run_cli("train", tmp_path / "empty", "--out", tmp_path / "r", "--preset", "tiny"),
                        "train/good", str(tmp_path / "empty"))


def test_error_truncated_image(tiny_dataset, tmp_path):
    bad = tiny_dataset / "train" / "good" / "005.png"
    bad.write_bytes(bad.read_bytes()[:200])
    _assert_clean_error(run_cli("train", tiny_dataset, "--out", tmp_path / "r", "--preset", "tiny"),
                        "005.png")
    assert not (tmp_path / "r" / "model").exists()


def test_error_unreadable_image(tiny_dataset, tmp_path):
    (tiny_dataset / "train" / "good" / "junk.jpg").write_text("not an image")
    _assert_clean_error(run_cli("train", tiny_dataset, "--out", tmp_path / "r", "--preset", "tiny"),
                        "junk.jpg", "not an image")


def test_error_mask_size_differs(trained_tiny, tmp_path):
    import shutil

    run, data = trained_tiny
    data2 = tmp_path / "d2"
    shutil.copytree(data, data2)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(data2 / "ground_truth" / "hole" / "002_mask.png")
    _assert_clean_error(run_cli("test", run, data2), "002_mask.png", "10x10")


def test_error_run_folder_is_not_a_model(tmp_path, tiny_dataset):
    (tmp_path / "notmodel").mkdir()
    _assert_clean_error(run_cli("test", tmp_path / "notmodel", tiny_dataset), "not a grdnet model")
    _assert_clean_error(run_cli("predict", tmp_path / "nothing", tiny_dataset, "--out", tmp_path / "o"),
                        "no such model folder")


def test_corrupt_weights_are_a_clear_error(trained_tiny, tmp_path):
    import shutil

    run, data = trained_tiny
    bad = tmp_path / "bad"
    shutil.copytree(run / "model", bad)
    (bad / "weights.safetensors").write_bytes(b"\x00" * 64)
    _assert_clean_error(run_cli("test", bad, data), "weights.safetensors")


def test_predict_reports_bad_image_and_continues(trained_tiny, tmp_path):
    run, data = trained_tiny
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, p in enumerate(sorted((data / "test" / "good").iterdir())[:2]):
        (imgs / f"ok{i}.png").write_bytes(p.read_bytes())
    (imgs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    res = run_cli("predict", run, imgs, "--out", tmp_path / "o")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    lines = [json.loads(x) for x in res.stdout.strip().splitlines()]
    assert len(lines) == 3 and sum("error" in x for x in lines) == 1
    assert "broken.png" in res.stderr


def test_interrupted_training_leaves_no_model(tiny_dataset, tmp_path):
    """A training killed mid-run leaves a run folder that does not load as a model."""
    import signal
    import time

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "grdnet.cli", "train", str(tiny_dataset), "--out", str(run),
                             "--preset", "tiny", "--epochs", "1000", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (run / "logs").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "model").exists()
    _assert_clean_error(run_cli("test", run, tiny_dataset), str(run))
