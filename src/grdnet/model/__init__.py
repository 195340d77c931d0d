"""The three GRD-Net networks. They know nothing of training (see `grdnet.training`)."""
from .discriminator import Discriminator
from .generator import Generator
from .segmenter import Segmenter

__all__ = ["Generator", "Discriminator", "Segmenter"]
