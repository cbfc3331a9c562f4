"""Rich tables for what the commands measured."""

from __future__ import annotations

from typing import Any, Optional

from rich import box
from rich.markup import escape
from rich.table import Table

from vera_cli.comparison import TableLine, axis_label
from vera_cli.metrics import AccuracyReport, percent as _pct
from vera_cli.param_count import ParamCount


def _change(value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    points = value * 100
    colour = "green" if points > 0 else "red" if points < 0 else "white"
    return f"[{colour}]{points:+.2f}[/{colour}]"


def cost_line(summary: dict[str, Any]) -> str:
    """What an adapt run cost beside its accuracy, from its summary: training, inference, peak memory."""
    def known(key: str, text: str) -> list[str]:
        return [text.format(summary[key])] if summary.get(key) is not None else []

    parts = (known("train_seconds", "training {:.1f}s") + known("train_seconds_per_1k_images", "{:.3g}s per 1,000 images")
             + known("inference_ms_per_image", "inference {:.3f} ms per image (adapter unmerged)")
             + ([f"peak memory {summary['peak_memory_bytes'] / 2**20:,.0f} MiB"] if summary.get("peak_memory_bytes") else []))
    return ", ".join(parts) or "costs not recorded"


def accuracy_table(report: AccuracyReport, title: str, held_out: list[str] = ()) -> Table:
    table = Table(title=escape(title))
    table.add_column("class")
    table.add_column("correct", justify="right")
    table.add_column("total", justify="right")
    table.add_column("accuracy", justify="right")
    for row in report.per_class:
        table.add_row(f"{row.name} (held out)" if row.name in held_out else row.name, str(row.correct), str(row.total),
                      _pct(row.accuracy))
    table.add_section()
    table.add_row("[bold]overall[/bold]", str(report.correct), str(report.total), f"[bold]{_pct(report.overall)}[/bold]")
    if held_out:
        table.caption = "held out: no image of the class was trained on"
    return table


def comparison_table(reports: dict[str, AccuracyReport], title: str, held_out: list[str] = ()) -> Table:
    """Per-class accuracy of several models side by side; the first is the reference for the changes.

    `held_out`: classes the base never saw. The chosen ones among them are new classes; the classes
    the base learned and no adapter trained on are the retained ones, whose accuracy should survive.
    """
    names = list(reports)
    reference = reports[names[0]]
    chosen = set(next((r.chosen_classes for r in reports.values() if r.chosen_classes), []))
    table = Table(title=escape(title))
    table.add_column("class")
    for index, name in enumerate(names):
        table.add_column(escape(name), justify="right")
        if index > 0:
            table.add_column("change", justify="right")

    def add(label: str, values: list[Optional[float]]) -> None:
        cells = [_pct(values[0])]
        for value in values[1:]:
            difference = None if value is None or values[0] is None else value - values[0]
            cells += [_pct(value), _change(difference)]
        table.add_row(label, *cells)

    new = [name for name in chosen if name in held_out]
    retained = [c.name for c in reference.per_class if c.name not in chosen and c.name not in held_out]
    for index, row in enumerate(reference.per_class):
        label = f"[bold]{row.name}[/bold] *" if row.name in chosen else row.name
        label += " (new)" if row.name in new else " (held out)" if row.name in held_out else ""
        add(label, [r.per_class[index].accuracy for r in reports.values()])
    table.add_section()
    if chosen:
        for label, metric in (("chosen classes (10-way)", "chosen"), ("chosen classes (task)", "task"),
                              ("other classes", "rest")):
            add(label, [r.metric(metric) for r in reports.values()])
    if new:
        add("new classes (10-way)", [r.accuracy_of(new) for r in reports.values()])
        add("retained classes", [r.accuracy_of(retained) for r in reports.values()])
    add("[bold]overall[/bold]", [r.overall for r in reports.values()])
    if chosen:
        table.caption = "* trained on. task: the chosen classes' images classified among the chosen classes only" + (
            ". new: held out from the base's pretraining; retained: learned by the base, not trained on here" if new else "")
    return table


def count_tables(count: ParamCount) -> list[Table]:
    """Per-layer counts, the shared projection pairs, and the totals of a `ParamCount`."""
    layers = Table(title=f"{count.method} parameters" + (f", rank {count.rank}" if count.method in ("vera", "lora") else ""))
    for column in ("layer", "shape", "trainable", "frozen"):
        layers.add_column(column, justify="left" if column in ("layer", "shape") else "right")
    for row in count.layers:
        layers.add_row(row.name, row.shape, f"{row.trainable:,}", f"{row.frozen:,}")
    tables = [layers]
    if count.pairs:
        pairs = Table(title=f"Shared frozen projections ({count.sharing}): {len(count.pairs)} pair(s)")
        for column in ("pair", "A", "B", "values", "used by", "one tensor"):
            pairs.add_column(column, justify="right" if column == "values" else "left")
        for pair in count.pairs:
            pairs.add_row(pair.key, "x".join(map(str, pair.a_shape)), "x".join(map(str, pair.b_shape)),
                          f"{pair.values:,}", ", ".join(pair.layers), "yes" if pair.one_tensor else "[red]NO[/red]")
        tables.append(pairs)
    totals = Table(title="Totals", show_header=False)
    totals.add_column("what")
    totals.add_column("count", justify="right")
    totals.add_row("trainable", f"{count.trainable:,}")
    totals.add_row("  without the head (the VeRA paper's count)", f"{count.adapter_trainable:,}")
    totals.add_row("  the head (classifier layer)", f"{count.head_trainable:,}")
    totals.add_row("frozen base weights", f"{count.frozen_base:,}")
    totals.add_row("frozen projections", f"{count.frozen_projections:,}")
    totals.add_row("total", f"{count.total:,}")
    totals.add_row("trainable share", f"{count.percent_trainable:.3f} %")
    totals.add_row("adapter file", f"{count.adapter_bytes:,} bytes")
    contrast = count.versus_lora
    if contrast is not None:
        totals.add_row(f"LoRA r{contrast.lora_rank}, same layers", f"{contrast.lora:,} ({contrast.ratio:.1f}x VeRA's)")
        totals.add_row("VeRA paper, ViT-B query|value", f"VeRA r256 {contrast.paper_vera / 1000:.1f}K, LoRA r8 "
                       f"{contrast.paper_lora / 1000:.1f}K ({contrast.paper_ratio:.1f}x)")
    tables.append(totals)
    if count.storage:
        tables.append(storage_table(count))
    return tables


def storage_table(count: ParamCount) -> Table:
    adapters = count.storage[0].adapters
    table = Table(title=f"Storage of {adapters:,} adapter(s) on disk, the base stored once")
    for column in ("method", "rank", "trained values each", "file each", f"{adapters:,} files", "shared", "total"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in count.storage:
        shared = f"{row.shared_bytes:,} (the seed)" if row.shared_bytes else "0"
        table.add_row(row.method, str(row.rank), f"{row.values:,}", f"{row.file_bytes:,}",
                      f"{row.adapters * row.file_bytes:,}", shared, f"{row.total_bytes:,} bytes")
    table.caption = ("VeRA's A and B regenerate from one projection seed: in memory one bank serves every adapter "
                     "with that seed; LoRA's A and B are stored and held per adapter")
    return table


def prediction_table(result: dict[str, Any]) -> Table:
    """`vera predict`'s rows (PredictResult.to_dict()): image, adapter, input, the most probable classes."""
    # Paths are printed as they are: a file named `a[/x].png` is no Rich markup.
    table = Table(title=f"Predictions over base {escape(result['base_run'])}"
                  + (", each image with its mirror image" if result["tta"] == "flip" else ""))
    for column in ("image", "adapter", "input", "class", "probability", "next"):
        table.add_column(column, justify="right" if column == "probability" else "left")
    for row in result["predictions"]:
        first, *rest = row["top"]
        source = row["input"]
        size = f"{source['width']}x{source['height']} {source['mode']}" + (", converted" if source["converted"] else "")
        table.add_row(escape(row["image"]), escape(row["adapter"] or "base"), size, first["class"], _pct(first["probability"]),
                      ", ".join(f"{entry['class']} {_pct(entry['probability'])}" for entry in rest))
    if any(row["input"]["converted"] for row in result["predictions"]):
        table.caption = f"converted: {result['conversion']}"
    return table


# Protocol columns of the comparison table, shown when any line sets them: (TableLine field, heading).
PROTOCOL_COLUMNS = (("shots", "shots"), ("base", "base"), ("lr", "lr"), ("head_lr", "head lr"))
SETTING_COLUMNS = ("method", "rank", "targets", "forgetting")
LEFT_COLUMNS = ("method", "targets", "forgetting", "base", "verdict", "front")


def _setting_table(title: str, shown: list[TableLine], columns: list[str]) -> tuple[Table, Any]:
    """A table whose first columns name each line's setting (with the protocol columns any line sets), then
    `columns`; and the function that gives a line's setting cells."""
    protocol = [(key, heading) for key, heading in PROTOCOL_COLUMNS if any(getattr(line, key) is not None for line in shown)]
    # No vertical rules and short headings keep the table within 130 columns where they can; a few-shot grid's
    # still needs more, and piped output prints it whole (cli._print_whole).
    result = Table(title=escape(title), box=box.SIMPLE_HEAD, pad_edge=False)
    for column in (*SETTING_COLUMNS, *(heading for _, heading in protocol), *columns):
        result.add_column(column, justify="left" if column in LEFT_COLUMNS else "right",
                          no_wrap=column in ("method", "forgetting", "base"))

    def setting(line: TableLine) -> list[str]:
        return [line.method, "-" if line.rank is None else str(line.rank), line.targets or "-", line.forgetting,
                *("-" if getattr(line, key) is None else axis_label(getattr(line, key)) for key, _ in protocol)]

    return result, setting


def _points(value: Optional[float], signed: bool = False) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def compare_table(table: list[TableLine], title: str, select_by: str = "overall", cut: str = "") -> Table:
    """One line per setting (mean over seeds, ± the half-width of its 95 % t-interval when there are several),
    base first; `cut` says what a time budget dropped.

    Where learning rates were tuned, only the lines that won on the validation split are shown, with
    their test numbers. Trainable parameters appear twice: without the head (the VeRA paper's count)
    and the head's own.
    """
    shown = [line for line in table if line.selected]
    tuned = any(line.validation is not None for line in shown)
    result, setting = _setting_table(title, shown, ["trainable", "head", "bytes", "chosen", "task", "rest", "overall",
                                                    *(["val"] if tuned else []), "seconds"])

    def cell(line: TableLine, metric: str) -> str:
        half = line.ci.get(metric)
        return _points(line.mean[metric]) + (f" ± {100 * half:.1f}" if line.seeds > 1 and half is not None else "")

    for index, line in enumerate(shown):
        result.add_row(*setting(line), f"{line.adapter_trainable:,}", f"{line.head_trainable:,}", f"{line.adapter_bytes:,}",
                       cell(line, "chosen"), cell(line, "task"), cell(line, "rest"), cell(line, "overall"),
                       *([_points(line.validation)] if tuned else []), f"{line.mean['seconds']:.1f}")
        if line.method == "base" and index + 1 < len(shown) and shown[index + 1].method != "base":
            result.add_section()
    result.caption = ("accuracy in %, the mean over seeds ± the half-width of its 95 % Student t-interval. trainable: "
                      "without the head (the VeRA paper's count); head: the classifier's, trained fully; "
                      "bytes: adapter file; chosen: 10-way accuracy on the chosen classes; task: among them only; "
                      "rest: the other classes; seconds: a row's wall time")
    if tuned:
        result.caption += f". val: {select_by} accuracy on the validation split"
    if len(shown) < len(table):
        result.caption += "; where learning rates were compared, the line that won on val is shown, with its test numbers"
    if cut:
        result.caption += f". {cut}"
    return result


def verdict_table(table: list[TableLine], title: str, select_by: str = "overall", reference: Optional[str] = None,
                  cut: str = "") -> Table:
    """Each shown line against its reference line, paired seed by seed."""
    shown = [line for line in table if line.selected and line.method != "base"]
    result, setting = _setting_table(title, shown, ["seeds", f"Δ {select_by}", "95 % CI", "verdict"])
    for line in shown:
        difference = line.difference
        interval = ("-" if difference is None or difference.half_width is None
                    else f"[{_points(difference.low, True)}, {_points(difference.high, True)}]")
        result.add_row(*setting(line), str(line.seeds), _points(difference.mean, True) if difference else "-", interval,
                       line.verdict or "-")
    references = ", ".join(dict.fromkeys(line.reference for line in shown if line.reference)) or "none yet"
    how = f"named by --reference {reference}" if reference else f"the best on {select_by}, on val where every line has it"
    result.caption = (f"Δ: {select_by} test accuracy minus the reference line's, in points, paired seed by seed (same "
                      f"seed, shots and base); reference: {references} ({how}). 95 % CI: the Student t-interval of "
                      "the mean difference; better or worse when it excludes 0")
    if cut:
        result.caption += f". {cut}"
    return result


def cost_table(table: list[TableLine], title: str) -> Table:
    """What each shown line cost beside its accuracy (means over its seeds), and the Pareto fronts it is on."""
    shown = [line for line in table if line.selected and line.method != "base"]
    result, setting = _setting_table(title, shown, ["bytes", "train s", "s/1k img", "ms/img", "peak MiB", "front"])

    def number(value: Optional[float], form: str) -> str:
        return "n/a" if value is None else format(value, form)

    for line in shown:
        peak = line.mean["peak_memory_bytes"]
        result.add_row(*setting(line), f"{line.adapter_bytes:,}", number(line.mean["train_seconds"], ".2f"),
                       # Three figures: a row on cached features trains 1,000 images in a few milliseconds.
                       number(line.mean["train_seconds_per_1k_images"], ".3g"),
                       number(line.mean["inference_ms_per_image"], ".3f"),
                       number(None if peak is None else peak / 2**20, ",.0f"), line.pareto.replace(" ", ", ") or "-")
    result.caption = ("bytes: adapter file; train s: the training epochs' seconds; s/1k img: per 1,000 training images; "
                      "ms/img: inference per image, adapter unmerged; peak MiB: the row's peak memory (CUDA's "
                      "allocation, else the resident set); front: on the Pareto front of task accuracy against adapter "
                      "bytes or training seconds (time), within one shots and base; n/a: not recorded")
    return result
