"""Training the AHN memory: self-distillation from the same base with full attention."""

from .data import DataError, PackedTokens, SampleOrder, resolve_files
from .loss import distill_loss, next_token_labels

__all__ = ["DataError", "PackedTokens", "SampleOrder", "distill_loss", "next_token_labels", "resolve_files"]
