"""hippolm: multi-store memory for pretrained Transformer language models."""

from .ahn import AHNCache, AHNConfig, AHNForCausalLM

__version__ = "0.1.0"
__all__ = ["AHNCache", "AHNConfig", "AHNForCausalLM", "__version__"]
