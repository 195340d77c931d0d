"""The GRD-Net networks. They know nothing of training (see `grdnet.training`)."""
from .discriminator import Discriminator
from .generator import Decoder, ResEncoder
from .grdnet import INFERENCE_PARTS, GRDNet
from .segmenter import Segmenter

__all__ = ["GRDNet", "INFERENCE_PARTS", "ResEncoder", "Decoder", "Discriminator", "Segmenter"]
