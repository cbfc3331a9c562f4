"""A training step's matrix products replayed alone: how fast the step could run if nothing else took time.

Every product a step dispatches (mm, addmm, bmm, baddbmm; forward and backward, after autocast) is recorded
once with its shapes, strides and dtype, then run again on its own, on fresh tensors laid out the same way.
Against the best product of the same precision this splits a step's distance from the arithmetic limit in
two: what the products lose at the model's own shapes, and what the work between them costs.

`benchmarks/run.py` measures the ViT's step this way.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# Each product's operands (by argument position) and FLOPs from their shapes.
PRODUCTS = {
    aten.mm.default: ((0, 1), lambda a, b: 2 * a[0] * a[1] * b[1]),
    aten.addmm.default: ((1, 2), lambda a, b: 2 * a[0] * a[1] * b[1]),
    aten.bmm.default: ((0, 1), lambda a, b: 2 * a[0] * a[1] * a[2] * b[2]),
    aten.baddbmm.default: ((1, 2), lambda a, b: 2 * a[0] * a[1] * a[2] * b[2]),
}


@dataclasses.dataclass(frozen=True)
class Product:
    func: torch._ops.OpOverload
    operands: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]  # (shape, stride) of every tensor argument
    dtypes: tuple[torch.dtype, ...]

    @property
    def flops(self) -> int:
        positions, count = PRODUCTS[self.func]
        return count(*(self.operands[i][0] for i in positions))

    def inputs(self) -> list[torch.Tensor]:
        return [torch.empty_strided(shape, stride, dtype=dtype).normal_()
                for (shape, stride), dtype in zip(self.operands, self.dtypes)]


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Product] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in PRODUCTS:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            self.calls.append(Product(func, tuple((tuple(t.shape), tuple(t.stride())) for t in tensors),
                                      tuple(t.dtype for t in tensors)))
        return func(*args, **(kwargs or {}))


def recorded_products(step: Callable[[], object]) -> list[Product]:
    """The products one call of `step` dispatches, in order."""
    with _Recorder() as recorder:
        step()
    return recorder.calls


def replay_seconds(calls: list[Product], repeats: int = 5) -> float:
    """Seconds to run `calls` one after another, the best of `repeats` passes (after one untimed pass)."""
    prepared = [(call.func, call.inputs()) for call in calls]
    best = float("inf")
    for attempt in range(repeats + 1):
        start = time.perf_counter()
        for func, inputs in prepared:
            func(*inputs)
        if attempt:
            best = min(best, time.perf_counter() - start)
    return best
