"""`vera compare`: every method on one base, same data, epochs and evaluation; one row per setting.

Each grid point (method, rank, targets, forgetting option, seed) is an ordinary adapt run
in `<run>/rows/<name>/`, each with its method's own tuned config
(`configs/adapt-<method>.yaml`). A row is appended to `rows.jsonl` as soon as its
run finishes, and the aggregated table (CSV, JSON) is rewritten, so an
interrupted comparison keeps every finished row and `--resume` runs only the rest.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from vera_cli import config as config_module
from vera_cli.adapters.config import DEFAULT_TARGETS
from vera_cli.adapters.inject import inject
from vera_cli.bases import load_pretrained, resolve_base
from vera_cli.commands.adapt import AdaptSummary, run_adapt
from vera_cli.commands.pretrain import Log
from vera_cli.config import AdaptConfig, CompareConfig
from vera_cli.data import class_ids, load_cifar10, require_images
from vera_cli.grid_progress import GridProgress
from vera_cli.lifecycle import RunLifecycle
from vera_cli.metrics import accuracy_report, percent, predict_logits
from vera_cli.plot import plot_comparison
from vera_cli.runs import Run, append_jsonl, read_json, read_jsonl, write_bytes_atomic, write_json
from vera_cli.train import resolve_device

ROWS_FILE = "rows.jsonl"
METRICS = ("chosen", "task", "rest", "overall")
RANKLESS = ("full", "head")  # no rank and no targets: they train whole modules


@dataclass
class GridPoint:
    method: str
    rank: int | None
    forgetting: str
    seed: int
    targets: str | None = None  # a preset or regex; None for the rankless methods

    @property
    def name(self) -> str:
        rank = f"-r{self.rank}" if self.rank is not None else ""
        # The default targets stay out of the name, so rows read as before; a regex becomes a safe folder name.
        targets = f"-{re.sub(r'[^A-Za-z0-9.-]+', '_', self.targets)}" if self.targets not in (None, *DEFAULT_TARGETS) else ""
        return f"{self.method}{rank}{targets}-{self.forgetting}-s{self.seed}"


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

    def to_dict(self) -> dict[str, Any]:
        flat = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("mean", "std")}
        for metric in (*METRICS, "seconds"):
            flat[metric], flat[f"{metric}_std"] = self.mean[metric], self.std[metric]
        return flat


@dataclass
class CompareSummary:
    run: Run
    base_run: str
    rows: list[TableLine]  # base first
    plot: Path
    wall_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "compare", "base_run": self.base_run, "rows": [line.to_dict() for line in self.rows],
                "plot": str(self.plot), "wall_seconds": self.wall_seconds}


def grid(cfg: CompareConfig) -> list[GridPoint]:
    """Every point once, in the order given: `--ranks 4,4` or a method named twice adds nothing."""
    points: dict[str, GridPoint] = {}
    for method in cfg.methods:
        rankless = method in RANKLESS
        for rank in ([None] if rankless else cfg.ranks):
            for targets in ([None] if rankless else cfg.targets):
                for forgetting in cfg.forgetting:
                    for seed in range(cfg.seeds):
                        point = GridPoint(method, rank, forgetting, seed, targets)
                        points.setdefault(point.name, point)
    return list(points.values())


def method_configs(cfg: CompareConfig) -> dict[str, AdaptConfig]:
    """Each compared method's own adapt config (its tuned learning rate), read once."""
    return {method: config_module.load(AdaptConfig, f"adapt-{method.partition('-')[0]}", {}) for method in cfg.methods}


