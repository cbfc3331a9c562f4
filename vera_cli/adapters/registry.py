"""Where a model's adapters live: its adapted layers, the adapters' names, the projection banks.

An adapter has no object of its own: it is the parts of that name in the adapted layers. The
projection banks are modules registered once on the model (`vera_projections`, then
`vera_projections_2`, ...), so that `.to()` moves them and the state dict holds each pair once;
an nn.Sequential would call a bank as a step, so there the first adapted layer holds them (a
layer's forward ignores its children).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from vera_cli.adapters.errors import AdapterError
from vera_cli.adapters.layer import AdaptedLayer, LayerAdapter, outer_modules
from vera_cli.adapters.projections import ProjectionBank
from vera_cli.adapters.vera import VeraAdapter

BANK_NAME = "vera_projections"
# What a mixed batch's per-sample names call "no adapter" (None does too).
NO_ADAPTER = "base"


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    return {name: module for name, module in outer_modules(model) if isinstance(module, AdaptedLayer)}


def adapter_names(model: nn.Module) -> list[str]:
    """The model's adapters, in the order they were added."""
    return names_in(adapted_layers(model).values())


def names_in(layers: Iterable[AdaptedLayer]) -> list[str]:
    """The adapters of these layers, in the order they were added."""
    order: dict[str, int] = {}
    for layer in layers:
        order.update(layer.orders)
    return sorted(order, key=order.__getitem__)


def next_order(model: nn.Module) -> int:
    return 1 + max((part.order for layer in adapted_layers(model).values() for part in layer.parts.values()), default=-1)


def parts_of(model: nn.Module, name: str) -> dict[str, LayerAdapter]:
    """Adapter `name`'s part in each layer it adapts, by layer name."""
    return {path: layer.parts[name] for path, layer in adapted_layers(model).items() if name in layer.parts}


def require(model: nn.Module, name: str) -> None:
    if not parts_of(model, name):
        names = adapter_names(model)
        raise AdapterError(f"the model has no adapter named {name!r}; "
                           + (f"it has {', '.join(names)}" if names else "it carries no adapters"))


def active_adapter(model: nn.Module) -> str | None:
    """The adapter the model computes with; None when none is (or it carries none)."""
    return next((layer.active for layer in adapted_layers(model).values()), None)


def activate(model: nn.Module, name: str | None) -> None:
    """Make `name` the active adapter: its tensors train, every other adapter's are frozen (as PEFT's set_adapter)."""
    for layer in adapted_layers(model).values():
        layer.active = name
        for part_name, part in layer.parts.items():
            for tensor in part.tensors().values():
                tensor.requires_grad_(part_name == name)


def named_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors by the names an adapter file gives them: `<layer>.<tensor>` whatever the adapter's name."""
    return {f"{path}.{key}": tensor for path, part in parts_of(model, name).items() for key, tensor in part.tensors().items()}


def banks(model: nn.Module) -> list[tuple[str, ProjectionBank]]:
    found = []
    for name, module in outer_modules(model):
        if isinstance(module, ProjectionBank):
            found.append((name, module))
        elif isinstance(module, AdaptedLayer):  # in an nn.Sequential the first adapted layer holds the banks
            found += [(f"{name}.{key}", child) for key, child in module._modules.items() if isinstance(child, ProjectionBank)]
    return found


def projection_bank(model: nn.Module, name: str | None = None) -> ProjectionBank | None:
    """The projections VeRA adapter `name` reads (default: the active adapter; without one, the first bank)."""
    name = name if name is not None else active_adapter(model)
    if name is None:
        return next((bank for _, bank in banks(model)), None)
    return next((part.bank for part in parts_of(model, name).values() if isinstance(part, VeraAdapter)), None)


def parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` wherever the module at `name` sits: a layer the model uses at several places (tied) stays one
    layer, adapted or plain, at each of them."""
    old = model.get_submodule(name)
    for _, module in list(outer_modules(model)):
        for key in [key for key, child in module._modules.items() if child is old]:
            setattr(module, key, new)


def drop_banks(model: nn.Module) -> list[ProjectionBank]:
    """Unregister every bank; returns them in their order."""
    found = banks(model)
    for name, _ in found:
        delattr(*parent(model, name))
    return [bank for _, bank in found]


def rehome_banks(model: nn.Module, known: list[ProjectionBank]) -> None:
    """Register once each, in order, the banks of `known` that the adapters read; unregister every other.
    `known` is gathered before layers are rewrapped: a bank held by a layer that went away is still in it."""
    drop_banks(model)
    layers = adapted_layers(model)
    used = {id(part.bank) for layer in layers.values() for part in layer.parts.values() if isinstance(part, VeraAdapter)}
    kept = [bank for bank in dict.fromkeys(known) if id(bank) in used]
    owner = next(iter(layers.values()), model) if isinstance(model, nn.Sequential) else model
    for index, bank in enumerate(kept):
        owner.add_module(BANK_NAME if index == 0 else f"{BANK_NAME}_{index + 1}", bank)
