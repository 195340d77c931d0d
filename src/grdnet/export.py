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

`export_openvino` converts that same ONNX graph to an OpenVINO IR (`.xml` + `.bin`) with the
same contract in the IR's runtime info (section `grdnet`), optionally quantised to INT8 by NNCF
post-training quantisation calibrated on the model's own training images; it is checked in
OpenVINO against PyTorch before it is written. `OpenVinoPredictor` scores images with it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import ModelConfig
from .errors import GRDNetError
from .files import atomic_write, sync_folder
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
    folder, _ = read_config(model_path)
    out = Path(out_file) if out_file is not None else folder.with_suffix(".onnx")
    if out.is_dir():
        raise GRDNetError(f"{out}: is a folder; give a file name ending in .onnx")
    cfg, meta, config_text, scored, proto, check = _checked_onnx(folder, opset, out)
    props = contract(cfg, meta, config_text)
    props["export_check"] = json.dumps({**check, "opset": opset, "torch": torch.__version__})
    del proto.metadata_props[:]
    for k, v in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    with atomic_write(out) as f:
        f.write(proto.SerializeToString())
    return out


def _checked_onnx(folder: Path, opset: int, out: Path):
    """The model folder's scored network as an ONNX program, checked in ONNX Runtime against
    PyTorch: (cfg, meta, config.json text, the PyTorch module, the ONNX proto, the check's figures)."""
    import onnx

    config_text = (folder / CONFIG).read_text()
    net, cfg, meta = load_model(folder)
    scored = ScoredNet(net, cfg).eval()
    proto = _trace(scored, cfg, opset, folder)
    proto.graph.doc_string = f"grdnet {__version__} anomaly detector: {INPUT} -> {', '.join(OUTPUTS)}"
    onnx.checker.check_model(proto)
    check = _parity(proto, scored, cfg, folder, out)
    return cfg, meta, config_text, scored, proto, check


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
                 tile: bool | str = False, tile_overlap: float = 0.25):
        super().__init__(cfg, threshold, meta, tile, tile_overlap)
        self.session = session

    @classmethod
    def load(cls, path, threads: int | None = None, tile: bool | str | None = None,
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


# ---- OpenVINO ------------------------------------------------------------------------------------

OV_FORMAT = "grdnet-openvino"
OV_FORMAT_VERSION = 1
OV_SECTION = "grdnet"  # the IR's runtime-info section that holds the contract
OV_EXTRA = 'pip install "grdnet[openvino]"'
# INT8 against PyTorch, on training images the calibration did not see, as they are and with
# synthetic defects: the mean and the largest score difference and the mean map difference
# allowed. Measured on magnetic_tile (docs/PERFORMANCE.md#openvino): 0.016, 0.086 and 0.007.
INT8_MEAN_SCORE_TOLERANCE = 0.05
INT8_SCORE_TOLERANCE = 0.25
INT8_MEAN_MAP_TOLERANCE = 0.02
CALIBRATION_IMAGES = 64  # training images whose network inputs calibrate INT8 (every view of each)
INT8_CHECK_IMAGES = 8  # further training images, not calibrated on, for the INT8 check


def _openvino(where):
    try:
        import openvino
    except ImportError:
        raise GRDNetError(f"{where}: OpenVINO is not installed; {OV_EXTRA}") from None
    return openvino


def _compile(ov, model, threads: int | None):
    """A CPU-compiled OpenVINO model, in fp32 (no bf16/fp16 downcast on CPUs that have them: the
    export check holds for what runs), one stream, as many threads as PyTorch uses."""
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads())}
    return ov.Core().compile_model(model, "CPU", config)


