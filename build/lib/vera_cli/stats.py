"""How far a mean over a few seeds can be trusted: Student t-intervals, paired verdicts, Pareto fronts.

A comparison has a handful of seeds per setting, so a normal interval would be too narrow; the t
quantile comes from the closed form of Student's t distribution for integer degrees of freedom
(Abramowitz and Stegun 26.7.3), a dozen lines instead of a dependency.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional, Sequence

LEVEL = 0.95
NO_DIFFERENCE = "no detectable difference at 95 %"


def t_central(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with `df` degrees of freedom (a positive integer)."""
    theta = math.atan(t / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    if df % 2:
        # 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)), df - 1 over 2 terms in the bracket.
        term = total = 1.0
        for k in range(1, (df - 1) // 2):
            term *= 2 * k / (2 * k + 1) * cos2
            total += term
        bracket = math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0
        return 2 / math.pi * (theta + bracket)
    # sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...), df over 2 terms.
    term = total = 1.0
    for k in range(1, df // 2):
        term *= (2 * k - 1) / (2 * k) * cos2
        total += term
    return math.sin(theta) * total


def t_quantile(p: float, df: int) -> float:
    """The t with P(T <= t) = p, for p in (0.5, 1): bisection on the central probability."""
    target = 2 * p - 1
    low, high = 0.0, 1.0
    while t_central(high, df) < target:
        low, high = high, 2 * high
    for _ in range(200):
        middle = (low + high) / 2
        if t_central(middle, df) < target:
            low = middle
        else:
            high = middle
        if high - low < 1e-12 * high:
            break
    return (low + high) / 2


@dataclass(frozen=True)
class Interval:
    """The mean of `count` values and the half-width of its 95 % Student t-interval (None under 2 values)."""

    mean: float
    half_width: Optional[float]
    count: int

    @property
    def low(self) -> Optional[float]:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> Optional[float]:
        return None if self.half_width is None else self.mean + self.half_width


def interval(values: Sequence[float]) -> Interval:
    if not values:
        raise ValueError("an interval needs at least one value")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Interval(mean, None, len(values))
    spread = statistics.stdev(values) / math.sqrt(len(values))
    return Interval(mean, t_quantile((1 + LEVEL) / 2, len(values) - 1) * spread, len(values))


def verdict(difference: Optional[Interval]) -> str:
    """What a paired difference (a line minus its reference, per seed; None: no seed in common) allows one
    to say at 95 %."""
    if difference is None:
        return "no common seed: no verdict"
    if difference.count < 2:
        return f"{difference.count} seed: no verdict"
    if difference.low > 0:
        return "better"
    if difference.high < 0:
        return "worse"
    return NO_DIFFERENCE


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For each (gain, cost): whether no other point has at least its gain at no more cost, better in one."""
    return [not any(g >= gain and c <= cost and (g > gain or c < cost) for g, c in points) for gain, cost in points]
