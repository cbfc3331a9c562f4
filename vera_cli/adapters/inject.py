"""Put adapters into a model: choose targets, wrap them, freeze the rest, merge, move state.

Methods:
- vera / lora: wrap the target nn.Linear and nn.Conv2d layers; only adapter tensors
  (and any modules named in `trainable`) train.
- full: every weight trains (the fine-tuning baseline).
- head: only the classifier head (the model's `classifier_name`) trains.
With `train_head`, vera / lora leave the head out of their targets and train it fully.
"""

from __future__ import annotations

import torch
from torch import nn

from vera_cli.adapters.config import AdapterConfig
from vera_cli.adapters.errors import AdapterError
from vera_cli.adapters.layer import AdaptedLayer, unsupported_reason
from vera_cli.adapters.lora import LoraConv2d, LoraLinear
from vera_cli.adapters.projections import ProjectionBank
from vera_cli.adapters.targets import head_name, select_targets
from vera_cli.adapters.vera import VeraConv2d, VeraLinear

BANK_NAME = "vera_projections"

# The adapted layer class for each method and base layer type.
LAYER_CLASSES: dict[str, dict[type[nn.Module], type[AdaptedLayer]]] = {
    "vera": {nn.Linear: VeraLinear, nn.Conv2d: VeraConv2d},
    "lora": {nn.Linear: LoraLinear, nn.Conv2d: LoraConv2d},
}


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, AdaptedLayer)}


def _bank_entry(model: nn.Module) -> tuple[str, ProjectionBank] | None:
    return next(((name, m) for name, m in model.named_modules() if isinstance(m, ProjectionBank)), None)


def projection_bank(model: nn.Module) -> ProjectionBank | None:
    entry = _bank_entry(model)
    return entry[1] if entry else None


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    setattr(*_parent(model, name), new)


def _register_bank(model: nn.Module, bank: ProjectionBank, first_layer: nn.Module) -> None:
    """Register the bank once, so that .to() moves it and the state dict holds each pair once:
    on the model itself, as `vera_projections`; an nn.Sequential would call it as a step,
    so there the first adapted layer holds it (a layer's forward ignores its children)."""
    (first_layer if isinstance(model, nn.Sequential) else model).add_module(BANK_NAME, bank)


def _layer_class(method: str, layer: nn.Module) -> type[AdaptedLayer]:
    return next(cls for base_type, cls in LAYER_CLASSES[method].items() if isinstance(layer, base_type))


def _check_trainable(model: nn.Module, names: list[str]) -> None:
    known = dict(model.named_modules())
    for name in names:
        if name not in known:
            raise AdapterError(f"trainable names {name!r}, which is not a module of the model")


def target_layers(model: nn.Module, spec: AdapterConfig) -> dict[str, nn.Module]:
    """The layers to wrap, every one checked (kind, usable rank) before the model is touched."""
    head = head_name(model) if spec.train_head else None
    layers = {name: model.get_submodule(name) for name in select_targets(model, spec.targets) if name != head}
    if not layers:
        raise AdapterError("train_head leaves no layer to adapt: add targets other than the head")
    for name, layer in layers.items():
        reason = unsupported_reason(layer)
        if reason is not None:
            raise AdapterError(f"target layer {name} {reason}: leave it out of the targets (a regex that skips it)")
    _check_rank(layers, spec)
    return layers


def useful_rank(layer: nn.Module, method: str) -> int:
    """The largest rank that still adds something to a layer's update, the layer seen as a matrix
    of out x in (in = in_channels * kernel area for a convolution).

    LoRA's update B A has rank at most min(in, out): past it the extra columns are dependent.
    VeRA's update is diag(b) B diag(d) A with frozen random A (r x in) and B (out x r), i.e. a
    combination sum_i d_i B[:, i] A[i, :] of r fixed rank-one matrices, trained through d. Those
    span up to in * out dimensions, so each rank up to in * out adds a direction d can reach
    (the update's own matrix rank stays at most min(in, out)); past in * out they are dependent.
    """
    fan_in, fan_out = layer.weight[0].numel(), layer.weight.shape[0]
    return min(fan_in, fan_out) if method == "lora" else fan_in * fan_out


def _check_rank(layers: dict[str, nn.Module], spec: AdapterConfig) -> None:
    """Refuse a rank no adapted layer can use, before a projection or matrix of that size is made."""
    best = max(layers, key=lambda name: useful_rank(layers[name], spec.method))
    limit = useful_rank(layers[best], spec.method)
    if spec.rank > limit:
        weight = layers[best].weight
        rule = "min(in, out)" if spec.method == "lora" else "in x out"
        raise AdapterError(f"rank {spec.rank} is more than any adapted layer can use: for {spec.method} it is {rule} "
                           f"per layer, at most {limit} here ({best}: {weight[0].numel()} -> {weight.shape[0]}); "
                           f"choose a rank up to {limit}")


def inject(model: nn.Module, spec: AdapterConfig) -> nn.Module:
    """Convert `model` in place for `spec.method` and return it; on bad input it is left unchanged."""
    if adapted_layers(model) or projection_bank(model) is not None:
        raise AdapterError("this model already carries adapters: load a fresh base model before adapting it again")
    _check_trainable(model, spec.trainable)
    layers = target_layers(model, spec) if spec.method in LAYER_CLASSES else {}
    model.requires_grad_(spec.method == "full")
    if spec.method == "head":
        model.get_submodule(head_name(model)).requires_grad_(True)
    if spec.method == "vera":
        bank = ProjectionBank([(layer.weight[0].numel(), layer.weight.shape[0]) for layer in layers.values()],
                              spec.rank, spec.sharing, spec.projection_seed)
        bank.to(next(model.parameters()).device)
        for name, layer in layers.items():
            _replace(model, name, _layer_class("vera", layer)(layer, bank, spec.rank, spec.d_init, spec.dropout))
        _register_bank(model, bank, model.get_submodule(next(iter(layers))))
    elif spec.method == "lora":
        for name, layer in layers.items():
            _replace(model, name, _layer_class("lora", layer)(layer, spec.rank, spec.alpha, spec.dropout))
    for name in spec.trainable + ([head_name(model)] if spec.train_head else []):
        model.get_submodule(name).requires_grad_(True)
    return model


def merge(model: nn.Module) -> None:
    for layer in adapted_layers(model).values():
        layer.merge()


def merged_plain(model: nn.Module) -> nn.Module:
    """Merge, then put each layer's plain nn.Linear / nn.Conv2d back and drop the projections:
    the base model's own architecture and speed, with the adapter folded into its weights.
    Cannot be unmerged."""
    merge(model)
    bank = _bank_entry(model)
    if bank is not None:
        delattr(*_parent(model, bank[0]))
    for name, layer in adapted_layers(model).items():
        _replace(model, name, layer.base)
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
        raise AdapterError(f"the adapter tensors do not fit this model (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for name, tensor in state.items():
            if params[name].shape != tensor.shape:
                raise AdapterError(f"adapter tensor {name} has shape {tuple(tensor.shape)}, the model expects {tuple(params[name].shape)}")
            params[name].copy_(tensor)
