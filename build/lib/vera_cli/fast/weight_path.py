"""Adapted layers through W0 + delta W where that costs fewer multiply-adds than the factored delta.

The adapters compute `W0 x + delta(x)`, the delta from its factors. Building delta W for the call instead
costs r in out multiply-adds whatever the input's size, so it wins where the input holds many positions
(tokens times batch in a ViT: VeRA at rank 256 then costs 8x less) or in inference. The same function to
float rounding; merged layers, dropout, no active adapter and mixed batches keep the adapters' own path.
VeRA on a Linear trains through `VeraLinear`, the same weight path as one autograd node.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from vera_cli.adapters.layer import AdaptedLayer, LayerAdapter
from vera_cli.adapters.vera import VeraAdapter


def is_cheaper(layer: AdaptedLayer, x: torch.Tensor) -> bool:
    """Factored: about P r (in + out) per pass, 2.5x that with the backward. Weight path: r in out to build
    delta W; with a backward, 3x that plus P in out for its gradient. P: the positions x holds."""
    positions, r, fan_in, out = layer.positions(x), layer.rank, layer.fan_in, layer.out_features
    if torch.is_grad_enabled():
        return 3 * r * fan_in * out + positions * fan_in * out < 2.5 * positions * r * (fan_in + out)
    return fan_in * out < positions * (fan_in + out)


def vera_weight(weight: torch.Tensor, a: torch.Tensor, b_proj: torch.Tensor, d: torch.Tensor,
                b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W0 + diag(b) B diag(d) A, and B diag(d) A, which the gradient of b reads."""
    scaled = b_proj @ (d[:, None] * a)
    return torch.addcmul(weight, b[:, None], scaled), scaled


def vera_vector_grads(grad_weight: torch.Tensor, a: torch.Tensor, b_proj: torch.Tensor, b: torch.Tensor,
                      scaled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of d and b from the gradient of the whole weight `vera_weight` made."""
    return ((b_proj.t() @ (b[:, None] * grad_weight)) * a).sum(1), (grad_weight * scaled).sum(1)


class VeraLinear(torch.autograd.Function):
    """x (W0 + diag(b) B diag(d) A)^T + bias, trained in d and b only: one node of the autograd graph where the
    adapters' own weight path makes six (two products, three scalings, a sum), with its backward written out.
    On the small layers of an adaptation step the graph's per-node cost is a large part of the step."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b_proj: torch.Tensor, d: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        full, scaled = vera_weight(weight, a, b_proj, d, b)
        ctx.save_for_backward(x, full, scaled, a, b_proj, b)
        return F.linear(x, full, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable  # written for one backward: a second order raises instead
    def backward(ctx, grad: torch.Tensor):
        x, full, scaled, a, b_proj, b = ctx.saved_tensors
        grad_x = grad @ full if ctx.needs_input_grad[0] else None
        grad_full = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        return (grad_x, None, None, None, None, *vera_vector_grads(grad_full, a, b_proj, b, scaled))


def one_node(layer: AdaptedLayer, part: LayerAdapter) -> bool:
    """Whether VeraLinear computes this call: VeRA on a Linear, only d and b trained, outside autocast."""
    base = layer.base
    # _parameters, not parameters(): a Linear has no submodules, and this runs for every layer on every step.
    return (isinstance(part, VeraAdapter) and isinstance(base, nn.Linear) and torch.is_grad_enabled()
            and not torch.is_autocast_enabled(base.weight.device.type)
            and not any(p is not None and p.requires_grad for p in base._parameters.values()))


def _forward(layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor:
    base = layer.base
    # Hooks on the base layer expect its own call, which the weight path replaces.
    if layer.plain_delta() and not (base._forward_hooks or base._forward_pre_hooks) and is_cheaper(layer, x):
        part = layer.current()
        if one_node(layer, part):
            a, b_proj = part.projections(layer)
            return VeraLinear.apply(x, layer.base.weight, layer.base.bias, a, b_proj, part.tensor("vera_d"),
                                    part.tensor("vera_b"))
        return layer.with_weight(x, layer.base.weight + layer.delta_weight())
    return type(layer).forward(layer, x)


def choose_per_call(model: nn.Module) -> None:
    """Every adapted layer of `model` picks the cheaper path on each call (an instance forward; the
    parameters, the state dict and the adapter files are untouched)."""
    for module in model.modules():
        if isinstance(module, AdaptedLayer):
            # A partial, not a bound method: a model saved whole with torch.save loads again.
            module.forward = functools.partial(_forward, module)
