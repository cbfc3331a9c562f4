"""The `vera` command line: parse options, call one library function, print.

Errors the user can fix (VeraError, bad options) end as one line on stderr and
exit code 2; `--debug` or VERA_DEBUG=1 shows the full traceback instead.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
import yaml
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from vera_cli import __version__
from vera_cli import completion as complete
from vera_cli import config as cfg
from vera_cli import signals
from vera_cli.allocator import keep_freed_memory
from vera_cli.adapters.errors import AdapterError
from vera_cli.errors import RunInterrupted, VeraError, WorkerFailed, describe_os_error

app = typer.Typer(no_args_is_help=True,
                  help="VeRA and LoRA fine-tuning experiments on CIFAR-10.")
# Piped output gets room for the wide tables instead of rich's 80-column default.
out = Console(width=None if sys.stdout.isatty() else 130)
err = Console(stderr=True)


def _print_whole(table: Table) -> None:
    """A table as wide as it needs on piped output: 130 columns do not hold a few-shot grid's comparison, whose
    cells rich would otherwise cut to an ellipsis that hides the number (a learning rate of 0.0…)."""
    if sys.stdout.isatty():
        out.print(table)
        return
    width = out.width
    out.width = max(width, Measurement.get(out, out.options.update_width(1_000_000), table).maximum)
    try:
        out.print(table)
    finally:
        out.width = width


# Options that take several values after one flag (`--classes cat bird dog`), and whether a comma
# separates values inside one token: class names never hold one; regexes (`fc{1,2}`) and paths may.
LIST_OPTIONS = {"--classes": True, "--exclude-classes": True, "--adapter": False, "--target": False}

ConfigOpt = typer.Option(None, "--config", help="a YAML file, or a shipped config by name (vera config list)")
PrintConfigOpt = typer.Option(False, "--print-config", help="print the effective config (after overrides) as YAML and stop")
EpochsOpt = typer.Option(None, "--epochs", help="training epochs")
BatchOpt = typer.Option(None, "--batch-size", help="batch size")
LrOpt = typer.Option(None, "--lr", help="peak learning rate")
DeviceOpt = typer.Option(None, "--device", help="auto, cpu, cuda or mps (Apple silicon); auto takes cuda, else mps, else cpu")
SeedOpt = typer.Option(None, "--seed", help="random seed")
DataDirOpt = typer.Option(None, "--data-dir", help="folder that holds cifar-10-batches-py/")
RunDirOpt = typer.Option(None, "--run-dir", help="where to write the run (must not exist)")
SetOpt = typer.Option([], "--set", help="override any config key: --set train.label_smoothing=0.1")
NoProgressOpt = typer.Option(False, "--no-progress", help="hide progress bars")
TargetOpt = typer.Option([], "--target", help="layers to adapt: presets linear (default), conv, all, all-linear, "
                         "attention, or regexes over layer names: --target conv fc5")
TensorBoardOpt = typer.Option(False, "--tensorboard", help="write TensorBoard event files in the run (logging.tensorboard)")
ResumeOpt = typer.Option(None, "--resume", help="continue an interrupted run (its own config; only --device, --data-dir and logging may change)",
                         autocompletion=complete.complete_resumable)


def _print_version(value: bool) -> None:
    if value:
        print(f"vera {__version__}")
        raise typer.Exit(0)


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version, help="print the version and stop"),
) -> None:
    """VeRA and LoRA fine-tuning experiments on CIFAR-10."""


def _log(message: str) -> None:
    err.print(message, highlight=False, markup=False, soft_wrap=True)


def _world():
    """This process's place under torchrun (one process without it); only rank 0 prints."""
    from vera_cli import distributed

    world = distributed.from_environment()
    out.quiet = err.quiet = not world.is_main
    return world


