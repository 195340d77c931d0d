"""grdnet: GRD-Net industrial visual anomaly detection.

Train on good images only (optionally with region-of-interest masks), then score and localise
defects in new images:

>>> import grdnet
>>> model_dir = grdnet.train("data/tile", "runs/tile", preset="cpu", max_minutes=20)
>>> predictor = grdnet.load(model_dir)
>>> result = predictor.predict("part.png")
>>> result.score, result.label, result.anomaly_map
"""
__version__ = "0.1.0"

from .api import load, train  # noqa: E402
from .config import ModelConfig, TrainConfig, build_config  # noqa: E402
from .errors import GRDNetError  # noqa: E402
from .scoring import Prediction, Predictor  # noqa: E402
from .export import OnnxPredictor, export_onnx  # noqa: E402

__all__ = ["load", "train", "Predictor", "OnnxPredictor", "export_onnx", "Prediction", "ModelConfig", "TrainConfig", "build_config",
           "GRDNetError", "__version__"]
