"""A comparison's table: finished rows, one line per setting over its seeds, learning-rate winners.

What `vera compare` records and what the report and plots read: kept apart from the command so
that readers of a comparison never import the code that runs one.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

METRICS = ("chosen", "task", "rest", "overall")
# Axes tuned on the validation split: lines that differ only in these compete.
TUNED_AXES = ("lr", "head_lr")


def axis_label(value: Any) -> str:
    """How an axis value reads in names and tables: a run by its folder name, a number without trailing zeros."""
    if isinstance(value, float):
        return f"{value:g}"
    return Path(value).name if isinstance(value, str) and "/" in value else str(value)


def method_parts(method: str) -> tuple[str, str, bool]:
    """`vera-sliced+head` -> ("vera", "sliced", True): the adapt method, its sharing mode, whether the head trains."""
    name, plus, _ = method.partition("+")
    adapt_method, _, sharing = name.partition("-")
    return adapt_method, sharing, bool(plus)


@dataclass
class Row:
    """One finished grid point, as rows.jsonl records it."""

    name: str
    method: str
    rank: Optional[int]
    forgetting: str
    targets: Optional[str]
    seed: int
    trainable: int
    adapter_bytes: int
    chosen: Optional[float]
    task: Optional[float]
    rest: Optional[float]
    overall: float
    seconds: float
    setting: str = ""
    lr: Optional[float] = None
    head_lr: Optional[float] = None
    shots: Union[int, str, None] = None
    base: Optional[str] = None
    head_trainable: int = 0  # of trainable, the classifier head's
    validation: Optional[dict[str, Optional[float]]] = None  # the METRICS on the validation split

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TableLine:
    """One setting aggregated over its seeds: mean and population standard deviation per metric."""

    method: str
    rank: Optional[int]
    forgetting: str
    targets: Optional[str]
    seeds: int
    trainable: int
    adapter_bytes: int
    mean: dict[str, Optional[float]]
    std: dict[str, Optional[float]]
    lr: Optional[float] = None
    head_lr: Optional[float] = None
    shots: Union[int, str, None] = None
    base: Optional[str] = None
    head_trainable: int = 0
    validation: Optional[float] = None  # mean select_by accuracy on the validation split
    selected: bool = True  # won on validation among the lines that differ only in learning rates

    @property
    def adapter_trainable(self) -> int:
        """Trainable parameters without the head: the VeRA paper's count."""
        return self.trainable - self.head_trainable

    def to_dict(self) -> dict[str, Any]:
        flat = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("mean", "std")}
        for metric in (*METRICS, "seconds"):
            flat[metric], flat[f"{metric}_std"] = self.mean[metric], self.std[metric]
        return flat


def _mean_std(values: list[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
    if any(v is None for v in values):
        return None, None
    return statistics.fmean(values), statistics.pstdev(values)


def aggregate(base_lines: list[TableLine], rows: list[Row], select_by: str = "overall") -> list[TableLine]:
    """One line per setting, base lines first; each line that won its learning-rate tuning is `selected`."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.setting or row.name.rpartition("-s")[0], []).append(row)
    lines = []
    for members in groups.values():
        first = members[0]
        stats = {metric: _mean_std([getattr(m, metric) for m in members]) for metric in (*METRICS, "seconds")}
        validation = [m.validation[select_by] for m in members if m.validation]
        lines.append(TableLine(first.method, first.rank, first.forgetting, first.targets, len(members), first.trainable,
                               first.adapter_bytes, {k: v[0] for k, v in stats.items()},
                               {k: v[1] for k, v in stats.items()}, first.lr, first.head_lr, first.shots, first.base,
                               first.head_trainable,
                               statistics.fmean(validation) if len(validation) == len(members) else None))
    mark_selected(lines)
    return [*base_lines, *lines]


def mark_selected(lines: list[TableLine]) -> None:
    """Among lines equal but for TUNED_AXES, keep `selected` only on the best on validation."""
    contests: dict[tuple, list[TableLine]] = {}
    for line in lines:
        key = tuple(v for k, v in dataclasses.asdict(line).items()
                    if k not in (*TUNED_AXES, "mean", "std", "seeds", "validation", "selected"))
        contests.setdefault(key, []).append(line)
    for entrants in contests.values():
        scored = [line for line in entrants if line.validation is not None]
        winner = max(scored, key=lambda line: line.validation) if scored else None
        for line in entrants:
            line.selected = winner is None or line is winner
