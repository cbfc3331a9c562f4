"""The compiled chain of Linear layers and ReLUs (fast/linear_chain.c): torch's function and gradients for any
shapes, rows and thread counts, its rows sliced across threads and padded inside."""

import pytest
import torch

from vera_cli.fast import linear_chain
from vera_cli.fast.build import library
from vera_cli.fast.weight_path import vera_vector_grads, vera_weight


@pytest.fixture
def width(kernel_width, monkeypatch) -> int:
    monkeypatch.setattr(linear_chain, "vector_width", lambda: kernel_width)
    return kernel_width


def torch_chain(x, first, weights, biases):
    h = x
    for i, (w, b) in enumerate(zip(weights, biases)):
        h = h @ w.t() + (first if i == 0 and first is not None else (0 if b is None else b))
        h = torch.relu(h) if i < len(weights) - 1 else h
    return h


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows", [1, 7, 64, 203])
@pytest.mark.parametrize("dims, first_bias", [([32, 120, 84, 84, 84, 10], True), ([5, 7, 3, 10], False),
                                              ([9, 1, 13], True), ([12, 6], False)])
def test_the_chain_gives_torchs_outputs_and_gradients(threads, rows, dims, first_bias, width):
    generator = torch.Generator().manual_seed(rows * 10 + threads)
    # The input and the first layer's row biases as views into one wider tensor, as the feature cache holds them.
    held = torch.randn(rows, dims[1] + dims[0] + 3, generator=generator)
    first = held[:, :dims[1]] if first_bias else None
    x = held[:, dims[1]:dims[1] + dims[0]]
    weights = [torch.randn(dims[i + 1], dims[i], generator=generator) / dims[i] ** 0.5 for i in range(len(dims) - 1)]
    biases = [None if (i == 0 and first_bias) or i == 1 else torch.randn(dims[i + 1], generator=generator)
              for i in range(len(dims) - 1)]
    grad = torch.randn(rows, dims[-1], generator=generator)
    torch.set_num_threads(threads)
    try:
        assert linear_chain.supports(x, [*weights, *biases])
        out, saved = linear_chain.forward(x, first, weights, biases)
        assert saved.width == width
        grad_weights, grad_biases = linear_chain.backward(saved, grad)
    finally:
        torch.set_num_threads(1)
    leaves = [t.clone().requires_grad_() for t in weights] + [
        torch.zeros(dims[i + 1]).requires_grad_() if b is None else b.clone().requires_grad_()
        for i, b in enumerate(biases)]
    first_leaf = None if first is None else first.clone().requires_grad_()
    layers = len(weights)
    expected = torch_chain(x, first_leaf, leaves[:layers], leaves[layers:])
    expected.backward(grad)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # With row biases the first layer's bias gradient is that of a bias shared by the rows: their sum.
    wanted = [leaf.grad for leaf in leaves]
    if first_leaf is not None:
        wanted[layers] = first_leaf.grad.sum(0)
    for got, expected_grad in zip([*grad_weights, *grad_biases], wanted):
        if rows >= 64:
            assert expected_grad.abs().max() > 0  # every layer has a gradient to compare
        torch.testing.assert_close(got, expected_grad, rtol=1e-4, atol=1e-5)


def test_the_chain_steps_aside_where_it_cannot_run():
    x = torch.randn(8, 4)
    assert not linear_chain.supports(x.double(), [torch.randn(3, 4)])
    assert not linear_chain.supports(x.t(), [torch.randn(3, 8)])  # columns not contiguous
    assert not linear_chain.supports(x[:0], [torch.randn(3, 4)])  # no rows
    assert not linear_chain.supports(x, [torch.randn(3, 4).double()])


@pytest.mark.parametrize("rank", [3, 200])
def test_vera_weights_and_vector_grads_are_the_weight_paths(rank):
    if library() is None:
        pytest.skip("no C compiler here")
    generator = torch.Generator().manual_seed(rank)
    # A and B as slices of wider banks, as the adapters share them between layers.
    a_bank, b_bank = torch.randn(rank + 2, 40, generator=generator), torch.randn(30, rank + 1, generator=generator)
    base, a, b_proj = torch.randn(17, 23, generator=generator), a_bank[:rank, :23], b_bank[:17, :rank]
    d, b = torch.randn(rank, generator=generator), torch.randn(17, generator=generator)
    first = (b_bank[:9, :rank], torch.randn(rank, generator=generator), torch.randn(9, generator=generator))
    layers = [linear_chain.VeraLayer(base, a, b_proj, d, b), linear_chain.VeraLayer(None, None, *first)]
    held = linear_chain.VeraLayers(layers)
    full, scaled = held.weights()
    expected = [vera_weight(base, a, b_proj, d, b), vera_weight(torch.zeros(9, rank), torch.eye(rank), *first)]
    for got, want in zip(zip(full, scaled), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grads = [torch.randn(17, 23, generator=generator), torch.randn(9, rank, generator=generator)]
    got = held.vector_grads(grads, scaled)
    want = [vera_vector_grads(grads[0], a, b_proj, b, expected[0][1]),
            vera_vector_grads(grads[1], torch.eye(rank), first[0], first[2], expected[1][1])]
    for pair, wanted in zip(got, want):
        torch.testing.assert_close(pair, wanted, rtol=1e-4, atol=1e-4)


def test_a_nan_passes_through_the_chain_and_its_gradients_as_through_torch(width):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(10, 6, generator=generator)
    x[3, 2] = float("nan")
    weights = [torch.randn(5, 6, generator=generator), torch.randn(4, 5, generator=generator),
               torch.randn(3, 4, generator=generator)]
    biases = [torch.randn(5, generator=generator), None, torch.randn(3, generator=generator)]
    out, saved = linear_chain.forward(x, None, weights, biases)
    leaves = [w.clone().requires_grad_() for w in weights]
    expected = torch_chain(x, None, leaves, biases)
    assert torch.isnan(out[3]).all() and torch.isnan(expected[3]).all()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, equal_nan=True)
    # The row's NaN activations pass its gradient on (torch's relu backward zeroes only where x <= 0).
    grad = torch.randn(10, 3, generator=generator)
    expected.backward(grad)
    grad_weights, _ = linear_chain.backward(saved, grad)
    for got, leaf in zip(grad_weights, leaves):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-4, atol=1e-5, equal_nan=True)
