"""`vera compare`'s statistics and costs: t-intervals, paired verdicts, Pareto fronts, what rows cost, --budget."""

import dataclasses
import io
import json
import warnings
from pathlib import Path

import pytest
import torch
from rich.console import Console

from vera_cli import config
from vera_cli.commands import compare as compare_module
from vera_cli.comparison import Row, TableLine, aggregate, read_rows, resolve_reference
from vera_cli.plot import X_AXES, comparison_figure
from vera_cli.config import CompareConfig, parse_duration
from vera_cli.costs import PeakMemory, inference_ms_per_image, per_thousand, training_seconds, vm_hwm_bytes
from vera_cli.errors import VeraError
from vera_cli.grid_progress import GridPlan, plan_grid
from vera_cli.report import compare_table, cost_table, verdict_table
from vera_cli.stats import NO_DIFFERENCE, interval, pareto_front, t_quantile, verdict


@pytest.mark.parametrize("df, expected", [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (30, 2.042),
                                          (120, 1.980)])
def test_t_quantiles_are_the_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=5e-4)


def test_t_quantile_of_other_levels():
    assert t_quantile(0.95, 5) == pytest.approx(2.015, abs=5e-4)
    assert t_quantile(0.995, 10) == pytest.approx(3.169, abs=5e-4)


def test_interval_is_the_student_t_interval_of_the_mean():
    values = [0.80, 0.82, 0.84]
    result = interval(values)
    assert result.mean == pytest.approx(0.82)
    # sd 0.02, n 3: half-width t_{0.975,2} * 0.02 / sqrt(3).
    assert result.half_width == pytest.approx(4.3027 * 0.02 / 3 ** 0.5, rel=1e-4)
    assert (result.low, result.high) == pytest.approx((0.82 - result.half_width, 0.82 + result.half_width))
    assert interval([0.7]).half_width is None and interval([0.7]).count == 1


def row(method: str, seed: int, accuracy: float, shots=None, rank=8, **extra) -> Row:
    name = f"{method}-r{rank}-replay" + (f"-k{shots}" if shots else "")
    return Row(f"{name}-s{seed}", method, rank, "replay", "linear", seed, 100, 1000, accuracy, accuracy, accuracy, accuracy,
               1.0, name, shots=shots, **extra)


def lines(accuracy: dict[str, list[float]], reference=None, **extra):
    rows = [row(method, seed, value, **extra) for method, values in accuracy.items() for seed, value in enumerate(values)]
    return {line.name: line for line in aggregate([], rows, "overall", reference)}


def test_a_planted_difference_is_detected_and_identical_rows_are_not():
    table = lines({"lora": [0.60, 0.62, 0.61, 0.64, 0.58], "vera": [0.65, 0.66, 0.67, 0.69, 0.62],
                   "same": [0.60, 0.62, 0.61, 0.64, 0.58], "head": [0.55, 0.58, 0.55, 0.60, 0.52]}, reference="lora")
    reference = table["lora-r8-replay"]
    assert reference.verdict == "reference" and reference.difference is None
    vera = table["vera-r8-replay"]
    # Paired per seed: +0.05 +0.04 +0.06 +0.05 +0.04, mean 0.048, sd 0.008367.
    assert vera.difference.mean == pytest.approx(0.048)
    assert vera.difference.half_width == pytest.approx(2.7764 * 0.0083666 / 5 ** 0.5, rel=1e-3)
    assert vera.verdict == "better" and vera.reference == "lora-r8-replay"
    assert table["head-r8-replay"].verdict == "worse"
    assert table["head-r8-replay"].difference.mean == pytest.approx(-0.05)
    same = table["same-r8-replay"]
    assert (same.difference.mean, same.difference.half_width) == (0.0, 0.0) and same.verdict == NO_DIFFERENCE
    # Unpaired, the seed-to-seed spread (sd 0.022) would swamp a 2-point difference; paired, it does not.
    close = lines({"lora": [0.60, 0.64, 0.56], "vera": [0.62, 0.66, 0.58]}, reference="lora-r8")["vera-r8-replay"]
    assert close.verdict == "better" and close.ci["overall"] > 0.02


def test_noise_larger_than_the_difference_gives_no_verdict_either_way():
    table = lines({"lora": [0.60, 0.62, 0.61], "vera": [0.64, 0.59, 0.63]}, reference="lora")
    assert table["vera-r8-replay"].verdict == NO_DIFFERENCE
    assert table["vera-r8-replay"].difference.low < 0 < table["vera-r8-replay"].difference.high


