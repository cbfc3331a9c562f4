"""VeRA: h = W0 x + diag(b) B diag(d) A x, with A and B frozen and shared.

On a Conv2d, A (r x in*kh*kw) is viewed as an (r, in, kh, kw) kernel, d scales its r
output channels, B (out x r) runs as a 1x1 convolution and b scales the out channels:
delta W = diag(b) B diag(d) A, reshaped to the layer's kernel.

In a mixed batch every sample's adapter reads the same A and B (when they share a projection
bank), so one `A x` and one `B` product serve the whole group; only `d` and `b` differ per
sample, gathered into (samples, r) and (samples, out) tables. Where the rank exceeds the layer's
width, a few adapters over many positions cost less through each adapter's own weight on its rows
(W0 + delta W, with no base output for the batch, when every sample has a VeRA adapter here).
"""

from __future__ import annotations

import torch
from torch import nn

from vera_cli.adapters.layer import DEFAULT, AdaptedLayer, AdaptedConv2d, AdaptedLinear, LayerAdapter
from vera_cli.adapters.projections import ProjectionBank
from vera_cli.adapters.routing import Group


class VeraAdapter(LayerAdapter):
    """Trains `vera_d` (r, starts at d_init) and `vera_b` (out, starts at 0: output equals the base)."""

    method = "vera"

    def __init__(self, layer: AdaptedLayer, holder: nn.Module, bank: ProjectionBank, rank: int, d_init: float,
                 dropout: float = 0.0, order: int = 0) -> None:
        device = layer.base.weight.device
        super().__init__(holder, {"vera_d": torch.full((rank,), float(d_init), device=device),
                                  "vera_b": torch.zeros(layer.out_features, device=device)}, dropout, order)
        # The bank is registered once on the model; every part reads it.
        self.bank = bank

    @property
    def rank(self) -> int:
        return self.tensor("vera_d").shape[0]

    def projections(self, layer: AdaptedLayer) -> tuple[torch.Tensor, torch.Tensor]:
        return self.bank.projections(layer.fan_in, layer.out_features)

    def delta(self, layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor:
        return self.delta_from_frozen(layer, self.frozen_delta_input(layer, x))

    def frozen_delta_input(self, layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor:
        # A is frozen: the down-projection is fixed for a fixed input.
        return layer.down(x, self.projections(layer)[0])

    def delta_from_frozen(self, layer: AdaptedLayer, frozen: torch.Tensor) -> torch.Tensor:
        d, b = self.tensor("vera_d"), self.tensor("vera_b")
        return layer.per_feature(b) * layer.up(layer.per_feature(d) * frozen, self.projections(layer)[1])

    def delta_weight(self, layer: AdaptedLayer) -> torch.Tensor:
        a, b = self.projections(layer)
        return ((self.tensor("vera_b")[:, None] * b) @ (self.tensor("vera_d")[:, None] * a)).view_as(layer.base.weight)

    def group_key(self) -> object:
        # Parts reading one bank read the same A and B in every layer.
        return (VeraAdapter, id(self.bank), self.rank)

    @staticmethod
    def mixed(layer: AdaptedLayer, x: torch.Tensor, out: torch.Tensor, group: Group) -> torch.Tensor:
        inputs = group.inputs(x)
        if _own_weights_cost_less(layer, layer.positions(inputs), group, beside_base=True):
            return group.one_by_one(x, out, lambda part, rows: layer.apply_weight(rows, part.delta_weight(layer), None),
                                    add=True)
        a, b = group.parts[0].projections(layer)
        # A x once for the layers that read one input through one A (a ViT's query and value): at r256 on a width
        # of 128 that is one of the four products the adapters add per token.
        h = group.shared.get(x, a, group.rows, layer.down_geometry(), lambda: layer.down(inputs, a))
        y = layer.up(h * layer.per_sample(group.gathered("vera_d"), h), b)
        # In place: y is this call's own (the products' temporaries are a tenth of a small layer's time).
        return group.put(out, y.mul_(layer.per_sample(group.gathered("vera_b"), y)), add=True)

    @staticmethod
    def whole(layer: AdaptedLayer, x: torch.Tensor, group: Group) -> torch.Tensor | None:
        if not _own_weights_cost_less(layer, layer.positions(x), group, beside_base=False):
            return None
        bias = layer.base.bias
        return group.one_by_one(x, None, lambda part, rows: layer.apply_weight(rows, part.merged_weights(layer)[0], bias),
                                add=False)


# One adapter's turn in a loop over them, in multiply-adds of a large product: its dozen small operations and its
# small products. Measured on a ViT at r256 (query and value, batch 256, 2-core Intel Xeon), its weights on their
# rows cost 108 us a turn more per layer as adapters were added; they ran faster than the factors up to 32
# adapters in a batch, even at 48, and slower from 61 (1,409 against 1,512 images/s): this constant puts the
# switch there. The factored cost counted below leaves out that query and value share one `A x`, so the
# constant carries that too.
TURN = 18_000_000


def _own_weights_cost_less(layer: AdaptedLayer, positions: int, group: Group, beside_base: bool) -> bool:
    """Whether each adapter's own weight on its rows costs fewer multiply-adds than the factored delta.

    The factored form costs r (in + out) per position; building an adapter's weight costs r in out, then in out
    per position: on top of the base's output (`beside_base`, a delta weight) or instead of it (W0 + delta W).
    A rank above the layer's width (VeRA r256 on a ViT of width 128) makes the weights cheaper for a few
    adapters over many positions. Each adapter's turn also costs a Python loop step (TURN). Counting the
    adapters used costs a sort: skipped where even one weight would cost more.
    """
    per_weight, rank = layer.fan_in * layer.out_features, group.parts[0].rank
    factored = positions * rank * (layer.fan_in + layer.out_features)
    again = positions * per_weight if beside_base else 0
    turn = rank * per_weight + TURN
    return turn + again < factored and len(group.used) * turn + again < factored

class OneVera:
    """A layer with one VeRA adapter, the default one: what `inject` builds, for a layer made by hand."""

    def __init__(self, base: nn.Module, bank: ProjectionBank, rank: int, d_init: float, dropout: float = 0.0) -> None:
        super().__init__(base)
        self.add_part(DEFAULT, VeraAdapter(self, self, bank, rank, d_init, dropout))
        self.active = DEFAULT


class VeraLinear(OneVera, AdaptedLinear):
    """VeRA on an nn.Linear."""


class VeraConv2d(OneVera, AdaptedConv2d):
    """VeRA on an nn.Conv2d: unmerged, a conv into r channels and a 1x1 conv (or the full kernel where cheaper)."""