def _overrides(named: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """Options the user gave (None means not given), then `--set` pairs, which win over them."""
    return {**{key: value for key, value in named.items() if value is not None}, **cfg.parse_set_options(sets)}


def _common(epochs, batch_size, lr, device, seed, data_dir, run_dir) -> dict[str, Any]:
    return {
        "train.epochs": epochs,
        "train.batch_size": batch_size,
        "train.lr": lr,
        "device": device,
        "seed": seed,
        "data.dir": data_dir,
        "run_dir": run_dir,
    }


def _settings(cls, kind: str, config_name: str, config_path: Optional[str], overrides: dict[str, Any],
              resume: Optional[str] = None, print_config: bool = False):
    """(run to resume or None, validated config); with --print-config, print the config and stop."""
    from vera_cli.lifecycle import load_settings

    if resume and config_path:
        raise VeraError("--resume continues a run with its own config; drop --config")
    run, settings = load_settings(cls, kind, config_name, config_path, overrides, resume)
    if print_config:
        print(yaml.safe_dump(cfg.to_dict(settings), sort_keys=False), end="")
        raise typer.Exit(0)
    return run, settings


@app.command()
def pretrain(
    exclude_classes: list[str] = typer.Option([], "--exclude-classes", help="classes to hold out: --exclude-classes cat bird dog"),
    config: Optional[str] = ConfigOpt, epochs: Optional[int] = EpochsOpt, batch_size: Optional[int] = BatchOpt,
    lr: Optional[float] = LrOpt, device: Optional[str] = DeviceOpt, seed: Optional[int] = SeedOpt,
    data_dir: Optional[str] = DataDirOpt, run_dir: Optional[str] = RunDirOpt, set_: list[str] = SetOpt,
    no_progress: bool = NoProgressOpt, resume: Optional[str] = ResumeOpt, print_config: bool = PrintConfigOpt,
    tensorboard: bool = TensorBoardOpt,
) -> None:
    """Train the base model on CIFAR-10 and print its per-class test accuracy."""
    from vera_cli.commands.pretrain import run_pretrain
    from vera_cli.report import accuracy_table

    world = _world()
    overrides = _overrides({**_common(epochs, batch_size, lr, device, seed, data_dir, run_dir),
                            "logging.tensorboard": tensorboard or None, "exclude_classes": exclude_classes or None}, set_)
    run, settings = _settings(cfg.PretrainConfig, "pretrain", "pretrain", config, overrides, resume, print_config)
    result = run_pretrain(settings, log=_log, progress=not no_progress and world.is_main, resume=run,
                          world=world)
    out.print(accuracy_table(result.test, f"Test accuracy, {result.run.path}", held_out=result.excluded_classes))
    _log(f"run written to {result.run.path} in {result.wall_seconds:.1f}s")


@app.command()
def adapt(
    classes: list[str] = typer.Option([], "--classes", help="classes to fine-tune on: --classes cat bird dog",
                                      autocompletion=complete.complete_classes),
    method: Optional[str] = typer.Option(None, "--method", help="vera (default), lora, full or head: picks the adapt-<method> config",
                                         autocompletion=complete.complete_methods),
    rank: Optional[int] = typer.Option(None, "--rank", help="adapter rank"),
    sharing: Optional[str] = typer.Option(None, "--sharing", help="VeRA projection sharing: per-shape or sliced"),
    target: list[str] = TargetOpt,
    base: Optional[str] = typer.Option(None, "--base", help="pretrain run to adapt (default: the latest)",
                                       autocompletion=complete.complete_bases),
    shots: Optional[int] = typer.Option(None, "--shots", help="training images per chosen class (default: all)"),
    train_head: Optional[bool] = typer.Option(None, "--train-head/--no-train-head",
                                              help="train the classifier layer fully beside the adapter"),
    head_lr: Optional[float] = typer.Option(None, "--head-lr", help="the classifier layer's own learning rate"),
    config: Optional[str] = ConfigOpt, epochs: Optional[int] = EpochsOpt, batch_size: Optional[int] = BatchOpt,
    lr: Optional[float] = LrOpt, device: Optional[str] = DeviceOpt, seed: Optional[int] = SeedOpt,
    data_dir: Optional[str] = DataDirOpt, run_dir: Optional[str] = RunDirOpt, set_: list[str] = SetOpt,
    no_progress: bool = NoProgressOpt, resume: Optional[str] = ResumeOpt, print_config: bool = PrintConfigOpt,
    tensorboard: bool = TensorBoardOpt,
) -> None:
    """Fine-tune a pretrained run on some classes with an adapter; print base vs adapted accuracy."""
    from vera_cli.commands.adapt import run_adapt
    from vera_cli.report import comparison_table, cost_line

    world = _world()
    overrides = _overrides({**_common(epochs, batch_size, lr, device, seed, data_dir, run_dir), "classes": classes or None,
                            "adapter.method": method, "adapter.rank": rank, "adapter.sharing": sharing,
                            "adapter.targets": target or None, "base": base, "logging.tensorboard": tensorboard or None,
                            "shots": shots, "adapter.train_head": train_head, "train.head_lr": head_lr}, set_)
    run, settings = _settings(cfg.AdaptConfig, "adapt", _adapt_config_name(overrides.get("adapter.method"), config), config,
                              overrides, resume, print_config)
    summary = run_adapt(settings, log=_log, progress=not no_progress and world.is_main, resume=run,
                       world=world)
    out.print(comparison_table({"base": summary.base, summary.method: summary.test},
                               f"Adapted {summary.base_run} -> {summary.run.path}", summary.held_out))
    head = f" ({summary.head_parameters:,} of them the head's)" if summary.head_parameters else ""
    _log(f"{summary.trainable_parameters:,} trainable parameters{head}, adapter file {summary.adapter_bytes:,} bytes, "
         f"{summary.wall_seconds:.1f}s; {cost_line(summary.to_dict())}")


def _adapt_config_name(method: Optional[str], config_path: Optional[str] = None) -> str:
    """The shipped adapt-<method> config a run starts from: the method the command line gives (--method, or
    --set adapter.method, which wins), else the method a --config file names (its learning rate is that
    method's), else VeRA's."""
    if method is None:
        named = cfg.read_config(config_path).get("adapter") if config_path else None
        method = named.get("method", "vera") if isinstance(named, dict) else "vera"
    if method not in cfg.METHODS:
        raise VeraError(f"unknown method {method!r}: choose one of {', '.join(cfg.METHODS)}")
    return f"adapt-{method}"


@app.command(name="eval")
def eval_(
    run: Optional[str] = typer.Argument(None, help="run directory (default: the latest run)",
                                        autocompletion=complete.complete_finished),
    adapter: list[str] = typer.Option([], "--adapter", help="adapt runs to apply over a pretrain run, side by side",
                                      autocompletion=complete.complete_adapters),
    merge: bool = typer.Option(False, "--merge", help="fold adapters into the weights before evaluating"),
    as_json: bool = typer.Option(False, "--json", help="print JSON on stdout and nothing else there"),
    data_dir: Optional[str] = DataDirOpt, device: Optional[str] = DeviceOpt,
    plot: Optional[str] = typer.Option(None, "--plot", help="also draw every model's per-class accuracy side by side into this new PNG file"),
) -> None:
    """Evaluate a run on the test set: per-class table, adapters against their base."""
    from vera_cli.commands.evaluate import evaluate_runs
    from vera_cli.report import accuracy_table, comparison_table

    if plot is not None and (not plot.endswith(".png") or os.path.exists(plot)):
        raise VeraError(f"--plot {plot}: name a new .png file (it must not exist yet)")
    if plot is not None:
        from vera_cli.files import blocking_file
        from vera_cli.plot import require_matplotlib

        blocking = blocking_file(Path(plot))
        if blocking is not None:
            # Found before the evaluation, not by the system's bare 'File exists' once it has run.
            raise VeraError(f"--plot {plot} cannot be made: {blocking} is a file; choose another path")
        require_matplotlib()
    result = evaluate_runs(run, adapter, merge, data_dir, device)
    rule = ", each image with its mirror image" if result.tta == "flip" else ""
    title = f"Test accuracy over base {result.base_run.path}" + (" (adapters merged)" if merge else "") + rule
    if plot is not None:
        from vera_cli.run_plots import write_per_class

        _log(f"plot written to {write_per_class(result.reports, title, Path(plot))}")
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    if len(result.reports) == 1:
        out.print(accuracy_table(result.reports["base"], f"Test accuracy, {result.base_run.path}{rule}"))
    else:
        _print_whole(comparison_table(result.reports, title))
    _log("time over the test set: " + ", ".join(f"{name} {seconds:.2f}s" for name, seconds in result.seconds.items())
         + (" (adapters merged into the weights)" if merge else ""))


@app.command()
def predict(
    run: str = typer.Argument(..., help="a pretrain run, or an adapt run (its base with its adapter)",
                              autocompletion=complete.complete_finished),
    images: Optional[list[str]] = typer.Argument(None, help="image files (anything Pillow reads) and folders of them"),
    adapter: list[str] = typer.Option([], "--adapter", help="adapt runs over the base: every image through each, in one batch",
                                      autocompletion=complete.complete_adapters),
    adapters_csv: Optional[str] = typer.Option(None, "--adapters-csv", help="a CSV file of image,adapter rows (adapter: "
                                               "an adapt run; empty or base: the base), served as one mixed batch"),
    top: int = typer.Option(3, "--top", help="how many of the most probable classes to show"),
    strict: bool = typer.Option(False, "--strict", help="classify nothing (exit code 2) when any image cannot be read"),
    as_json: bool = typer.Option(False, "--json", help="print JSON on stdout and nothing else there"),
    device: Optional[str] = DeviceOpt,
) -> None:
    """Classify image files with a run, or with several adapters over one base in one mixed batch."""
    from vera_cli.commands.predict import predict_images
    from vera_cli.report import prediction_table

    result = predict_images(run, images or [], adapter, adapters_csv, top, strict, device, warn=_log).to_dict()
    if as_json:
        print(json.dumps(result, indent=2))
        return
    out.print(prediction_table(result))


@app.command(name="count-params")
def count_params(
    method: Optional[str] = typer.Option(None, "--method", help="vera (default), lora, full or head",
                                         autocompletion=complete.complete_methods),
    rank: Optional[int] = typer.Option(None, "--rank", help="adapter rank"),
    sharing: Optional[str] = typer.Option(None, "--sharing", help="per-shape or sliced"),
    target: list[str] = TargetOpt,
    model: str = typer.Option("convnet", "--model", help="model to count: convnet or vit (default settings)"),
    lora_rank: Optional[int] = typer.Option(None, "--versus-lora", help="VeRA: also count LoRA at this rank on the same layers"),
    adapters: Optional[int] = typer.Option(None, "--adapters", help="also state the disk storage of this many VeRA and LoRA "
                                           "adapters (LoRA at the --versus-lora rank, else the same rank)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON on stdout"),
    config: Optional[str] = ConfigOpt, set_: list[str] = SetOpt,
) -> None:
    """Count trainable and frozen parameters (projections included) and the adapter file size."""
    from vera_cli.param_count import count_params as count, versus_lora, with_storage
    from vera_cli.models import build_model
    from vera_cli.report import count_tables

    overrides = _overrides({"adapter.method": method, "adapter.rank": rank, "adapter.sharing": sharing,
                            "adapter.targets": target or None}, set_)
    _, settings = _settings(cfg.AdaptConfig, "adapt", _adapt_config_name(overrides.get("adapter.method"), config), config,
                            overrides)
    base = build_model(model)
    result = count(base, settings.adapter)
    if lora_rank is not None:
        if settings.adapter.method != "vera":
            raise VeraError("--versus-lora sets VeRA beside LoRA: use it with --method vera")
        if lora_rank < 1:
            raise VeraError(f"--versus-lora is LoRA's rank: a positive integer, got {lora_rank}")
        result = versus_lora(result, base, settings.adapter, lora_rank)
    if adapters is not None:
        if adapters < 1:
            raise VeraError(f"--adapters is how many adapters to store: a positive integer, got {adapters}")
        if settings.adapter.method not in ("vera", "lora"):
            raise VeraError("--adapters N compares the storage of VeRA and LoRA adapters: use it with --method vera or "
                            "lora")
        result = with_storage(result, base, settings.adapter, adapters, lora_rank)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    for table in count_tables(result):
        out.print(table)


@app.command()
def experiment(
    classes: list[str] = typer.Option([], "--classes", help="classes to fine-tune on", autocompletion=complete.complete_classes),
    base: Optional[str] = typer.Option(None, "--base", help="pretrain run to start from (default: pretrain one)",
                                       autocompletion=complete.complete_bases),
    config: Optional[str] = ConfigOpt, device: Optional[str] = DeviceOpt, seed: Optional[int] = SeedOpt,
    data_dir: Optional[str] = DataDirOpt, run_dir: Optional[str] = RunDirOpt, set_: list[str] = SetOpt,
    no_progress: bool = NoProgressOpt, print_config: bool = PrintConfigOpt,
) -> None:
    """The whole write-up: pretrain, count parameters, adapt on the chosen classes, before/after table."""
    from vera_cli.commands.experiment import run_experiment
    from vera_cli.report import comparison_table, count_tables

    if _world().size > 1:
        raise VeraError("vera experiment runs in one process; under torchrun run vera pretrain, adapt or compare")
    # Options that both sections hold apply to both; --set reaches either one (adapt.cache_features=false).
    shared = {f"{section}.{key}": value for section in ("pretrain", "adapt")
              for key, value in {"device": device, "seed": seed, "data.dir": data_dir}.items()}
    overrides = _overrides({**shared, "run_dir": run_dir, "adapt.classes": classes or None, "base": base}, set_)
    _, settings = _settings(cfg.ExperimentConfig, "experiment", "experiment", config, overrides,
                            print_config=print_config)
    result = run_experiment(settings, log=_log, progress=not no_progress)
    for table in count_tables(result.counts):
        out.print(table)
    adapt = result.adapt
    out.print(comparison_table({"base": adapt.base, adapt.method: adapt.test},
                               f"Experiment {result.run.path}: before and after adaptation", adapt.held_out))
    _log(f"experiment written to {result.run.path} in {result.wall_seconds:.1f}s")


@app.command()
def compare(
    classes: list[str] = typer.Option([], "--classes", help="classes to fine-tune on", autocompletion=complete.complete_classes),
    methods: Optional[str] = typer.Option(None, "--methods", help="comma list of vera, vera-sliced, lora, full, head; +head trains the head beside an adapter; an adapter may fix its rank and targets: lora-r8, vera-r256@all-linear+head",
                                          autocompletion=complete.complete_compare_methods),
    ranks: Optional[str] = typer.Option(None, "--ranks", help="comma list of ranks, e.g. 4,16,64,256"),
    targets: Optional[str] = typer.Option(None, "--targets", help="comma list of targets for vera and lora, e.g. linear,all"),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="number of seeds per setting (mean and spread)"),
    base: Optional[str] = typer.Option(None, "--base", help="pretrain run to adapt (default: the latest)",
                                       autocompletion=complete.complete_bases),
    bases: Optional[str] = typer.Option(None, "--bases", help="comma list of pretrain runs: a base axis"),
    lrs: Optional[str] = typer.Option(None, "--lrs", help="comma list of learning rates, chosen on validation"),
    head_lrs: Optional[str] = typer.Option(None, "--head-lrs", help="comma list of head learning rates (+head methods)"),
    shots: Optional[str] = typer.Option(None, "--shots", help="comma list of images per class, e.g. 10,100,all"),
    reference: Optional[str] = typer.Option(None, "--reference", help="the line the others are judged against, paired "
                                            "by seed, e.g. lora-r8 (default: the best)"),
    budget: Optional[str] = typer.Option(None, "--budget", help="a duration (90s, 30m, 2h): cut the grid to fit, "
                                         "the highest seeds first"),
    workers: Optional[str] = typer.Option(None, "--workers", help="local processes sharing the rows: N, or auto (one "
                                          "per core for small CPU rows, else 1); 1 runs them in this process"),
    epochs: Optional[int] = EpochsOpt, config: Optional[str] = ConfigOpt, device: Optional[str] = DeviceOpt,
    data_dir: Optional[str] = DataDirOpt, run_dir: Optional[str] = RunDirOpt, set_: list[str] = SetOpt,
    no_progress: bool = NoProgressOpt, resume: Optional[str] = ResumeOpt, print_config: bool = PrintConfigOpt,
) -> None:
    """VeRA against LoRA, full fine-tuning and head-only on one base: a table and a plot."""
    from vera_cli.commands.compare import run_compare
    from vera_cli.report import compare_table, cost_table, verdict_table

    world = _world()
    overrides = _overrides({"classes": classes or None, "methods": methods, "ranks": ranks, "targets": targets, "seeds": seeds,
                            "base": base, "bases": bases, "lrs": lrs, "head_lrs": head_lrs, "shots": shots,
                            "reference": reference, "budget": budget, "epochs": epochs, "device": device,
                            "data.dir": data_dir, "run_dir": run_dir},
                           # Read as --set reads values (YAML): 4 is a number, auto a word.
                           ([f"workers={workers}"] if workers else []) + set_)
    run, settings = _settings(cfg.CompareConfig, "compare", "compare", config, overrides, resume, print_config)
    result = run_compare(settings, log=_log, progress=not no_progress and world.is_main, resume=run,
                         world=world)
    cut = result.plan.cut_note() if result.plan else ""
    _print_whole(compare_table(result.rows, f"Comparison {result.run.path} on {', '.join(settings.classes)}",
                               settings.select_by, cut))
    _print_whole(verdict_table(result.rows, "Against the reference line, paired by seed", settings.select_by,
                               settings.reference, cut))
    _print_whole(cost_table(result.rows, "What each line cost"))
    _log(f"table: {result.run.file('table.csv')}, plots: {', '.join(map(str, result.plots))}, "
         f"{result.wall_seconds:.1f}s" + (f"; {result.pace()}" if result.rows_per_hour else "")
         + f"; vera report {result.run.path} writes them into one page")


