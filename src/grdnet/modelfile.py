"""Model folders: `weights.safetensors` (the inference networks) and `config.json` (readable:
architecture, preprocessing, score rule, threshold, training summary). Nothing is unpickled.

A folder is written under a temporary name, synced and renamed into place, so an interrupted save
never leaves something that loads as a finished model.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from .config import ModelConfig, to_dict
from .errors import GRDNetError
from .files import commit, sync_file, sync_folder
from .model import GRDNet

FORMAT = "grdnet-model"
FORMAT_VERSION = 1
WEIGHTS, CONFIG = "weights.safetensors", "config.json"
# Options that older model files record and that are gone, with the only value they may hold.
RETIRED_OPTIONS = {"score_rule": "max_pool", "score_scales": [1.0], "score_topk": None}


def resolve_model_dir(path) -> Path:
    """A model folder, or a run folder whose `model/` sub-folder is one."""
    path = Path(path)
    for cand in (path, path / "model"):
        if (cand / CONFIG).is_file() and (cand / WEIGHTS).is_file():
            return cand
    if not path.exists():
        raise GRDNetError(f"{path}: no such model folder")
    if (path / "checkpoints").is_dir():
        raise GRDNetError(f"{path}: training run has no finished model (interrupted? resume it with "
                          "'grdnet train ... --resume')")
    raise GRDNetError(f"{path}: not a grdnet model (no {CONFIG} and {WEIGHTS})")


def save_model(folder, net: GRDNet, cfg: ModelConfig, meta: dict) -> Path:
    """Write `net`'s inference weights and its config atomically into `folder`."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        save_file(net.inference_state_dict(), str(tmp / WEIGHTS))
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": to_dict(cfg), **meta}
        (tmp / CONFIG).write_text(json.dumps(doc, indent=2, default=str))
        for name in (WEIGHTS, CONFIG):
            sync_file(tmp / name)
        sync_folder(tmp)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            commit(folder, old)
            commit(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            commit(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_config(path) -> tuple[Path, dict]:
    folder = resolve_model_dir(path)
    try:
        doc = json.loads((folder / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise GRDNetError(f"{folder / CONFIG}: unreadable model config ({e})") from None
    parse_config(doc, folder / CONFIG)
    return folder, doc


def load_model(path) -> tuple[GRDNet, ModelConfig, dict]:
    """-> (GRDNet with its inference parts, in eval mode; ModelConfig; metadata dict)."""
    folder, doc = read_config(path)
    cfg, meta = parse_config(doc, folder / CONFIG)
    net = GRDNet(cfg)
    try:
        state = load_file(str(folder / WEIGHTS))
        net.load_state_dict(state, strict=True)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise GRDNetError(f"{folder / WEIGHTS}: cannot load weights ({str(e).splitlines()[0]})") from None
    return net.eval(), cfg, meta


def parse_config(doc: dict, where) -> tuple[ModelConfig, dict]:
    """A config.json document -> (ModelConfig, the rest: threshold, training summary, ...)."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise GRDNetError(f"{where}: not a grdnet model config")
    if doc.get("format_version", 0) > FORMAT_VERSION:
        raise GRDNetError(f"{where}: model format {doc['format_version']} is newer than this grdnet")
    try:
        cfg = ModelConfig(**_without_retired(doc["model"], where))
    except (TypeError, KeyError) as e:
        raise GRDNetError(f"{where}: invalid model section ({e})") from None
    return cfg, {k: v for k, v in doc.items() if k not in ("format", "format_version", "model")}


def _without_retired(model: dict, where) -> dict:
    """An older file's model section, less the retired options it holds at their only remaining value."""
    kept = dict(model)
    for name, only in RETIRED_OPTIONS.items():
        if name in kept:
            value = kept.pop(name)
            if only is not None and value != only:
                raise GRDNetError(f"{where}: model option {name}={value!r} is no longer supported "
                                  f"(only {only!r}); retrain the model with this grdnet")
    return kept
