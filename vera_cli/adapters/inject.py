"""Put adapters into a model: choose targets, wrap them, freeze the rest, merge, move state.

Methods:
- vera / lora: wrap the target nn.Linear layers; only adapter tensors (and any
  modules named in `trainable`) train.
- full: every weight trains (the fine-tuning baseline).
- head: only the last nn.Linear trains.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from vera_cli.adapters.layer import AdaptedLinear
from vera_cli.adapters.lora import LoraLinear
from vera_cli.adapters.projections import ProjectionBank
from vera_cli.adapters.vera import VeraLinear
from vera_cli.config import AdapterConfig
from vera_cli.errors import VeraError

BANK_NAME = "vera_projections"


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def select_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of nn.Linear layers matched in full by any pattern; every nn.Linear when none are given."""
    candidates = linear_names(model)
    if not patterns:
        return candidates
    chosen = []
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise VeraError(f"target {pattern!r} is not a valid regular expression ({exc})") from exc
        matched = [name for name in candidates if regex.fullmatch(name)]
        if not matched:
            raise VeraError(f"target {pattern!r} matches no linear layer; the model has {', '.join(candidates)}")
        chosen.extend(name for name in matched if name not in chosen)
    return [name for name in candidates if name in chosen]


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, AdaptedLinear)}


def projection_bank(model: nn.Module) -> ProjectionBank | None:
    return getattr(model, BANK_NAME, None)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _set_trainable(model: nn.Module, names: list[str]) -> None:
    known = dict(model.named_modules())
    for name in names:
        if name not in known:
            raise VeraError(f"adapter.trainable names {name!r}, which is not a module of the model")
        for param in known[name].parameters():
            param.requires_grad_(True)


def inject(model: nn.Module, spec: AdapterConfig) -> nn.Module:
    """Convert `model` in place for `spec.method` and return it."""
    if adapted_layers(model) or projection_bank(model) is not None:
        raise VeraError("this model already carries adapters: load a fresh base model before adapting it again")
    model.requires_grad_(False)
    if spec.method == "full":
        model.requires_grad_(True)
        return model
    if spec.method == "head":
        model.get_submodule(linear_names(model)[-1]).requires_grad_(True)
        return model
    targets = select_targets(model, spec.targets)
    layers = {name: model.get_submodule(name) for name in targets}
    if spec.method == "vera":
        shapes = [(layer.in_features, layer.out_features) for layer in layers.values()]
        bank = ProjectionBank(shapes, spec.rank, spec.sharing, spec.projection_seed)
        bank.to(next(model.parameters()).device)
        model.add_module(BANK_NAME, bank)
        for name, layer in layers.items():
            _replace(model, name, VeraLinear(layer, bank, spec.rank, spec.d_init, spec.dropout))
    else:
        for name, layer in layers.items():
            _replace(model, name, LoraLinear(layer, spec.rank, spec.alpha, spec.dropout))
    _set_trainable(model, spec.trainable)
    return model


def merge(model: nn.Module) -> None:
    for layer in adapted_layers(model).values():
        layer.merge()


def merged_plain(model: nn.Module) -> nn.Module:
    """Merge, then put each layer's plain nn.Linear back and drop the projections: the base model's
    own architecture and speed, with the adapter folded into its weights. Cannot be unmerged."""
    merge(model)
    for name, layer in adapted_layers(model).items():
        _replace(model, name, layer.base)
    if projection_bank(model) is not None:
        delattr(model, BANK_NAME)
    return model


def unmerge(model: nn.Module) -> None:
    for layer in adapted_layers(model).values():
        layer.unmerge()


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an adapter file holds: exactly the parameters that train."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    expected = {name for name, p in params.items() if p.requires_grad}
    if set(state) != expected:
        missing = sorted(expected - set(state))
        extra = sorted(set(state) - expected)
        raise VeraError(f"the adapter file does not fit this model (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for name, tensor in state.items():
            if params[name].shape != tensor.shape:
                raise VeraError(f"adapter tensor {name} has shape {tuple(tensor.shape)}, the model expects {tuple(params[name].shape)}")
            params[name].copy_(tensor)
