"""hippolm: multi-store memory for pretrained Transformer language models."""

__version__ = "0.1.0"
