"""`vera compare`: every method on one base, same data, epochs and evaluation; one row per setting.

Each grid point (method, rank, targets, forgetting option, seed) is an ordinary adapt run
in `<run>/rows/<name>/`, each with its method's own tuned config
(the `adapt-<method>` config). A row is appended to `rows.jsonl` as soon as its
run finishes, and the aggregated table (CSV, JSON) is rewritten, so an
interrupted comparison keeps every finished row and `--resume` runs only the rest.

The protocol axes (learning rate, head learning rate, shots, base) add grid
points the same way. Learning rates are tuned, never on the test set: among the
lines that differ only in their learning rates, the one with the best mean
`select_by` accuracy on the validation split is marked `selected`; the printed
table and the plot show those, with their test numbers.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import io
import itertools
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch

from vera_cli import config as config_module
from vera_cli import fast
from vera_cli.adapters.config import DEFAULT_TARGETS
from vera_cli.adapters.inject import inject
from vera_cli.bases import load_pretrained, model_config, resolve_base
from vera_cli.comparison import METRICS, Row, TableLine, aggregate, axis_label, method_parts
from vera_cli.commands.adapt import AdaptSummary, run_adapt
from vera_cli.train import Log
from vera_cli.config import RANKLESS, AdaptConfig, CompareConfig
from vera_cli.data import Cifar10, class_ids, load_cifar10, require_images
from vera_cli.distributed import LOCAL, World
from vera_cli.grid_progress import GridProgress, per_hour
from vera_cli.lifecycle import RunLifecycle
from vera_cli.metrics import accuracy_report, percent
from vera_cli.plot import plot_comparison, require_matplotlib
from vera_cli.runs import Run
from vera_cli.selection import require_counts
from vera_cli.files import append_jsonl, read_json, read_jsonl, write_bytes_atomic, write_json
from vera_cli.train import resolve_device
from vera_cli.workers import Pool, worker_count

ROWS_FILE = "rows.jsonl"
CLAIMS_DIR = "claims"  # under torchrun or with workers: which process took which row (vera_cli.distributed)
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
    def setting(self) -> str:
        """The name without the seed: what the seeds of one setting share."""
        rank = f"-r{self.rank}" if self.rank is not None else ""
        # The default targets stay out of the name, so rows read as before; a regex becomes a safe folder name.
        targets = f"-{re.sub(r'[^A-Za-z0-9.-]+', '_', self.targets)}" if self.targets not in (None, *DEFAULT_TARGETS) else ""
        extra = "".join(f"-{prefix}{axis_label(getattr(self, axis))}" for axis, prefix in NAMED_AXES
                        if getattr(self, axis) is not None)
        return f"{self.method}{rank}{targets}-{self.forgetting}{extra}"

    @property
    def name(self) -> str:
        return f"{self.setting}-s{self.seed}"


@dataclass
class CompareSummary:
    run: Run
    base_run: str
    rows: list[TableLine]  # base first
    plot: Path
    wall_seconds: float
    world_size: int = 1  # processes that shared the rows (torchrun); the last part's on a resumed run
    workers: int = 1  # local processes that shared the rows (--workers); the last part's on a resumed run
    # The rows this part ran (not those found finished), over the wall time of its grid (after the setup).
    rows_run: int = 0
    grid_seconds: float = 0.0
    rows_per_hour: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "compare", "base_run": self.base_run, "rows": [line.to_dict() for line in self.rows],
                "plot": str(self.plot), "wall_seconds": self.wall_seconds, "world_size": self.world_size,
                "workers": self.workers, "rows_run": self.rows_run, "grid_seconds": self.grid_seconds,
                "rows_per_hour": self.rows_per_hour}

    def pace(self) -> str:
        """`6 rows in 10.2s: 2,118 rows/hour with 2 workers`, for the last line a comparison prints."""
        workers = f" with {self.workers} workers" if self.workers > 1 else ""
        return (f"{self.rows_run} row{'s' * (self.rows_run != 1)} in {self.grid_seconds:.1f}s: "
                f"{per_hour(self.rows_per_hour or 0)} rows/hour{workers}")


@dataclass
class RowJob:
    """What a worker process needs to run rows (vera_cli.workers); the data's tensors are shared, not copied."""

    run: Run
    points: dict[str, GridPoint]
    configs: dict[str, AdaptConfig]
    data: Cifar10
    order: dict[str, int]


