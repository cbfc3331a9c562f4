"""Several adapters on one base model, by name, as PEFT offers them: add, choose, disable, delete.

    add_adapter(model, "cat", AdapterConfig(method="vera"))    # the first one added becomes active
    add_adapter(model, "dog", AdapterConfig(method="lora", rank=8))
    set_adapter(model, "dog")                                  # model(x) = base + dog
    with disable_adapters(model): model(x)                     # the base alone
    delete_adapter(model, "cat")

Adapters of any method (vera, lora, head) sit side by side. VeRA adapters with the same projection
settings (seed, rank, sharing, layer shapes) read one projection bank: memory for A and B does not
grow with the number of adapters. An adapter that trains the head (`train_head`, the `head`
method) or `trainable` layers gets its own copy of them. For a batch whose samples use different
adapters, see `vera_cli.adapters.mixed`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from vera_cli.adapters.config import AdapterConfig
from vera_cli.adapters.errors import AdapterError
from vera_cli.adapters.inject import attach
from vera_cli.adapters.registry import (activate, active_adapter, adapted_layers, adapter_names, banks,
                                        rehome_banks, replace, require)

__all__ = ["active_adapter", "add_adapter", "adapter_names", "delete_adapter", "disable_adapters", "set_adapter"]


def add_adapter(model: nn.Module, name: str, spec: AdapterConfig) -> nn.Module:
    """Add a fresh adapter (vera, lora or head) named `name`; the model's first adapter becomes the active one,
    later ones wait for `set_adapter`. On bad input the model is left unchanged. Returns `model`."""
    attach(model, name, spec)
    return model


def _refuse_while_merged(model: nn.Module, doing: str) -> None:
    merged = next((layer.merged_name for layer in adapted_layers(model).values() if layer.merged_name), None)
    if merged is not None:
        raise AdapterError(f"adapter {merged!r} is merged into the base weights: unmerge it before {doing}")


def set_adapter(model: nn.Module, name: str) -> None:
    """Compute with adapter `name` from now on; its tensors train, every other adapter's are frozen."""
    require(model, name)
    _refuse_while_merged(model, f"switching to {name!r}")
    activate(model, name)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base alone inside the block; the adapters come back after it."""
    _refuse_while_merged(model, "disabling the adapters")
    layers = list(adapted_layers(model).values())
    # Each layer's own state comes back, not "enabled": a block inside another leaves the outer one disabled.
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer, disabled in zip(layers, before):
            layer.disabled = disabled


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` and its tensors. Layers left with no adapter become the plain layers again, and
    projections no adapter reads are dropped. When it was active, the first remaining adapter becomes active
    (as in PEFT), or none."""
    require(model, name)
    layers = adapted_layers(model)
    if any(layer.merged_name == name for layer in layers.values()):
        raise AdapterError(f"adapter {name!r} is merged into the base weights: unmerge it before deleting it")
    was_active = active_adapter(model) == name
    known = [bank for _, bank in banks(model)]
    for layer_name, layer in layers.items():
        if name in layer.parts:
            layer.remove_part(name)
            if not layer.parts:
                replace(model, layer_name, layer.base)
    rehome_banks(model, known)
    if was_active:
        remaining = adapter_names(model)
        activate(model, remaining[0] if remaining else None)
