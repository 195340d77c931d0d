"""grdnet: GRD-Net industrial visual anomaly detection.

Train on good images only (optionally with region-of-interest masks), then score and localise
defects in new images:

>>> import grdnet
>>> model_dir = grdnet.train("data/tile", "runs/tile", preset="cpu", max_minutes=20)
>>> predictor = grdnet.load(model_dir)
>>> result = predictor.predict("part.png")
>>> result.score, result.label, result.anomaly_map
"""
from .api import load, train
from .config import ModelConfig, TrainConfig, build_config
from .errors import GRDNetError
from .export import OnnxPredictor, OpenVinoPredictor, export_onnx, export_openvino
from .scoring import Prediction, Predictor
from .version import __version__

__all__ = ["load", "train", "Predictor", "OnnxPredictor", "OpenVinoPredictor", "export_onnx", "export_openvino", "Prediction", "ModelConfig", "TrainConfig", "build_config",
           "GRDNetError", "__version__"]