def grid(cfg: CompareConfig) -> list[GridPoint]:
    """Every point once, in the order given: `--ranks 4,4` or a method named twice adds nothing."""
    points: dict[str, GridPoint] = {}
    for method in cfg.methods:
        rankless = method in RANKLESS
        head_lrs = (cfg.head_lrs if method_parts(method)[2] else []) or [None]
        axes = itertools.product([None] if rankless else cfg.ranks, [None] if rankless else cfg.targets, cfg.forgetting,
                                 cfg.lrs or [None], head_lrs, cfg.shots or [None], cfg.bases or [None])
        for rank, targets, forgetting, lr, head_lr, shots, base in axes:
            for seed in range(cfg.seeds):
                point = GridPoint(method, rank, forgetting, seed, targets, lr, head_lr, shots, base)
                points.setdefault(point.name, point)
    return list(points.values())


def method_configs(cfg: CompareConfig) -> dict[str, AdaptConfig]:
    """Each compared method's own adapt config (its tuned learning rate), read once."""
    return {method: config_module.load(AdaptConfig, f"adapt-{method_parts(method)[0]}", {}) for method in cfg.methods}


def adapt_config(cfg: CompareConfig, own: AdaptConfig, point: GridPoint, base: str, run_dir: Path) -> AdaptConfig:
    """The grid point's adapt config: the method's own, with the comparison's shared settings."""
    method, sharing, train_head = method_parts(point.method)
    # `vera` and `vera+head` are two rows: whether the head trains is the method's, never the base's to decide.
    adapter = dataclasses.replace(own.adapter, rank=point.rank or own.adapter.rank,
                                  sharing=sharing or own.adapter.sharing,
                                  targets=[point.targets] if point.targets else own.adapter.targets,
                                  train_head=train_head if method not in RANKLESS else own.adapter.train_head)
    train = dataclasses.replace(own.train, epochs=cfg.epochs or own.train.epochs, lr=point.lr or own.train.lr,
                                batch_size=cfg.batch_size or own.train.batch_size,
                                head_lr=point.head_lr or own.train.head_lr)
    # The comparison draws its own picture; one per row would cost more than a short row's training.
    logging = dataclasses.replace(own.logging, plots=False)
    shots = own.shots if point.shots is None else None if point.shots == "all" else point.shots
    row = dataclasses.replace(own, base=point.base or base, classes=cfg.classes, seed=point.seed, device=cfg.device,
                              data=cfg.data, run_dir=str(run_dir), forgetting=point.forgetting, adapter=adapter,
                              train=train, logging=logging, shots=shots, validation=cfg.validation or own.validation,
                              min_steps=cfg.min_steps,
                              replay_fraction=own.replay_fraction if cfg.replay_fraction is None else cfg.replay_fraction)
    return config_module.step_budget(row, epochs_stated=cfg.epochs is not None, batch_stated=cfg.batch_size is not None)


def row_from_summary(point: GridPoint, summary: AdaptSummary) -> Row:
    test, validation = summary.test, summary.validation
    return Row(point.name, point.method, point.rank, point.forgetting, point.targets, point.seed, summary.trainable_parameters,
               summary.adapter_bytes, test.chosen, test.task, test.rest, test.overall, summary.wall_seconds,
               point.setting, point.lr, point.head_lr, point.shots, point.base, summary.head_parameters,
               {m: validation.metric(m) for m in METRICS} if validation else None)


def write_tables(run: Run, table: list[TableLine]) -> None:
    lines = [line.to_dict() for line in table]
    write_json(run.file("table.json"), lines)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(lines[0]))
    writer.writeheader()
    writer.writerows(lines)
    write_bytes_atomic(run.file("table.csv"), buffer.getvalue().encode())


