"""A chain of small Linear layers with ReLUs between, forward and backward, and VeRA layers' weights and vector
gradients, over linear_chain.c.

Plain tensors in, plain tensors out: the caller (an autograd function) builds the weights (`VeraLayers` for VeRA
layers) and turns the weight gradients into its own parameters' gradients. The forward keeps each thread's
activations for the backward in one buffer, opaque to the caller.
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import torch

from vera_cli.fast.build import address, call_with_scratch, library, vector_width


class VeraLayer(NamedTuple):
    """W0 + diag(b) B diag(d) A: `base` W0 (None: zero), `a` A (None where the layer's input is A x already, as the
    feature cache holds it), `b_proj` B, and the trained vectors."""
    base: torch.Tensor | None
    a: torch.Tensor | None
    b_proj: torch.Tensor
    d: torch.Tensor
    b: torch.Tensor


class Saved(NamedTuple):
    """What the backward reads: the activations, and the call's shapes, slicing and vector width."""
    activations: torch.Tensor
    dims: ctypes.Array
    weights: list[torch.Tensor]
    rows: int
    threads: int
    width: int


def supports(x: torch.Tensor, tensors: list[torch.Tensor | None]) -> bool:
    """Float32 rows on the CPU with unit column stride, float32 weights and biases, and the kernels built here."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.stride(1) == 1
            and x.shape[0] > 0 and library() is not None
            and all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu") for t in tensors))


def _pointers(tensors: list[torch.Tensor | None]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[None if t is None else t.data_ptr() for t in tensors])


def forward(x: torch.Tensor, first: torch.Tensor | None, weights: list[torch.Tensor],
            biases: list[torch.Tensor | None]) -> tuple[torch.Tensor, Saved]:
    """weights[-1] relu(... relu(x weights[0]^T + first) ...) + biases[-1]: `first`, one bias per row for the first
    layer (rows like x's, unit column stride), or None for biases[0]. Check `supports` first."""
    rows, threads, layers = x.shape[0], torch.get_num_threads(), len(weights)
    weights = [w.contiguous() for w in weights]
    biases = [None if b is None else b.contiguous() for b in biases]
    dims = (ctypes.c_int * (layers + 1))(x.shape[1], *(w.shape[0] for w in weights))
    largest_slice = -(-rows // threads)
    ld = (largest_slice + 15) // 16 * 16  # as linear_chain.c pads each slice
    activations = x.new_empty(threads * sum(dims[:layers]) * ld)
    out = x.new_empty(rows, dims[layers])
    # Every tensor whose address is passed is held in a name until the call returns.
    width = vector_width()
    call_with_scratch("vc_chain_forward", width, rows, threads, layers, dims, address(x), x.stride(0), address(first),
                      0 if first is None else first.stride(0), _pointers(weights), _pointers(biases),
                      address(activations), address(out))
    return out, Saved(activations, dims, weights, rows, threads, width)


def backward(saved: Saved, grad: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each layer's weight and bias gradients, from the gradient of `forward`'s output."""
    grad = grad.contiguous()
    dims, layers = saved.dims, len(saved.weights)
    sizes = [dims[l + 1] * dims[l] for l in range(layers)]
    gw = grad.new_empty(saved.threads, sum(sizes))
    gb = grad.new_empty(saved.threads, sum(dims[1:]))
    call_with_scratch("vc_chain_backward", saved.width, saved.rows, saved.threads, layers, dims,
                      _pointers(saved.weights), address(saved.activations), address(grad), address(gw), address(gb))
    gw, gb = gw[0], gb[0]  # the kernel adds the threads' sums up into the first's
    return ([g.view(dims[l + 1], dims[l]) for l, g in enumerate(gw.split(sizes))],
            list(gb.split(list(dims[1:]))))



class VeraLayers:
    """Several VeRA layers, held with their addresses for the kernels from the forward to the backward."""

    def __init__(self, layers: list[VeraLayer]) -> None:
        self.layers = [VeraLayer(*(None if t is None else t.contiguous() for t in layer)) for layer in layers]
        shape = []
        for layer in self.layers:
            out, rank = layer.b_proj.shape
            shape += [out, rank if layer.a is None else layer.a.shape[1], rank]
        self.shape = (ctypes.c_int * len(shape))(*shape)
        self.pointers = {field: _pointers([getattr(layer, field) for layer in self.layers])
                         for field in VeraLayer._fields}

    def weights(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each layer's whole weight, and its B diag(d) A (which the gradient of b reads): as
        weight_path.vera_weight computes them."""
        full = [layer.b_proj.new_empty(self.shape[3 * i], self.shape[3 * i + 1]) for i, layer in enumerate(self.layers)]
        scaled = [torch.empty_like(f) for f in full]
        call_with_scratch("vc_vera_weights", len(self.layers), torch.get_num_threads(), self.shape,
                          *self.pointers.values(), _pointers(scaled), _pointers(full))
        return full, scaled

    def vector_grads(self, grad_weights: list[torch.Tensor],
                     scaled: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's gradients of d and b from that of its whole weight, as weight_path.vera_vector_grads
        computes them."""
        grad_weights = [g.contiguous() for g in grad_weights]
        grad_d = [torch.empty_like(layer.d) for layer in self.layers]
        grad_b = [torch.empty_like(layer.b) for layer in self.layers]
        call_with_scratch("vc_vera_vector_grads", len(self.layers), torch.get_num_threads(), self.shape,
                          _pointers(grad_weights), self.pointers["a"], self.pointers["b_proj"], self.pointers["b"],
                          _pointers(scaled), _pointers(grad_d), _pointers(grad_b))
        return list(zip(grad_d, grad_b))
