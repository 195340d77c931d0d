"""Runs the grdnet CLI (`python tests/cli_probe.py train ...`) with test instruments set by
environment variables. Lightning's DDP launcher starts the other ranks with this same command line,
so they are instrumented too.

- GRDNET_PROBE_DIR: each rank writes rank<r>.json at exit: a hash of its final parameters, the sum
  and hash of its first synthetic defect mask, a hash of its first augmented batch, its epoch-0 sample
  indices, and how many model folders it wrote.
- GRDNET_PROBE_KILL_IN_CHECKPOINT=n: SIGKILL this process inside its n-th checkpoint write, after
  the temporary file is complete and before it is renamed into place.
- GRDNET_PROBE_STEP_DELAY=s: sleep s seconds after each training step (a slower run to kill).
"""
import atexit
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from grdnet import defects, engine, files, training
from grdnet.cli import main

record: dict = {"model_saves": 0}


def _instrument_ddp_probe(folder: Path):
    real_call = defects.DefectSynthesizer.__call__

    def call(self, x, gen=None):
        batch = real_call(self, x, gen)
        if "first_mask_sum" not in record:
            record["first_mask_sum"] = float(batch.mask.sum())
            record["first_mask_hash"] = hashlib.sha256(batch.mask.cpu().numpy().tobytes()).hexdigest()
            record["first_input_hash"] = hashlib.sha256(x.cpu().numpy().tobytes()).hexdigest()
        return batch

    defects.DefectSynthesizer.__call__ = call

    real_save = engine.save_model

    def save_model(*args, **kwargs):
        record["model_saves"] += 1
        return real_save(*args, **kwargs)

    engine.save_model = save_model

    def on_train_end(self):
        h = hashlib.sha256()
        for name, p in sorted(self.named_parameters()):
            h.update(name.encode())
            h.update(p.detach().cpu().numpy().tobytes())
        record["params"] = h.hexdigest()
        record["rank"] = self.global_rank
        sampler = self.trainer.train_dataloader.sampler
        sampler.set_epoch(0)
        record["epoch0_indices"] = [int(i) for i in sampler]

    training.GRDNetModule.on_train_end = on_train_end

    def dump():
        if "rank" in record:
            (folder / f"rank{record['rank']}.json").write_text(json.dumps(record))

    atexit.register(dump)


def _instrument_kill(n: int):
    real_commit = files.commit
    calls = [0]

    def commit(tmp, path):
        if Path(path).suffix == ".ckpt":
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
        real_commit(tmp, path)

    files.commit = commit


def _instrument_delay(seconds: float):
    real_step = training.GRDNetModule.training_step

    def training_step(self, batch, batch_idx):
        out = real_step(self, batch, batch_idx)
        time.sleep(seconds)
        return out

    training.GRDNetModule.training_step = training_step


if __name__ == "__main__":
    torch.set_num_threads(1)  # a shared CI machine: no thread oversubscription between processes
    if os.environ.get("GRDNET_PROBE_DIR"):
        _instrument_ddp_probe(Path(os.environ["GRDNET_PROBE_DIR"]))
    if os.environ.get("GRDNET_PROBE_KILL_IN_CHECKPOINT"):
        _instrument_kill(int(os.environ["GRDNET_PROBE_KILL_IN_CHECKPOINT"]))
    if os.environ.get("GRDNET_PROBE_STEP_DELAY"):
        _instrument_delay(float(os.environ["GRDNET_PROBE_STEP_DELAY"]))
    sys.exit(main(sys.argv[1:]))
