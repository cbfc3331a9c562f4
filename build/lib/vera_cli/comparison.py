"""A comparison's grid and table: its points, finished rows, one line per setting over its seeds,
learning-rate winners, verdicts against a reference line and the Pareto fronts of accuracy against cost.

What `vera compare` records and what the report and plots read: kept apart from the command so
that readers of a comparison never import the code that runs one.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from vera_cli.adapters.config import DEFAULT_TARGETS
from vera_cli.config import RANKLESS, CompareConfig, compared_method
from vera_cli.errors import VeraError
from vera_cli.files import read_jsonl
from vera_cli.stats import Interval, interval, pareto_front, verdict

METRICS = ("chosen", "task", "rest", "overall")
# What each row cost beside its accuracy; None in rows recorded before they were measured.
COSTS = ("train_seconds", "train_seconds_per_1k_images", "inference_ms_per_image", "peak_memory_bytes")
QUANTITIES = (*METRICS, "seconds", *COSTS)
# Axes tuned on the validation split: lines that differ only in these compete.
TUNED_AXES = ("lr", "head_lr")
# Axes whose lines are never compared with each other: a verdict pairs seeds within one shots and one base.
PAIRED_AXES = ("shots", "base")
ROWS_FILE = "rows.jsonl"


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


def line_name(method: str, rank: Optional[int], targets: Optional[str], forgetting: str) -> str:
    """A setting's name without its protocol axes (learning rates, shots, base): `lora-r8-replay`.

    The default targets stay out of the name, so rows read as before; a regex becomes a safe folder name.
    """
    rank_part = f"-r{rank}" if rank is not None else ""
    targets_part = f"-{re.sub(r'[^A-Za-z0-9.-]+', '_', targets)}" if targets not in (None, *DEFAULT_TARGETS) else ""
    return f"{method}{rank_part}{targets_part}-{forgetting}"


# Protocol axes of a grid point: (field, prefix in the point's name). A point names only the axes
# the comparison sets, so that a grid without them keeps its old names.
NAMED_AXES = (("lr", "lr"), ("head_lr", "hlr"), ("shots", "k"), ("base", "on-"))


@dataclass
class GridPoint:
    method: str
    rank: int | None
    forgetting: str
    seed: int
    targets: str | None = None  # a preset or regex; None for the rankless methods
    lr: Optional[float] = None
    head_lr: Optional[float] = None
    shots: Union[int, str, None] = None  # an int, "all", or None: the method's config decides
    base: Optional[str] = None  # a pretrain run when the comparison has a bases axis

    @property
    def line(self) -> str:
        """The name without the seed and the protocol axes: what `--reference` matches."""
        return line_name(self.method, self.rank, self.targets, self.forgetting)

    @property
    def setting(self) -> str:
        """The name without the seed: what the seeds of one setting share."""
        extra = "".join(f"-{prefix}{axis_label(getattr(self, axis))}" for axis, prefix in NAMED_AXES
                        if getattr(self, axis) is not None)
        return f"{self.line}{extra}"

    @property
    def name(self) -> str:
        return f"{self.setting}-s{self.seed}"


def grid(cfg: CompareConfig) -> list[GridPoint]:
    """Every point once, in the order given: `--ranks 4,4` or a method named twice adds nothing."""
    points: dict[str, GridPoint] = {}
    for own in map(compared_method, cfg.methods):
        method, rankless = own.method, own.method in RANKLESS
        head_lrs = (cfg.head_lrs if method_parts(method)[2] else []) or [None]
        ranks = [None] if rankless else [own.rank] if own.rank else cfg.ranks
        targets = [None] if rankless else [own.targets] if own.targets else cfg.targets
        axes = itertools.product(ranks, targets, cfg.forgetting, cfg.lrs or [None], head_lrs, cfg.shots or [None],
                                 cfg.bases or [None])
        for rank, targets, forgetting, lr, head_lr, shots, base in axes:
            for seed in range(cfg.seeds):
                point = GridPoint(method, rank, forgetting, seed, targets, lr, head_lr, shots, base)
                points.setdefault(point.name, point)
    return list(points.values())


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
    chosen: Optional[float]  # the test METRICS: None while a learning-rate contest leaves them for its winner
    task: Optional[float]
    rest: Optional[float]
    overall: Optional[float]
    seconds: float
    setting: str = ""
    lr: Optional[float] = None
    head_lr: Optional[float] = None
    shots: Union[int, str, None] = None
    base: Optional[str] = None
    head_trainable: int = 0  # of trainable, the classifier head's
    validation: Optional[dict[str, Optional[float]]] = None  # the METRICS on the validation split
    train_seconds: Optional[float] = None  # the training epochs' own seconds, evaluation left out
    train_seconds_per_1k_images: Optional[float] = None
    inference_ms_per_image: Optional[float] = None  # the adapted model with its adapter unmerged
    peak_memory_bytes: Optional[int] = None  # CUDA's peak allocation, else the resident-set high-water mark

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def setting_of(row: Row) -> str:
    """The row's setting; rows recorded before it was (only their names) give it from the name."""
    return row.setting or row.name.rpartition("-s")[0]


