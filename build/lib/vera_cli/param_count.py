"""`vera count-params`: what an adapter trains and stores, layer by layer, projections included."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

from safetensors.torch import save
from torch import nn

from vera_cli.adapters.config import AdapterConfig
from vera_cli.adapters.head import head_parameters
from vera_cli.adapters.inject import adapted_layers, inject, projection_bank
from vera_cli.adapters.layer import AdaptedLayer
from vera_cli.adapters.projections import ProjectionBank
from vera_cli.adapters.state import adapter_tensors


@dataclass
class LayerCount:
    name: str
    shape: str
    trainable: int
    frozen: int


@dataclass
class PairCount:
    key: str
    a_shape: list[int]
    b_shape: list[int]
    values: int
    layers: list[str]
    one_tensor: bool  # every layer reads this pair's storage, not a copy


# The VeRA paper's ViT-B, query and value adapted, head excluded: VeRA r256 against LoRA r8.
PAPER_VIT_B = {"vera": 24_600, "lora": 294_900}


@dataclass
class LoraContrast:
    """What LoRA trains on the same layers, beside the VeRA paper's own pair of numbers."""

    lora_rank: int
    lora: int
    vera: int
    paper_vera: int = PAPER_VIT_B["vera"]
    paper_lora: int = PAPER_VIT_B["lora"]

    @property
    def ratio(self) -> float:
        return self.lora / self.vera

    @property
    def paper_ratio(self) -> float:
        return self.paper_lora / self.paper_vera


# VeRA's projections regenerate from one seed, a 64-bit integer, whatever the number of adapters.
SEED_BYTES = 8


@dataclass
class Storage:
    """What N adapters of one method take on disk: a tensor file each, plus what they share."""

    method: str
    rank: int
    adapters: int
    values: int  # trained values per adapter
    file_bytes: int  # one adapter's tensor file (safetensors, as `vera adapt` writes it)
    shared_bytes: int  # stored once for all of them: VeRA's projection seed

    @property
    def total_bytes(self) -> int:
        return self.adapters * self.file_bytes + self.shared_bytes


@dataclass
class ParamCount:
    method: str
    rank: int
    sharing: str
    layers: list[LayerCount]
    pairs: list[PairCount] = field(default_factory=list)
    trainable: int = 0
    head_trainable: int = 0  # of `trainable`, the classifier head's (left out of the VeRA paper's counts)
    frozen_base: int = 0
    frozen_projections: int = 0
    adapter_bytes: int = 0
    versus_lora: Optional[LoraContrast] = None
    storage: list[Storage] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.trainable + self.frozen_base + self.frozen_projections

    @property
    def percent_trainable(self) -> float:
        return 100.0 * self.trainable / self.total

    @property
    def adapter_trainable(self) -> int:
        return self.trainable - self.head_trainable

    def to_dict(self) -> dict[str, Any]:
        contrast = self.versus_lora and {**asdict(self.versus_lora), "ratio": self.versus_lora.ratio,
                                         "paper_ratio": self.versus_lora.paper_ratio}
        return {**asdict(self), "versus_lora": contrast, "total": self.total, "percent_trainable": self.percent_trainable,
                "adapter_trainable": self.adapter_trainable,
                "storage": [{**asdict(row), "total_bytes": row.total_bytes} for row in self.storage]}


def _layer_shape(module: nn.Module) -> str:
    weight = getattr(module, "weight", None)
    if isinstance(module, AdaptedLayer):
        weight = module.base.weight
    return "x".join(str(d) for d in weight.shape) if weight is not None else "-"


def _layer_rows(model: nn.Module) -> list[LayerCount]:
    rows = []
    adapted = adapted_layers(model)
    for name, module in model.named_modules():
        if isinstance(module, ProjectionBank) or any(name.startswith(prefix + ".") for prefix in adapted):
            continue
        params = list(module.parameters()) if name in adapted else list(module.parameters(recurse=False))
        if not params:
            continue
        rows.append(LayerCount(name, _layer_shape(module), sum(p.numel() for p in params if p.requires_grad),
                               sum(p.numel() for p in params if not p.requires_grad)))
    return rows


def _pair_rows(model: nn.Module) -> list[PairCount]:
    bank = projection_bank(model)
    if bank is None:
        return []
    users: dict[str, list[str]] = {key: [] for key in bank.pair_shapes}
    one_tensor: dict[str, bool] = {key: True for key in bank.pair_shapes}
    for name, layer in adapted_layers(model).items():
        key = bank.key_for(layer.fan_in, layer.out_features)
        users[key].append(name)
        a, b = layer.projections()
        pair_a, pair_b = bank.pair(key)
        same = (a.untyped_storage().data_ptr() == pair_a.untyped_storage().data_ptr()
                and b.untyped_storage().data_ptr() == pair_b.untyped_storage().data_ptr())
        one_tensor[key] = one_tensor[key] and same
    rows = []
    for key in bank.pair_shapes:
        a, b = bank.pair(key)
        rows.append(PairCount(key, list(a.shape), list(b.shape), a.numel() + b.numel(), users[key], one_tensor[key]))
    return rows


def count_params(model: nn.Module, spec: AdapterConfig) -> ParamCount:
    """Count what `spec` trains on `model`, what stays frozen, and the file size; `model` is left as it is."""
    model = inject(copy.deepcopy(model), spec)
    bank = projection_bank(model)
    params = list(model.parameters())
    return ParamCount(
        method=spec.method,
        rank=spec.rank,
        sharing=spec.sharing,
        layers=_layer_rows(model),
        pairs=_pair_rows(model),
        trainable=trainable_count(model),
        head_trainable=sum(p.numel() for p in head_parameters(model)),
        frozen_base=sum(p.numel() for p in params if not p.requires_grad),
        frozen_projections=bank.num_values() if bank is not None else 0,
        adapter_bytes=len(save({k: v.contiguous() for k, v in adapter_tensors(model, spec).items()})),
    )


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def versus_lora(count: ParamCount, model: nn.Module, spec: AdapterConfig, lora_rank: int) -> ParamCount:
    """`count` (a VeRA count of `model`) with what LoRA at `lora_rank` would train on the same targets."""
    lora = trainable_count(inject(copy.deepcopy(model), replace(spec, method="lora", rank=lora_rank)))
    return replace(count, versus_lora=LoraContrast(lora_rank, lora, count.trainable))


def with_storage(count: ParamCount, model: nn.Module, spec: AdapterConfig, adapters: int,
                 lora_rank: int | None = None) -> ParamCount:
    """`count` with the disk storage of `adapters` VeRA adapters and as many LoRA adapters (at `lora_rank`, else
    the same rank) on the same layers: a file of d and b per VeRA adapter plus one seed, of A and B per LoRA one."""
    rows = []
    for method, rank in (("vera", spec.rank), ("lora", lora_rank or spec.rank)):
        counted = count if (method, rank) == (count.method, count.rank) else count_params(model, replace(spec, method=method, rank=rank))
        shared = SEED_BYTES if method == "vera" and not spec.store_projections else 0
        rows.append(Storage(method, rank, adapters, counted.trainable, counted.adapter_bytes, shared))
    return replace(count, storage=rows)
