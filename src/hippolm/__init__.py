"""hippolm: multi-store memory for pretrained Transformer language models."""

from .ahn import AHNCache, AHNConfig, AHNForCausalLM
from .models import HippoConfig, HippoForCausalLM

__version__ = "0.1.0"
__all__ = ["AHNCache", "AHNConfig", "AHNForCausalLM", "HippoConfig", "HippoForCausalLM", "__version__"]
