"""Put adapters into a model: choose targets, wrap them, freeze the rest, merge, move state.

Methods:
- vera / lora: wrap the target nn.Linear and nn.Conv2d layers; only adapter tensors
  (and any modules named in `trainable`) train.
- full: every weight trains (the fine-tuning baseline).
- head: only the classifier head (the model's `classifier_name`) trains.
With `train_head`, vera / lora leave the head out of their targets and train it fully.

`inject` turns a fresh base into one adapted model: one adapter, named "default", with the head
and `trainable` modules trained in place. `attach` (behind `vera_cli.adapters.named.add_adapter`)
adds an adapter under a name beside others: every layer it trains fully gets a copy of its own,
so that the base and the other adapters keep theirs.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from vera_cli.adapters.config import AdapterConfig
from vera_cli.adapters.errors import AdapterError, RankError
from vera_cli.adapters.full import FullCopy
from vera_cli.adapters.layer import DEFAULT, AdaptedLayer, adapted_class, base_of, unsupported_reason
from vera_cli.adapters.lora import LoraAdapter
from vera_cli.adapters.projections import ProjectionBank, RecordedProjections
from vera_cli.adapters.registry import (NO_ADAPTER, activate, active_adapter, adapted_layers, adapter_names, banks,
                                        drop_banks, next_order, parts_of, projection_bank, rehome_banks, replace,
                                        require)
from vera_cli.adapters.targets import head_name, select_targets
from vera_cli.adapters.vera import VeraAdapter

__all__ = ["adapted_layers", "attach", "inject", "merge", "merged_plain", "projection_bank", "unmerge",
           "trainable_state", "load_trainable_state", "load_into", "target_layers", "useful_rank"]

LOW_RANK = ("vera", "lora")
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")


def _check_trainable(model: nn.Module, names: list[str]) -> None:
    known = dict(model.named_modules())
    for name in names:
        if name not in known:
            raise AdapterError(f"trainable names {name!r}, which is not a module of the model")


def target_layers(model: nn.Module, spec: AdapterConfig) -> dict[str, nn.Module]:
    """The plain layers to adapt, every one checked (kind, usable rank) before the model is touched."""
    head = head_name(model) if spec.train_head else None
    layers = {name: base_of(model.get_submodule(name)) for name in select_targets(model, spec.targets) if name != head}
    if "" in layers:  # an adapted layer takes the plain one's place in its parent, and the model has no parent
        raise AdapterError(f"the model is itself a {type(model).__name__}: adapters replace layers inside a model; "
                           "wrap it first (nn.Sequential(layer))")
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
        raise RankError(f"rank {spec.rank} is more than any adapted layer can use: for {spec.method} it is {rule} "
                        f"per layer, at most {limit} here ({best}: {weight[0].numel()} -> {weight.shape[0]})", limit)


def fully_trained(model: nn.Module, spec: AdapterConfig) -> list[str]:
    """The modules an adapter trains whole: the head (train_head, or the head method) and `trainable`."""
    head = [head_name(model)] if spec.train_head or spec.method == "head" else []
    return list(dict.fromkeys([*spec.trainable, *head]))


def named_refusal(model: nn.Module, spec: AdapterConfig) -> str | None:
    """Why an adapter like `spec` cannot sit beside others on one base (None: it can)."""
    if spec.method == "full":
        return "a full fine-tune changes every weight: it is a model of its own, not an adapter beside others"
    modules = dict(model.named_modules())
    adapted = set(select_targets(model, spec.targets)) if spec.method in LOW_RANK else set()
    for name in fully_trained(model, spec):
        layer = base_of(modules[name]) if name in modules else None
        if layer is not None and (not isinstance(layer, (nn.Linear, nn.Conv2d)) or unsupported_reason(layer)):
            return (f"it trains {name} ({type(layer).__name__}) whole, and an adapter beside others keeps its own "
                    "copy of an nn.Linear or a plain nn.Conv2d only")
        if name in adapted and name in spec.trainable:
            return f"trainable names {name}, which the adapter also adapts: leave it out of the targets or of trainable"
    return None


def _check_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise AdapterError(f"adapter name {name!r}: use letters, digits, _ and - (not starting with -)")
    if name == NO_ADAPTER:
        raise AdapterError(f"adapter name {NO_ADAPTER!r} means no adapter in a mixed batch: choose another name")
    if name != DEFAULT and hasattr(nn.ModuleDict(), name):
        raise AdapterError(f"adapter name {name!r} is a method of the layers' adapter container: choose another name")
    if parts_of(model, name):
        raise AdapterError(f"the model already has an adapter named {name!r}: delete it first or choose another name")


def _trained_in_place(model: nn.Module) -> list[str]:
    """Weights that train outside any adapter: modules `inject` trains in place."""
    adapter_tensors = {id(tensor) for layer in adapted_layers(model).values() for part in layer.parts.values()
                       for tensor in part.tensors().values()}
    return [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in adapter_tensors]


def _bank_for(model: nn.Module, layers: dict[str, nn.Module], spec: AdapterConfig,
              recorded: RecordedProjections | None) -> ProjectionBank:
    """The bank an adapter with `spec` reads: one the model has when it holds the very values the adapter needs
    (memory for A and B does not grow with the number of adapters), else a new one, checked."""
    shapes = [(layer.weight[0].numel(), layer.weight.shape[0]) for layer in layers.values()]
    pairs = ProjectionBank.pairs_for(shapes, spec.sharing)
    checksum = recorded.checksum if recorded is not None else None
    for _, bank in banks(model):
        if bank.serves(spec.rank, spec.sharing, spec.projection_seed, pairs, checksum):
            return bank
    bank = ProjectionBank(shapes, spec.rank, spec.sharing, spec.projection_seed)
    bank.to(next(iter(layers.values())).weight.device)
    if recorded is not None:
        if recorded.stored:
            try:
                bank.load_state_dict(recorded.stored)
            except RuntimeError as exc:
                raise AdapterError(f"the stored VeRA projections do not fit the adapter's settings "
                                   f"({str(exc).splitlines()[-1].strip()})") from exc
        if bank.checksum() != recorded.checksum:
            raise recorded.mismatch()
    return bank


def _layer(model: nn.Module, name: str, active: str | None) -> AdaptedLayer:
    """The adapted layer at `name`, wrapping the plain layer there first if needed."""
    module = model.get_submodule(name)
    if isinstance(module, AdaptedLayer):
        return module
    layer = adapted_class(module)(module)
    layer.active = active
    replace(model, name, layer)
    return layer


def attach(model: nn.Module, name: str, spec: AdapterConfig, in_place: bool = False,
           recorded: RecordedProjections | None = None) -> None:
    """Add adapter `name` as `spec` describes; on bad input the model is left unchanged. The first adapter becomes
    the active one, and the model's other weights are frozen.

    in_place: `inject`'s way, for vera and lora: the head and `trainable` modules are left for the caller to train
    in place. recorded: what an adapter file says of its projections (VeRA): the bank must hold those values.
    """
    _check_name(model, name)
    allowed = LOW_RANK if in_place else (*LOW_RANK, "head")
    if spec.method not in allowed:
        raise AdapterError(named_refusal(model, spec) or f"method {spec.method} cannot be added by name")
    existing = adapter_names(model)
    in_place_weights = _trained_in_place(model) if existing else []
    if in_place_weights:
        raise AdapterError(f"this model trains {', '.join(in_place_weights[:3])} in place (inject with the head, "
                           "trainable modules or full): add adapters by name to a fresh base instead")
    _check_trainable(model, spec.trainable)
    layers = target_layers(model, spec) if spec.method in LOW_RANK else {}
    others = sorted({str(layer.weight.dtype).removeprefix("torch.") for layer in layers.values()} - {"float32"})
    if others:
        # Adapter values and projection banks are float32, and the bank's checksum is taken in it.
        raise AdapterError(f"adapters are added to float32 layers and this model's are {', '.join(others)}: call "
                           "model.float() first, then convert the adapted model or run it under torch.autocast")
    copies = [] if in_place else fully_trained(model, spec)
    reason = named_refusal(model, spec) if copies else None
    if reason is not None:
        raise AdapterError(f"adapter {name!r} cannot sit beside others: {reason}")
    bank = _bank_for(model, layers, spec, recorded) if spec.method == "vera" else None
    is_new_bank = bank is not None and all(bank is not other for _, other in banks(model))
    # From here on nothing depends on the input: the model changes.
    if not existing:
        model.requires_grad_(False)
    order, active = next_order(model), active_adapter(model)
    for layer_name in layers:
        layer = _layer(model, layer_name, active)
        if spec.method == "vera":
            part = VeraAdapter(layer, layer.holder(name), bank, spec.rank, spec.d_init, spec.dropout, order)
        else:
            part = LoraAdapter(layer, layer.holder(name), spec.rank, spec.alpha, spec.dropout, order)
        layer.add_part(name, part)
    for layer_name in copies:
        layer = _layer(model, layer_name, active)
        layer.add_part(name, FullCopy(layer, layer.holder(name), order))
    if is_new_bank:
        rehome_banks(model, [*(known for _, known in banks(model)), bank])
    activate(model, active if active is not None else name)


def inject(model: nn.Module, spec: AdapterConfig, recorded: RecordedProjections | None = None) -> nn.Module:
    """Convert `model` in place for `spec.method` and return it; on bad input it is left unchanged.

    recorded: what an adapter file says of its projections (see `attach`)."""
    if adapted_layers(model) or banks(model):
        raise AdapterError("this model already carries adapters: load a fresh base model before adapting it again, "
                           "or add this one beside them under a name (vera_cli.adapters.named.add_adapter)")
    _check_trainable(model, spec.trainable)
    in_place = fully_trained(model, spec) if spec.method != "full" else []
    if spec.method in LOW_RANK:
        attach(model, DEFAULT, spec, in_place=True, recorded=recorded)
    else:
        model.requires_grad_(spec.method == "full")
    for name in in_place:
        model.get_submodule(name).requires_grad_(True)
    return model


def merge(model: nn.Module, name: str | None = None) -> None:
    """Fold adapter `name` (default: the active one) into the base weights and make it the active one. While it is
    merged the model computes base + that adapter at the base's cost; one adapter is merged at a time."""
    layers = adapted_layers(model).values()
    name = name if name is not None else active_adapter(model)
    other = next((layer.merged_name for layer in layers if layer.merged_name not in (None, name)), None)
    if other is not None:
        raise AdapterError(f"adapter {other!r} is merged: unmerge it before merging {name!r}")
    if name is None:
        return
    require(model, name)
    activate(model, name)
    for layer in layers:
        layer.merge(name)


