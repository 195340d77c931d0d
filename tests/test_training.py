import csv
import json
import time

import numpy as np
import torch

import grdnet
from grdnet.config import build_config
from grdnet.training import GRDNetModule


def test_training_smoke_losses_finite_and_contextual_loss_falls(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    model_dir = grdnet.train(tiny_dataset, run, preset="tiny", epochs=12, progress=False,
                             train={"log_every_n_steps": 1, "val_fraction": 0.25})
    rows = list(csv.DictReader(open(run / "logs" / "metrics.csv")))
    steps = [r for r in rows if r.get("l_con")]
    assert len(steps) >= 24
    for r in steps:
        for k in ("loss", "l_adv", "l_con", "l_enc", "l_seg", "l_disc"):
            assert np.isfinite(float(r[k])), k
    con = [float(r["l_con"]) for r in steps]
    assert np.mean(con[-5:]) < 0.8 * np.mean(con[:5])
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["training"]["n_val"] == 3 and cfg["threshold"] is not None
    assert (run / "run.json").is_file()


def test_saved_model_reproduces_trained_networks(trained_tiny):
    run, data = trained_tiny
    p = grdnet.load(run)
    x = torch.rand(2, 3, 32, 32)
    assert p.maps(x).shape == (2, 1, 32, 32)
    r = p.predict(str(next((data / "test" / "hole").iterdir())))
    assert r.anomaly_map.shape == (40, 48)  # back at the image's own size
    assert 0 <= r.score <= 1 and r.threshold == p.threshold
    assert r.is_anomalous == (r.score >= p.threshold)


def test_predict_accepts_arrays_and_lists(trained_tiny):
    p = grdnet.load(trained_tiny[0])
    gray = (np.random.default_rng(0).random((50, 60)) * 255).astype(np.uint8)
    rgb = np.stack([gray] * 3, axis=-1)
    a, b = p.predict([gray, rgb])
    assert a.anomaly_map.shape == (50, 60) and abs(a.score - b.score) < 1e-6
    assert p.predict(rgb, threshold=2.0).is_anomalous is False


def test_threshold_override_changes_decision_only(trained_tiny):
    p = grdnet.load(trained_tiny[0])
    img = np.full((32, 32, 3), 128, np.uint8)
    lo, hi = p.predict(img, threshold=0.0), p.predict(img, threshold=1.01)
    assert lo.score == hi.score and lo.is_anomalous and not hi.is_anomalous


def test_grayscale_model_trains(tmp_path):
    from conftest import write_dataset

    data = write_dataset(tmp_path / "g", channels=1)
    model_dir = grdnet.train(data, tmp_path / "run", preset="tiny", epochs=1, progress=False)
    p = grdnet.load(model_dir)
    assert p.cfg.channels == 1
    assert p.predict(str(next((data / "test" / "good").iterdir()))).anomaly_map.shape == (40, 48)


def test_module_step_uses_rank_and_step_seeded_defects():
    m, t = build_config("tiny")
    mod = GRDNetModule(m, t)
    g1 = mod._defect_generator(0).initial_seed()
    g2 = mod._defect_generator(1).initial_seed()
    assert g1 != g2


def test_segmenter_learning_rate_is_its_own():
    m, t = build_config("tiny", train={"lr": 1e-4, "seg_lr": 1e-3})
    mod = GRDNetModule(m, t)
    (g_opt, d_opt), _ = mod.configure_optimizers()
    seg = {id(p) for p in mod.net.segmenter.parameters()}
    for group in g_opt.param_groups:
        assert group["lr"] == (1e-3 if {id(p) for p in group["params"]} <= seg else 1e-4)
    assert d_opt.param_groups[0]["lr"] == 1e-4
    m, t = build_config("tiny", train={"lr": 2e-4})
    assert {g["lr"] for g in GRDNetModule(m, t).configure_optimizers()[0][0].param_groups} == {2e-4}


def test_model_without_gan_trains_the_segmenter_alone(tiny_dataset, tmp_path):
    from safetensors.torch import load_file

    m, t = build_config("tiny", model={"gan": False}, train={"seg_lr": 1e-3})
    mod = GRDNetModule(m, t)
    assert mod.net.encoder is None and mod.net.discriminator is None and not mod.net.has_gan
    (opt,), (sched,) = mod.configure_optimizers()
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in mod.net.segmenter.parameters()}
    assert opt.param_groups[0]["lr"] == 1e-3
    # the segmenter sees the image alone: C input channels, not the (reconstruction, image) pair
    assert mod.net.segmenter.down[0][0].in_channels == m.channels

    run = tmp_path / "run"
    model_dir = grdnet.train(tiny_dataset, run, preset="tiny", model={"gan": False}, epochs=3, progress=False,
                             train={"log_every_n_steps": 1})
    rows = [r for r in csv.DictReader(open(run / "logs" / "metrics.csv")) if r.get("l_seg")]
    assert len(rows) >= 3 and all(np.isfinite(float(r["l_seg"])) for r in rows)
    assert not any(r.get("l_con") or r.get("l_disc") for r in rows)
    weights = load_file(str(model_dir / "weights.safetensors"))
    assert weights and all(k.startswith("segmenter.") for k in weights)
    p = grdnet.load(model_dir)
    assert p.cfg.gan is False and p.net.encoder is None
    r = p.predict(str(next((tiny_dataset / "test" / "hole").iterdir())))
    assert r.anomaly_map.shape == (40, 48) and 0 <= r.score <= 1


