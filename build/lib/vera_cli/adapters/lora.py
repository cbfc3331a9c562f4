"""LoRA: h = W0 x + (alpha / r) B A x, with A and B trained.

On a Conv2d the factors have PEFT's shapes, A (r, in, kh, kw) and B (out, r, 1, 1),
so that a layer's tensors are exactly what PEFT stores for it.

In a mixed batch each distinct adapter needs its own pair of products. A few adapters in a layer,
or adapters with many positions each (a ViT's tokens), run one after another on their own samples
(as PEFT's `adapter_names` does); otherwise every sample's A and B are gathered and the products run
as one batched product per factor (a grouped convolution on a Conv2d). See `Group.loops`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vera_cli.adapters.layer import DEFAULT, AdaptedConv2d, AdaptedLayer, AdaptedLinear, LayerAdapter
from vera_cli.adapters.routing import Group

class LoraAdapter(LayerAdapter):
    """Trains `lora_A` (Kaiming-uniform over its fan-in) and `lora_B` (zeros: output equals the base)."""

    method = "lora"

    def __init__(self, layer: AdaptedLayer, holder: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 order: int = 0) -> None:
        weight = layer.base.weight
        ones = (1,) * (weight.dim() - 2)
        a = torch.empty(rank, *weight.shape[1:], device=weight.device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        super().__init__(holder, {"lora_A": a, "lora_B": torch.zeros(layer.out_features, rank, *ones, device=weight.device)},
                         dropout, order)
        self.scaling = alpha / rank

    @property
    def rank(self) -> int:
        return self.tensor("lora_A").shape[0]

    def delta(self, layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor:
        return layer.up(layer.down(x, self.tensor("lora_A")), self.tensor("lora_B")) * self.scaling

    def delta_weight(self, layer: AdaptedLayer) -> torch.Tensor:
        return (self.tensor("lora_B").flatten(1) @ self.tensor("lora_A").flatten(1)).view_as(layer.base.weight) * self.scaling

    @staticmethod
    def mixed(layer: AdaptedLayer, x: torch.Tensor, out: torch.Tensor, group: Group) -> torch.Tensor:
        if group.loops(layer, x):
            return group.one_by_one(x, out, lambda part, rows: part.delta(layer, rows), add=True)
        scaling = torch.tensor([part.scaling for part in group.parts], dtype=out.dtype, device=out.device)
        y = layer.up_per_sample(layer.down_per_sample(group.inputs(x), group.gathered("lora_A")), group.gathered("lora_B"))
        return group.put(out, y * layer.per_sample(scaling.index_select(0, group.local)[:, None], y), add=True)


class OneLora:
    """A layer with one LoRA adapter, the default one: what `inject` builds, for a layer made by hand."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(base)
        self.add_part(DEFAULT, LoraAdapter(self, self, rank, alpha, dropout))
        self.active = DEFAULT


class LoraLinear(OneLora, AdaptedLinear):
    """LoRA on an nn.Linear: A (r, in), B (out, r)."""


class LoraConv2d(OneLora, AdaptedConv2d):
    """LoRA on an nn.Conv2d: A a conv into r channels with the layer's kernel, B a 1x1 conv."""