def finished_rows(run: Run) -> list[Row]:
    """Rows recorded so far; a damaged record is dropped, and its grid point is taken from its run again."""
    rows = []
    for record in read_jsonl(run.file(ROWS_FILE)):
        try:
            rows.append(Row(**record))
        except TypeError:
            continue
    return rows


def base_line(base_run: Run, device: torch.device, data: Cifar10, chosen: list[int], label: Optional[str]) -> TableLine:
    model, base_cfg = load_pretrained(base_run, device)
    report = accuracy_report(fast.predict_logits(fast.forward(model), data.test, base_cfg.model.tta), data.test.labels, data.classes, chosen)
    return TableLine("base", None, "-", None, 1, 0, 0, {**{m: report.metric(m) for m in METRICS}, "seconds": 0.0},
                     {m: 0.0 for m in (*METRICS, "seconds")}, base=label)


def run_row(run: Run, point: GridPoint, cfg: AdaptConfig, data: Cifar10, log: Log,
            progress: bool, detail: Log = print) -> tuple[Row, bool]:
    """The grid point's adapt run under `rows/`, and whether it ran now (it is only read when it finished already).

    `log` hears of the row when it starts running; `detail` then hears its plan (images, optimizer steps) and
    notes, not its epochs.
    """
    row_dir = run.file("rows") / point.name
    row_run = Run(row_dir) if (row_dir / "status.json").is_file() else None
    if row_run is not None and row_run.status.get("status") == "finished":
        # Finished just before an interruption could record it (or on another rank).
        return row_from_summary(point, AdaptSummary.from_dict(row_run, read_json(row_dir / "summary.json"))), False
    log(point.name + (" (resuming)" if row_run else ""))
    summary = run_adapt(dataclasses.replace(cfg, run_dir=str(row_dir)), lambda message: detail(f"    {message}"),
                        progress, data, resume=row_run, epoch_log=lambda message: None)
    return row_from_summary(point, summary), True


def worker_row(job: RowJob, name: str, log: Log) -> tuple[Row, bool]:
    """A row in a worker process: the one-process run_row, its lines tagged with the row (rows run side by side)."""
    tagged = lambda message: log(f"[{job.order[name] + 1}/{len(job.order)}] {message}")  # noqa: E731
    return run_row(job.run, job.points[name], job.configs[name], job.data, tagged, False, tagged)