def test_progress_without_a_terminal_is_a_line_at_an_interval(tiny_dataset, tmp_path, capsys, monkeypatch):
    from grdnet import engine

    # stdout is captured here, not a terminal: no redrawn bar, only a line every 30 seconds
    start = time.monotonic()
    grdnet.train(tiny_dataset, tmp_path / "quiet", preset="tiny", epochs=3)
    seconds = time.monotonic() - start
    out = capsys.readouterr().out
    assert "\r" not in out and "it/s" not in out
    assert sum(ln.startswith("step ") for ln in out.splitlines()) <= seconds // engine.PROGRESS_LINE_SECONDS
    monkeypatch.setattr(engine, "PROGRESS_LINE_SECONDS", 0.0)  # a line after every batch
    model = grdnet.train(tiny_dataset, tmp_path / "lines", preset="tiny", steps=7)
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("step ")]
    assert len(lines) == json.loads((model / "config.json").read_text())["training"]["steps"] == 7
    assert "\r" not in "".join(lines) and lines[-1].startswith("step 7/7 ") and " seg " in lines[-1]
    # the plan, before training: steps, images per step, passes over the 9 training images
    assert out.splitlines()[0] == "training: 7 steps of 4 images (3.1 passes over 9 training images, rounds of 40 batches)"


def test_length_in_steps_whatever_the_number_of_images(tmp_path):
    from conftest import write_dataset

    for n in (5, 50):
        data = write_dataset(tmp_path / f"d{n}", n_train=n, size=(32, 32))
        model = grdnet.train(data, tmp_path / f"r{n}", preset="tiny", steps=6, progress=False,
                             train={"log_every_n_steps": 1})
        t = json.loads((model / "config.json").read_text())["training"]
        assert (t["steps"], t["planned_steps"], t["optimizer_steps"], t["stopped_by"]) == (6, 6, 12, "steps")
        assert t["epochs"] == round(6 * 4 / t["n_train"], 2)  # passes over the images, recorded
        rows = [r for r in csv.DictReader(open(tmp_path / f"r{n}" / "logs" / "metrics.csv")) if r.get("l_seg")]
        assert len(rows) == 6


