"""The comparison picture: accuracy against trainable parameters, one series per method and setting.

matplotlib (Agg backend, no display needed) draws it: a log axis, error bars,
legends and a PNG writer are a lot of hand-written code otherwise.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vera_cli.adapters.config import DEFAULT_TARGETS  # noqa: E402
from vera_cli.runs import write_bytes_atomic  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from vera_cli.commands.compare import TableLine

PANELS = (("chosen", "chosen classes, 10-way"), ("task", "chosen classes, task"), ("rest", "other classes"))
STYLES = {"vera": ("tab:blue", "o"), "vera-sliced": ("tab:cyan", "D"), "lora": ("tab:orange", "s"),
          "full": ("tab:red", "^"), "head": ("tab:green", "v")}


def _label(method: str, targets: str | None, forgetting: str, rows: list["TableLine"]) -> str:
    """The method, with the targets and forgetting option when the table has more than one of them."""
    details = [value for value, axis in ((targets, "targets"), (forgetting, "forgetting"))
               if value is not None and len({getattr(r, axis) for r in rows} - {None}) > 1]
    return f"{method} ({', '.join(details)})" if details else method


def plot_comparison(table: list["TableLine"], classes: list[str], path: Path) -> Path:
    base = table[0]
    rows = table[1:]
    figure, axes = plt.subplots(1, len(PANELS), figsize=(15, 4.8), sharex=True)
    for axis, (metric, title) in zip(axes, PANELS):
        series: dict[tuple[str, str | None, str], list["TableLine"]] = {}
        for row in rows:
            if row.mean[metric] is not None:
                series.setdefault((row.method, row.targets, row.forgetting), []).append(row)
        for (method, targets, forgetting), members in series.items():
            members.sort(key=lambda r: r.trainable)
            colour, marker = STYLES.get(method, ("black", "x"))
            axis.errorbar([r.trainable for r in members], [100 * r.mean[metric] for r in members],
                          yerr=[100 * r.std[metric] for r in members], color=colour, marker=marker,
                          # Hollow markers: the same method on other targets than the default linear layers.
                          markerfacecolor=colour if targets in (None, *DEFAULT_TARGETS) else "white",
                          linestyle="--" if forgetting == "none" else "-", capsize=3,
                          label=_label(method, targets, forgetting, rows))
        if base.mean[metric] is not None:
            axis.axhline(100 * base.mean[metric], color="grey", linestyle=":", label="base model")
        axis.set_xscale("log")
        axis.set_title(title)
        axis.set_xlabel("trainable parameters (log scale)")
        axis.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), frameon=False)
    figure.suptitle(f"Adapting on {', '.join(classes)}: accuracy against trainable parameters")
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    save_figure(figure, path)
    plt.close(figure)
    return path


def save_figure(figure: "Figure", path: Path) -> Path:
    """The figure as a PNG, written atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    write_bytes_atomic(path, buffer.getvalue())
    return path
