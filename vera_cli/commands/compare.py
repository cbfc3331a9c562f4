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
table and the plots show those, with their test numbers, each judged against a
reference line seed by seed (vera_cli.comparison).

The first row's time sets the estimate for the whole grid; with `budget` the grid
is cut then, the highest seeds first, and the cut is recorded in `plan.json`.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import io
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from vera_cli import config as config_module
from vera_cli import fast
from vera_cli.adapters.errors import AdapterError, RankError
from vera_cli.adapters.inject import inject
from vera_cli.adapters.targets import head_name
from vera_cli.bases import fingerprint, load_pretrained, model_config, resolve_base
from vera_cli.comparison import (METRICS, ROWS_FILE, GridPoint, Row, TableLine, aggregate, base_line as line_of_base,
                                 contest, grid, method_parts, read_rows, resolve_reference, setting_of)
from vera_cli.commands.adapt import (AdaptSummary, evaluate_later, held_out_by, require_learnable_head, run_adapt,
                                     settle_head)
from vera_cli.train import Log
from vera_cli.config import RANKLESS, AdaptConfig, CompareConfig, compared_method
from vera_cli.data import CLASSES, Cifar10, class_ids, load_cifar10, require_images
from vera_cli.distributed import LOCAL, World, claimed
from vera_cli.fast.feature_cache import prefix_is_frozen
from vera_cli.errors import VeraError
from vera_cli.grid_progress import PLAN_FILE, GridPlan, GridProgress, per_hour, plan_grid
from vera_cli.lifecycle import RunLifecycle
from vera_cli.metrics import AccuracyReport, accuracy_report, percent
from vera_cli.plot import X_AXES, plot_comparison, require_matplotlib
from vera_cli.runs import Run
from vera_cli.selection import require_counts
from vera_cli.files import append_jsonl, read_json, write_bytes_atomic, write_json
from vera_cli.train import resolve_device
from vera_cli.workers import Pool, worker_count

CLAIMS_DIR = "claims"  # under torchrun or with workers: which process took which row (vera_cli.distributed)


@dataclass
class CompareSummary:
    run: Run
    base_run: str
    rows: list[TableLine]  # base first
    plots: list[Path]  # accuracy against trainable parameters, then against training seconds
    wall_seconds: float
    world_size: int = 1  # processes that shared the rows (torchrun); the last part's on a resumed run
    plan: Optional[GridPlan] = None  # the estimate and what a budget cut; None when no row ran in one process
    workers: int = 1  # local processes that shared the rows (--workers); the last part's on a resumed run
    # The rows this part ran (not those found finished), over the wall time of its grid (after the setup).
    rows_run: int = 0
    grid_seconds: float = 0.0
    rows_per_hour: Optional[float] = None
    left_out: dict[str, str] = dataclasses.field(default_factory=dict)  # a setting the base cannot take: why

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "compare", "base_run": self.base_run, "rows": [line.to_dict() for line in self.rows],
                "plot": str(self.plots[0]), "plots": [str(plot) for plot in self.plots],
                "wall_seconds": self.wall_seconds, "world_size": self.world_size,
                "plan": self.plan.to_dict() if self.plan else None, "workers": self.workers, "rows_run": self.rows_run,
                "grid_seconds": self.grid_seconds, "rows_per_hour": self.rows_per_hour, "left_out": self.left_out}

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
    shared: dict[tuple, Any]  # the bases' test logits and more (run_adapt's shared)
    later: frozenset[str]  # rows whose test split waits for the learning-rate choice (tested_later)


def method_configs(cfg: CompareConfig) -> dict[str, AdaptConfig]:
    """Each compared method's own adapt config (its tuned learning rate), read once."""
    methods = {config_module.compared_method(entry).method for entry in cfg.methods}
    return {method: config_module.load(AdaptConfig, f"adapt-{method_parts(method)[0]}", {}) for method in methods}


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
    # The comparison draws its own picture and reads each row's last evaluation only: pictures and curve points
    # would cost more than a short row's training (on the ViT, four test evaluations are most of a few-shot row).
    logging = dataclasses.replace(own.logging, plots=False, evaluations=1)
    shots = own.shots if point.shots is None else None if point.shots == "all" else point.shots
    row = dataclasses.replace(own, base=point.base or base, classes=cfg.classes, seed=point.seed, device=cfg.device,
                              data=cfg.data, run_dir=str(run_dir), forgetting=point.forgetting, adapter=adapter,
                              train=train, logging=logging, shots=shots, validation=cfg.validation or own.validation,
                              min_steps=cfg.min_steps,
                              replay_fraction=own.replay_fraction if cfg.replay_fraction is None else cfg.replay_fraction)
    return config_module.step_budget(row, epochs_stated=cfg.epochs is not None, batch_stated=cfg.batch_size is not None)


