"""Timing helpers the benchmarks share: medians, and round-robin calls that a shared machine's drift hits alike."""

from __future__ import annotations

import random
import statistics
import time
from typing import Callable

import torch

from vera_cli import fast


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def round_robin_ms(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median milliseconds of each call, timing one call of each in turn, `rounds` times over.

    The order is shuffled every round (seeded): in a fixed order each call always follows the same one, and
    a call after a twin of itself ran about 3 % faster (two copies of the base read 1.025-1.035 of each
    other over 2,000 rounds; shuffled, 0.995-0.997)."""
    timings: dict[str, list[float]] = {name: [] for name in calls}
    order, rng = list(calls), random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            start = time.perf_counter()
            calls[name]()
            timings[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(values) for name, values in timings.items()}


def product_forward(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A model's forward as the product runs it (vera_cli.fast); a PEFT model's base gets the same speed-ups, so
    that a comparison with PEFT measures the adapters alone."""
    return fast.forward(model.get_base_model() if hasattr(model, "get_base_model") else model)