@app.command()
def report(
    run: str = typer.Argument(..., help="a finished compare, adapt or experiment run",
                              autocompletion=complete.complete_finished),
) -> None:
    """Write the run's report as one self-contained HTML page and as Markdown, into the run (report.html, report.md)."""
    from vera_cli.report_page import write_report

    for path in write_report(run):
        _log(f"report written to {path}")


@app.command()
def export(
    run: str = typer.Argument(..., help="adapt run to export"),
    format_: str = typer.Option("peft", "--format", help="peft: adapter_config.json + adapter_model.safetensors"),
    out_dir: str = typer.Option(..., "--out", help="folder to write the adapter into (new or empty)"),
    base_out: Optional[str] = typer.Option(None, "--base-out", help="also write the base weights and preprocessing here"),
    merge: bool = typer.Option(False, "--merge", help="write the adapter folded into the plain model instead (any adapter)"),
) -> None:
    """Export an adapter in a format another tool loads (Hugging Face PEFT), or merged into the plain model."""
    from vera_cli.commands.export import export_merged, export_peft

    if format_ != "peft":
        raise VeraError(f"unknown export format {format_!r}: the supported format is peft")
    if merge and base_out:
        raise VeraError("--merge writes the whole model into --out: drop --base-out")
    result = export_merged(run, out_dir) if merge else export_peft(run, out_dir, base_out)
    for path, size in result.files.items():
        out.print(f"{path}  {size:,} bytes", highlight=False)


