"""The pictures every run writes: training curves per epoch, and per-class accuracy of several models.

Each series differs by hatching or marker and line style as well as by colour, so
that the pictures still read when printed in greyscale.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from vera_cli.metrics import AccuracyReport
from vera_cli.plot import new_figure, save_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CURVES_FILE = "training-curves.png"
PER_CLASS_FILE = "per-class-accuracy.png"
# (metrics.jsonl key, legend label, marker, line style): darker and more distinct markers down the list.
ACCURACY_CURVES = (("test_accuracy", "all classes", "o", "-"), ("chosen", "chosen classes, 10-way", "s", "--"),
                   ("task", "chosen classes, task", "^", "-."), ("rest", "other classes", "v", ":"))
# Bars: light to dark, each with its own hatching.
BAR_STYLES = (("#d9d9d9", "//"), ("#525252", ""), ("#969696", ".."), ("#252525", "xx"), ("#bdbdbd", "\\\\"),
              ("#737373", "++"))


def training_curves(records: list[dict], title: str) -> Figure:
    """Training loss and test accuracy per epoch, from metrics.jsonl records."""
    figure = new_figure(figsize=(12, 4))
    loss_axis, accuracy_axis = figure.subplots(1, 2)
    epochs = [record["epoch"] for record in records]
    loss_axis.plot(epochs, [record["loss"] for record in records], color="black", marker="o")
    loss_axis.set_title("training loss")
    loss_axis.set_ylabel("cross-entropy")
    for key, label, marker, style in ACCURACY_CURVES:
        # Epochs without an evaluation (a long few-shot run evaluates every few epochs) have no point.
        points = [(record["epoch"], record[key]) for record in records if record.get(key) is not None]
        if points:
            accuracy_axis.plot([e for e, _ in points], [100 * v for _, v in points], color="black", marker=marker,
                               linestyle=style, label=label)
    accuracy_axis.set_title("test accuracy")
    accuracy_axis.set_ylabel("accuracy (%)")
    # Beside the axis, never over a curve.
    accuracy_axis.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small", frameon=False)
    for axis in (loss_axis, accuracy_axis):
        axis.set_xlabel("epoch")
        # Whole epochs only: a 2-epoch run would otherwise get ticks at 1.25, 1.5, ...
        axis.set_xticks(epochs if len(epochs) <= 15 else epochs[::max(1, len(epochs) // 10)])
        axis.grid(True, alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def write_training_curves(metrics_path: Path, title: str) -> Path:
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return save_figure(training_curves(records, title), metrics_path.with_name(CURVES_FILE))


def per_class_bars(reports: dict[str, AccuracyReport], title: str) -> Figure:
    """Per-class accuracy of each model side by side (the first is the reference), then overall;
    the classes any model was trained on are starred and shaded."""
    names = list(reports)
    classes = [row.name for row in next(iter(reports.values())).per_class]
    chosen = {name for report in reports.values() for name in report.chosen_classes}
    groups = [*classes, "overall"]
    width = 0.8 / len(names)
    figure = new_figure(figsize=(max(9.0, 0.7 * len(groups) * max(2, len(names)) / 2 + 2), 4.8))
    axis = figure.subplots()
    for index, name in enumerate(names):
        report = reports[name]
        values = [100 * row.accuracy for row in report.per_class] + [100 * report.overall]
        colour, hatch = BAR_STYLES[index % len(BAR_STYLES)]
        positions = [group + (index - (len(names) - 1) / 2) * width for group in range(len(groups))]
        axis.bar(positions, values, width, label=name, color=colour, hatch=hatch, edgecolor="black", linewidth=0.6)
    for group, label in enumerate(groups):
        if label in chosen:
            axis.axvspan(group - 0.45, group + 0.45, color="#f0f0f0", zorder=0)
    axis.axvline(len(classes) - 0.5, color="black", linestyle="--", linewidth=0.8)
    axis.set_xticks(range(len(groups)), [f"{c} *" if c in chosen else c for c in groups], rotation=30, ha="right")
    for tick in axis.get_xticklabels():
        if tick.get_text().endswith("*"):
            tick.set_fontweight("bold")
    axis.set_ylim(0, 100)
    axis.set_ylabel("test accuracy (%)")
    axis.grid(True, axis="y", alpha=0.3)
    axis.set_axisbelow(True)
    axis.set_title(title + ("\n* trained on (shaded)" if chosen else ""), fontsize="medium")
    figure.legend(loc="lower center", ncol=min(len(names), 3), frameon=False, fontsize="small")
    # Room under the axis for the rotated class names and the legend rows.
    figure.tight_layout(rect=(0, 0.05 * ((len(names) - 1) // 3 + 1), 1, 1))
    return figure


def write_per_class(reports: dict[str, AccuracyReport], title: str, path: Path) -> Path:
    return save_figure(per_class_bars(reports, title), path)
