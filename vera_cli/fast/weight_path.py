"""Adapted layers through W0 + delta W where that costs fewer multiply-adds than the factored delta.

The adapters compute `W0 x + delta(x)`, the delta from its factors. Building delta W for the call instead
costs r in out multiply-adds whatever the input's size, so it wins where the input holds many positions
(tokens times batch in a ViT: VeRA at rank 256 then costs 8x less) or in inference. The same function to
float rounding; merged layers, dropout, no active adapter and mixed batches keep the adapters' own path.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from vera_cli.adapters.layer import AdaptedLayer


def is_cheaper(layer: AdaptedLayer, x: torch.Tensor) -> bool:
    """Factored: about P r (in + out) per pass, 2.5x that with the backward. Weight path: r in out to build
    delta W; with a backward, 3x that plus P in out for its gradient. P: the positions x holds."""
    positions, r, fan_in, out = layer.positions(x), layer.rank, layer.fan_in, layer.out_features
    if torch.is_grad_enabled():
        return 3 * r * fan_in * out + positions * fan_in * out < 2.5 * positions * r * (fan_in + out)
    return fan_in * out < positions * (fan_in + out)


def _forward(layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor:
    if layer.plain_delta() and is_cheaper(layer, x):
        return layer.with_weight(x, layer.base.weight + layer.delta_weight())
    return type(layer).forward(layer, x)


def choose_per_call(model: nn.Module) -> None:
    """Every adapted layer of `model` picks the cheaper path on each call (an instance forward; the
    parameters, the state dict and the adapter files are untouched)."""
    for module in model.modules():
        if isinstance(module, AdaptedLayer):
            # A partial, not a bound method: a model saved whole with torch.save loads again.
            module.forward = functools.partial(_forward, module)
