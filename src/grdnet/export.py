"""ONNX export and ONNX Runtime inference.

`export_onnx` writes one self-describing `.onnx` file: the inference networks plus the score rule
in one graph (input `image` (B, C, S, S) float in [0, 1]; outputs `anomaly_map` (B, 1, S, S) and
`score` (B,)), with the preprocessing contract, score rule, threshold and the model's full
config.json in the file's metadata. Before the file is written, the exported graph is run in ONNX
Runtime on check images and compared with PyTorch; a disagreement is an error, not a file.

`OnnxPredictor` scores images with such a file; it shares every step but the network with
`grdnet.scoring.Predictor`, so both give the same results on the same images.

Exporter: `torch.onnx.export(..., dynamo=True)` (torch.export based). On these networks it gives
the same graph as the legacy TorchScript exporter (same operators once constants are folded, same
agreement with PyTorch, same ONNX Runtime speed) but exports several times slower; the legacy
exporter is deprecated and announced for removal, so it is not used.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import ModelConfig
from .errors import GRDNetError
from .files import atomic_write
from .model import GRDNet
from .modelfile import CONFIG, load_model, parse_config, read_config
from .scoring import BasePredictor, image_scores, trained_on_tiles
from .version import __version__

FORMAT = "grdnet-onnx"
FORMAT_VERSION = 2  # 2: anomaly_map (B, n, S, S), channel 0 the map (files of this grdnet: n = 1)
DEFAULT_OPSET = 18  # ONNX Runtime >= 1.14, TensorRT, OpenVINO all read it
PARITY_TOLERANCE = 1e-4  # max abs difference between PyTorch and ONNX Runtime maps and scores
INPUT, OUTPUTS = "image", ("anomaly_map", "score")


class ScoredNet(nn.Module):
    """The exported graph: images (B, C, S, S) in [0, 1] -> (anomaly maps (B, 1, S, S), scores (B,))."""

    def __init__(self, net: GRDNet, cfg: ModelConfig):
        super().__init__()
        self.net, self.cfg = net, cfg

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.net(x)
        return maps, image_scores(maps, self.cfg)


def contract(cfg: ModelConfig, meta: dict, config_text: str) -> dict[str, str]:
    """The metadata written into the .onnx file: what a caller must do to feed it and read it."""
    s, c = cfg.image_size, cfg.channels
    rule = (f"max_pool: maximum of the anomaly map average-pooled with a {cfg.score_kernel}x{cfg.score_kernel} "
            f"box (stride 1, padding {cfg.score_kernel // 2}, padding not counted)")
    threshold = meta.get("threshold")
    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "grdnet_version": __version__,
        "image_size": str(s),
        "channels": str(c),
        "input": f"{INPUT}: float32 (batch, {c}, {s}, {s}), channel order {'RGB' if c == 3 else 'L (grayscale)'}",
        "scaling": "[0, 1]: uint8 pixel value / 255; no mean/std normalisation",
        "color": ("RGB; grayscale images repeated to 3 channels" if c == 3 else
                  "grayscale: PIL 'L' (ITU-R 601-2 luma) of colour images")
                 + "; transparent pixels composited onto black",
        "resize": resize_contract(cfg),
        "outputs": f"anomaly_map: float32 (batch, 1, {s}, {s}) anomaly probability in [0, 1]; "
                   "score: float32 (batch,) image score",
        "flip_average": ("true: inside the graph, the map is the mean over the image and its horizontal, "
                         "vertical and double flip (4 network passes per image)" if cfg.flip_average else "false"),
        "score_rule": rule,
        "threshold": "none" if threshold is None else repr(float(threshold)),
        "threshold_rule": str(meta.get("threshold_rule", "none")),
        "decision": "defective if score >= threshold",
        "tiled_training": str(trained_on_tiles(meta)).lower(),
        "config_json": config_text,
    }


def resize_contract(cfg: ModelConfig) -> str:
    s = cfg.image_size
    squeeze = (f"whole image resized to {s}x{s} (bilinear, antialiased, align_corners=False; aspect ratio "
               "not kept); the map is resized back to the image size (bilinear, align_corners=False). "
               "Tiled mode: images larger than the model are cut into overlapping "
               f"{s}x{s} tiles at native resolution, maps blended with a Hann window")
    keep = (f"image resized so that its shorter side is {s} px (bilinear, antialiased, align_corners=False), cut "
            f"into overlapping {s}x{s} tiles (overlap 0.25), maps blended with a Hann window; the score rule is "
            "applied to the blended map, which is then resized back to the image size (bilinear, align_corners=False)")
    if cfg.aspect == "keep":
        return "aspect keep: " + keep
    if cfg.aspect == "both":
        return (f"aspect both: view 1, {squeeze}; view 2 (non-square images), {keep}; the anomaly map is the "
                "pixel-wise maximum of the two maps, the score the larger of the two scores")
    return squeeze


def _check_inputs(cfg: ModelConfig) -> torch.Tensor:
    """Noise, flat grey and a smooth image with a dark square: what the parity check runs."""
    g = torch.Generator().manual_seed(0)
    s, c = cfg.image_size, cfg.channels
    noise = torch.rand(2, c, s, s, generator=g)
    flat = torch.full((1, c, s, s), 0.5)
    ramp = torch.linspace(0.2, 0.8, s)[None, None, None, :].expand(1, c, s, s).clone()
    ramp[..., s // 3:s // 2, s // 3:s // 2] = 0.05
    return torch.cat([noise, flat, ramp])


def _trace(scored: ScoredNet, cfg: ModelConfig, opset: int, where):
    """The ONNX program of the scored network, at exactly `opset`, with a dynamic batch size."""
    example = torch.rand(2, cfg.channels, cfg.image_size, cfg.image_size)
    # The exporter warns about optional torchvision operators we never use.
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    try:
        program = torch.onnx.export(scored, (example,), None, dynamo=True, verbose=False, opset_version=opset,
                                    input_names=[INPUT], output_names=list(OUTPUTS),
                                    dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    except Exception as e:
        raise GRDNetError(f"{where}: ONNX export at opset {opset} failed ({str(e).splitlines()[0]})") from None
    finally:
        registration_log.setLevel(level)
    proto = program.model_proto
    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:  # the exporter falls back to its lowest supported opset without saying so
        raise GRDNetError(f"{where}: cannot export at ONNX opset {opset} (the exporter produced opset {got}); "
                          "use 17 or newer")
    return proto


def _parity(proto, scored: ScoredNet, cfg: ModelConfig, where, out: Path) -> dict:
    """Run the exported graph in ONNX Runtime on check images beside PyTorch; a disagreement is an error."""
    x = _check_inputs(cfg)
    with torch.inference_mode():
        ref_maps, ref_scores = scored(x)
    maps, scores = _session(proto.SerializeToString(), threads=None, where=out).run(list(OUTPUTS), {INPUT: x.numpy()})
    map_diff = float(np.abs(maps - ref_maps.numpy()).max())
    score_diff = float(np.abs(scores - ref_scores.numpy()).max())
    if not (map_diff <= PARITY_TOLERANCE and score_diff <= PARITY_TOLERANCE):
        raise GRDNetError(f"{where}: the ONNX export disagrees with PyTorch (max map difference {map_diff:.2e}, "
                          f"score {score_diff:.2e}); nothing written")
    return {"images": len(x), "max_abs_map_diff": map_diff, "max_abs_score_diff": score_diff}


def export_onnx(model_path, out_file=None, opset: int = DEFAULT_OPSET) -> Path:
    """Export a model folder (or run folder) to one `.onnx` file; returns its path.

    `out_file` defaults to `<model folder>.onnx` next to the folder. The batch size is dynamic.
    The export is checked against PyTorch before it is written (maps and scores within
    `PARITY_TOLERANCE`); the check's figures are in the file's `export_check` metadata.
    """
    import onnx

    folder, _ = read_config(model_path)
    config_text = (folder / CONFIG).read_text()
    net, cfg, meta = load_model(folder)
    out = Path(out_file) if out_file is not None else folder.with_suffix(".onnx")
    if out.is_dir():
        raise GRDNetError(f"{out}: is a folder; give a file name ending in .onnx")
    scored = ScoredNet(net, cfg).eval()
    proto = _trace(scored, cfg, opset, folder)
    proto.graph.doc_string = f"grdnet {__version__} anomaly detector: {INPUT} -> {', '.join(OUTPUTS)}"
    onnx.checker.check_model(proto)
    check = _parity(proto, scored, cfg, folder, out)
    props = contract(cfg, meta, config_text)
    props["export_check"] = json.dumps({**check, "opset": opset, "torch": torch.__version__})
    del proto.metadata_props[:]
    for k, v in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    with atomic_write(out) as f:
        f.write(proto.SerializeToString())
    return out


def _session(model, threads: int | None, where, providers: list[str] | None = None):
    """An ONNX Runtime session; `model` is a path or serialized bytes."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # One thread pool as wide as PyTorch's (physical cores, or OMP_NUM_THREADS): the graph is a
    # chain of convolutions, so parallelism inside operators is what pays; none between them.
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(model, opts, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
        raise GRDNetError(f"{where}: not a valid ONNX model ({str(e).splitlines()[0][:200]})") from None


class OnnxPredictor(BasePredictor):
    """Scores images with an exported `.onnx` file in ONNX Runtime; the same interface and the
    same pre- and post-processing as `Predictor` (`predict`, `maps`, `cfg`, `threshold`, `meta`).

    >>> p = OnnxPredictor.load("runs/tile/model.onnx")
    >>> p.predict("part.png").label
    """

    def __init__(self, session, cfg: ModelConfig, threshold: float | None = None, meta: dict | None = None,
                 tile: bool = False, tile_overlap: float = 0.25):
        super().__init__(cfg, threshold, meta, tile, tile_overlap)
        self.session = session

    @classmethod
    def load(cls, path, threads: int | None = None, tile: bool | None = None,
             providers: list[str] | None = None) -> "OnnxPredictor":
        """Open a file written by `export_onnx`. `threads`: ONNX Runtime intra-op threads
        (default: as many as PyTorch uses)."""
        path = Path(path)
        if not path.is_file():
            raise GRDNetError(f"{path}: no such ONNX file")
        session = _session(str(path), threads, path, providers)
        props = session.get_modelmeta().custom_metadata_map
        if props.get("format") != FORMAT or "config_json" not in props:
            raise GRDNetError(f"{path}: ONNX model without grdnet metadata (not written by 'grdnet export')")
        if int(props.get("format_version", "0")) > FORMAT_VERSION:
            raise GRDNetError(f"{path}: grdnet ONNX format {props['format_version']} is newer than this grdnet")
        try:
            doc = json.loads(props["config_json"])
        except json.JSONDecodeError as e:
            raise GRDNetError(f"{path}: unreadable config in the ONNX metadata ({e})") from None
        cfg, meta = parse_config(doc, path)
        meta["onnx"] = {k: v for k, v in props.items() if k != "config_json"}
        return cls(session, cfg, meta.get("threshold"), meta, trained_on_tiles(meta) if tile is None else tile)

    def _run(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        maps, scores = self.session.run(list(OUTPUTS), {INPUT: x})
        return torch.from_numpy(maps), torch.from_numpy(scores)