def read_rows(path: Path) -> list[Row]:
    """The rows a comparison recorded; a damaged record is dropped (its grid point is taken from its run again),
    and a later record of a row (its test figures, added once its learning rate won) replaces the earlier."""
    rows: dict[str, Row] = {}
    for record in read_jsonl(path):
        try:
            row = Row(**record)
        except TypeError:
            continue
        rows[row.name] = row
    return list(rows.values())


def contest(point: GridPoint) -> tuple:
    """The point's learning-rate contest: what the points that differ from it in TUNED_AXES (and the seed) only share."""
    return point.method, point.rank, point.forgetting, point.targets, point.shots, point.base


@dataclass
class TableLine:
    """One setting aggregated over its seeds: mean and population standard deviation per quantity, the
    half-width of the mean's 95 % t-interval per metric, and how it fares against its reference line."""

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
    name: str = ""  # line_name: what --reference matches
    setting: str = ""  # the setting its rows share (the name without the seed)
    ci: dict[str, Optional[float]] = field(default_factory=dict)  # per metric; None under two seeds
    reference: Optional[str] = None  # the name of the line this one is judged against
    difference: Optional[Interval] = None  # this line minus the reference, paired by seed
    verdict: str = ""  # "reference" on the reference line itself
    pareto: str = ""  # "bytes", "time", "bytes time": the fronts of task accuracy against those costs

    @property
    def adapter_trainable(self) -> int:
        """Trainable parameters without the head: the VeRA paper's count."""
        return self.trainable - self.head_trainable

    def to_dict(self) -> dict[str, Any]:
        flat = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("mean", "std", "ci", "difference")}
        for quantity in QUANTITIES:
            flat[quantity], flat[f"{quantity}_std"] = self.mean.get(quantity), self.std.get(quantity)
        for metric in METRICS:
            flat[f"{metric}_ci95"] = self.ci.get(metric)
        difference = self.difference
        flat.update(difference=difference.mean if difference else None,
                    difference_ci95=difference.half_width if difference else None,
                    pairs=difference.count if difference else None)
        return flat


def base_line(metrics: dict[str, Optional[float]], label: Optional[str]) -> TableLine:
    """The base model's line: its test metrics, nothing trained, nothing measured beside them."""
    return TableLine("base", None, "-", None, 1, 0, 0, {**{m: metrics[m] for m in METRICS}, "seconds": 0.0,
                                                        **{c: None for c in COSTS}},
                     {**{m: 0.0 for m in (*METRICS, "seconds")}, **{c: None for c in COSTS}}, base=label, name="base")


