"""Standalone language models built from :mod:`hippolm.layers` (registered with transformers' Auto classes)."""

from .standalone import HippoCache, HippoConfig, HippoForCausalLM, HippoModel

__all__ = ["HippoCache", "HippoConfig", "HippoForCausalLM", "HippoModel"]
