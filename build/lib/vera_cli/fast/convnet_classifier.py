"""The ConvNet's classifier after its cached first layer, trained as one autograd node.

On cached features an adaptation step runs the five small Linear layers on a batch of rows: tens of
microseconds of arithmetic each, while the autograd graph's per-node cost (some fifteen nodes, each
visited forward and back) was a large part of the step. Here the whole chain is one node with its
backward written out: the first layer's delta from its cached frozen part (VeRA), then each later layer
through W0 + delta W (VeRA trained in d and b) or its plain weight (frozen, or a head trained whole),
ReLUs between. Where the compiled kernels run (linear_chain.c), the node is four calls into them: the VeRA
layers' whole weights, the forward, the backward, and the gradients of d and b; otherwise torch's operators
compute it. Where any layer is otherwise (LoRA, dropout, hooks, trained base weights, autocast), or the
input needs a gradient, the plain path runs. The same function and gradients as the plain path to float
rounding; the backward is first order only.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vera_cli.adapters.layer import AdaptedLayer
from vera_cli.adapters.vera import VeraAdapter
from vera_cli.fast import linear_chain
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
        through = _KernelChain if linear_chain.supports(part, [*first, *tensors]) else _Chain
        return through.apply(part, kinds, *first, *tensors)

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
        grad_weights, grad_biases, vera_grads = [], [], []
        layers = _layers(ctx.kinds, tensors, needs)
        for i in reversed(range(len(ctx.kinds))):
            x, (kind, layer) = ctx.inputs[i], layers[i]
            grad_weight = grad.t() @ x if layer.wanted else None
            grad_weights.insert(0, grad_weight)
            grad_biases.insert(0, grad.sum(0) if layer.wanted and kind == LINEAR else None)
            if kind == VERA:
                a, b_proj_i, b_i = layer.tensors[2], layer.tensors[3], layer.tensors[5]
                vera_grads.insert(0, vera_vector_grads(grad_weight, a, b_proj_i, b_i, ctx.scaled[i])
                                  if layer.wanted else (None, None))
            # x is the ReLU's output: its gradient passes where x > 0, as relu's own backward has it.
            grad = torch.ops.aten.threshold_backward(grad @ ctx.weights[i], x, 0)
        grad_d = ((grad * b) @ b_proj * frozen).sum(0) if ctx.needs_input_grad[2] else None
        grad_b = (grad * delta).sum(0) if ctx.needs_input_grad[3] else None
        return (None, None, grad_d, grad_b, None, *_tensor_grads(ctx.kinds, tensors, needs, vera_grads,
                                                                 grad_weights, grad_biases))


class _KernelChain(torch.autograd.Function):
    """The same chain through linear_chain.c: fc1's delta as a Linear layer of its own, diag(b) B diag(d) on the
    cached frozen part, with the cached output of fc1's base as its bias, one per row; the VeRA layers' weights
    and vector gradients in one call each."""

    @staticmethod
    def forward(ctx, part: torch.Tensor, kinds: tuple[str, ...], d: torch.Tensor, b: torch.Tensor,
                b_proj: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        width = b.shape[0]
        vera, layers = [linear_chain.VeraLayer(None, None, b_proj, d, b)], _per_layer(kinds, tensors)
        for kind, layer in zip(kinds, layers):
            if kind == VERA:
                weight, _, a, b_proj_i, d_i, b_i = layer
                vera.append(linear_chain.VeraLayer(weight, a, b_proj_i, d_i, b_i))
        ctx.vera = linear_chain.VeraLayers(vera)
        full, ctx.scaled = ctx.vera.weights()
        weights, biases, made = [full[0]], [None], iter(full[1:])
        for kind, layer in zip(kinds, layers):
            weights.append(next(made) if kind == VERA else layer[0])
            biases.append(layer[1])
        out, ctx.chain = linear_chain.forward(part[:, width:], part[:, :width], weights, biases)
        ctx.kinds = kinds
        # fc1's tensors too, though ctx.vera holds them: saved, a change in place before the backward raises.
        ctx.save_for_backward(d, b, b_proj, *tensors)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # written for one backward: a second order raises instead
    def backward(ctx, grad: torch.Tensor):
        _, _, _, *tensors = ctx.saved_tensors
        (first, *grad_weights), (_, *grad_biases) = linear_chain.backward(ctx.chain, grad)
        vera_weights = [first] + [g for kind, g in zip(ctx.kinds, grad_weights) if kind == VERA]
        (grad_d, grad_b), *vera_grads = ctx.vera.vector_grads(vera_weights, ctx.scaled)
        grads = _tensor_grads(ctx.kinds, tensors, ctx.needs_input_grad[5:], vera_grads, grad_weights, grad_biases)
        return (None, None, grad_d if ctx.needs_input_grad[2] else None, grad_b if ctx.needs_input_grad[3] else None,
                None, *grads)


class _Layer(NamedTuple):
    tensors: tuple[torch.Tensor, ...]
    wanted: bool  # whether any of the layer's tensors wants a gradient: VeRA's d or b, a plain layer's own


def _layers(kinds: tuple[str, ...], tensors: list[torch.Tensor], needs: tuple[bool, ...]) -> list[tuple[str, _Layer]]:
    return [(kind, _Layer(layer, any(wants[4:6]) if kind == VERA else any(wants[:2])))
            for kind, layer, wants in zip(kinds, _per_layer(kinds, tensors), _per_layer(kinds, needs))]


def _tensor_grads(kinds: tuple[str, ...], tensors: list[torch.Tensor], needs: tuple[bool, ...], vera_grads: list,
                  grad_weights: list, grad_biases: list) -> list[torch.Tensor | None]:
    """The gradients of the later layers' tensors: VeRA's d and b as given (one pair per VeRA layer, in order),
    a plain layer's weight and bias from those of the layer."""
    grads: list[torch.Tensor | None] = []
    vera = iter(vera_grads)
    for i, kind in enumerate(kinds):
        if kind == VERA:
            grads += [None] * 4 + list(next(vera))
        else:
            grads += [grad_weights[i], grad_biases[i]]
    return [g if need else None for g, need in zip(grads, needs)]


def _per_layer(kinds: tuple[str, ...], items: Sequence) -> list[tuple]:
    """`items` (the later layers' tensors, or what is said of each) split into each layer's own."""
    layers, start = [], 0
    for kind in kinds:
        size = 6 if kind == VERA else 2
        layers.append(tuple(items[start:start + size]))
        start += size
    return layers
