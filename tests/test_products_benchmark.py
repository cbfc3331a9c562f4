"""The step's products replayed alone (benchmarks/products.py): what is recorded, counted and timed."""

import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import products  # noqa: E402

aten = torch.ops.aten


def test_a_linear_layer_s_step_records_its_three_products_with_their_layouts_and_flops():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(5, 8, requires_grad=True)
    calls = products.recorded_products(lambda: layer(x).sum().backward())
    # Forward y = b + x W^T; backward dx = g W and dW = g^T x: 2 * 5 * 8 * 4 FLOPs each.
    assert sorted(str(call.func) for call in calls) == ["aten.addmm.default", "aten.mm.default", "aten.mm.default"]
    assert [call.flops for call in calls] == [320, 320, 320]
    forward = next(call for call in calls if call.func == aten.addmm.default)
    # W^T as the forward reads it: W's storage, strides swapped.
    assert forward.operands == (((4,), (1,)), ((5, 8), (8, 1)), ((8, 4), (1, 8)))
    assert all(dtype == torch.float32 for call in calls for dtype in call.dtypes)
    replayed = forward.inputs()
    assert [(tuple(t.shape), t.stride()) for t in replayed] == [(s, st) for s, st in forward.operands]


def test_batched_products_under_bf16_autocast_are_recorded_in_bf16():
    q, k = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        calls = products.recorded_products(lambda: q @ k.transpose(-2, -1))
    assert len(calls) == 1 and calls[0].func == aten.bmm.default
    assert calls[0].dtypes == (torch.bfloat16, torch.bfloat16)
    assert calls[0].flops == 2 * 6 * 4 * 8 * 4


def test_replay_runs_every_product_once_per_pass_and_keeps_the_fastest_timed_pass(monkeypatch):
    calls = products.recorded_products(lambda: torch.randn(3, 2) @ torch.randn(2, 5) + F.relu(torch.randn(3, 5)))
    assert len(calls) == 1
    ran, clock = [], [0.0]
    costs = iter([9.0, 4.0, 2.0, 3.0])  # the first, untimed pass is the slowest

    def func(*inputs):
        ran.append(tuple(t.shape for t in inputs))
        clock[0] += next(costs)

    monkeypatch.setattr(products, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    replayed = [products.Product(func, calls[0].operands, calls[0].dtypes)]
    assert products.replay_seconds(replayed, repeats=3) == 2.0
    assert ran == [((3, 2), (2, 5))] * 4
