"""How far a grid of runs has come, how fast it goes, about how long the rest will take, and what a time budget
cuts from it."""

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


def per_hour(rate: float) -> str:
    """2,118 or 0.42 rows/hour: whole numbers once there are ten or more."""
    return f"{rate:,.0f}" if rate >= 10 else f"{rate:.2g}"


class GridProgress:
    """Rows done out of `total`, rows per hour of the grid's wall time (since it started), and the time left:
    the wall time per row run here times the rows left. Rows that run side by side (several processes)
    share the wall time, so both figures count what the processes achieve together.

    Rows finished before a resume count as done but not in the rate: their time was spent elsewhere.
    `after_rows`: seconds of work once every row has run (the winning rates' tests), counted in the time left.
    """

    def __init__(self, total: int, done: int = 0, clock=time.perf_counter) -> None:
        self.total, self.done, self.clock = total, done, clock
        self.ran = 0
        self.started = clock()
        self.after_rows = 0.0

    def seconds(self) -> float:
        return self.clock() - self.started

    def rows_per_hour(self, seconds: float | None = None) -> float | None:
        """Rows run here per hour of the grid's wall time (`seconds`, else until now); None before any ran."""
        seconds = self.seconds() if seconds is None else seconds
        return self.ran / seconds * 3600 if self.ran and seconds > 0 else None

    def row_done(self, ran_here: bool = True) -> str:
        self.done += 1
        self.ran += ran_here
        left = self.total - self.done
        line = f"{self.done}/{self.total} rows done"
        rate = self.rows_per_hour()
        if rate is not None:
            line += f" at {per_hour(rate)} rows/hour"
            if left:
                line += f", about {duration(left / rate * 3600 + self.after_rows)} left"
            elif self.after_rows:
                line += f", about {duration(self.after_rows)} of tests left"
        return line


PLAN_FILE = "plan.json"


@dataclass
class GridPlan:
    """How long a grid takes at the pace of its first row, and which rows a time budget dropped.

    Decided once, when the first row has run, and recorded in the run: a resumed grid keeps the same cut.
    Rows of a learning-rate contest are tested after the grid (only the winners): each such row counts for
    its share of those test evaluations, each as long as the base's own (measured when the grid began).
    """

    rows: int
    first_row: str
    seconds_per_row: float
    budget: Optional[str] = None  # as the user wrote it: 30m
    dropped: list[str] = field(default_factory=list)
    settings: int = 0  # how many settings the grid has: each keeps its seed 0 whatever the budget
    workers: int = 1  # processes running rows side by side: the grid goes that many times the pace of one row
    tests: float = 0.0  # test evaluations after the grid, for all its rows
    kept_tests: float = 0.0  # the same for the rows the budget kept
    test_seconds: float = 0.0  # one of them (the base's test evaluation, on all of this process's threads)

    @property
    def grid_seconds_per_row(self) -> float:
        return self.seconds_per_row / self.workers

    @property
    def estimate_seconds(self) -> float:
        return self.rows * self.grid_seconds_per_row + self.tests * self.test_seconds

    def lines(self) -> list[str]:
        """What the plan says to the user once it is made."""
        side = f" with {self.workers} side by side" if self.workers > 1 else ""
        rows = self.rows * self.grid_seconds_per_row
        said = [f"the first row ({self.first_row}) took {duration(self.seconds_per_row)}: the grid's {self.rows} rows take "
                f"about {duration(rows)}{side} if each takes as long (rows of other methods and ranks differ)"
                + (f", then about {duration(self.tests * self.test_seconds)} to test the {self.tests:.0f} row(s) of the "
                   f"learning rates chosen on validation (each about as long as the base's test evaluation, "
                   f"{duration(self.test_seconds)}): about {duration(self.estimate_seconds)} in all" if self.tests else "")]
        if self.budget is None:
            return said
        if not self.dropped:
            return [*said, f"--budget {self.budget}: every row fits"]
        kept = self.rows - len(self.dropped)
        kept_seconds = kept * self.grid_seconds_per_row + self.kept_tests * self.test_seconds
        said.append(f"--budget {self.budget}: {kept} of the {self.rows} rows fit, about "
                    f"{duration(kept_seconds)}{' with their tests' if self.kept_tests else ''}; "
                    f"dropped, the highest seeds first: {', '.join(self.dropped)}")
        if kept_seconds > budget_seconds(self.budget):
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
                and all(isinstance(value, (int, float))
                        for value in (plan.seconds_per_row, plan.tests, plan.kept_tests, plan.test_seconds))):
            raise VeraError(f"{path} is damaged (no list of dropped rows or no time per row): remove it to plan the grid "
                            "again from its next row")
        return plan


def budget_seconds(budget: str) -> float:
    return parse_duration(budget, "budget")


def plan_grid(points: list[tuple[str, int]], done: set[str], first_row: str, seconds_per_row: float,
              budget: Optional[str], workers: int = 1, test_shares: Optional[dict[str, float]] = None,
              test_seconds: float = 0.0) -> GridPlan:
    """The plan for `points` (name, seed) in grid order, `done` of them finished, each row taking `seconds_per_row`
    and `workers` of them running side by side; the rows in `test_shares` are tested after the grid, each counting
    for its share of a test evaluation of `test_seconds` (those run one after another, each on all the threads).

    A `budget` keeps as many rows as fit: every setting's seed 0 (and every finished row), then the other seeds
    lowest first, each seed in grid order; the rest are dropped.
    """
    shares = test_shares or {}
    settings = sum(1 for _, seed in points if seed == 0)
    cost = lambda name: seconds_per_row / workers + shares.get(name, 0.0) * test_seconds  # noqa: E731
    # Rounded: three rates' thirds of a test add up to 7.999... for 8.
    tests = lambda names: round(sum(shares.get(name, 0.0) for name in names), 6)  # noqa: E731
    names = [name for name, _ in points]
    plan = GridPlan(len(points), first_row, seconds_per_row, budget, [], settings, workers, tests(names), tests(names),
                    test_seconds)
    if budget is None:
        return plan
    limit = budget_seconds(budget) * (1 + 1e-9)  # rows that fill it exactly fit, whatever the rounding
    kept = set(done)
    spent = sum(cost(name) for name in kept)
    full = False  # once a row does not fit, no later one is kept: rows of differing cost still go from the end
    for name, seed in sorted(points, key=lambda point: point[1]):  # stable: grid order within a seed
        if name in kept:
            continue
        full = full or (seed > 0 and spent + cost(name) > limit)
        if seed == 0 or not full:
            kept.add(name)
            spent += cost(name)
    return dataclasses.replace(plan, dropped=[name for name in names if name not in kept], kept_tests=tests(kept))
