"""What the command-line tools share: device and dtype choices (one rule, one message) and the
help formatter."""

from __future__ import annotations

import argparse

import torch


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except None (the help says what None means) and flags."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or isinstance(action.default, bool):
            return action.help or ""
        return super()._get_help_string(action)


def pick_device(name: str | None = "auto") -> torch.device:
    """``auto`` (or None): CUDA if present, else CPU; otherwise a torch device string that exists
    here. A ValueError that says what to pass otherwise."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here; use cpu (or auto).")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    elif device.type not in ("cpu", "mps"):
        raise ValueError(f"--device {name!r}: use auto, cpu, cuda or cuda:N.")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here; use cpu (or auto).")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA, float32 elsewhere (bf16 is slow on CPUs); else the torch dtype named."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)