def run_compare(cfg: CompareConfig, log: Log = print, progress: bool = True, resume: Run | None = None,
                world: World = LOCAL) -> CompareSummary:
    """Run the grid into a new run directory, or only its missing rows in the unfinished run `resume`.

    In a `world` of several processes (torchrun) each runs whole rows with its share of
    the CPU threads; rank 0 writes rows.jsonl, the table and the plot. Alone, the rows run in this
    process or, with `cfg.workers` (vera_cli.workers), in local processes that claim them the same way
    while this one writes.
    """
    device = world.place(resolve_device(cfg.device))
    chosen = class_ids(cfg.classes)
    base_runs = [resolve_base(base) for base in cfg.bases] if cfg.bases else [resolve_base(cfg.base)]
    base_run = base_runs[0]
    models = {str(each.path): model_config(each) for each in base_runs}
    ttas = {path: model.tta for path, model in models.items()}
    if len(set(ttas.values())) > 1:
        # Flip averaging alone moves a base by about 2 points: a reader of the table must know.
        log("note: the bases classify test images differently (" + ", ".join(f"{path}: model.tta {tta}" for path, tta
            in ttas.items()) + "), so their accuracies differ by that too; pretrain them with the same model.tta "
            "to compare like with like")
    require_matplotlib()
    life = RunLifecycle("compare", cfg, resume, recorded={**config_module.to_dict(cfg), "base": str(base_run.path)},
                        shared=world.shared())
    points = grid(cfg)
    # Decided (and an impossible count refused) before the run exists; the rows left cap it again below.
    workers = worker_count(cfg.workers, device, world.size, len(points), list(models.values()))
    order = {point.name: index for index, point in enumerate(points)}
    own = method_configs(cfg)
    configs = {point.name: adapt_config(cfg, own[point.method], point, str(base_run.path), Path("rows") / point.name)
               for point in points}
    model, _ = load_pretrained(base_run, device)
    # A target that matches no layer of the base (or a rank no layer can use) is refused before the
    # comparison starts, not at its first row.
    for adapter in {repr(c.adapter): c.adapter for c in configs.values()}.values():
        inject(copy.deepcopy(model), adapter)
    data = load_cifar10(cfg.data.dir, cfg.data.download).to(device)
    require_images(data.train, chosen, data.classes, "training")
    for shots, validation in {(c.shots, c.validation) for c in configs.values()}:
        require_counts(data.train.labels, chosen, shots, validation, data.classes)
    # Rows join the table in grid order, whatever order (or process) they finished in.
    in_grid_order = lambda rows: sorted(rows, key=lambda row: order[row.name])  # noqa: E731
    with world.joined(device), life.open() as run, contextlib.ExitStack() as stack:
        base_lines = [base_line(each, device, data, chosen, str(each.path) if cfg.bases else None) for each in base_runs]
        recorded = [Row(**raw) for raw in life.by_writer(lambda: [row.to_dict() for row in finished_rows(run)])]
        rows = list(recorded)
        done = {row.name for row in rows}
        pending = [point.name for point in points if point.name not in done]
        workers = min(workers, max(1, len(pending)))
        # The grid's wall time starts here; under torchrun rank 0 sees only its own rows finish, so it
        # shows no count or time left.
        grid_clock = GridProgress(len(points), len(done))
        if workers > 1:
            job = RowJob(run, {point.name: point for point in points}, configs, data, order)
            pool = stack.enter_context(Pool(workers, worker_row, job, pending, run.file(CLAIMS_DIR), log))
            log(f"{workers} worker processes ({pool.threads} CPU thread(s) each) share the {len(pending)} rows")
            results: Iterator[tuple[str, tuple[Row, bool]]] = iter(pool)
        else:
            results = ((name, run_row(run, points[order[name]], configs[name], data,
                                      lambda message: log(f"[{order[name] + 1}/{len(points)}] {message}"), progress, log))
                       for name in world.take_turns(pending, run.file(CLAIMS_DIR)))
        ran: list[tuple[Row, bool]] = []
        for name, (row, ran_here) in results:
            rows.append(row)
            ran.append((row, ran_here))
            if life.writes:
                append_jsonl(run.file(ROWS_FILE), row.to_dict())
                write_tables(run, aggregate(base_lines, in_grid_order(rows), cfg.select_by))
            # Rows that finish side by side name themselves; in one process the row's own lines came just before.
            lead = f"[{order[name] + 1}/{len(points)}] " if workers > 1 else "    "
            line = grid_clock.row_done(ran_here)
            log(f"{lead}{row.trainable:,} trainable, " + ", ".join(f"{m} {percent(getattr(row, m))}" for m in METRICS[:3])
                + f", {row.seconds:.1f}s" + (f"; {line}" if world.size == 1 else ""))
        gathered = world.from_others(ran)
        if gathered:
            log(f"{len(gathered)} more row(s) ran in the other {world.size - 1} process(es)")
        for _, ran_here in gathered:
            grid_clock.row_done(ran_here)
        grid_seconds = grid_clock.seconds()
        others = [row for row, _ in gathered]
        table = aggregate(base_lines, in_grid_order(rows + others), cfg.select_by)

        def record() -> Path:
            for row in others:
                append_jsonl(run.file(ROWS_FILE), row.to_dict())
            write_tables(run, table)
            shutil.rmtree(run.file(CLAIMS_DIR), ignore_errors=True)
            return plot_comparison(table, [data.classes[i] for i in chosen], run.file("accuracy-vs-parameters.png"))

        plot = life.by_writer(record)
        return life.finish(CompareSummary(run, str(base_run.path), table, plot, life.elapsed(), world.size, workers,
                                          grid_clock.ran, grid_seconds, grid_clock.rows_per_hour(grid_seconds)))
