"""How far a grid of runs has come, and about how long the rest will take."""

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
