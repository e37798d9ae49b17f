"""Configuration of the AHN memory added to a base model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

MEMORY_TYPES = ("mamba2", "deltanet", "gdn", "loglinear_mamba2", "loglinear_gdn")


@dataclass
class AHNConfig:
    """What memory is added and how much lossless context each layer keeps.

    ``sinks`` first tokens and the last ``window`` tokens (the current one included) stay in the
    KV cache; every other token is compressed into the memory the moment it leaves the window.
    ``levels`` (log-linear memories only) bounds the tokens the memory can hold: 2**(levels-1).
    """

    memory: str = "gdn"
    window: int = 2048
    sinks: int = 128
    levels: int = 21
    base_model: str = ""  # name or path of the base, recorded so memory files are not mixed up
    base_fingerprint: dict = field(default_factory=dict)  # shapes that must match the base

    def __post_init__(self) -> None:
        validate_window(self.window, self.sinks)
        if self.memory not in MEMORY_TYPES:
            raise ValueError(f"memory must be one of {', '.join(MEMORY_TYPES)}, got {self.memory!r}.")
        if not isinstance(self.levels, int) or self.levels < 2:
            raise ValueError(f"levels must be an int >= 2, got {self.levels!r}.")

    @property
    def loglinear(self) -> bool:
        return self.memory.startswith("loglinear_")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AHNConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def validate_window(window: int, sinks: int) -> None:
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int (tokens kept losslessly), got {window!r}.")
    if not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"sinks must be a non-negative int, got {sinks!r}.")