def test_one_seed_gives_no_verdict():
    table = lines({"lora": [0.60], "vera": [0.70]}, reference="lora")
    assert table["vera-r8-replay"].verdict == "1 seed: no verdict"
    assert table["vera-r8-replay"].difference.half_width is None
    assert table["vera-r8-replay"].ci["overall"] is None
    assert verdict(None) == "no common seed: no verdict"


def test_the_default_reference_is_the_best_line():
    table = lines({"lora": [0.60, 0.62], "vera": [0.70, 0.71], "head": [0.5, 0.5]})
    assert {line.reference for line in table.values()} == {"vera-r8-replay"}
    assert table["vera-r8-replay"].verdict == "reference"
    assert table["lora-r8-replay"].verdict == "worse"


def test_lines_are_paired_within_their_shots_only():
    rows = [row(method, seed, value + (0.1 if shots == 100 else 0), shots=shots)
            for shots in (10, 100) for method, values in {"lora": [0.5, 0.52], "vera": [0.55, 0.58]}.items()
            for seed, value in enumerate(values)]
    table = aggregate([], rows, "overall", "lora-r8")
    by_shots = {(line.name, line.shots): line for line in table}
    for shots in (10, 100):
        assert by_shots[("lora-r8-replay", shots)].verdict == "reference"
        # Against its own shots' reference: +0.05, +0.06 each time, never the other shots' +0.15.
        assert by_shots[("vera-r8-replay", shots)].difference.mean == pytest.approx(0.055)


def test_reference_names_one_setting_or_is_refused():
    names = ["vera-r8-replay", "vera-r80-replay", "lora-r8-replay", "lora-r8-none"]
    assert resolve_reference("vera-r8", names) == "vera-r8-replay"
    with pytest.raises(VeraError, match=r"^--reference lora-r8 matches 2 settings \(lora-r8-replay, lora-r8-none\)"):
        resolve_reference("lora-r8", names)
    with pytest.raises(VeraError, match="^--reference dora matches no setting of the grid: name one of vera-r8-replay"):
        resolve_reference("dora", names)


def test_pareto_fronts_of_task_accuracy_against_bytes_and_training_time():
    assert pareto_front([(0.6, 10), (0.7, 20), (0.65, 30), (0.7, 20), (0.5, 5)]) == [True, True, False, True, True]
    rows = [Row(f"{m}-s0", m, None, "replay", None, 0, 1, size, acc, acc, acc, acc, 1.0, m, train_seconds=seconds)
            for m, size, acc, seconds in (("small", 100, 0.60, 9.0), ("big", 5000, 0.70, 2.0), ("mid", 1000, 0.55, 1.0),
                                          ("worst", 6000, 0.50, 10.0))]
    marks = {line.name: line.pareto for line in aggregate([], rows)}
    assert marks == {"small-replay": "bytes", "big-replay": "bytes time", "mid-replay": "time", "worst-replay": ""}


def test_rows_recorded_before_costs_still_load_and_aggregate(tmp_path):
    old = {k: v for k, v in row("lora", 0, 0.6).to_dict().items()
           if k not in ("train_seconds", "train_seconds_per_1k_images", "inference_ms_per_image", "peak_memory_bytes")}
    (tmp_path / "rows.jsonl").write_text(json.dumps(old) + "\n" + json.dumps({**old, "name": "lora-r8-replay-s1", "seed": 1})
                                         + "\n")
    rows = read_rows(tmp_path / "rows.jsonl")
    assert [r.train_seconds for r in rows] == [None, None]
    line = aggregate([], rows)[0].to_dict()
    assert line["train_seconds"] is None and line["peak_memory_bytes"] is None and line["pareto"] == "bytes"
    assert line["overall"] == pytest.approx(0.6) and line["overall_ci95"] == 0.0


def text_of(table) -> str:
    console = Console(file=io.StringIO(), width=200, record=True)
    console.print(table)
    return console.export_text()


def cells(text: str, method: str) -> list[str]:
    """The words of the table line of `method`."""
    return next(line.split() for line in text.splitlines() if line.split()[:1] == [method])


def flat(text: str) -> str:
    """Text with its wrapping undone: captions wrap wherever the width falls."""
    return " ".join(text.split())