def row_from_summary(point: GridPoint, summary: AdaptSummary) -> Row:
    test, validation = summary.test, summary.validation
    metrics = (test.chosen, test.task, test.rest, test.overall) if test else (None,) * len(METRICS)
    return Row(point.name, point.method, point.rank, point.forgetting, point.targets, point.seed, summary.trainable_parameters,
               summary.adapter_bytes, *metrics, summary.wall_seconds,
               point.setting, point.lr, point.head_lr, point.shots, point.base, summary.head_parameters,
               {m: validation.metric(m) for m in METRICS} if validation else None, summary.train_seconds,
               summary.train_seconds_per_1k_images, summary.inference_ms_per_image, summary.peak_memory_bytes)


def write_tables(run: Run, table: list[TableLine]) -> None:
    lines = [line.to_dict() for line in table]
    write_json(run.file("table.json"), lines)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(lines[0]))
    writer.writeheader()
    writer.writerows(lines)
    write_bytes_atomic(run.file("table.csv"), buffer.getvalue().encode())


def base_line(base_run: Run, device: torch.device, data: Cifar10, chosen: list[int], label: Optional[str],
              shared: dict[tuple, Any]) -> TableLine:
    """The base's line of the table; its test logits join `shared`, where the rows find them (run_adapt)."""
    model, base_cfg = load_pretrained(base_run, device)
    logits = shared[fingerprint(model), base_cfg.model.tta] = fast.predict_logits(fast.forward(model), data.test,
                                                                                  base_cfg.model.tta)
    report = accuracy_report(logits, data.test.labels, data.classes, chosen)
    return line_of_base({m: report.metric(m) for m in METRICS}, label)


def run_row(run: Run, point: GridPoint, cfg: AdaptConfig, data: Cifar10, log: Log,
            progress: bool, detail: Log = print, shared: dict | None = None, test: bool = True) -> tuple[Row, bool]:
    """The grid point's adapt run under `rows/`, and whether it ran now (it is only read when it finished already).

    `log` hears of the row when it starts running; `detail` then hears its plan (images, optimizer steps) and
    notes, not its epochs. Without `test` its test split is left for `test_chosen`.
    """
    row_dir = run.file("rows") / point.name
    row_run = Run(row_dir) if (row_dir / "status.json").is_file() else None
    if row_run is not None and row_run.status.get("status") == "finished":
        # Finished just before an interruption could record it (or on another rank).
        return row_from_summary(point, AdaptSummary.from_dict(row_run, read_json(row_dir / "summary.json"))), False
    log(point.name + (" (resuming)" if row_run else ""))
    summary = run_adapt(dataclasses.replace(cfg, run_dir=str(row_dir)), lambda message: detail(f"    {message}"),
                        progress, data, resume=row_run, epoch_log=lambda message: None, shared=shared,
                        test=test)
    return row_from_summary(point, summary), True


def worker_row(job: RowJob, name: str, log: Log) -> tuple[Row, bool]:
    """A row in a worker process: the one-process run_row, its lines tagged with the row (rows run side by side)."""
    tagged = lambda message: log(f"[{job.order[name] + 1}/{len(job.order)}] {message}")  # noqa: E731
    return run_row(job.run, job.points[name], job.configs[name], job.data, tagged, False, tagged, job.shared,
                   name not in job.later)


def tested_later(points: list[GridPoint], configs: dict[str, AdaptConfig]) -> dict[str, float]:
    """The rows whose test split waits for the learning-rate choice: those of a contest between several rates,
    decided on a validation split. Only the winners' test figures are shown, and on the ViT a test evaluation is
    most of a 10-shot row, so the losers' are not spent. Each with its share of the tests that will run: one
    rate of its contest's is tested."""
    rates: dict[tuple, set] = {}
    for point in points:
        rates.setdefault(contest(point), set()).add((point.lr, point.head_lr))
    return {point.name: 1 / len(rates[contest(point)]) for point in points
            if len(rates[contest(point)]) > 1 and configs[point.name].validation > 0}


def row_test(job: RowJob, name: str, log: Log) -> AccuracyReport:
    """The test report of a row left for later, measured now (in this process or a worker's)."""
    return evaluate_later(Run(job.run.file("rows") / name), job.data).test


