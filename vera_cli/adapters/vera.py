"""The VeRA layer: h = W0 x + diag(b) B diag(d) A x, with A and B frozen and shared.

On a Conv2d, A (r x in*kh*kw) is viewed as an (r, in, kh, kw) kernel, d scales its r
output channels, B (out x r) runs as a 1x1 convolution and b scales the out channels:
delta W = diag(b) B diag(d) A, reshaped to the layer's kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from vera_cli.adapters.layer import AdaptedLayer, Conv2dGeometry, LinearGeometry
from vera_cli.adapters.projections import ProjectionBank


class VeraLayer(AdaptedLayer):
    """Trains `vera_d` (r, starts at d_init) and `vera_b` (out, starts at 0: output equals the base)."""

    def __init__(self, base: nn.Module, bank: ProjectionBank, rank: int, d_init: float, dropout: float = 0.0) -> None:
        super().__init__(base, dropout)
        device = base.weight.device
        self.vera_d = nn.Parameter(torch.full((rank,), float(d_init), device=device))
        self.vera_b = nn.Parameter(torch.zeros(self.out_features, device=device))
        # A tuple keeps the bank out of this module's children: the model registers it once.
        self._bank = (bank,)

    @property
    def rank(self) -> int:
        return self.vera_d.shape[0]

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._bank[0].projections(self.fan_in, self.out_features)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.delta_from_frozen(self.frozen_delta_input(x))

    def frozen_delta_input(self, x: torch.Tensor) -> torch.Tensor:
        # A is frozen: the down-projection is fixed for a fixed input.
        return self.down(x, self.projections()[0])

    def delta_from_frozen(self, frozen: torch.Tensor) -> torch.Tensor:
        return self.per_feature(self.vera_b) * self.up(self.per_feature(self.vera_d) * frozen, self.projections()[1])

    def delta_weight(self) -> torch.Tensor:
        a, b = self.projections()
        return ((self.vera_b[:, None] * b) @ (self.vera_d[:, None] * a)).view_as(self.base.weight)


class VeraLinear(LinearGeometry, VeraLayer):
    """VeRA on an nn.Linear."""


class VeraConv2d(Conv2dGeometry, VeraLayer):
    """VeRA on an nn.Conv2d: unmerged, a conv into r channels and a 1x1 conv (or the full kernel where cheaper)."""
