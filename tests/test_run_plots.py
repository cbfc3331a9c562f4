"""The pictures: what each run writes, and what the figures hold (bar heights, marks, series styles)."""

import json
from pathlib import Path

from matplotlib.patches import Rectangle

from conftest import QUICK
from vera_cli.metrics import AccuracyReport
from vera_cli.run_plots import per_class_bars, training_curves


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def report(run: Path, key: str) -> AccuracyReport:
    return AccuracyReport.from_dict(json.loads((run / "summary.json").read_text())[key])


def bars(figure) -> list[Rectangle]:
    return [patch for patch in figure.axes[0].patches if isinstance(patch, Rectangle) and patch.get_width() < 0.5]


def test_training_curves_plot_what_metrics_jsonl_holds():
    records = [{"epoch": 1, "loss": 2.0, "test_accuracy": 0.3, "chosen": 0.5, "task": 0.7, "rest": 0.2},
               {"epoch": 2, "loss": 1.5, "test_accuracy": 0.4, "chosen": 0.6, "task": 0.8, "rest": 0.3}]
    loss_axis, accuracy_axis = training_curves(records, "t").axes
    assert list(loss_axis.lines[0].get_ydata()) == [2.0, 1.5]
    lines = {line.get_label(): line for line in accuracy_axis.lines}
    assert list(lines) == ["all classes", "chosen classes, 10-way", "chosen classes, task", "other classes"]
    assert list(lines["chosen classes, task"].get_ydata()) == [70.0, 80.0]
    # Told apart without colour: every curve has its own marker and line style.
    assert len({(line.get_marker(), line.get_linestyle()) for line in lines.values()}) == 4
    assert list(accuracy_axis.get_xticks()) == [1, 2]
    pretrain_only = training_curves([{k: r[k] for k in ("epoch", "loss", "test_accuracy")} for r in records], "t")
    assert [line.get_label() for line in pretrain_only.axes[1].lines] == ["all classes"]


def test_runs_write_their_pictures_and_eval_plots_adapters_side_by_side(vera, pretrained):
    assert is_png(pretrained / "training-curves.png")
    for name, method in (("a", "vera"), ("b", "lora")):
        result = vera("adapt", *QUICK, "--classes", "cat", "dog", "--method", method, "--run-dir", f"runs/{name}")
        assert result.code == 0, result.err
        assert is_png(Path(f"runs/{name}/per-class-accuracy.png")) and is_png(Path(f"runs/{name}/training-curves.png"))
    evaluated = vera("eval", str(pretrained), "--adapter", "runs/a", "runs/b", "--plot", "side.png")
    assert evaluated.code == 0, evaluated.err
    assert "plot written to side.png" in evaluated.err and is_png(Path("side.png"))
    again = vera("eval", str(pretrained), "--plot", "side.png")
    assert again.code == 2 and "--plot side.png: name a new .png file" in again.err

    reports = {"base": report(Path("runs/a"), "base"), "runs/a": report(Path("runs/a"), "test"),
               "runs/b": report(Path("runs/b"), "test")}
    figure = per_class_bars(reports, "t")
    drawn = bars(figure)
    assert len(drawn) == 3 * 11  # ten classes and overall, per model
    for index, (name, model) in enumerate(reports.items()):
        expected = [100 * row.accuracy for row in model.per_class] + [100 * model.overall]
        assert [bar.get_height() for bar in drawn[index * 11:(index + 1) * 11]] == expected
    assert len({bar.get_hatch() for bar in drawn}) == 3  # one hatching per model
    labels = [tick.get_text() for tick in figure.axes[0].get_xticklabels()]
    assert labels[3] == "cat *" and labels[5] == "dog *" and labels[4] == "deer" and labels[-1] == "overall"
