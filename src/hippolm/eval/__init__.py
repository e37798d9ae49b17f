"""Long-context evaluation: perplexity by position, RULER-style needle tests, LongBench / LV-Eval /
InfiniteBench files, with full attention, SWA-only and AHN side by side (``hippolm eval``)."""

from .longbench import load_benchmark, prepare_prompts, score_benchmark, truncate_middle
from .needle import make_needle_samples, needle_heatmap, run_needle, score_needle
from .perplexity import perplexity_by_position
from .report import heatmap, summary_markdown, write_summary
from .runner import generate_batch, make_systems, memory_disabled, run_generation

__all__ = [
    "generate_batch", "heatmap", "load_benchmark", "make_needle_samples", "make_systems", "memory_disabled",
    "needle_heatmap", "perplexity_by_position", "prepare_prompts", "run_generation", "run_needle",
    "score_benchmark", "score_needle", "summary_markdown", "truncate_middle", "write_summary",
]