config_app = typer.Typer(no_args_is_help=True, help="The shipped configs: list them, print one after overrides.")
app.add_typer(config_app, name="config")


@config_app.command("list")
def config_list() -> None:
    """Names of the shipped configs (each usable as --config NAME)."""
    for name in cfg.config_names():
        print(name)


@config_app.command("show")
def config_show(
    name: str = typer.Argument(..., help="a shipped config (vera config list) or a YAML file"),
    set_: list[str] = SetOpt,
) -> None:
    """Print a config with every `extends` resolved and the --set overrides applied, ready to copy and edit.

    A file is shown as it is written; `vera <command> --config FILE --print-config` shows it as that
    command reads it (laid over the command's own config)."""
    print(yaml.safe_dump(cfg.apply_overrides(cfg.read_config(name), cfg.parse_set_options(set_)), sort_keys=False), end="")


runs_app = typer.Typer(help="The runs under runs/: a table, and safe removal.")
app.add_typer(runs_app, name="runs")
RunsDirOpt = typer.Option("runs", "--runs-dir", help="folder that holds the runs")
YesOpt = typer.Option(False, "--yes", "-y", help="remove without asking")


@runs_app.callback(invoke_without_command=True)
def runs_list(
    ctx: typer.Context,
    runs_dir: str = RunsDirOpt,
    kind: Optional[str] = typer.Option(None, "--kind", help="only runs of this kind: pretrain, adapt, compare, experiment"),
    status: Optional[str] = typer.Option(None, "--status", help="only runs in this state: running, finished, failed, interrupted, crashed, unreadable"),
    classes: list[str] = typer.Option([], "--classes", help="only runs trained on all of these classes",
                                      autocompletion=complete.complete_classes),
    sort: str = typer.Option("created", "--sort", help="column to sort by (accuracies and wall time: highest first)"),
    reverse: bool = typer.Option(False, "--reverse", help="reverse the order"),
    as_json: bool = typer.Option(False, "--json", help="print JSON on stdout and nothing else there"),
) -> None:
    """One table of the runs: kind, status, base, method, rank, classes, accuracies, wall time."""
    if ctx.invoked_subcommand is not None:
        return
    from vera_cli import run_list as rt
    from vera_cli.runs import STATUS_FILE

    root = Path(runs_dir)
    entries = rt.sort_entries(rt.select(rt.find_runs(root), kind, status, classes), sort, reverse)
    if not entries and (root / STATUS_FILE).is_file():
        _log(f"note: {root} is a run itself; --runs-dir takes the folder that holds runs, e.g. --runs-dir {root.parent}")
    if as_json:
        print(json.dumps([entry.to_dict() for entry in entries], indent=2))
        return
    print(rt.runs_table(entries, root))


