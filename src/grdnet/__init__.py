"""grdnet: GRD-Net industrial visual anomaly detection.

Train on good images only (optionally with region-of-interest masks), then score and localise
defects in new images:

>>> import grdnet
>>> model_dir = grdnet.train("data/tile", "runs/tile", preset="cpu", max_minutes=20)
>>> predictor = grdnet.load(model_dir)
>>> result = predictor.predict("part.png")
>>> result.score, result.label, result.anomaly_map, result.regions
>>> report = grdnet.test(model_dir, "data/tile", out="runs/tile/report")  # metrics, as `grdnet test`
>>> grdnet.export_onnx(model_dir, "tile.onnx")  # or export_openvino(..., int8=True)
"""
from .api import calibrate, load, predict, resolve_config, test, train
from .config import ModelConfig, TrainConfig, build_config
from .errors import GRDNetError
from .export import OnnxPredictor, OpenVinoPredictor, export_onnx, export_openvino
from .scoring import Prediction, Predictor
from .version import __version__

__all__ = ["load", "train", "predict", "test", "calibrate", "resolve_config", "Predictor", "OnnxPredictor",
           "OpenVinoPredictor", "export_onnx", "export_openvino", "Prediction", "ModelConfig", "TrainConfig",
           "build_config", "GRDNetError", "__version__"]