def test_chosen(rows: list[Row], base_lines: list[TableLine], select_by: str, log: Log,
                tests: Callable[[list[str]], Iterator[tuple[str, AccuracyReport]]],
                record: Callable[[Row], None]) -> list[Row]:
    """`rows` with the test figures of those left for later whose learning rate won on validation, measured now
    by `tests` (each name's report, in any order); `record` keeps each tested row."""
    chosen = {line.setting for line in aggregate(base_lines, rows, select_by) if line.selected}
    waiting = [row.name for row in rows if row.overall is None and setting_of(row) in chosen]
    if not waiting:
        return rows
    log(f"testing the {len(waiting)} row(s) of the learning rates chosen on validation")
    tested = {}
    by_name = {row.name: row for row in rows}
    for name, test in tests(waiting):
        tested[name] = dataclasses.replace(by_name[name], chosen=test.chosen, task=test.task, rest=test.rest,
                                           overall=test.overall)
        record(tested[name])
    return [tested.get(row.name, row) for row in rows]


@dataclass
class CheckedGrid:
    points: list[GridPoint]  # those that can run, in grid order
    left_out: dict[str, str]  # a setting the bases cannot take: why
    # Rows whose every step runs the whole network (no cached features: full fine-tuning, adapters on the
    # convolutions): on the ConvNet they take 2-3x as long as the rest of a grid.
    whole: frozenset[str]

    def claim_order(self, names: list[str], shared: bool) -> list[str]:
        """The order in which `names` run: seed by seed, as a budget cuts the highest seeds and the rows of a seed
        train on the same images (whose features a process keeps, fast.SharedViews); where processes `shared`
        the grid, the longest rows of a seed first, so that no process is left running one while the others idle.
        Alone, the first row stays the grid's first, which a budget's estimate takes as typical."""
        seeds = {point.name: point.seed for point in self.points}
        return sorted(names, key=lambda name: (seeds[name], shared and name not in self.whole))


def check_grid(cfg: CompareConfig, points: list[GridPoint], configs: dict[str, AdaptConfig],
               bases: list[tuple[Run, torch.nn.Module, list[str]]]) -> CheckedGrid:
    """The grid checked on copies of each base before the comparison starts, not at a row; `configs` maps each
    point's name to its config, `bases` holds each base's run, model and the chosen classes it never saw.

    A target that matches no layer, or new classes that nothing trained could reach, is refused. A rank from the
    ranks axis that no targeted layer can use (LoRA's min(in, out): 120 on the ConvNet's linear layers) leaves that
    method's rows at that rank out, as full and head have no rank, while the method keeps another rank; a rank
    the method names itself (lora-r256), or a method left with none, is refused.
    """
    by_name = {point.name: point for point in points}
    refused: dict[str, RankError] = {}
    whole: set[str] = set()
    for key, (name, adapt_cfg) in {repr(c.adapter): (name, c) for name, c in configs.items()}.items():
        for each, model, new in bases:
            try:
                settled, _ = settle_head(adapt_cfg, new, each)
                adapted = inject(copy.deepcopy(model), settled.adapter)
                require_learnable_head(adapted, head_name(adapted) if new else "", settled, new, each)
            except RankError as error:
                refused[key] = error
            except AdapterError as error:
                # A target or setting the model cannot take: the grid's, not one row's; with several bases, whose.
                if len(bases) == 1:
                    raise
                raise VeraError(f"base {each.path}: {error}") from None
            except VeraError as error:
                on = f" on base {each.path}" if len(bases) > 1 else ""
                raise VeraError(f"row {name}{on}: {error}") from None
        if key not in refused and not prefix_is_frozen(adapted):
            whole.add(key)
    named = {(own.method, own.rank) for own in map(compared_method, cfg.methods) if own.rank}
    out = {name: refused[repr(configs[name].adapter)] for name in configs if repr(configs[name].adapter) in refused}
    kept = [point for point in points if point.name not in out]
    for name, error in out.items():
        point = by_name[name]
        if (point.method, point.rank) in named:
            raise VeraError(f"row {name}: {error}")
    # By the methods' entries, not their adapters: `lora@conv` or `lora` left with no rank is refused even where
    # `lora-r8` keeps LoRA in the grid.
    for own in map(compared_method, cfg.methods):
        targets = [own.targets] if own.targets else cfg.targets
        mine = [point.name for point in points if own.rank is None and point.method == own.method
                and point.rank in cfg.ranks and point.targets in targets]
        if mine and all(name in out for name in mine):
            raise VeraError(f"row {mine[0]}: {out[mine[0]]}")
    setting = lambda point: (f"{point.method} at rank {point.rank}"  # noqa: E731
                             + (f" on {point.targets}" if len(cfg.targets) > 1 else ""))
    return CheckedGrid(kept, {setting(by_name[name]): error.reason for name, error in out.items()},
                       frozenset(point.name for point in kept if repr(configs[point.name].adapter) in whole))