def test_length_by_epochs_is_passes_over_the_images(tmp_path):
    from conftest import write_dataset
    from grdnet.engine import describe_plan, plan_training

    data = write_dataset(tmp_path / "d", n_train=30, size=(32, 32))  # 23 trained on, 7 held out
    model = grdnet.train(data, tmp_path / "r", preset="tiny", epochs=2, progress=False)
    t = json.loads((model / "config.json").read_text())["training"]
    assert (t["n_train"], t["n_val"], t["steps"], t["epochs"]) == (23, 7, 12, 2.09)  # 46 / 4 = 11.5 -> 12 steps
    _, cfg = build_config("cpu", train={"epochs": 200})
    assert plan_training(685, cfg).steps == 8563 and plan_training(23, cfg).steps == 288
    _, both = build_config("cpu", train={"steps": 2500, "epochs": 100})  # the longer of the two
    assert plan_training(685, both).steps == 4281 and plan_training(23, both).steps == 2500
    assert describe_plan(plan_training(23, both), 23, both).endswith("the longer of 2,500 steps and 100 passes")


def test_grd_cpu_preset_is_grdnet_whole(tiny_dataset, tmp_path):
    """GRD-Net with generator and discriminator at CPU sizes: trains, saves E1 + decoder + segmenter."""
    from safetensors.torch import load_file

    m, t = build_config("grd-cpu")
    assert m.gan and t.steps and t.epochs is None and build_config("cpu")[1].steps > t.steps
    model = grdnet.train(tiny_dataset, tmp_path / "run", preset="grd-cpu", steps=2, progress=False,
                         train={"log_every_n_steps": 1})
    parts = {k.split(".")[0] for k in load_file(str(model / "weights.safetensors"))}
    assert parts == {"encoder", "decoder", "segmenter"}
    p = grdnet.load(model)
    assert p.cfg.gan and p.cfg.gen_widths == m.gen_widths and p.cfg.image_size == 128
    r = p.predict(str(next((tiny_dataset / "test" / "hole").iterdir())))
    assert r.anomaly_map.shape == (40, 48) and 0 <= r.score <= 1
    rows = [r for r in csv.DictReader(open(tmp_path / "run" / "logs" / "metrics.csv")) if r.get("l_con")]
    assert rows and all(np.isfinite(float(r["l_disc"])) for r in rows)


def test_length_flags(tiny_dataset, tmp_path, capsys):
    from grdnet.cli import main

    args = ["train", str(tiny_dataset), "--out", str(tmp_path / "r"), "--preset", "tiny", "--no-progress"]
    assert main(args + ["--steps", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err
    assert main(args + ["--max-minutes", "0"]) == 2  # not "stop at once" with a model that looks trained
    assert "max_minutes must be a positive" in capsys.readouterr().err
    assert not (tmp_path / "r" / "model").exists()
    assert main(args + ["--epochs", "1"]) == 0
    assert "2 steps = 0.89 epochs" in capsys.readouterr().out  # 9 images: 2 batches of 4
    assert main(args[:3] + [str(tmp_path / "both")] + args[4:] + ["--steps", "3", "--epochs", "2"]) == 0
    assert "5 steps = 2.22 epochs" in capsys.readouterr().out  # both: the longer, 9 x 2 / 4 -> 5 steps
    _, t = build_config("paper", train={"steps": 100})
    assert (t.steps, t.epochs) == (100, None)  # a length by steps replaces the preset's epochs


def test_lighting_augmentation_moves_the_image_not_the_roi():
    m, t = build_config("tiny", model={"channels": 1}, train={"brightness": 0.3, "contrast": 0.3, "rotation": 0.0,
                                                               "hflip": False, "vflip": False})
    module = GRDNetModule(m, t)
    image = torch.full((8, 1, 32, 32), 0.5) + 0.1 * torch.rand(8, 1, 32, 32)
    roi = (torch.rand(8, 1, 32, 32) > 0.5).float()
    out = module._augment(torch.cat([image, roi], 1), batch_idx=0)
    assert torch.equal(out[:, 1:], roi)  # the ROI channel is never relit
    means = out[:, 0].mean((1, 2))
    assert means.max() - means.min() > 0.1  # every image its own brightness
    assert torch.equal(out, module._augment(torch.cat([image, roi], 1), batch_idx=0))  # seeded per step
    plain = GRDNetModule(*build_config("tiny", model={"channels": 1}, train={"rotation": 0.0, "hflip": False,
                                                                             "vflip": False}))
    assert plain.lighting is None and torch.equal(plain._augment(torch.cat([image, roi], 1), 0)[:, :1], image)
