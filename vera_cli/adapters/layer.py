"""What every adapted layer shares: a frozen base, a low-rank delta, merging.

A delta is built from two factors, a "down" one (r x fan_in) and an "up" one
(out x r). How a factor acts on the input depends on the base layer, so each
base type has a geometry mixin: nn.Linear multiplies over the last dimension;
nn.Conv2d runs the down factor as a convolution with the layer's own kernel size,
stride, padding and dilation into r channels, and the up factor as a 1x1
convolution, as PEFT's LoRA does. The full (out, in, kh, kw) kernel is built for
merging (and by vera_cli.fast, for a forward pass where that costs fewer multiply-adds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vera_cli.adapters.errors import AdapterError


def unsupported_reason(layer: nn.Module) -> str | None:
    """Why `layer` cannot carry an adapter, or None when it can."""
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            return f"is a grouped convolution (groups={layer.groups}); convolution adapters support groups=1 only"
        if layer.padding_mode != "zeros":
            return f"pads with {layer.padding_mode!r}; convolution adapters support zero padding only"
        return None
    if isinstance(layer, nn.Linear):
        return None
    return f"is a {type(layer).__name__}; adapters wrap nn.Linear and nn.Conv2d"


class AdaptedLayer(nn.Module):
    """Wraps a frozen layer; subclasses define the delta in factored and in full form."""

    def __init__(self, base: nn.Module, dropout: float) -> None:
        super().__init__()
        reason = unsupported_reason(base)
        if reason is not None:
            raise AdapterError(f"this layer {reason}")
        self.base = base
        # The factors' sizes: a conv's fan-in counts every weight of one output channel.
        self.fan_in = base.weight[0].numel()
        self.out_features = base.weight.shape[0]
        # None rather than nn.Identity: a module call per forward costs measurable time on small layers.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.merged = False
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution for input x, computed without the full weight."""
        raise NotImplementedError

    def frozen_delta_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the delta needs of x that frozen weights alone compute: x itself, unless a subclass knows more."""
        return x

    def delta_from_frozen(self, frozen: torch.Tensor) -> torch.Tensor:
        """The delta from `frozen_delta_input(x)`."""
        return self.delta(frozen)

    def delta_weight(self) -> torch.Tensor:
        """The same contribution in the base weight's shape, for merging."""
        raise NotImplementedError

    @property
    def rank(self) -> int:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        # Dropout acts on the adapter's input only.
        return self.base(x) + self.delta(x if self.dropout is None else self.dropout(x))

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        delta = self.delta_weight()
        if not torch.isfinite(delta).all():
            raise AdapterError("refusing to merge: the adapter's weights are not finite (the run diverged; lower the learning rate)")
        self.base.weight += delta.to(self.base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
        self.merged = False


class LinearGeometry:
    """Factors act as matrix products over the last dimension; per-feature vectors scale it."""

    base: nn.Linear

    def with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.base.bias)

    @staticmethod
    def positions(x: torch.Tensor) -> int:
        return x.numel() // x.shape[-1]

    @staticmethod
    def down(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return F.linear(x, a)

    @staticmethod
    def up(h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.linear(h, b)

    @staticmethod
    def per_feature(v: torch.Tensor) -> torch.Tensor:
        return v


class Conv2dGeometry:
    """Factors act as convolutions on (N, C, H, W); per-feature vectors scale the channels."""

    base: nn.Conv2d

    def with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight, self.base.bias, self.base.stride, self.base.padding, self.base.dilation)

    def positions(self, x: torch.Tensor) -> int:
        # Output positions, to within the border the kernel loses.
        stride_y, stride_x = self.base.stride
        return x.shape[0] * (x.shape[-2] // stride_y) * (x.shape[-1] // stride_x)

    def down(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        # (r, fan_in) viewed as an (r, in, kh, kw) kernel: a view, also of a sliced pair's columns.
        kernel = a.view(a.shape[0], *self.base.weight.shape[1:])
        return F.conv2d(x, kernel, None, self.base.stride, self.base.padding, self.base.dilation)

    @staticmethod
    def up(h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.conv2d(h, b.view(b.shape[0], b.shape[1], 1, 1))

    @staticmethod
    def per_feature(v: torch.Tensor) -> torch.Tensor:
        return v[:, None, None]