def run_compare(cfg: CompareConfig, log: Log = print, progress: bool = True, resume: Run | None = None,
                world: World = LOCAL) -> CompareSummary:
    """Run the grid into a new run directory, or only its missing rows in the unfinished run `resume`.

    In a `world` of several processes (torchrun) each runs whole rows with its share of
    the CPU threads; rank 0 writes rows.jsonl, the table and the plots. Alone, the rows run in this
    process or, with `cfg.workers` (vera_cli.workers), in local processes that claim them the same way
    while this one writes.
    """
    if cfg.budget is not None and world.size > 1:
        # Each process would time its own first row and cut a grid the others share.
        raise VeraError("--budget cuts the grid from one process's first row: run it without torchrun, or drop --budget")
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
    own = method_configs(cfg)
    points = grid(cfg)
    configs = {point.name: adapt_config(cfg, own[point.method], point, str(base_run.path), Path("rows") / point.name)
               for point in points}
    checked = check_grid(cfg, points, configs, [(each, load_pretrained(each, device)[0],
                                                 [CLASSES[c] for c in chosen if c in held_out_by(each)])
                                                for each in base_runs])
    points = checked.points
    for setting, reason in checked.left_out.items():
        log(f"note: {setting} is left out of the grid: {reason}")
    configs = {point.name: configs[point.name] for point in points}
    reference = resolve_reference(cfg.reference, [point.line for point in points]) if cfg.reference else None
    # Decided (and an impossible count refused) before the run exists; the rows left cap it again below.
    workers = worker_count(cfg.workers, device, world.size, len(points), list(models.values()))
    order = {point.name: index for index, point in enumerate(points)}
    # Under torchrun each process sees only its own rows: there every row is tested as it runs.
    test_shares = tested_later(points, configs) if world.size == 1 else {}
    later = frozenset(test_shares)
    data = load_cifar10(cfg.data.dir, cfg.data.download).to(device)
    require_images(data.train, chosen, data.classes, "training")
    for shots, validation in {(c.shots, c.validation) for c in configs.values()}:
        require_counts(data.train.labels, chosen, shots, validation, data.classes)
    # Rows join the table in grid order, whatever order (or process) they finished in.
    in_grid_order = lambda rows: sorted(rows, key=lambda row: order[row.name])  # noqa: E731
    with world.joined(device), life.open() as run, contextlib.ExitStack() as stack:
        shared: dict[tuple, Any] = {}
        started = time.perf_counter()
        base_lines = [base_line(each, device, data, chosen, str(each.path) if cfg.bases else None, shared)
                      for each in base_runs]
        # What a test evaluation after the grid costs: a row's is the base's with the adapter on top.
        test_seconds = (time.perf_counter() - started) / len(base_runs)
        recorded = [Row(**raw) for raw in life.by_writer(lambda: [row.to_dict() for row in read_rows(run.file(ROWS_FILE))])]
        rows = list(recorded)
        done = {row.name for row in rows}
        pending = [point.name for point in points if point.name not in done]
        grid_workers, workers = workers, min(workers, max(1, len(pending)))
        # Under torchrun rank 0 sees only its own rows finish: no count or time left to offer, no plan to make.
        alone = world.size == 1
        plan = GridPlan.read(run.file(PLAN_FILE)) if alone else None
        dropped = set(plan.dropped) if plan else set()
        # The grid's wall time starts here.
        grid_clock = GridProgress(len(points) - len(dropped), len(done))
        if plan:
            grid_clock.after_rows = plan.kept_tests * plan.test_seconds
        settings = len({point.setting for point in points})
        log(f"{len(points)} rows: {settings} setting(s) x {cfg.seeds} seed(s)"
            + (f"; {len(dropped)} dropped by --budget {plan.budget} when the grid began" if dropped
               else "; the first row's time gives the estimate" if alone and plan is None else ""))
        # A budget not yet planned takes the first row to finish as typical: the long rows first would overstate
        # every row (2-3x on the ConvNet) and drop seeds that fit.
        pending = checked.claim_order([name for name in pending if name not in dropped],
                                      (workers > 1 or not alone) and (cfg.budget is None or plan is not None))
        job = RowJob(run, {point.name: point for point in points}, configs, data, order, shared, later)
        if workers > 1:
            pool = stack.enter_context(Pool(workers, worker_row, job, pending, run.file(CLAIMS_DIR), log))
            log(f"{workers} worker processes ({pool.threads} CPU thread(s) each) share the {len(pending)} rows")
            results: Iterator[tuple[str, tuple[Row, bool]]] = iter(pool)
        else:
            results = ((name, run_row(run, points[order[name]], configs[name], data,
                                      lambda message: log(f"[{order[name] + 1}/{len(points)}] {message}"), progress, log,
                                      shared, name not in later))
                       for name in world.take_turns(pending, run.file(CLAIMS_DIR)) if name not in dropped)
        ran: list[tuple[Row, bool]] = []
        for name, (row, ran_here) in results:
            if name in dropped:
                continue  # a worker had started it before the first row's time cut it: the table keeps to the plan
            rows.append(row)
            ran.append((row, ran_here))
            if life.writes:
                append_jsonl(run.file(ROWS_FILE), row.to_dict())
                write_tables(run, aggregate(base_lines, in_grid_order(rows), cfg.select_by, reference))
            said = []
            if alone and plan is None and ran_here:
                plan = plan_grid([(point.name, point.seed) for point in points], {row.name for row in rows}, name,
                                 row.seconds, cfg.budget, workers, test_shares, test_seconds)
                write_json(run.file(PLAN_FILE), plan.to_dict())
                dropped = set(plan.dropped)
                grid_clock.total -= len(dropped)
                grid_clock.after_rows = plan.kept_tests * plan.test_seconds
                if workers > 1:  # workers claim rows through files: claiming the dropped ones keeps them from starting
                    for _ in claimed(sorted(dropped), run.file(CLAIMS_DIR)):
                        pass
                said = plan.lines()
            # Rows that finish side by side name themselves; in one process the row's own lines came just before.
            lead = f"[{order[name] + 1}/{len(points)}] " if workers > 1 else "    "
            line = grid_clock.row_done(ran_here)
            figures = (", ".join(f"{m} {percent(getattr(row, m))}" for m in METRICS[:3]) if row.overall is not None
                       else f"validation {cfg.select_by} {percent(row.validation[cfg.select_by])} (tested if chosen)")
            log(f"{lead}{row.trainable:,} trainable, {figures}, {row.seconds:.1f}s" + (f"; {line}" if alone else ""))
            for said_line in said:
                log(said_line)
        # The rows' features are of no use to the tests below, nor to the processes that run them.
        shared.clear()
        gathered = world.from_others(ran)
        if gathered:
            log(f"{len(gathered)} more row(s) ran in the other {world.size - 1} process(es)")
        for _, ran_here in gathered:
            grid_clock.row_done(ran_here)
        others = [row for row, _ in gathered]
        every = in_grid_order(rows + others)
        if life.writes:
            # The other ranks' rows first: a row of theirs that the testing below measures is then recorded last,
            # tested, and rows.jsonl's last record per name agrees with the table.
            for row in others:
                append_jsonl(run.file(ROWS_FILE), row.to_dict())

            def tests(names: list[str]) -> Iterator[tuple[str, AccuracyReport]]:
                # The workers again where the grid had them: two one-thread evaluations of the ViT outrun one on
                # both threads.
                count = min(grid_workers, len(names))
                if count > 1:
                    return iter(stack.enter_context(Pool(count, row_test, job, names, run.file(CLAIMS_DIR), log)))
                return ((name, row_test(job, name, log)) for name in names)

            # Grid order, as the table's: a tie on validation then picks the same winner here as there. On a resume
            # under torchrun this also tests the winners that an earlier part, run alone, left untested.
            every = test_chosen(every, base_lines, cfg.select_by, log, tests,
                                lambda row: append_jsonl(run.file(ROWS_FILE), row.to_dict()))
        grid_seconds = grid_clock.seconds()
        table = aggregate(base_lines, every, cfg.select_by, reference)

        def record() -> list[Path]:
            write_tables(run, table)
            shutil.rmtree(run.file(CLAIMS_DIR), ignore_errors=True)
            classes = [data.classes[i] for i in chosen]
            return [plot_comparison(table, classes, run.file(f"accuracy-vs-{axis.file}.png"), axis) for axis in X_AXES]

        plots = life.by_writer(record)
        return life.finish(CompareSummary(run, str(base_run.path), table, plots, life.elapsed(), world.size, plan, workers,
                                          grid_clock.ran, grid_seconds, grid_clock.rows_per_hour(grid_seconds),
                                          checked.left_out))
