"""What every adapted linear layer shares: a frozen base, a low-rank delta, merging."""

from __future__ import annotations

import torch
from torch import nn

from vera_cli.errors import VeraError


class AdaptedLinear(nn.Module):
    """Wraps a frozen nn.Linear; subclasses define the delta in factored and in full form."""

    def __init__(self, base: nn.Linear, dropout: float) -> None:
        super().__init__()
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        # None rather than nn.Identity: a module call per forward costs measurable time on small layers.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.merged = False
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution for input x, computed without the out x in matrix."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """The same contribution as an (out, in) matrix, for merging."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.base(x)
        if self.merged:
            return output
        return output + self.delta(x if self.dropout is None else self.dropout(x))

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        delta = self.delta_weight()
        if not torch.isfinite(delta).all():
            raise VeraError("refusing to merge: the adapter's weights are not finite (the run diverged; lower the learning rate)")
        self.base.weight += delta.to(self.base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
        self.merged = False
