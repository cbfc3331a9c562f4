"""What an adapter is: method, rank, sharing, targets. Validated on construction.

Messages start with the field's name so that an application can prefix where the
field sits in its own configuration (`adapter.rank must be ...`).
"""

from __future__ import annotations

import math
import re
import typing
from dataclasses import dataclass, field
from typing import Literal, Optional

from vera_cli.adapters.errors import AdapterError

Method = Literal["vera", "lora", "full", "head"]
Sharing = Literal["per-shape", "sliced"]
METHODS: tuple[str, ...] = typing.get_args(Method)
SHARING_MODES: tuple[str, ...] = typing.get_args(Sharing)
# What an empty `targets` means: the preset of every nn.Linear, as in the write-up.
DEFAULT_TARGETS = ("linear",)


@dataclass
class AdapterConfig:
    method: Method = "vera"
    rank: int = 32
    sharing: Sharing = "per-shape"
    d_init: float = 0.1
    alpha: float = 16.0
    dropout: float = 0.0
    projection_seed: int = 0
    # Presets (linear, conv, all, attention, all-linear) or regexes matched in full against
    # module names; empty means the `linear` preset, every nn.Linear.
    targets: list[str] = field(default_factory=list)
    # Modules kept fully trainable beside the adapters (for example the classifier).
    trainable: list[str] = field(default_factory=list)
    # Train the classifier head (the model's classifier_name) fully beside the adapter, as PEFT's modules_to_save;
    # the adapter then leaves that layer alone. None: not decided here (an application that knows the base
    # decides, e.g. on when the classes are new to it); this package takes it as False.
    train_head: Optional[bool] = False
    store_projections: bool = False

    def __post_init__(self) -> None:
        # Types first: a float rank (width / 4) would otherwise fail inside torch with the model half adapted.
        for name in ("rank", "projection_seed"):
            value = getattr(self, name)
            _require(isinstance(value, int) and not isinstance(value, bool), f"{name} must be an integer, got {value!r}")
        for name in ("d_init", "alpha", "dropout"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and not isinstance(value, bool), f"{name} must be a number, got {value!r}")
        for name in ("targets", "trainable"):
            value = getattr(self, name)
            # A lone string would be read letter by letter.
            hint = f" (one: [{value!r}])" if isinstance(value, str) else ""
            _require(isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value),
                     f"{name} must be a list of strings, got {value!r}{hint}")
        _require(self.method in METHODS, f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        _require(self.sharing in SHARING_MODES, f"sharing must be one of {', '.join(SHARING_MODES)}, got {self.sharing!r}")
        _require(self.rank >= 1, f"rank must be a positive integer, got {self.rank}")
        _require(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("d_init", "alpha", "dropout"):
            _require(math.isfinite(getattr(self, name)), f"{name} must be a finite number, got {getattr(self, name)}")
        # With d = 0 and b = 0 (VeRA's start) neither vector ever receives a gradient.
        _require(self.d_init != 0, "d_init must not be 0: VeRA's update would stay zero; PEFT's default is 0.1")
        _require(self.alpha > 0, f"alpha must be positive (LoRA scales its update by alpha / rank), got {self.alpha}")
        # torch seeds its generators with an unsigned 64-bit integer.
        _require(0 <= self.projection_seed < 2**64,
                 f"projection_seed must be an integer from 0 to 2**64 - 1, got {self.projection_seed}")
        # Every preset name is also a valid regex, so one check covers both kinds of target.
        for pattern in self.targets:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise AdapterError(f"targets: {pattern!r} is neither a preset nor a valid regular expression ({exc})") from exc


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise AdapterError(message)
