"""What differs between transformers versions, in one place. The cache argument's name:
``past_key_values`` up to 5.24, ``cache`` from 5.25 (the old name still works there with a warning,
until 5.40); hippolm passes whichever name the installed version takes, and its own forward/generate
accept both. The generation settings a ``generate`` call resolves to."""

from __future__ import annotations

import inspect
from typing import Any

from transformers import GenerationConfig, LlamaModel, PreTrainedModel

CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def cache_arg(cache: Any) -> dict[str, Any]:
    """``{name: cache}`` to pass a cache to a transformers forward or generate."""
    return {CACHE_ARG: cache}


def pick_cache(cache: Any, past_key_values: Any) -> Any:
    """The one cache a caller passed, as ``cache`` or as ``past_key_values``."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("two different caches were passed: give it once, as cache= (or past_key_values=, its "
                         "name before transformers 5.25).")
    return cache if cache is not None else past_key_values


def generation_config(model: PreTrainedModel, **kwargs: Any) -> tuple[GenerationConfig, dict[str, Any]]:
    """(the settings ``model.generate(**kwargs)`` runs with: the call's over the model's
    generation_config over transformers' global defaults (e.g. top_k 50 when sampling), the kwargs
    that are not generation settings), resolved as transformers' generate resolves them."""
    given = kwargs.pop("generation_config", None)
    return model._prepare_generation_config(given, **kwargs)


def expand_size(config: GenerationConfig) -> int:
    """Rows generate makes of each input row: beams or returned sequences (transformers repeats them)."""
    return max(config.num_beams or 1, config.num_return_sequences or 1)
