"""Model folders: `weights.safetensors` (the inference networks) and `config.json` (readable:
architecture, preprocessing, score rule, threshold, training summary). Nothing is unpickled.

A folder is written under a temporary name and renamed into place, so an interrupted save never
leaves something that loads as a finished model.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from .config import ModelConfig, to_dict
from .errors import GRDNetError

FORMAT = "grdnet-model"
FORMAT_VERSION = 1
WEIGHTS, CONFIG = "weights.safetensors", "config.json"


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


def save_model(folder, net, cfg: ModelConfig, meta: dict) -> Path:
    """Write `net` (an `InferenceNet`) and its config atomically into `folder`."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": to_dict(cfg), **meta}
        (tmp / CONFIG).write_text(json.dumps(doc, indent=2, default=str))
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
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


def load_model(path):
    """-> (InferenceNet in eval mode, ModelConfig, metadata dict)."""
    from .scoring import InferenceNet

    folder, doc = read_config(path)
    cfg, meta = parse_config(doc, folder / CONFIG)
    net = InferenceNet.build(cfg)
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
        cfg = ModelConfig(**doc["model"])
    except (TypeError, KeyError) as e:
        raise GRDNetError(f"{where}: invalid model section ({e})") from None
    return cfg, {k: v for k, v in doc.items() if k not in ("format", "format_version", "model")}