def _mean_std(values: list[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
    if any(v is None for v in values):
        return None, None
    return statistics.fmean(values), statistics.pstdev(values)


def _half_width(values: list[Optional[float]]) -> Optional[float]:
    return None if any(v is None for v in values) else interval(values).half_width


def aggregate(base_lines: list[TableLine], rows: list[Row], select_by: str = "overall",
              reference: Optional[str] = None) -> list[TableLine]:
    """One line per setting, base lines first; each line that won its learning-rate tuning is `selected`,
    judged against the reference line of its shots and base (see `judge`) and marked on the Pareto fronts."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(setting_of(row), []).append(row)
    lines, members_of = [], {}
    for setting, members in groups.items():
        first = members[0]
        stats = {quantity: _mean_std([getattr(m, quantity) for m in members]) for quantity in QUANTITIES}
        validation = [m.validation[select_by] for m in members if m.validation]
        line = TableLine(first.method, first.rank, first.forgetting, first.targets, len(members), first.trainable,
                         first.adapter_bytes, {k: v[0] for k, v in stats.items()}, {k: v[1] for k, v in stats.items()},
                         first.lr, first.head_lr, first.shots, first.base, first.head_trainable,
                         statistics.fmean(validation) if len(validation) == len(members) else None,
                         name=line_name(first.method, first.rank, first.targets, first.forgetting), setting=setting,
                         ci={metric: _half_width([getattr(m, metric) for m in members]) for metric in METRICS})
        lines.append(line)
        members_of[id(line)] = members
    mark_selected(lines)
    for entrants in paired_groups([line for line in lines if line.selected]).values():
        judge(entrants, {id(line): members_of[id(line)] for line in entrants}, select_by, reference)
        mark_pareto(entrants)
    return [*base_lines, *lines]


def mark_selected(lines: list[TableLine]) -> None:
    """Among lines equal but for TUNED_AXES, keep `selected` only on the best on validation."""
    contests: dict[tuple, list[TableLine]] = {}
    for line in lines:
        key = (line.method, line.rank, line.forgetting, line.targets, line.trainable, line.adapter_bytes, line.shots,
               line.base, line.head_trainable)
        contests.setdefault(key, []).append(line)
    for entrants in contests.values():
        scored = [line for line in entrants if line.validation is not None]
        winner = max(scored, key=lambda line: line.validation) if scored else None
        for line in entrants:
            line.selected = winner is None or line is winner


def paired_groups(lines: list[TableLine]) -> dict[tuple, list[TableLine]]:
    """Lines by PAIRED_AXES: only lines of one group see the same images and base, seed for seed."""
    groups: dict[tuple, list[TableLine]] = {}
    for line in lines:
        groups.setdefault(tuple(getattr(line, axis) for axis in PAIRED_AXES), []).append(line)
    return groups


def matches(reference: str, name: str) -> bool:
    """`lora-r8` names `lora-r8` and `lora-r8-replay`, not `lora-r80-replay`."""
    return name == reference or name.startswith(f"{reference}-")


def resolve_reference(reference: str, names: list[str]) -> str:
    """The one line name `reference` matches among `names` (those of the grid); anything else is a one-line error."""
    choices = list(dict.fromkeys(names))
    found = [name for name in choices if matches(reference, name)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise VeraError(f"--reference {reference} matches no setting of the grid: name one of {', '.join(choices)}")
    raise VeraError(f"--reference {reference} matches {len(found)} settings ({', '.join(found)}): name one of them")


def judge(entrants: list[TableLine], members: dict[int, list[Row]], select_by: str, reference: Optional[str]) -> None:
    """Set each line's paired difference to the reference line on `select_by` (test accuracy), per common seed,
    and its verdict. The reference is the line `reference` names, else the best line on validation (on the test
    set where a line has no validation figure); while its rows are missing nobody is judged."""
    if reference is not None:
        named = [line for line in entrants if matches(reference, line.name)]
        chosen = named[0] if len(named) == 1 else None
    else:
        on_validation = all(line.validation is not None for line in entrants)
        scored = [line for line in entrants
                  if (line.validation if on_validation else line.mean[select_by]) is not None]
        chosen = max(scored, key=lambda line: line.validation if on_validation else line.mean[select_by],
                     default=None)
    if chosen is None:
        return
    reference_scores = _by_seed(members[id(chosen)], select_by)
    for line in entrants:
        line.reference = chosen.name
        if line is chosen:
            line.verdict = "reference"
            continue
        scores = _by_seed(members[id(line)], select_by)
        differences = [scores[seed] - reference_scores[seed] for seed in sorted(scores.keys() & reference_scores.keys())]
        line.difference = interval(differences) if differences else None
        line.verdict = verdict(line.difference)


def _by_seed(rows: list[Row], metric: str) -> dict[int, float]:
    return {row.seed: getattr(row, metric) for row in rows if getattr(row, metric) is not None}


# Pareto fronts: (marker, the TableLine mean the cost is read from).
FRONTS = (("bytes", None), ("time", "train_seconds"))


def mark_pareto(entrants: list[TableLine]) -> None:
    """Mark the lines no other line beats on task accuracy at no more adapter bytes (or training seconds)."""
    marks: dict[int, list[str]] = {id(line): [] for line in entrants}
    for marker, quantity in FRONTS:
        cost = (lambda line: line.adapter_bytes) if quantity is None else (lambda line: line.mean[quantity])
        points = [line for line in entrants if line.mean["task"] is not None and cost(line) is not None]
        for line, on_front in zip(points, pareto_front([(line.mean["task"], cost(line)) for line in points])):
            if on_front:
                marks[id(line)].append(marker)
    for line in entrants:
        line.pareto = " ".join(marks[id(line)])