@runs_app.command("rm")
def runs_rm(
    runs: list[str] = typer.Argument(..., help="run directories to remove", autocompletion=complete.complete_any_run),
    yes: bool = YesOpt,
) -> None:
    """Remove runs (refuses running ones; a link goes, not what it points to); asks first unless --yes."""
    from vera_cli import run_list as rt

    _remove(rt.runs_to_remove(runs), yes)


@runs_app.command("clean")
def runs_clean(
    failed: bool = typer.Option(False, "--failed", help="remove runs that failed"),
    interrupted: bool = typer.Option(False, "--interrupted", help="remove runs that were interrupted (they cannot resume after)"),
    crashed: bool = typer.Option(False, "--crashed", help="remove runs whose process died while running (they cannot resume after)"),
    unreadable: bool = typer.Option(False, "--unreadable", help="remove runs whose files cannot be read"),
    runs_dir: str = RunsDirOpt, yes: bool = YesOpt,
) -> None:
    """Remove the failed (or interrupted, crashed, unreadable) runs under --runs-dir; asks first unless --yes."""
    from vera_cli import run_list as rt

    statuses = tuple(name for name, wanted in (("failed", failed), ("interrupted", interrupted), ("crashed", crashed),
                                               ("unreadable", unreadable)) if wanted)
    if not statuses:
        raise VeraError("say what to clean: --failed, --interrupted, --crashed and/or --unreadable")
    entries = rt.runs_in_state(Path(runs_dir), statuses)
    if not entries:
        _log(f"no {' or '.join(statuses)} runs under {runs_dir}")
        return
    _remove(entries, yes)


