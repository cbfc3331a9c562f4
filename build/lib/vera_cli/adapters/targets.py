"""Which layers an adapter wraps: named presets, or regexes matched in full against module names.

Presets are data, chosen by layer type and name, so that they mean the same on any
model: the ConvNet's fc1..fc5 and conv1..conv2, or a transformer's query/key/value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from vera_cli.adapters.config import DEFAULT_TARGETS
from vera_cli.adapters.errors import AdapterError
from vera_cli.adapters.layer import base_of, outer_modules

ADAPTABLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class Preset:
    description: str
    types: tuple[type[nn.Module], ...]
    name: str | None = None  # a regex the module name must match in full
    without_head: bool = False  # leave out the classifier head (the model's classifier_name)


PRESETS: dict[str, Preset] = {
    "linear": Preset("every nn.Linear (the default, as in the write-up)", (nn.Linear,)),
    "conv": Preset("every nn.Conv2d", (nn.Conv2d,)),
    "all": Preset("every nn.Linear and nn.Conv2d", (nn.Linear, nn.Conv2d)),
    # The VeRA paper adapts the query and value projections of attention.
    "attention": Preset("nn.Linear layers named query or value (the VeRA paper's choice)", (nn.Linear,),
                        name=r"(.*\.)?(query|value)"),
    # PEFT's meaning of all-linear: the output layer stays as it is.
    "all-linear": Preset("every nn.Linear except the classifier head", (nn.Linear,), without_head=True),
}


def has_head(model: nn.Module) -> bool:
    """Whether the model names its classifier head, an nn.Linear, in `classifier_name` (timm's convention)."""
    name = getattr(model, "classifier_name", None)
    if not isinstance(name, str):
        return False
    try:
        return isinstance(base_of(model.get_submodule(name)), nn.Linear)
    except AttributeError:
        return False


def head_name(model: nn.Module) -> str:
    """The classifier head's module name, as the model declares it."""
    if not has_head(model):
        raise AdapterError(f"{type(model).__name__} does not name its classifier head: set its classifier_name "
                           "attribute to the name of that nn.Linear layer (e.g. model.classifier_name = 'fc')")
    return model.classifier_name


def _matches(preset: Preset, name: str, module: nn.Module, head: str | None) -> bool:
    return (isinstance(module, preset.types)
            and (preset.name is None or re.fullmatch(preset.name, name) is not None)
            and not (preset.without_head and name == head))


def adaptable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Linear and nn.Conv2d by name, in model order; a layer that already carries adapters counts as
    the layer it wraps, under its own name."""
    return {name: base_of(module) for name, module in outer_modules(model) if isinstance(base_of(module), ADAPTABLE)}


def select_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the adaptable layers chosen by any preset or regex, in model order.

    A preset name wins over a module of the same name. Every pattern must choose at
    least one layer, so that a typo does not silently adapt less than asked.
    """
    candidates = adaptable_layers(model)
    head = head_name(model) if has_head(model) else None
    chosen: set[str] = set()
    for pattern in patterns or DEFAULT_TARGETS:
        preset = PRESETS.get(pattern)
        if preset is not None and preset.without_head and head is None:
            raise AdapterError(f"preset {pattern!r} leaves out the classifier head, and {type(model).__name__} names "
                               "none: set its classifier_name attribute to that nn.Linear layer's name")
        if preset is not None:
            matched = [name for name, module in candidates.items() if _matches(preset, name, module, head)]
        else:
            matched = [name for name in candidates if re.fullmatch(pattern, name)]
        if not matched:
            kind = f"preset {pattern!r} ({preset.description})" if preset else f"target {pattern!r}"
            raise AdapterError(f"{kind} matches no adaptable layer; the model's Linear and Conv2d layers are "
                               f"{', '.join(candidates) or 'none'}; presets: {', '.join(PRESETS)}")
        chosen.update(matched)
    return [name for name in candidates if name in chosen]
