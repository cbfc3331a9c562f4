"""A layer trained fully by one adapter: its own copy of the layer's weight and bias (PEFT's modules_to_save).

An adapter that trains the classifier head (`train_head`, the `head` method) or names a layer in
`trainable` keeps such a copy per adapter, so that adapters of one model never share what one of
them trained; the base keeps its own. In a mixed batch a sample with a copy gets that layer's output
from its copy alone.
"""

from __future__ import annotations

import torch
from torch import nn

from vera_cli.adapters.layer import AdaptedLayer, LayerAdapter
from vera_cli.adapters.routing import Group


class FullCopy(LayerAdapter):
    """`weight` and `bias` (when the layer has one), starting as the base's."""

    method = "full"
    low_rank = False

    def __init__(self, layer: AdaptedLayer, holder: nn.Module, order: int = 0) -> None:
        base = layer.base
        tensors = {"weight": base.weight.detach().clone()}
        if base.bias is not None:
            tensors["bias"] = base.bias.detach().clone()
        super().__init__(holder, tensors, 0.0, order)

    def group_key(self) -> object:
        return (FullCopy,)

    def bias(self) -> torch.Tensor | None:
        return self.tensor("bias") if "bias" in self.names else None

    def output(self, layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor:
        return layer.apply_weight(x, self.tensor("weight"), self.bias())

    def merged_weights(self, layer: AdaptedLayer) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.tensor("weight"), self.bias()

    @staticmethod
    def mixed(layer: AdaptedLayer, x: torch.Tensor, out: torch.Tensor, group: Group) -> torch.Tensor:
        if group.loops(layer, x):
            return group.one_by_one(x, out, lambda part, rows: part.output(layer, rows), add=False)
        y = layer.down_per_sample(group.inputs(x), group.gathered("weight"))
        if layer.base.bias is not None:
            y = y + layer.per_sample(group.gathered("bias"), y)
        return group.put(out, y, add=False)
