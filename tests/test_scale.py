"""Training at scale and through faults: DDP on two CPU processes, kill + resume, determinism,
mixed precision, atomic checkpoints, loggers."""
import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import grdnet
from conftest import write_dataset
from grdnet.cli import main
from grdnet.config import build_config
from grdnet.losses import (adversarial_loss, contextual_loss, discriminator_loss, latent_loss,
                           segmentation_loss)
from grdnet.config import build_config
from grdnet.engine import AtomicCheckpointIO, ResumableLoader, RoundSampler, plan_training

PROBE = Path(__file__).with_name("cli_probe.py")


@pytest.fixture(autouse=True)
def one_thread():
    """Two cores shared by several processes: one intra-op thread each avoids oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **{k: str(v) for k, v in extra.items()}}


def _weights(model_dir: Path) -> dict:
    return load_file(str(Path(model_dir) / "weights.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _test_image(data: Path) -> str:
    return str(next((data / "test" / "hole").iterdir()))


def test_ddp_two_processes_identical_weights_own_defects_one_model_folder(tmp_path):
    data = write_dataset(tmp_path / "data", n_train=24)
    good = sorted((data / "train" / "good").iterdir())
    for p in good[1:]:  # identical images: only augmentation can make the ranks' inputs differ
        p.write_bytes(good[0].read_bytes())
    probe, run = tmp_path / "probe", tmp_path / "run"
    probe.mkdir()
    res = subprocess.run([sys.executable, str(PROBE), "train", str(data), "--out", str(run), "--preset", "tiny",
                          "--epochs", "2", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
                          "--no-progress"], capture_output=True, text=True, timeout=600,
                         env=_env(GRDNET_PROBE_DIR=probe))
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (json.loads((probe / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["params"] == r1["params"]  # gradients averaged, schedulers stepped alike
    assert r0["first_mask_hash"] != r1["first_mask_hash"]  # own synthetic defects
    assert r0["first_input_hash"] != r1["first_input_hash"]  # own augmentation
    i0, i1 = r0["epoch0_indices"], r1["epoch0_indices"]
    # 24 images - 6 held out: 9 per rank; rounds of 18 passes make the 40 batches of 4 a round needs
    assert len(i0) == len(i1) == 9 * 18
    for k in range(0, 9 * 18, 9):  # each pass sharded without overlap
        assert not set(i0[k:k + 9]) & set(i1[k:k + 9]) and set(i0[k:k + 9]) | set(i1[k:k + 9]) == set(range(18))
    assert (r0["model_saves"], r1["model_saves"]) == (1, 0)
    assert res.stdout.count("model written to") == 1
    run_info = json.loads((run / "run.json").read_text())
    assert [a["world_size"] for a in run_info["attempts"]] == [2]
    assert json.loads((run / "model" / "config.json").read_text())["training"]["world_size"] == 2
    assert 0 <= grdnet.load(run).predict(_test_image(data)).score <= 1


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() - t0 < timeout, f"no {path} after {timeout} s"
        time.sleep(0.05)


def _step(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]


def test_sigkill_at_random_moments_then_resume_continues_exactly(tmp_path):
    """48 steps (96 optimiser steps: G and D per batch) over 32 images in batches of 4: a round of
    40 batches (5 passes), then 8 of the next; checkpoint every 4 optimiser steps. Attempt 1 is
    killed at a random moment, attempt 2 inside a checkpoint write (between the temporary file and
    the rename), attempt 3 finishes; the result equals an uninterrupted run."""
    data = write_dataset(tmp_path / "data", n_train=40)
    cfg = tmp_path / "cfg.json"
    train_cfg = {"checkpoint_every_n_steps": 4, "log_every_n_steps": 1}
    cfg.write_text(json.dumps({"train": train_cfg}))
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "last.ckpt"
    args = [sys.executable, str(PROBE), "train", str(data), "--out", str(run), "--preset", "tiny", "--steps", "48",
            "--config", str(cfg), "--deterministic", "--no-progress"]
    delay = random.uniform(0.0, 0.6)

    proc = subprocess.Popen(args, env=_env(GRDNET_PROBE_STEP_DELAY=0.05), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(ckpt, proc)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"finished before the kill {delay:.2f} s after the first checkpoint"
    step1 = _step(ckpt)  # a complete checkpoint, whatever moment the kill hit
    assert 4 <= step1 < 96 and step1 % 4 == 0, (step1, delay)

    res = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=600,
                         env=_env(GRDNET_PROBE_KILL_IN_CHECKPOINT=2))
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    leftovers = list(ckpt.parent.glob(".last.ckpt.tmp-*"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0  # the new one, never renamed
    step2 = _step(ckpt)  # the previous checkpoint, intact
    assert step2 == step1 + 4

    res = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=600, env=_env())
    assert res.returncode == 0, res.stderr[-3000:]
    assert not list(ckpt.parent.glob(".*.tmp-*"))
    attempts = json.loads((run / "run.json").read_text())["attempts"]
    assert [a["start_step"] for a in attempts] == [0, step1, step2]  # Lightning's restored step, not zero
    cfg_doc = json.loads((run / "model" / "config.json").read_text())
    t = cfg_doc["training"]
    assert (t["steps"], t["optimizer_steps"], t["rounds"], t["n_train"], t["epochs"]) == (48, 96, 2, 32, 6.0)
    assert 0 <= grdnet.load(run).predict(_test_image(data)).score <= 1

    rows = list(csv.DictReader(open(run / "logs" / "metrics.csv")))
    steps = [int(r["step"]) for r in rows if r["l_con"]]
    assert steps == sorted(set(steps))  # no step logged twice after the resumes
    assert len(set(range(48)) - set(steps)) <= 2  # at most a checkpoint step's own row per kill
    assert len([r for r in rows if r["epoch_loss"]]) == 1  # the one finished round

    ref = grdnet.train(data, tmp_path / "ref", preset="tiny", steps=48, train=train_cfg, deterministic=True,
                       progress=False)
    assert _same(_weights(run / "model"), _weights(ref))


def test_resume_extends_a_finished_run_and_refuses_other_settings(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", str(tiny_dataset), "--out", str(run), "--preset", "tiny", "--no-progress"]
    assert main(args + ["--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    grdnet.train(tiny_dataset, run, preset="tiny", steps=3, train={"checkpoint_every_n_steps": 2}, progress=False)
    steps1 = json.loads((run / "model" / "config.json").read_text())["training"]["steps"]
    assert steps1 == 3
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2 * steps1 and ckpt["grdnet"]["model"]["image_size"] == 32
    spent = ckpt["callbacks"]["Timer"]["time_elapsed"]["train"]  # the time budget used so far
    assert spent > 0

    assert main(args + ["--steps", "6", "--lr", "0.5", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "train.lr: 0.001 -> 0.5" in err

    grdnet.train(tiny_dataset, run, preset="tiny", steps=6, train={"checkpoint_every_n_steps": 2}, resume=True,
                 progress=False)
    doc = json.loads((run / "model" / "config.json").read_text())["training"]
    assert doc["steps"] == 2 * steps1 and doc["stopped_by"] == "steps"
    assert doc["seconds"] > round(spent, 3)  # both attempts' training time: more than the first's
    assert [a["start_step"] for a in json.loads((run / "run.json").read_text())["attempts"]] == [0, 2 * steps1]  # G and D steps


def test_weight_average_is_saved_and_survives_resume(tiny_dataset, tmp_path):
    ema = {"ema_decay": 0.9, "checkpoint_every_n_steps": 2, "seed": 5}

    def run(name, epochs, resume=False, train=ema):
        return grdnet.train(tiny_dataset, tmp_path / name, preset="tiny", epochs=epochs, deterministic=True,
                            train=train, resume=resume, progress=False)

    straight = _weights(run("straight", 2))
    ckpt = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)

    def inference_part(state):  # module keys (net.encoder.*, net.segmenter.*) -> model file keys
        return {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}

    averaged, raw = inference_part(ckpt["state_dict"]), inference_part(ckpt["current_model_state"])
    # the model file holds the average, not the last step's weights
    assert all(torch.equal(straight[k], averaged[k]) for k in straight)
    assert not all(torch.equal(straight[k], raw[k]) for k in straight)
    run("split", 1)
    assert _same(_weights(run("split", 2, resume=True)), straight)  # the average is restored, not restarted
    assert not _same(_weights(run("plain", 2, train={**ema, "ema_decay": None})), straight)


def test_model_without_gan_resumes_exactly(tiny_dataset, tmp_path):
    # one optimizer and one schedule instead of two: a resumed run must still continue exactly
    def run(name, epochs, resume=False):
        return grdnet.train(tiny_dataset, tmp_path / name, preset="tiny", model={"gan": False}, epochs=epochs,
                            deterministic=True, train={"checkpoint_every_n_steps": 2, "seed": 3}, resume=resume,
                            progress=False)

    straight = _weights(run("straight", 2))
    assert all(k.startswith("segmenter.") for k in straight)
    run("split", 1)
    assert _same(_weights(run("split", 2, resume=True)), straight)


def test_same_seed_deterministic_runs_give_identical_weights(tiny_dataset, tmp_path):
    def run(name, seed):
        return _weights(grdnet.train(tiny_dataset, tmp_path / name, preset="tiny", epochs=2, deterministic=True,
                                     train={"seed": seed}, progress=False))

    a, b, c = run("a", 3), run("b", 3), run("c", 4)
    assert _same(a, b)
    assert not _same(a, c)
    assert not torch.are_deterministic_algorithms_enabled()  # the process is left as it was
    info = json.loads((tmp_path / "a" / "run.json").read_text())
    assert info["seed"] == 3 and info["deterministic"] is True
    assert {"torch", "lightning", "kornia", "numpy"} <= set(info["packages"])


def test_losses_under_bf16_autocast_match_fp32():
    _, t = build_config("tiny")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g)
    w = torch.randn(3, 3, 3, 3, generator=g) * 0.3
    mask = (torch.rand(4, 1, 32, 32, generator=g) > 0.8).float()
    roi = (torch.rand(4, 1, 32, 32, generator=g) > 0.3).float()

    def losses():
        # Network outputs under autocast are bf16; the losses must still be computed in fp32.
        x_hat = torch.sigmoid(torch.nn.functional.conv2d(x, w, padding=1))
        feats = torch.nn.functional.conv2d(x, w, padding=1)
        seg = torch.nn.functional.conv2d(x, w[:2], padding=1) * 4
        logits = feats.mean((1, 2, 3)) * 10
        return [contextual_loss(x, x_hat, t), adversarial_loss(feats, feats * 0.9), latent_loss(feats, feats + 0.01),
                discriminator_loss(logits, -logits), *(segmentation_loss(seg, mask, roi, t, m)
                                                      for m in ("target", "prediction", "none"))]

    ref = losses()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = losses()
    for r, v in zip(ref, low):
        assert v.dtype == torch.float32 and torch.isfinite(v)
        # the inputs themselves went through a bf16 conv (~3 significant digits); the loss adds no more error
        assert abs(float(v) - float(r)) <= 2e-2 * abs(float(r)) + 1e-4, (float(v), float(r))


def test_default_precision_follows_the_cpus_bf16_support(monkeypatch):
    from grdnet import engine

    for native, expected in ((True, "bf16-mixed"), (False, "32-true")):
        monkeypatch.setattr(engine, "native_cpu_bf16", lambda: native)
        assert engine.resolve_precision(None, "cpu") == expected
        assert engine.resolve_precision("32-true", "cpu") == "32-true"  # an explicit choice stands


def test_cpu_training_runs_channels_last(tiny_dataset, tmp_path):
    seen = []

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            w = pl_module.net.segmenter.down[0][0].weight
            seen.append(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous())

    model = grdnet.train(tiny_dataset, tmp_path / "cl", preset="tiny", epochs=1, accelerator="cpu",
                         callbacks=[Probe()], progress=False)
    assert seen and all(seen)
    assert grdnet.load(model).predict(np.zeros((32, 32, 3), np.uint8)).anomaly_map.shape == (32, 32)


def test_bf16_mixed_training_on_cpu_fp16_and_spawn_refused(tiny_dataset, tmp_path, capsys):
    model = grdnet.train(tiny_dataset, tmp_path / "bf16", preset="tiny", epochs=1, precision="bf16-mixed",
                         accelerator="cpu", train={"log_every_n_steps": 1}, progress=False)
    rows = list(csv.DictReader(open(tmp_path / "bf16" / "logs" / "metrics.csv")))
    assert rows and all(np.isfinite(float(r["loss"])) for r in rows if r["loss"])
    assert json.loads((model / "config.json").read_text())["training"]["precision"] == "bf16-mixed"
    assert main(["train", str(tiny_dataset), "--out", str(tmp_path / "fp16"), "--preset", "tiny",
                 "--accelerator", "cpu", "--precision", "16-mixed"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: precision 16-mixed needs a GPU") and "bf16-mixed" in err
    assert main(["train", str(tiny_dataset), "--out", str(tmp_path / "spawn"), "--preset", "tiny",
                 "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp_spawn"]) == 2
    assert capsys.readouterr().err.startswith("error: strategy ddp_spawn is not supported")


def test_checkpoint_write_is_atomic(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "ck" / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)
    with pytest.raises(Exception):
        io.save_checkpoint({"step": torch.tensor(2), "bad": lambda: 0}, path)  # fails while writing
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_loader_resumes_mid_epoch_with_the_unseen_batches():
    ds = torch.utils.data.TensorDataset(torch.arange(22))
    plan = plan_training(22, build_config("tiny", train={"batch_size": 4})[1])
    assert (plan.passes, plan.round_batches) == (8, 44)  # rounds of at least 40 batches: 8 passes

    def loader():
        return ResumableLoader(ds, batch_size=4, sampler=RoundSampler(22, plan, rank=0, seed=5), drop_last=True)

    a = loader()
    a.sampler.set_epoch(3)
    full = [b[0].tolist() for b in a]
    it = iter(a)
    next(it), next(it)
    state = a.state_dict()
    assert state == {"epoch": 3, "batches": 2}
    b = loader()
    b.load_state_dict(state)
    b.sampler.set_epoch(3)
    assert [x[0].tolist() for x in b] == full[2:]
    b.sampler.set_epoch(4)  # the next round is whole again
    assert len(list(b)) == len(full) == 44
    seen = torch.tensor(sum(full, []))
    assert torch.bincount(seen, minlength=22).tolist() == [8] * 22  # every image once per pass


def test_loggers_by_flag(tiny_dataset, tmp_path, capsys):
    args = ["train", str(tiny_dataset), "--preset", "tiny", "--no-progress"]
    for name, module in (("tensorboard", ("tensorboard", "tensorboardX")), ("mlflow", ("mlflow",))):
        out = tmp_path / name
        if not any(find_spec(m) for m in module):
            assert main(args + ["--out", str(out), "--logger", name]) == 2
            assert f"--logger {name} needs the" in capsys.readouterr().err
            assert not out.exists() or not (out / "model").exists()
        else:
            assert main(args + ["--out", str(out), "--logger", name]) == 0
            assert (out / "logs" / "metrics.csv").is_file()
            assert (out / "logs" / ("tensorboard" if name == "tensorboard" else "mlflow.db")).exists()


def test_checkpoint_by_time_is_written_during_training(tiny_dataset, tmp_path):
    """The time interval counts under manual optimisation too (Lightning's ModelCheckpoint ignores it)."""
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    seen = []

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(_step(ckpt) if ckpt.is_file() else None)

    grdnet.train(tiny_dataset, tmp_path / "run", preset="tiny", steps=4, progress=False, callbacks=[Watch()],
                 train={"checkpoint_every_minutes": 1e-6})
    assert seen == [None, 2, 4, 6]  # after every step (G and D: two optimiser steps each)
    assert _step(ckpt) == 8