def test_tables_show_intervals_verdicts_costs_and_the_cut():
    rows = [row("lora", s, v, train_seconds=4.0, train_seconds_per_1k_images=0.00481, inference_ms_per_image=0.02,
                peak_memory_bytes=300 * 2**20) for s, v in enumerate([0.60, 0.62, 0.61])]
    rows += [row("vera", s, v) for s, v in enumerate([0.65, 0.66, 0.67])]
    table = aggregate([], rows, "overall", "lora")
    accuracy = text_of(compare_table(table, "t", cut="cut to fit --budget 1m: 2 row(s) dropped (a-s2, b-s2)"))
    assert "61.0 ± 2.5" in accuracy and "95 % Student t-interval" in flat(accuracy)
    assert "cut to fit --budget 1m: 2 row(s) dropped (a-s2, b-s2)" in flat(accuracy)
    verdicts = text_of(verdict_table(table, "v", reference="lora"))
    assert cells(verdicts, "lora")[4:] == ["3", "-", "-", "reference"]
    assert cells(verdicts, "vera")[4:] == ["3", "+5.0", "[+2.5,", "+7.5]", "better"]
    assert "reference: lora-r8-replay (named by --reference lora)" in flat(verdicts)
    costs = text_of(cost_table(table, "c"))
    # Three figures: a row on cached features trains 1,000 images in a few milliseconds.
    assert cells(costs, "lora")[4:] == ["1,000", "4.00", "0.00481", "0.020", "300", "time"]
    assert cells(costs, "vera")[4:] == ["1,000", "n/a", "n/a", "n/a", "n/a", "bytes"]


def test_costs_are_measured_as_documented():
    ticks = iter([0.0, 0.5, 1.0, 1.2, 2.0, 2.3])
    calls = []
    assert inference_ms_per_image(lambda: calls.append(1), 50, torch.device("cpu"), repeats=3,
                                  clock=lambda: next(ticks)) == pytest.approx(1000 * 0.2 / 50)
    assert len(calls) == 4  # one untimed pass first
    assert vm_hwm_bytes("Name:\tpython\nVmPeak:\t  999 kB\nVmHWM:\t  12345 kB\n") == 12345 * 1024
    assert vm_hwm_bytes("Name:\tpython\n") is None
    assert training_seconds([{"seconds": 1.5}, {"seconds": 2.5}]) == 4.0
    assert training_seconds([{"seconds": 1.5}, {"seconds": "x"}]) is None
    assert per_thousand(4.0, 2000) == 2.0 and per_thousand(None, 10) is None
    peak = PeakMemory(torch.device("cpu")).bytes()
    if Path("/proc/self/status").is_file():
        # The resident set of a process that imported torch: tens of MiB at least.
        assert peak is not None and peak > 20 * 2**20


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("2h", 7200), ("1h30m", 5400), ("1.5m", 90)])
def test_durations(text, seconds):
    assert parse_duration(text, "budget") == seconds


@pytest.mark.parametrize("text", ["30", "30 minutes", "m", "0s", "-5m", "1d"])
def test_bad_durations_are_refused(text):
    with pytest.raises(VeraError, match="^budget must be"):
        parse_duration(text, "budget")


def test_a_budget_drops_the_highest_seeds_first():
    points = [(f"{setting}-s{seed}", seed) for setting in ("a", "b", "c") for seed in range(3)]
    plan = plan_grid(points, {"a-s0"}, "a-s0", 10.0, "75s")
    # 7 rows fit: every seed 0 and 1, then seed 2 in grid order until the budget is spent.
    assert plan.dropped == ["b-s2", "c-s2"] and plan.estimate_seconds == 90.0
    assert plan.cut_note() == "cut to fit --budget 75s: 2 row(s) dropped (b-s2, c-s2)"
    assert plan.lines()[1] == "--budget 75s: 7 of the 9 rows fit, about 1m10s; dropped, the highest seeds first: b-s2, c-s2"
    tight = plan_grid(points, set(), "a-s0", 10.0, "15s")
    assert tight.dropped == ["a-s1", "a-s2", "b-s1", "b-s2", "c-s1", "c-s2"]
    assert tight.lines()[-1].startswith("note: one seed of each of the 3 settings takes longer than --budget 15s")
    assert plan_grid(points, set(), "a-s0", 10.0, "2h").dropped == []
    assert plan_grid(points, set(), "a-s0", 10.0, None).lines() == [
        "the first row (a-s0) took 10s: the grid's 9 rows take about 1m30s if each takes as long (rows of other methods "
        "and ranks differ)"]
    # Two workers run rows side by side: the same budget holds twice the rows.
    paired = plan_grid(points, set(), "a-s0", 10.0, "40s", workers=2)
    assert paired.dropped == ["c-s2"] and paired.estimate_seconds == 45.0
    assert paired.lines()[0].startswith("the first row (a-s0) took 10s: the grid's 9 rows take about 45s with 2 side by side")


