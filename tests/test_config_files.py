"""Runs from config files: a run's own run.json repeats it, YAML works as JSON does, and
--print-config shows the resolved configuration in the form --config reads."""
import json

import pytest

import grdnet
from grdnet.cli import main
from grdnet.config import build_config


def _without_times(doc: dict) -> dict:
    training = {k: v for k, v in doc["training"].items() if k not in ("finished", "minutes", "seconds", "started")}
    return {**doc, "training": training}


def test_a_run_repeats_from_its_run_json(tiny_dataset, tmp_path, capsys):
    first, second = tmp_path / "r1", tmp_path / "r2"
    assert main(["train", str(tiny_dataset), "--out", str(first), "--preset", "tiny", "--steps", "4", "--seed", "3",
                 "--no-progress"]) == 0
    # No DATA and no preset: both come from the record (the preset's values are all in it).
    assert main(["train", "--config", str(first / "run.json"), "--out", str(second), "--no-progress"]) == 0
    a, b = (json.loads((r / "model" / "config.json").read_text()) for r in (first, second))
    assert a["training"]["train_config"]["seed"] == 3 and a["training"]["steps"] == 4
    assert _without_times(a) == _without_times(b)
    # --print-config of the record is the record's configuration, and reads back as a config file.
    capsys.readouterr()
    assert main(["train", "--config", str(first / "run.json"), "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    record = json.loads((first / "run.json").read_text())
    assert printed == {"model": record["model"], "train": record["train"]}
    (tmp_path / "printed.json").write_text(json.dumps(printed))
    m, t = build_config("paper", config_file=tmp_path / "printed.json")
    assert (m.image_size, t.steps, t.seed) == (32, 4, 3)
    assert not (tmp_path / "r3").exists()


def test_yaml_config_and_print_config_overrides(tiny_dataset, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model:\n  score_kernel: 3\ntrain:\n  steps: 9\n  brightness: 0.1\n")
    assert main(["train", str(tiny_dataset), "--preset", "tiny", "--config", str(cfg), "--batch-size", "2",
                 "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"]["score_kernel"] == 3 and printed["model"]["channels"] == 3
    assert (printed["train"]["steps"], printed["train"]["epochs"], printed["train"]["batch_size"]) == (9, None, 2)
    assert printed["train"]["brightness"] == 0.1
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2]\n")
    with pytest.raises(grdnet.GRDNetError, match="bad.yaml.*'model' section"):
        build_config("tiny", config_file=bad)
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2  # no DATA, no run record
    assert "no training data" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--print-config"]) == 0  # the preset itself
    assert json.loads(capsys.readouterr().out)["train"]["steps"] == 3
