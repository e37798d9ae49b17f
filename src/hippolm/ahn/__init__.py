"""AHN: a pretrained causal LM with sinks + sliding-window attention and a learned recurrent memory."""

from .cache import AHNCache, AHNLayerCache
from .config import MEMORY_TYPES, AHNConfig
from .graph import GraphDecoder
from .memory import MemoryModule
from .model import AHNForCausalLM, convert, fingerprint

__all__ = ["MEMORY_TYPES", "AHNCache", "AHNConfig", "AHNForCausalLM", "AHNLayerCache", "GraphDecoder", "MemoryModule",
           "convert", "fingerprint"]