def test_a_budget_counts_the_tests_left_for_after_the_grid():
    # a and b are the two rates of one contest (each row half a test evaluation of 20 s); c is tested as it runs.
    points = [(f"{setting}-s{seed}", seed) for setting in ("a", "b", "c") for seed in range(3)]
    shares = {name: 0.5 for name, _ in points if name[0] in "ab"}
    plan = plan_grid(points, set(), "a-s0", 10.0, "100s", test_shares=shares, test_seconds=20.0)
    # Seed 0 costs 20 + 20 + 10 s, seed 1 as much again: 100 s; no row of seed 2 fits.
    assert plan.dropped == ["a-s2", "b-s2", "c-s2"] and plan.tests == 3 and plan.kept_tests == 2
    assert plan.estimate_seconds == 9 * 10 + 3 * 20
    assert plan.lines() == [
        "the first row (a-s0) took 10s: the grid's 9 rows take about 1m30s if each takes as long (rows of other methods "
        "and ranks differ), then about 1m00s to test the 3 row(s) of the learning rates chosen on validation (each about "
        "as long as the base's test evaluation, 20s): about 2m30s in all",
        "--budget 100s: 6 of the 9 rows fit, about 1m40s with their tests; dropped, the highest seeds first: a-s2, b-s2, "
        "c-s2"]
    # Without the tests the same budget holds the whole grid.
    assert plan_grid(points, set(), "a-s0", 10.0, "100s").dropped == []
    # Rows of differing cost are still dropped from the end: a cheaper row after one that did not fit goes too.
    # (85 s: seed 0 and a-s1 take 70 s; b-s1 would end at 90 s, so c-s1, which would fit at 80 s, goes as well.)
    assert plan_grid(points, set(), "a-s0", 10.0, "85s", test_shares=shares, test_seconds=20.0).dropped == [
        "a-s2", "b-s1", "b-s2", "c-s1", "c-s2"]


def test_a_recorded_plan_reads_back_and_a_damaged_one_is_refused(tmp_path):
    plan = plan_grid([("a-s0", 0), ("a-s1", 1)], set(), "a-s0", 10.0, "10s")
    (tmp_path / "plan.json").write_text(json.dumps(plan.to_dict()))
    assert GridPlan.read(tmp_path / "plan.json") == plan
    (tmp_path / "plan.json").write_text(json.dumps({"rows": 2}))
    with pytest.raises(VeraError, match="plan.json is damaged"):
        GridPlan.read(tmp_path / "plan.json")
    assert GridPlan.read(tmp_path / "none.json") is None


@pytest.mark.parametrize("args, message", [
    (["--budget", "30 minutes"], "error: budget must be a duration such as 90s, 30m, 2h or 1h30m; got '30 minutes'"),
    (["--budget", "0s"], "error: budget must be longer than no time at all"),
    (["--reference", "dora"], "error: --reference dora matches no setting of the grid: name one of vera-r4-replay, "),
])
def test_bad_budget_or_reference_is_refused_before_anything_runs(vera, pretrained, args, message):
    result = vera("compare", "--methods", "vera,head", "--ranks", "4", *args, "--run-dir", "runs/never")
    assert result.code == 2
    assert result.err.startswith(message) and result.err.count("\n") == 1, result.err
    assert not Path("runs/never").exists()


def test_a_budget_with_several_workers_estimates_from_a_typical_row_not_the_long_ones(vera, pretrained, monkeypatch):
    # The workers' pool in this process, claiming in the order it is given: the first row claimed finishes first.
    class InOrder:
        threads = 1

        def __init__(self, count, task, job, names, claims, log):
            self.task, self.job, self.names, self.log = task, job, names, log

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def __iter__(self):
            return ((name, self.task(self.job, name, self.log)) for name in self.names)

    monkeypatch.setattr(compare_module, "Pool", InOrder)
    result = vera("compare", "--methods", "head,full,lora-r4@conv", "--seeds", "2", "--epochs", "1", "--workers", "2",
                  "--budget", "1h", "--run-dir", "runs/cut")
    assert result.code == 0, result.err
    # Full fine-tuning and LoRA on the convolutions train through the whole network: not the typical row.
    assert json.loads(Path("runs/cut/plan.json").read_text())["first_row"] == "head-replay-s0"