def _ov_run(compiled, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    result = compiled(np.ascontiguousarray(x, dtype=np.float32))
    return result[OUTPUTS[0]], result[OUTPUTS[1]]


def _differences(compiled, scored: ScoredNet, x: torch.Tensor, batch: int = 16) -> dict:
    """Largest and mean map differences and largest score difference from PyTorch on `x`."""
    map_max = map_sum = score_max = score_sum = 0.0
    n = 0
    for start in range(0, len(x), batch):
        chunk = x[start:start + batch]
        with torch.inference_mode():
            ref_maps, ref_scores = scored(chunk)
        maps, scores = _ov_run(compiled, chunk.numpy())
        d = np.abs(maps - ref_maps.numpy())
        map_max, map_sum = max(map_max, float(d.max())), map_sum + float(d.mean()) * len(chunk)
        score_d = np.abs(scores - ref_scores.numpy())
        score_max, score_sum = max(score_max, float(score_d.max())), score_sum + float(score_d.sum())
        n += len(chunk)
    return {"images": n, "max_abs_map_diff": map_max, "mean_abs_map_diff": map_sum / n,
            "max_abs_score_diff": score_max, "mean_abs_score_diff": score_sum / n}


class _InputRecorder(BasePredictor):
    """Collects the model-size tensors the network would see for each image (every view, every
    tile); returns empty maps, so nothing is scored."""

    def __init__(self, cfg: ModelConfig, tile: bool | str):
        super().__init__(cfg, tile=tile)
        self.seen: list[torch.Tensor] = []

    def _run(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen.extend(batch.float())
        s = self.cfg.image_size
        return torch.zeros(len(batch), 1, s, s), torch.zeros(len(batch))


def calibration_folder(meta: dict, calibration_data, where) -> Path:
    """The images INT8 is calibrated on: `calibration_data` (a folder of good images, or a dataset
    root with train/good), else the training images the model records (`training.data`)."""
    from .data import list_images

    if calibration_data is not None:
        root = Path(calibration_data)
        if not root.is_dir():
            raise GRDNetError(f"{root}: no such calibration folder")
        folder = root / "train" / "good" if (root / "train" / "good").is_dir() else root
    else:
        data = (meta.get("training") or {}).get("data")
        if not data:
            raise GRDNetError(f"{where}: the model does not record its training data; give the calibration "
                              "images with --calibration-data DIR")
        folder = Path(str(data)) / "train" / "good"
        if not folder.is_dir():
            raise GRDNetError(f"{folder}: the model's training images are not there (moved?); give the "
                              "calibration images with --calibration-data DIR")
    if not list_images(folder):
        raise GRDNetError(f"{folder}: no images to calibrate INT8 on")
    return folder


def _calibration_inputs(folder: Path, cfg: ModelConfig, meta: dict, n_images: int, n_check: int):
    """(calibration inputs, check inputs): network inputs of `n_images` images spread over the
    sorted folder, and of up to `n_check` others (the calibration images themselves if there
    are no others)."""
    from .data import list_images

    paths = list_images(folder)
    pick = np.unique(np.linspace(0, len(paths) - 1, min(n_images, len(paths))).round().astype(int))
    picked = set(pick.tolist())
    rest = [p for i, p in enumerate(paths) if i not in picked]
    check = [rest[i] for i in np.unique(np.linspace(0, len(rest) - 1, min(n_check, len(rest))).round().astype(int))] \
        if rest else [paths[i] for i in pick[:n_check]]

    def inputs(chosen):
        rec = _InputRecorder(cfg, tile=trained_on_tiles(meta))
        for p in chosen:
            rec.predict(p, batch_size=16)
        return torch.stack(rec.seen)

    return inputs([paths[i] for i in pick]), inputs(check), bool(rest)


def with_synthetic_defects(x: torch.Tensor, meta: dict, seed: int = 0) -> torch.Tensor:
    """`x` (N, C, S, S) with a synthetic defect painted on every image, by the model's own
    training settings (`training.train_config`; defaults where it records none): defects drive
    the network where good images do not, so INT8 calibrates and is checked on both."""
    from .config import TrainConfig
    from .defects import DefectSynthesizer

    if not len(x):
        return x
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    recorded = (meta.get("training") or {}).get("train_config") or {}
    try:
        cfg = TrainConfig(**{k: v for k, v in recorded.items() if k in known})
    except (TypeError, ValueError):
        cfg = TrainConfig()
    cfg = dataclasses.replace(cfg, defect_prob=1.0)
    gen = torch.Generator().manual_seed(seed)
    synth = DefectSynthesizer(cfg)  # no texture images: the noise source stands in for them
    return torch.cat([synth(x[i:i + 16], gen).image.clamp(0, 1) for i in range(0, len(x), 16)])


def _kept_fp32(ov_model) -> list[str]:
    """The operations INT8 leaves in fp32: the first convolution (on the image), the last (the
    logits) and everything after it (upsampling of the logits, softmax, flip average, score).
    Measured on magnetic_tile (docs/PERFORMANCE.md): quantised, the first and last convolutions
    make most of the error (scores off by up to 0.5 on good images); and a defect's logits lie
    outside what calibration on good images sees, so quantised they would be clipped."""
    ops = ov_model.get_ordered_ops()
    convs = [i for i, o in enumerate(ops) if o.get_type_name() in ("Convolution", "GroupConvolution")]
    head = [o for o in ops[convs[-1]:] if o.get_type_name() not in ("Constant", "Parameter", "Result")]
    return [o.get_friendly_name() for o in [ops[convs[0]], *head]]


def _quantize(ov_model, calib: torch.Tensor):
    """NNCF post-training INT8 quantisation (weights and activations) of the network but for
    `_kept_fp32`, statistics from `calib`."""
    try:
        import nncf
    except ImportError:
        raise GRDNetError(f"INT8 export needs NNCF; {OV_EXTRA}") from None
    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    nncf_log.setLevel(logging.ERROR)
    try:
        data = nncf.Dataset([x[None].numpy() for x in calib])
        return nncf.quantize(ov_model, data, subset_size=len(calib),
                             ignored_scope=nncf.IgnoredScope(names=_kept_fp32(ov_model), validate=False))
    finally:
        nncf_log.setLevel(level)


def export_openvino(model_path, out_file=None, *, int8: bool = False, calibration_data=None,
                    calibration_images: int = CALIBRATION_IMAGES, opset: int = DEFAULT_OPSET) -> Path:
    """Export a model folder (or run folder) to an OpenVINO IR, `<name>.xml` + `<name>.bin`;
    returns the `.xml` path (default: `<model folder>.xml` next to the folder).

    The IR is converted (`openvino.convert_model`) from the ONNX graph `export_onnx` writes, that
    graph first checked in ONNX Runtime. `int8`: NNCF post-training quantisation, calibrated on
    the network inputs of `calibration_images` of the model's training images (or of the images
    in `calibration_data`). Before anything is written the IR is run in OpenVINO beside PyTorch:
    fp32 maps and scores within `PARITY_TOLERANCE`; INT8 scores within `INT8_MEAN_SCORE_TOLERANCE`
    on average and `INT8_SCORE_TOLERANCE` at most, maps within `INT8_MEAN_MAP_TOLERANCE` on
    average, on training images it was not calibrated on, as they are and with synthetic defects
    (half the calibration images carry one too). The check's figures are in the IR's runtime info (`export_check`).
    """
    from .data import list_images

    folder, _ = read_config(model_path)
    out = Path(out_file) if out_file is not None else folder.with_suffix(".xml")
    if out.is_dir() or out.suffix.lower() != ".xml":
        raise GRDNetError(f"{out}: give a file name ending in .xml (the weights go beside it, in .bin)")
    ov = _openvino(folder)
    calib = check_x = None
    if int8:  # the images first: a missing folder fails before the export's minute of work
        if calibration_images < 1:
            raise GRDNetError(f"calibration images must be at least 1, got {calibration_images}")
        cfg0, meta0 = parse_config(read_config(folder)[1], folder)
        source = calibration_folder(meta0, calibration_data, folder)
        calib, check_x, unseen = _calibration_inputs(source, cfg0, meta0, calibration_images, INT8_CHECK_IMAGES)
    cfg, meta, config_text, scored, proto, onnx_check = _checked_onnx(folder, opset, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.stem}.partial-", dir=out.parent) as tmp:
        onnx_file = Path(tmp) / "model.onnx"
        onnx_file.write_bytes(proto.SerializeToString())
        try:
            ov_model = ov.convert_model(str(onnx_file))
        except Exception as e:
            raise GRDNetError(f"{folder}: OpenVINO could not convert the ONNX graph "
                              f"({str(e).strip().splitlines()[0][:200]}); nothing written") from None
        if int8:
            # half the calibration images with a synthetic defect: activations of defects too
            # (measured: half the mean score error on defective inputs of good images alone)
            ov_model = _quantize(ov_model, torch.cat([calib[::2], with_synthetic_defects(calib[1::2], meta, seed=1)]))
        compiled = _compile(ov, ov_model, None)
        synthetic = _differences(compiled, scored, _check_inputs(cfg))
        if not int8:
            check = {**synthetic, "precision": "fp32"}
            if not (check["max_abs_map_diff"] <= PARITY_TOLERANCE and check["max_abs_score_diff"] <= PARITY_TOLERANCE):
                raise GRDNetError(f"{folder}: the OpenVINO model disagrees with PyTorch (max map difference "
                                  f"{check['max_abs_map_diff']:.2e}, score {check['max_abs_score_diff']:.2e}); "
                                  "nothing written")
        else:
            good = _differences(compiled, scored, check_x)
            defects = _differences(compiled, scored, with_synthetic_defects(check_x, meta))
            real = {"images": good["images"] + defects["images"],
                    "max_abs_map_diff": max(good["max_abs_map_diff"], defects["max_abs_map_diff"]),
                    "mean_abs_map_diff": (good["mean_abs_map_diff"] + defects["mean_abs_map_diff"]) / 2,
                    "max_abs_score_diff": max(good["max_abs_score_diff"], defects["max_abs_score_diff"]),
                    "mean_abs_score_diff": (good["mean_abs_score_diff"] + defects["mean_abs_score_diff"]) / 2}
            n_calib = min(calibration_images, len(list_images(source)))
            check = {**real, "precision": "int8", "checked_on": "inputs of training images not calibrated on, "
                     "as they are and with synthetic defects" if unseen else "inputs of the calibration images "
                     "(no others), as they are and with synthetic defects",
                     "calibration": {"folder": str(source), "images": n_calib, "inputs": len(calib)},
                     "good_images": good, "synthetic_defects": defects, "synthetic_images": synthetic,
                     "tolerance": {"mean_abs_score_diff": INT8_MEAN_SCORE_TOLERANCE,
                                   "max_abs_score_diff": INT8_SCORE_TOLERANCE,
                                   "mean_abs_map_diff": INT8_MEAN_MAP_TOLERANCE}}
            if not (real["mean_abs_score_diff"] <= INT8_MEAN_SCORE_TOLERANCE
                    and real["max_abs_score_diff"] <= INT8_SCORE_TOLERANCE
                    and real["mean_abs_map_diff"] <= INT8_MEAN_MAP_TOLERANCE):
                raise GRDNetError(
                    f"{folder}: the INT8 model strays too far from PyTorch on {real['images']} network inputs of "
                    f"training images (score difference mean {real['mean_abs_score_diff']:.3f}, allowed "
                    f"{INT8_MEAN_SCORE_TOLERANCE}, max {real['max_abs_score_diff']:.3f}, allowed "
                    f"{INT8_SCORE_TOLERANCE}; "
                    f"mean map difference {real['mean_abs_map_diff']:.4f}, allowed {INT8_MEAN_MAP_TOLERANCE}); "
                    "nothing written")
        del compiled
        props = contract(cfg, meta, config_text)
        props.update(format=OV_FORMAT, format_version=str(OV_FORMAT_VERSION), precision=check["precision"],
                     export_check=json.dumps({**check, "onnx_check": onnx_check, "opset": opset,
                                              "torch": torch.__version__, "openvino": ov.__version__}))
        for k, v in props.items():
            ov_model.set_rt_info(v, [OV_SECTION, k])
        staged = Path(tmp) / "model.xml"
        ov.save_model(ov_model, str(staged), compress_to_fp16=False)
        _ov_props(ov.Core().read_model(str(staged)), staged)  # the contract reads back
        for f in (staged, staged.with_suffix(".bin")):
            with open(f, "rb+") as h:
                os.fsync(h.fileno())
        # The .xml is the model's name: removed first and renamed last, so that an interruption
        # leaves the old IR, the new one, or no .xml, never an .xml with another IR's weights.
        out.unlink(missing_ok=True)
        os.replace(staged.with_suffix(".bin"), out.with_suffix(".bin"))
        os.replace(staged, out)
        sync_folder(out.parent)
    return out


def _ov_props(model, where) -> dict[str, str]:
    """The contract stored in an IR's runtime info; an error if the IR is not grdnet's."""
    if not model.has_rt_info([OV_SECTION, "format"]) or not model.has_rt_info([OV_SECTION, "config_json"]):
        raise GRDNetError(f"{where}: OpenVINO model without grdnet metadata (not written by 'grdnet export')")
    section = model.get_rt_info()[OV_SECTION]
    props = {k: model.get_rt_info([OV_SECTION, k]).astype(str) for k in section}
    if props.get("format") != OV_FORMAT:
        raise GRDNetError(f"{where}: OpenVINO model without grdnet metadata (not written by 'grdnet export')")
    return props


class OpenVinoPredictor(BasePredictor):
    """Scores images with an OpenVINO IR written by `export_openvino` (CPU); the same interface
    and the same pre- and post-processing as `Predictor` and `OnnxPredictor`.

    >>> p = OpenVinoPredictor.load("runs/tile/model.xml")
    >>> p.predict("part.png").label
    """

    def __init__(self, compiled, cfg: ModelConfig, threshold: float | None = None, meta: dict | None = None,
                 tile: bool | str = False, tile_overlap: float = 0.25):
        super().__init__(cfg, threshold, meta, tile, tile_overlap)
        self.compiled = compiled

    @classmethod
    def load(cls, path, threads: int | None = None, tile: bool | str | None = None) -> "OpenVinoPredictor":
        """Open an `.xml` (with its `.bin` beside it) written by `export_openvino`. `threads`:
        OpenVINO inference threads (default: as many as PyTorch uses)."""
        path = Path(path)
        if not path.is_file():
            raise GRDNetError(f"{path}: no such OpenVINO file")
        ov = _openvino(path)
        if not path.with_suffix(".bin").is_file():
            raise GRDNetError(f"{path}: its weights file {path.with_suffix('.bin').name} is missing beside it")
        try:
            model = ov.Core().read_model(str(path))
        except Exception as e:  # OpenVINO raises RuntimeError with a long multi-line message
            raise GRDNetError(f"{path}: not a valid OpenVINO model ({_first_line(e)})") from None
        props = _ov_props(model, path)
        if int(props.get("format_version", "0")) > OV_FORMAT_VERSION:
            raise GRDNetError(f"{path}: grdnet OpenVINO format {props['format_version']} is newer than this grdnet")
        try:
            doc = json.loads(props["config_json"])
        except json.JSONDecodeError as e:
            raise GRDNetError(f"{path}: unreadable config in the OpenVINO metadata ({e})") from None
        cfg, meta = parse_config(doc, path)
        try:
            compiled = _compile(ov, model, threads)
        except Exception as e:
            raise GRDNetError(f"{path}: OpenVINO cannot compile the model ({_first_line(e)})") from None
        meta["openvino"] = {k: v for k, v in props.items() if k != "config_json"}
        return cls(compiled, cfg, meta.get("threshold"), meta, trained_on_tiles(meta) if tile is None else tile)

    def _run(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps, scores = _ov_run(self.compiled, batch.detach().cpu().numpy())
        return torch.from_numpy(np.array(maps)), torch.from_numpy(np.array(scores))


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:200]