def _remove(entries: list, yes: bool) -> None:
    from vera_cli.run_list import directory_bytes, remove

    sizes = {entry.path: directory_bytes(entry.path) for entry in entries}
    for entry in entries:
        what = (f"a link to {os.readlink(entry.path)}: only the link goes" if entry.path.is_symlink()
                else f"{sizes[entry.path]:,} bytes")
        _log(f"{entry.path}  {entry.kind or '?'}, {entry.status}, {what}")
    if not yes:
        if not sys.stdin.isatty():
            raise VeraError("not removing without confirmation: add --yes")
        if not typer.confirm(f"remove these {len(entries)} run(s)?", err=True):
            _log("nothing removed")
            raise typer.Exit(1)
    remove(entries)
    _log(f"removed {len(entries)} run(s), {sum(sizes.values()):,} bytes")


def expand_list_options(argv: list[str]) -> list[str]:
    """`--classes cat bird dog` -> `--classes cat --classes bird --classes dog` (also `cat,bird`);
    `--target 'fc{1,2}'` stays one value: what the shell hands over as one token is one value.
    A token that holds no value (`--classes ""`) is kept as it is, for the option to refuse."""
    expanded: list[str] = []
    current: str | None = None
    for token in argv:
        if token.startswith("-"):
            current = token if token in LIST_OPTIONS else None
            if current is None:
                expanded.append(token)
            continue
        if current is not None:
            values = [value for value in (token.split(",") if LIST_OPTIONS[current] else [token]) if value.strip()]
            for value in values or [token]:
                expanded += [current, value]
            continue
        expanded.append(token)
    return expanded


