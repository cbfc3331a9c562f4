"""How far a grid of runs has come, about how long the rest will take, and what a time budget cuts from it."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from vera_cli.config import parse_duration
from vera_cli.errors import VeraError
from vera_cli.files import read_json


def duration(seconds: float) -> str:
    """45s, 2m10s, 1h05m: as precise as a time-left estimate deserves."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class GridProgress:
    """Rows done out of `total`; the time left is the mean time of the rows run here times the rows left.

    Rows finished before a resume count as done but not in the mean: their time was spent elsewhere.
    """

    def __init__(self, total: int, done: int = 0, clock=time.perf_counter) -> None:
        self.total, self.done, self.clock = total, done, clock
        self.ran = 0
        self.started = clock()

    def row_done(self, ran_here: bool = True) -> str:
        self.done += 1
        self.ran += ran_here
        left = self.total - self.done
        line = f"{self.done}/{self.total} rows done"
        if left and self.ran:
            line += f", about {duration((self.clock() - self.started) / self.ran * left)} left"
        return line


PLAN_FILE = "plan.json"


@dataclass
class GridPlan:
    """How long a grid takes at the pace of its first row, and which rows a time budget dropped.

    Decided once, when the first row has run, and recorded in the run: a resumed grid keeps the same cut.
    """

    rows: int
    first_row: str
    seconds_per_row: float
    budget: Optional[str] = None  # as the user wrote it: 30m
    dropped: list[str] = field(default_factory=list)
    settings: int = 0  # how many settings the grid has: each keeps its seed 0 whatever the budget

    @property
    def estimate_seconds(self) -> float:
        return self.rows * self.seconds_per_row

    def lines(self) -> list[str]:
        """What the plan says to the user once it is made."""
        said = [f"the first row ({self.first_row}) took {duration(self.seconds_per_row)}: the grid's {self.rows} rows take "
                f"about {duration(self.estimate_seconds)} if each takes as long (rows of other methods and ranks differ)"]
        if self.budget is None:
            return said
        if not self.dropped:
            return [*said, f"--budget {self.budget}: every row fits"]
        kept = self.rows - len(self.dropped)
        said.append(f"--budget {self.budget}: {kept} of the {self.rows} rows fit, about {duration(kept * self.seconds_per_row)}; "
                    f"dropped, the highest seeds first: {', '.join(self.dropped)}")
        if kept * self.seconds_per_row > budget_seconds(self.budget):
            said.append(f"note: one seed of each of the {self.settings} settings takes longer than --budget {self.budget}: "
                        "every setting keeps its seed 0 all the same")
        return said

    def cut_note(self) -> str:
        """For a table's caption: what the budget cut, or nothing."""
        if not self.dropped:
            return ""
        return f"cut to fit --budget {self.budget}: {len(self.dropped)} row(s) dropped ({', '.join(self.dropped)})"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "estimate_seconds": self.estimate_seconds}

    @classmethod
    def read(cls, path: Path) -> Optional["GridPlan"]:
        """The plan a run recorded; None before its first row ran. A damaged one is a one-line error."""
        if not path.is_file():
            return None
        raw = read_json(path)
        try:
            plan = cls(**{k: v for k, v in raw.items() if k != "estimate_seconds"})
        except (AttributeError, TypeError) as exc:
            raise VeraError(f"{path} is damaged ({exc}): remove it to plan the grid again from its next row") from exc
        if not (isinstance(plan.dropped, list) and all(isinstance(name, str) for name in plan.dropped)
                and isinstance(plan.seconds_per_row, (int, float))):
            raise VeraError(f"{path} is damaged (no list of dropped rows or no time per row): remove it to plan the grid "
                            "again from its next row")
        return plan


def budget_seconds(budget: str) -> float:
    return parse_duration(budget, "budget")


def plan_grid(points: list[tuple[str, int]], done: set[str], first_row: str, seconds_per_row: float,
              budget: Optional[str]) -> GridPlan:
    """The plan for `points` (name, seed) in grid order, `done` of them finished, each row taking `seconds_per_row`.

    A `budget` keeps as many rows as fit: every setting's seed 0 (and every finished row), then the other seeds
    lowest first, each seed in grid order; the rest are dropped.
    """
    settings = sum(1 for _, seed in points if seed == 0)
    if budget is None:
        return GridPlan(len(points), first_row, seconds_per_row, settings=settings)
    fits = int(budget_seconds(budget) // seconds_per_row) if seconds_per_row > 0 else len(points)
    kept = set(done)
    for name, seed in sorted(points, key=lambda point: point[1]):  # stable: grid order within a seed
        if name not in kept and (seed == 0 or len(kept) < fits):
            kept.add(name)
    return GridPlan(len(points), first_row, seconds_per_row, budget, [name for name, _ in points if name not in kept],
                    settings)
