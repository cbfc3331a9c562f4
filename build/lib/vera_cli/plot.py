"""The comparison pictures: accuracy against trainable parameters and against training time, one series per
method and setting, with the 95 % t-interval over seeds as error bars.

matplotlib draws it: a log axis, error bars, legends and a PNG writer are a lot of hand-written code
otherwise. Its Figure is used alone (no pyplot, so no display or backend), imported where a picture is
drawn: a matplotlib that is installed but broken is a one-line error, checked before a run starts.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from vera_cli.adapters.config import DEFAULT_TARGETS
from vera_cli.comparison import TableLine, axis_label
from vera_cli.errors import VeraError
from vera_cli.files import write_bytes_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PANELS = (("chosen", "chosen classes, 10-way"), ("task", "chosen classes, task"), ("rest", "other classes"))


@dataclass(frozen=True)
class XAxis:
    """What a comparison picture puts across: each picture is `accuracy-vs-<file>.png`."""

    file: str
    label: str
    title: str
    value: Callable[[TableLine], Optional[float]]


X_AXES = (XAxis("parameters", "trainable parameters, head included (log scale)", "accuracy against trainable parameters",
                lambda line: line.trainable),
          XAxis("training-time", "training seconds of a row, evaluation left out (log scale)",
                "accuracy against training time", lambda line: line.mean.get("train_seconds")))
STYLES = {"vera": ("tab:blue", "o"), "vera-sliced": ("tab:cyan", "D"), "lora": ("tab:orange", "s"),
          "full": ("tab:red", "^"), "head": ("tab:green", "v")}


def series_label(line: TableLine, rows: list[TableLine]) -> str:
    """The method, with what else tells its series apart (targets, forgetting, shots, base) and the head it trains."""
    parts = [f"{key} {axis_label(getattr(line, key))}" for key in ("targets", "forgetting", "shots", "base")
             if getattr(line, key) is not None and len({getattr(r, key) for r in rows} - {None}) > 1]
    head = [f"head {line.head_trainable:,} incl."] if line.head_trainable and line.adapter_trainable else []
    extra = parts + head
    return line.method + (f" ({', '.join(extra)})" if extra else "")


def plot_comparison(table: list[TableLine], classes: list[str], path: Path, axis: XAxis = X_AXES[0]) -> Path:
    return save_figure(comparison_figure(table, classes, axis), path)


def comparison_figure(table: list[TableLine], classes: list[str], x_axis: XAxis = X_AXES[0]) -> "Figure":
    """Accuracy against `x_axis`; only the settings that won their tuning on validation, and that have a value there
    above zero (the axis is logarithmic: a head trained on cached features can take under the clock's resolution).
    Error bars: the 95 % Student t-interval of the mean over seeds (none with one seed)."""
    base = table[0]
    rows = [line for line in table if line.method != "base" and line.selected and (x_axis.value(line) or 0) > 0]
    figure = new_figure(figsize=(15, 4.8))
    axes = figure.subplots(1, len(PANELS), sharex=True)
    for axis in axes:
        axis.set_xscale("log")
    spread = {x_axis.value(row) for row in rows}
    if len(spread) == 1:
        # One value across: a log axis would shrink to its rounding and divide by zero; a decade around it instead.
        only = spread.pop()
        axes[0].set_xlim(only / 10 ** 0.5, only * 10 ** 0.5)
    for axis, (metric, title) in zip(axes, PANELS):
        series: dict[str, list[TableLine]] = {}
        for row in rows:
            if row.mean[metric] is not None:
                series.setdefault(series_label(row, rows), []).append(row)
        for label, members in series.items():
            members.sort(key=x_axis.value)
            method, targets, forgetting = members[0].method, members[0].targets, members[0].forgetting
            colour, marker = STYLES.get(method.partition("+")[0], ("black", "x"))
            axis.errorbar([x_axis.value(r) for r in members], [100 * r.mean[metric] for r in members],
                          yerr=[100 * (r.ci.get(metric) or 0.0) for r in members], color=colour, marker=marker,
                          # Hollow markers: the same method on other targets than the default linear layers.
                          markerfacecolor=colour if targets in (None, *DEFAULT_TARGETS) else "white",
                          linestyle="--" if forgetting == "none" else ":" if "+" in method else "-", capsize=3,
                          label=label)
        if base.mean[metric] is not None:
            axis.axhline(100 * base.mean[metric], color="grey", linestyle=":", label="base model")
        axis.set_title(title)
        axis.set_xlabel(x_axis.label)
        axis.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    # Three labels a line: a setting's label names its targets and head, and six of them overflow the figure.
    columns = min(len(labels), 3)
    legend_lines = -(-len(labels) // max(columns, 1))
    figure.set_figheight(4.8 + 0.25 * legend_lines)
    figure.legend(handles, labels, loc="lower center", ncol=columns, frameon=False)
    figure.suptitle(f"Adapting on {', '.join(classes)}: {x_axis.title} (error bars: 95 % t-interval over seeds)")
    figure.tight_layout(rect=(0, 0.055 * legend_lines + 0.02, 1, 1))
    return figure


def require_matplotlib(instead: str = "") -> None:
    """Refuse, before any work, a matplotlib that is found but does not import; `instead` says how to do without."""
    try:
        import matplotlib.figure  # noqa: F401
    except Exception as exc:  # a broken install raises anything on import
        raise VeraError(f"matplotlib is installed but does not import ({type(exc).__name__}: {exc}): reinstall it "
                        f"(pip install --force-reinstall matplotlib){instead}") from exc


def new_figure(**kwargs: Any) -> "Figure":
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def save_figure(figure: "Figure", path: Path) -> Path:
    """The figure as a PNG, written atomically."""
    write_bytes_atomic(path, figure_png(figure))
    return path


def figure_png(figure: "Figure") -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()