def adapt_config(cfg: CompareConfig, own: AdaptConfig, point: GridPoint, base: str, run_dir: Path) -> AdaptConfig:
    """The grid point's adapt config: the method's own, with the comparison's shared settings."""
    _, _, sharing = point.method.partition("-")
    adapter = dataclasses.replace(own.adapter, rank=point.rank or own.adapter.rank,
                                  sharing=sharing or own.adapter.sharing,
                                  targets=[point.targets] if point.targets else own.adapter.targets)
    train = dataclasses.replace(own.train, epochs=cfg.epochs or own.train.epochs)
    # The comparison draws its own picture; one per row would cost more than a short row's training.
    logging = dataclasses.replace(own.logging, plots=False)
    return dataclasses.replace(own, base=base, classes=cfg.classes, seed=point.seed, device=cfg.device, data=cfg.data,
                               run_dir=str(run_dir), forgetting=point.forgetting, adapter=adapter, train=train,
                               logging=logging)


def row_from_summary(point: GridPoint, summary: AdaptSummary) -> Row:
    test = summary.test
    return Row(point.name, point.method, point.rank, point.forgetting, point.targets, point.seed, summary.trainable_parameters,
               summary.adapter_bytes, test.chosen, test.task, test.rest, test.overall, summary.wall_seconds)


def _mean_std(values: list[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
    if any(v is None for v in values):
        return None, None
    return statistics.fmean(values), statistics.pstdev(values)


def aggregate(base_line: TableLine, rows: list[Row]) -> list[TableLine]:
    """One line per setting, base first."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault((row.method, row.rank, row.forgetting, row.targets), []).append(row)
    table = [base_line]
    for (method, rank, forgetting, targets), members in groups.items():
        stats = {metric: _mean_std([getattr(m, metric) for m in members]) for metric in (*METRICS, "seconds")}
        table.append(TableLine(method, rank, forgetting, targets, len(members), members[0].trainable, members[0].adapter_bytes,
                               {k: v[0] for k, v in stats.items()}, {k: v[1] for k, v in stats.items()}))
    return table


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


def run_compare(cfg: CompareConfig, log: Log = print, progress: bool = True, resume: Run | None = None) -> CompareSummary:
    device = resolve_device(cfg.device)
    chosen = class_ids(cfg.classes)
    base_run = resolve_base(cfg.base)
    life = RunLifecycle("compare", cfg, resume, recorded={**config_module.to_dict(cfg), "base": str(base_run.path)})
    points = grid(cfg)
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
    with life.open() as run:
        base_report = accuracy_report(predict_logits(model, data.test), data.test.labels, data.classes, chosen)
        base_line = TableLine("base", None, "-", None, 1, 0, 0, {**{m: base_report.metric(m) for m in METRICS}, "seconds": 0.0},
                              {m: 0.0 for m in (*METRICS, "seconds")})
        rows = finished_rows(run)
        done = {row.name for row in rows}
        progress_line = GridProgress(len(points), len(done))
        for index, point in enumerate(points, 1):
            if point.name in done:
                continue
            row_dir = run.file("rows") / point.name
            row_run = Run(row_dir) if (row_dir / "status.json").is_file() else None
            recorded = row_run is not None and row_run.status.get("status") == "finished"
            if recorded:
                # Finished just before an interruption could record it.
                summary = AdaptSummary.from_dict(row_run, read_json(row_dir / "summary.json"))
            else:
                log(f"[{index}/{len(points)}] {point.name}" + (" (resuming)" if row_run else ""))
                summary = run_adapt(dataclasses.replace(configs[point.name], run_dir=str(row_dir)), lambda message: None,
                                    progress, data, resume=row_run)
            row = row_from_summary(point, summary)
            rows.append(row)
            append_jsonl(run.file(ROWS_FILE), row.to_dict())
            write_tables(run, aggregate(base_line, rows))
            log(f"    {row.trainable:,} trainable, " + ", ".join(f"{m} {percent(getattr(row, m))}" for m in METRICS[:3])
                + f", {row.seconds:.1f}s; {progress_line.row_done(ran_here=not recorded)}")
        table = aggregate(base_line, rows)
        write_tables(run, table)
        plot = plot_comparison(table, [data.classes[i] for i in chosen], run.file("accuracy-vs-parameters.png"))
        return life.finish(CompareSummary(run, str(base_run.path), table, plot, life.elapsed()))
