"""How far a grid of runs has come, how fast it goes, and about how long the rest will take."""

from __future__ import annotations

import time


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
    """

    def __init__(self, total: int, done: int = 0, clock=time.perf_counter) -> None:
        self.total, self.done, self.clock = total, done, clock
        self.ran = 0
        self.started = clock()

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
                line += f", about {duration(left / rate * 3600)} left"
        return line
