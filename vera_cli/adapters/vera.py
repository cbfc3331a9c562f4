"""The VeRA layer: h = W0 x + diag(b) B diag(d) A x, with A and B frozen and shared."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vera_cli.adapters.layer import AdaptedLinear
from vera_cli.adapters.projections import ProjectionBank


class VeraLinear(AdaptedLinear):
    """Trains `vera_d` (r, starts at d_init) and `vera_b` (out, starts at 0: output equals the base)."""

    def __init__(self, base: nn.Linear, bank: ProjectionBank, rank: int, d_init: float, dropout: float = 0.0) -> None:
        super().__init__(base, dropout)
        device = base.weight.device
        self.vera_d = nn.Parameter(torch.full((rank,), float(d_init), device=device))
        self.vera_b = nn.Parameter(torch.zeros(self.out_features, device=device))
        # A tuple keeps the bank out of this module's children: the model registers it once.
        self._bank = (bank,)

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._bank[0].projections(self.in_features, self.out_features)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.projections()
        return self.vera_b * F.linear(self.vera_d * F.linear(x, a), b)

    def delta_weight(self) -> torch.Tensor:
        a, b = self.projections()
        return (self.vera_b[:, None] * b) @ (self.vera_d[:, None] * a)
