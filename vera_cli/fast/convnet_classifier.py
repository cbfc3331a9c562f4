"""The ConvNet's classifier after its cached first layer, trained as one autograd node.

On cached features an adaptation step runs the five small Linear layers on a batch of rows: tens of
microseconds of arithmetic each, while the autograd graph's per-node cost (some fifteen nodes, each
visited forward and back) was a large part of the step. Here the whole chain is one node with its
backward written out: the first layer's delta from its cached frozen part (VeRA), then each later layer
through W0 + delta W (VeRA trained in d and b) or its plain weight (frozen, or a head trained whole),
ReLUs between. Where any layer is otherwise (LoRA, dropout, hooks, trained base weights, autocast), or the
input needs a gradient, the plain path runs. The same function and gradients as the plain path to float
rounding; the backward is first order only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vera_cli.adapters.layer import AdaptedLayer
from vera_cli.adapters.vera import VeraAdapter
from vera_cli.fast.forward import Forward
from vera_cli.fast.weight_path import one_node, vera_vector_grads, vera_weight
from vera_cli.models.convnet import ConvNet

# The layers of ConvNet.classifier, a ReLU after each but the last.
LAYERS = ("fc1", "fc2", "fc3", "fc4", "fc5")
VERA, LINEAR = "vera", "linear"


def cached_classifier(model: ConvNet, plain: Forward) -> Forward:
    """`plain` (the classifier from fc1's cached frozen part, as feature_cache computes it), as one node
    wherever the chain above applies to the call."""

    def forward(part: torch.Tensor) -> torch.Tensor:
        # The backward gives `part` no gradient: the cache's features never need one.
        chain = None if part.requires_grad else _chain(model)
        if chain is None:
            return plain(part)
        kinds, first, tensors = chain
        return _Chain.apply(part, kinds, *first, *tensors)

    return forward


def _chain(model: ConvNet) -> tuple[tuple[str, ...], tuple, list[torch.Tensor]] | None:
    """Each later layer's kind and tensors, and fc1's VeRA tensors; None where the chain does not apply."""
    if not torch.is_grad_enabled() or torch.is_autocast_enabled("cpu"):
        return None
    layers = [getattr(model, name) for name in LAYERS]
    if any(module._forward_hooks or module._forward_pre_hooks
           for layer in layers for module in (layer, getattr(layer, "base", layer))):
        return None
    first = _vera_part(layers[0])
    if first is None:
        return None
    kinds, tensors = [], []
    for layer in layers[1:]:
        part = _vera_part(layer)
        if part is not None:
            a, b_proj = part.projections(layer)
            kinds.append(VERA)
            tensors += [layer.base.weight, layer.base.bias, a, b_proj, part.tensor("vera_d"), part.tensor("vera_b")]
        elif type(layer) is nn.Linear:
            kinds.append(LINEAR)
            tensors += [layer.weight, layer.bias]
        else:
            return None
    return tuple(kinds), (first.tensor("vera_d"), first.tensor("vera_b"), first.projections(layers[0])[1]), tensors


def _vera_part(layer: nn.Module) -> VeraAdapter | None:
    if not isinstance(layer, AdaptedLayer) or layer.routing is not None or layer.base.bias is None:
        return None
    part = layer.current()
    return part if layer.plain_delta() and one_node(layer, part) else None


class _Chain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, part: torch.Tensor, kinds: tuple[str, ...], d: torch.Tensor, b: torch.Tensor,
                b_proj: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        base, frozen = part.split([b.shape[0], part.shape[1] - b.shape[0]], dim=1)
        delta = torch.mm(frozen * d, b_proj.t())
        x = torch.relu(torch.addcmul(base, delta, b))
        inputs, weights, scaled = [], [], []
        for i, (kind, layer) in enumerate(zip(kinds, _per_layer(kinds, tensors))):
            if kind == VERA:
                weight, bias, a, b_proj_i, d_i, b_i = layer
                full, product = vera_weight(weight, a, b_proj_i, d_i, b_i)
            else:
                (full, bias), product = layer, None
            inputs.append(x)
            weights.append(full)
            scaled.append(product)
            x = F.linear(x, full, bias)
            if i < len(kinds) - 1:
                x = torch.relu(x)
        # Made here, not inputs: kept on ctx (save_for_backward is for a call's inputs and outputs).
        ctx.inputs, ctx.weights, ctx.scaled, ctx.kinds = inputs, weights, scaled, kinds
        ctx.save_for_backward(frozen, delta, d, b, b_proj, *tensors)
        return x

    @staticmethod
    @torch.autograd.function.once_differentiable  # written for one backward: a second order raises instead
    def backward(ctx, grad: torch.Tensor):
        frozen, delta, d, b, b_proj, *tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad[5:]
        grads: list[torch.Tensor | None] = [None] * len(tensors)
        start = len(tensors)
        for i in reversed(range(len(ctx.kinds))):
            kind, x = ctx.kinds[i], ctx.inputs[i]
            start -= 6 if kind == VERA else 2
            if kind == VERA:
                a, b_proj_i, b_i = tensors[start + 2], tensors[start + 3], tensors[start + 5]
                if needs[start + 4] or needs[start + 5]:
                    grads[start + 4:start + 6] = vera_vector_grads(grad.t() @ x, a, b_proj_i, b_i, ctx.scaled[i])
            else:
                if needs[start]:
                    grads[start] = grad.t() @ x
                if needs[start + 1]:
                    grads[start + 1] = grad.sum(0)
            # x is the ReLU's output: its gradient passes where x > 0, as relu's own backward has it.
            grad = torch.ops.aten.threshold_backward(grad @ ctx.weights[i], x, 0)
        grad_d = ((grad * b) @ b_proj * frozen).sum(0) if ctx.needs_input_grad[2] else None
        grad_b = (grad * delta).sum(0) if ctx.needs_input_grad[3] else None
        return (None, None, grad_d, grad_b, None, *grads)


def _per_layer(kinds: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, ...]]:
    layers, start = [], 0
    for kind in kinds:
        size = 6 if kind == VERA else 2
        layers.append(tensors[start:start + size])
        start += size
    return layers