@functools.cache
def click_command() -> Any:
    """The click command typer builds from `app`, once per process: building it reads every command's
    signature (a quarter of a `vera runs`), and click commands hold no state between invocations."""
    return refuse_empty_values(typer.main.get_command(app))


def refuse_empty_values(command: Any) -> Any:
    """Every option and argument of `command` (a click command or group, as typer builds it) that takes a
    value refuses an empty one: `--run-dir ""` would be the current folder, `--classes ""` or `--base ""`
    the default, silently. Returns `command`."""
    for param in command.params:
        if not getattr(param, "is_flag", False) and not getattr(param, "count", False):
            param.callback = _not_empty(param.callback)
    for sub in getattr(command, "commands", {}).values():
        refuse_empty_values(sub)
    return command


def _not_empty(previous: Any) -> Any:
    def check(ctx: Any, param: Any, value: Any) -> Any:
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(each, str) and not each.strip() for each in values):
            default = ", or leave the option out for its default" if param.param_type_name == "option" else ""
            raise typer.BadParameter(f"the value is empty: give one{default}")
        return previous(ctx, param, value) if previous is not None else value
    return check


def run(argv: list[str]) -> int:
    """Run the CLI on `argv`; returns the exit code instead of exiting."""
    debug = "--debug" in argv or os.environ.get("VERA_DEBUG", "") not in ("", "0")
    argv = expand_list_options([a for a in argv if a != "--debug"])
    command = click_command()
    if complete.completing("vera"):
        complete.expand_completion_words(os.environ, expand_list_options, LIST_OPTIONS)
    keep_freed_memory()
    # SIGTERM (a scheduler, `kill`) stops a run as cleanly as Ctrl-C does.
    previous = signals.install()
    try:
        if signals.interrupted():
            # A signal came after the entry point's handlers and library code swallowed it: the handlers now raise
            # only once, so a command started anyway could no longer be stopped.
            _say("interrupted")
            return signals.INTERRUPTED
        # Outside standalone mode typer returns a typer.Exit's code instead of raising it, and turns a
        # KeyboardInterrupt it meets into a returned 130; any signal seen counts as one.
        code = command.main(args=argv, prog_name="vera", standalone_mode=False)
        if code == signals.INTERRUPTED or signals.interrupted():
            _say("interrupted")
            return signals.INTERRUPTED
        return code if isinstance(code, int) else 0
    except typer.Exit as exc:
        return exc.exit_code
    except RunInterrupted as exc:
        _say(str(exc))
        return 130
    except (KeyboardInterrupt, typer.Abort):
        _say("interrupted")
        return 130
    except Exception as exc:
        if signals.interrupted() and not debug:
            # A failure that follows a signal (library code swallowed its KeyboardInterrupt) is that interrupt.
            _say("interrupted")
            return signals.INTERRUPTED
        # Typer's usage errors (bad option, wrong type) carry format_message() and an exit code;
        # OSError is a full or read-only disk or a path that is a file, in the system's own words.
        is_usage = hasattr(exc, "format_message") and hasattr(exc, "exit_code")
        # The adapters package stands alone with its own error type: bad input all the same.
        user_error = isinstance(exc, (VeraError, AdapterError, OSError))
        # A worker process's bug is not bad input, but its traceback belongs to --debug: one line, exit 1.
        from_worker = isinstance(exc, WorkerFailed)
        if debug or not (user_error or is_usage or from_worker):
            raise
        if isinstance(exc, OSError):
            message = describe_os_error(exc)
        else:
            message = str(exc) if user_error or from_worker else f"{exc.format_message()} (see vera --help)"
        _say(f"error: {' '.join(message.split())}")
        return 1 if from_worker else 2
    finally:
        signals.restore(previous)


def _say(line: str) -> None:
    # A path that is not valid UTF-8 reaches us with surrogate escapes, which no stream can print.
    err.print(line.encode("utf-8", "backslashreplace").decode("utf-8"), highlight=False, markup=False, soft_wrap=True)

