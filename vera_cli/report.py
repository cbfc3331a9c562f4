"""Rich tables for what the commands measured."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from rich.table import Table

from vera_cli.metrics import AccuracyReport, percent as _pct

if TYPE_CHECKING:
    from vera_cli.commands.compare import TableLine
    from vera_cli.commands.count_params import ParamCount


def _change(value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    points = value * 100
    colour = "green" if points > 0 else "red" if points < 0 else "white"
    return f"[{colour}]{points:+.2f}[/{colour}]"


def accuracy_table(report: AccuracyReport, title: str) -> Table:
    table = Table(title=title)
    table.add_column("class")
    table.add_column("correct", justify="right")
    table.add_column("total", justify="right")
    table.add_column("accuracy", justify="right")
    for row in report.per_class:
        table.add_row(row.name, str(row.correct), str(row.total), _pct(row.accuracy))
    table.add_section()
    table.add_row("[bold]overall[/bold]", str(report.correct), str(report.total), f"[bold]{_pct(report.overall)}[/bold]")
    return table


def comparison_table(reports: dict[str, AccuracyReport], title: str) -> Table:
    """Per-class accuracy of several models side by side; the first is the reference for the changes."""
    names = list(reports)
    reference = reports[names[0]]
    chosen = set(next((r.chosen_classes for r in reports.values() if r.chosen_classes), []))
    table = Table(title=title)
    table.add_column("class")
    for index, name in enumerate(names):
        table.add_column(name, justify="right")
        if index > 0:
            table.add_column("change", justify="right")

    def add(label: str, values: list[Optional[float]]) -> None:
        cells = [_pct(values[0])]
        for value in values[1:]:
            difference = None if value is None or values[0] is None else value - values[0]
            cells += [_pct(value), _change(difference)]
        table.add_row(label, *cells)

    for index, row in enumerate(reference.per_class):
        label = f"[bold]{row.name}[/bold] *" if row.name in chosen else row.name
        add(label, [r.per_class[index].accuracy for r in reports.values()])
    table.add_section()
    if chosen:
        for label, metric in (("chosen classes (10-way)", "chosen"), ("chosen classes (task)", "task"),
                              ("other classes", "rest")):
            add(label, [r.metric(metric) for r in reports.values()])
    add("[bold]overall[/bold]", [r.overall for r in reports.values()])
    if chosen:
        table.caption = "* trained on. task: the chosen classes' images classified among the chosen classes only"
    return table


def count_tables(count: "ParamCount") -> list[Table]:
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
    return tables


def compare_table(table: list["TableLine"], title: str) -> Table:
    """One line per setting (mean over seeds, with the spread when there are several), base first."""
    result = Table(title=title)
    for column in ("method", "rank", "targets", "forgetting", "trainable", "adapter bytes", "chosen (10-way)", "task",
                   "rest", "overall", "seconds"):
        result.add_column(column, justify="left" if column in ("method", "targets", "forgetting") else "right")

    def cell(line: "TableLine", metric: str) -> str:
        spread = line.std[metric]
        return _pct(line.mean[metric]) + (f" ± {100 * spread:.1f}" if line.seeds > 1 and spread is not None else "")

    for index, line in enumerate(table):
        result.add_row(line.method, "-" if line.rank is None else str(line.rank), line.targets or "-", line.forgetting,
                       f"{line.trainable:,}", f"{line.adapter_bytes:,}", cell(line, "chosen"), cell(line, "task"),
                       cell(line, "rest"), cell(line, "overall"), f"{line.mean['seconds']:.1f}")
        if index == 0:
            result.add_section()
    return result