def unmerge(model: nn.Module) -> None:
    """Restore the base weights exactly as they were before `merge`."""
    for layer in adapted_layers(model).values():
        layer.unmerge()


def merged_plain(model: nn.Module, name: str | None = None) -> nn.Module:
    """Merge adapter `name` (default: the active one), then put each layer's plain nn.Linear / nn.Conv2d back and
    drop the projections and every other adapter: the base model's own architecture and speed, with the
    adapter folded into its weights. Cannot be unmerged."""
    merge(model, name)
    drop_banks(model)
    for layer_name, layer in adapted_layers(model).items():
        replace(model, layer_name, layer.base)
    return model


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an adapter file holds: exactly the parameters that train."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    load_into({name: p for name, p in model.named_parameters() if p.requires_grad}, state)


def load_into(params: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into `params`, which must be exactly its keys and shapes."""
    if set(state) != set(params):
        missing = sorted(set(params) - set(state))
        extra = sorted(set(state) - set(params))
        raise AdapterError(f"the adapter tensors do not fit this model (missing {missing}, unexpected {extra})")
    for name, tensor in state.items():
        if params[name].shape != tensor.shape:
            raise AdapterError(f"adapter tensor {name} has shape {tuple(tensor.shape)}, the model expects {tuple(params[name].shape)}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)