def test_compare_records_costs_and_cuts_the_grid_to_its_budget(vera, pretrained, monkeypatch):
    # Every row counts as 100 s, so that the cut does not depend on how busy the machine is.
    original = compare_module.row_from_summary
    monkeypatch.setattr(compare_module, "row_from_summary",
                        lambda point, summary: dataclasses.replace(original(point, summary), seconds=100.0))
    result = vera("compare", "--methods", "head", "--set", "forgetting=[none,replay]", "--seeds", "3", "--epochs", "1",
                  "--budget", "7m", "--reference", "head-replay", "--run-dir", "runs/cut")
    assert result.code == 0, result.err
    run = Path("runs/cut")
    plan = json.loads((run / "plan.json").read_text())
    assert plan["dropped"] == ["head-none-s2", "head-replay-s2"]
    assert plan["seconds_per_row"] == 100.0 and plan["budget"] == "7m" and plan["rows"] == 6
    assert "the first row (head-none-s0) took 1m40s: the grid's 6 rows take about 10m00s" in result.err
    assert "--budget 7m: 4 of the 6 rows fit, about 6m40s; dropped, the highest seeds first: head-none-s2, head-replay-s2" \
        in result.err
    rows = [json.loads(line) for line in (run / "rows.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == ["head-none-s0", "head-replay-s0", "head-none-s1", "head-replay-s1"]  # seed by seed
    for recorded in rows:
        summary = json.loads((run / "rows" / recorded["name"] / "summary.json").read_text())
        epochs = json.loads((run / "rows" / recorded["name"] / "metrics.jsonl").read_text().splitlines()[0])
        assert recorded["train_seconds"] == pytest.approx(epochs["seconds"]) and recorded["train_seconds"] > 0
        assert recorded["train_seconds_per_1k_images"] == pytest.approx(
            1000 * recorded["train_seconds"] / (summary["epochs"] * summary["train_images"]))
        assert recorded["inference_ms_per_image"] > 0 and recorded["peak_memory_bytes"] > 20 * 2**20
    table = {line["name"]: line for line in json.loads((run / "table.json").read_text())}
    assert table["head-none"]["seeds"] == 2 and table["head-none"]["reference"] == "head-replay"
    paired = [a["overall"] - b["overall"] for a, b in zip(rows[0::2], rows[1::2])]
    assert table["head-none"]["difference"] == pytest.approx(sum(paired) / 2)
    assert table["head-replay"]["verdict"] == "reference"
    assert "cut to fit --budget 7m: 2 row(s) dropped (head-none-s2, head-replay-s2)" in flat(result.out)
    assert json.loads((run / "summary.json").read_text())["plan"]["dropped"] == plan["dropped"]
    for picture in ("accuracy-vs-parameters.png", "accuracy-vs-training-time.png"):
        assert (run / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_budget_is_refused_under_torchrun():
    class Two:
        size = 2

    cfg = config.load(CompareConfig, "compare", {"budget": "1m"})
    with pytest.raises(VeraError, match="^--budget cuts the grid from one process's first row"):
        compare_module.run_compare(cfg, world=Two())


@pytest.mark.parametrize("seconds", [[3e-5, 3e-5], [1e-6], [0.5, 2.0]])
def test_the_comparison_picture_spans_a_decade_around_a_single_value_without_numeric_warnings(seconds):
    accuracy = {"chosen": 0.3, "task": 0.6, "rest": 0.7}
    base = TableLine("base", None, "replay", None, 1, 0, 0, {"chosen": 0.0, "task": 0.4, "rest": 0.8}, {})
    lines = [TableLine("vera", 8 * (i + 1), "replay", None, 1, 100, 400, {**accuracy, "train_seconds": s}, {})
             for i, s in enumerate(seconds)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figure = comparison_figure([base, *lines], ["cat"], X_AXES[1])
        figure.canvas.draw()
    low, high = figure.axes[0].get_xlim()
    assert low <= min(seconds) and max(seconds) <= high
    if len(set(seconds)) == 1:
        assert high / low == pytest.approx(10)
