"""The LoRA layer: h = W0 x + (alpha / r) B A x, with A and B trained."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vera_cli.adapters.layer import AdaptedLinear


class LoraLinear(AdaptedLinear):
    """Trains `lora_A` (r x in, Kaiming-uniform) and `lora_B` (out x r, zeros: output equals the base)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(base, dropout)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling
