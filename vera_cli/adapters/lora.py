"""The LoRA layer: h = W0 x + (alpha / r) B A x, with A and B trained.

On a Conv2d the factors have PEFT's shapes, A (r, in, kh, kw) and B (out, r, 1, 1),
so that a layer's tensors are exactly what PEFT stores for it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vera_cli.adapters.layer import AdaptedLayer, Conv2dGeometry, LinearGeometry


class LoraLayer(AdaptedLayer):
    """Trains `lora_A` (Kaiming-uniform over its fan-in) and `lora_B` (zeros: output equals the base)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(base, dropout)
        weight = base.weight
        ones = (1,) * (weight.dim() - 2)
        self.lora_A = nn.Parameter(torch.empty(rank, *weight.shape[1:], device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, *ones, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x, self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.flatten(1) @ self.lora_A.flatten(1)).view_as(self.base.weight) * self.scaling


class LoraLinear(LinearGeometry, LoraLayer):
    """LoRA on an nn.Linear: A (r, in), B (out, r)."""


class LoraConv2d(Conv2dGeometry, LoraLayer):
    """LoRA on an nn.Conv2d: A a conv into r channels with the layer's kernel, B a 1x1 conv."""
