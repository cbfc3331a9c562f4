"""Timing helpers the benchmarks share: medians, and round-robin calls that a shared machine's drift hits alike."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def round_robin_ms(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median milliseconds of each call, timing one call of each in turn, `rounds` times over."""
    timings: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            timings[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(values) for name, values in timings.items()}
