"""`vera compare` end to end on the synthetic data: rows, counts, plot, resume."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from vera_cli.commands import compare as compare_module
from vera_cli.grid_progress import GridProgress, duration
from vera_cli import config
from vera_cli.config import AdapterConfig, CompareConfig
from vera_cli.param_count import count_params
from vera_cli.errors import VeraError
from vera_cli.models import ConvNet, ViT, ViTConfig

GRID = ["--methods", "vera,lora,head", "--ranks", "2,4", "--seeds", "2", "--epochs", "1"]


def test_grid_names_every_setting_once():
    points = compare_module.grid(config.load(CompareConfig, "compare", {"methods": ["vera", "full"], "ranks": [4, 8], "seeds": 2,
                                                                      "forgetting": ["none", "replay"]}))
    names = [p.name for p in points]
    assert len(names) == len(set(names)) == (2 + 1) * 2 * 2
    assert "vera-r8-none-s1" in names and "full-replay-s0" in names


def test_an_adapter_may_fix_its_own_rank_and_targets_beside_the_axes():
    cfg = config.load(CompareConfig, "compare", {"methods": ["lora-r8", "vera-r256@all-linear+head", "vera", "head"],
                                                 "ranks": [4], "targets": ["attention"], "head_lrs": [0.01]})
    points = compare_module.grid(cfg)
    assert [(p.method, p.rank, p.targets) for p in points] == [
        ("lora", 8, "attention"), ("vera+head", 256, "all-linear"), ("vera", 4, "attention"), ("head", None, None)]
    assert [p.line for p in points] == ["lora-r8-attention-replay", "vera+head-r256-all-linear-replay",
                                        "vera-r4-attention-replay", "head-replay"]
    own = compare_module.method_configs(cfg)
    assert set(own) == {"lora", "vera+head", "vera", "head"}
    row = compare_module.adapt_config(cfg, own["vera+head"], points[1], "runs/base", Path("rows") / points[1].name)
    assert (row.adapter.method, row.adapter.rank, row.adapter.targets, row.adapter.train_head) == (
        "vera", 256, ["all-linear"], True)
    # Named twice, once by the axis and once by itself, a setting is one line.
    twice = config.load(CompareConfig, "compare", {"methods": ["lora", "lora-r8"], "ranks": [8], "seeds": 1})
    assert [p.name for p in compare_module.grid(twice)] == ["lora-r8-replay-s0"]


def test_a_row_evaluates_the_test_split_once_and_draws_no_picture():
    cfg = config.load(CompareConfig, "compare", {"methods": ["vera"], "ranks": [4]})
    [point] = compare_module.grid(cfg)
    own = compare_module.method_configs(cfg)["vera"]
    row = compare_module.adapt_config(cfg, own, point, "runs/base", Path("rows") / point.name)
    assert own.logging.evaluations == 5 and row.logging.evaluations == 1 and not row.logging.plots


def checked_grid(entries: dict):
    cfg = config.load(CompareConfig, "compare", entries)
    points, own = compare_module.grid(cfg), compare_module.method_configs(cfg)
    configs = {p.name: compare_module.adapt_config(cfg, own[p.method], p, "runs/base", Path("rows") / p.name)
               for p in points}
    checked = compare_module.check_grid(cfg, points, configs, [(None, ConvNet(), [])])
    return checked.points, checked.left_out


def test_a_rank_from_the_axis_that_lora_cannot_use_leaves_its_rows_out_with_the_reason():
    # The shipped grid (ranks 4, 16, 64, 256) on the ConvNet, whose linear layers give LoRA at most rank 120.
    points, left_out = checked_grid({"methods": ["vera", "lora", "head"], "forgetting": ["none", "replay"], "seeds": 2})
    names = [p.name for p in points]
    assert len(names) == (4 + 3) * 2 * 2 + 2 * 2
    assert "vera-r256-replay-s1" in names and not any(name.startswith("lora-r256") for name in names)
    assert left_out == {"lora at rank 256": "rank 256 is more than any adapted layer can use: for lora it is "
                                            "min(in, out) per layer, at most 120 here (fc1: 400 -> 120)"}
    # With several targets the note names them: on the convolutions alone LoRA reaches rank 16 (conv2: 150 -> 16).
    points, left_out = checked_grid({"methods": ["lora"], "ranks": [4, 64], "targets": ["linear", "conv"]})
    assert [p.name for p in points] == ["lora-r4-replay-s0", "lora-r4-conv-replay-s0", "lora-r64-replay-s0"]
    assert list(left_out) == ["lora at rank 64 on conv"] and "at most 16 here (conv2: 150 -> 16)" in left_out["lora at rank 64 on conv"]


def test_each_base_of_a_bases_axis_is_checked_on_its_own_model():
    cfg = config.load(CompareConfig, "compare", {"methods": ["vera"], "ranks": [4], "targets": ["attention"]})
    points, own = compare_module.grid(cfg), compare_module.method_configs(cfg)
    configs = {p.name: compare_module.adapt_config(cfg, own[p.method], p, "runs/vit", Path("rows") / p.name)
               for p in points}
    vit, convnet = SimpleNamespace(path=Path("runs/vit")), SimpleNamespace(path=Path("runs/convnet"))
    tiny_vit = ViT(ViTConfig(patch_size=8, dim=16, depth=2, heads=2, mlp_ratio=2))
    assert [p.name for p in compare_module.check_grid(cfg, points, configs, [(vit, tiny_vit, [])]).points] == [
        "vera-r4-attention-replay-s0"]
    # The ConvNet has no attention: its rows would fail one by one once the comparison ran.
    with pytest.raises(VeraError, match=r"^base runs/convnet: preset 'attention' .* matches no adaptable layer"):
        compare_module.check_grid(cfg, points, configs, [(vit, tiny_vit, []), (convnet, ConvNet(), [])])


def test_rows_run_seed_by_seed_and_processes_sharing_a_grid_claim_the_whole_network_rows_first():
    cfg = config.load(CompareConfig, "compare", {"methods": ["vera", "head", "full", "lora-r4@conv"], "ranks": [4],
                                                 "seeds": 2})
    points, own = compare_module.grid(cfg), compare_module.method_configs(cfg)
    configs = {p.name: compare_module.adapt_config(cfg, own[p.method], p, "runs/base", Path("rows") / p.name)
               for p in points}
    checked = compare_module.check_grid(cfg, points, configs, [(None, ConvNet(), [])])
    # Full fine-tuning and adapters on the convolutions train through the convolutions at every step.
    assert checked.whole == {"full-replay-s0", "full-replay-s1", "lora-r4-conv-replay-s0", "lora-r4-conv-replay-s1"}
    names = [p.name for p in points]
    assert checked.claim_order(names, shared=True) == [
        "full-replay-s0", "lora-r4-conv-replay-s0", "vera-r4-replay-s0", "head-replay-s0",
        "full-replay-s1", "lora-r4-conv-replay-s1", "vera-r4-replay-s1", "head-replay-s1"]
    # One process keeps the grid's order within a seed.
    assert checked.claim_order(names, shared=False) == [
        "vera-r4-replay-s0", "head-replay-s0", "full-replay-s0", "lora-r4-conv-replay-s0",
        "vera-r4-replay-s1", "head-replay-s1", "full-replay-s1", "lora-r4-conv-replay-s1"]


@pytest.mark.parametrize("entries, message", [
    ({"methods": ["vera", "lora-r256"], "ranks": [4]}, "row lora-r256-replay-s0: rank 256 is more than any adapted layer"),
    ({"methods": ["vera", "lora"], "ranks": [200, 256]}, "row lora-r200-replay-s0: rank 200 is more than any adapted"),
    # LoRA keeps a row named with its own rank, but the lora entry that sweeps the axis is left with none.
    ({"methods": ["lora-r8", "lora"], "ranks": [256]}, "row lora-r256-replay-s0: rank 256 is more than any adapted"),
    ({"methods": ["lora-r8@conv", "lora"], "ranks": [200]}, "row lora-r200-replay-s0: rank 200 is more than any adapted"),
])
def test_a_rank_a_method_names_itself_or_a_method_left_without_any_rank_is_refused(entries, message):
    with pytest.raises(config.VeraError, match="^" + re.escape(message) + ".*; choose a rank up to 120$"):
        checked_grid(entries)


def test_the_rows_features_are_let_go_before_the_chosen_rows_are_tested(vera, pretrained, monkeypatch):
    held = []
    original = compare_module.row_test
    monkeypatch.setattr(compare_module, "row_test",
                        lambda job, name, log: held.append(len(job.shared)) or original(job, name, log))
    result = vera("compare", "--methods", "head,vera", "--ranks", "2", "--epochs", "1", "--set", "validation=1",
                  "--lrs", "0.002,0.05", "--run-dir", "runs/contest")
    assert result.code == 0, result.err
    assert held and set(held) == {0}


@pytest.mark.slow
def test_compare_runs_the_grid_and_writes_table_csv_and_plot(vera, pretrained):
    result = vera("compare", *GRID, "--run-dir", "runs/cmp")
    assert result.code == 0, result.err
    run = Path("runs/cmp")
    table = json.loads((run / "table.json").read_text())
    assert [(r["method"], r["rank"]) for r in table] == [
        ("base", None), ("vera", 2), ("vera", 4), ("lora", 2), ("lora", 4), ("head", None)]
    assert all(r["seeds"] == 2 for r in table[1:])
    rows = [json.loads(line) for line in (run / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 10
    for line in table[1:]:
        expected = count_params(ConvNet(), AdapterConfig(method=line["method"], rank=line["rank"] or 1))
        assert line["trainable"] == expected.trainable
        members = [r for r in rows if (r["method"], r["rank"]) == (line["method"], line["rank"])]
        for metric in ("chosen", "task", "rest", "overall"):
            # Each row is its own adapt run's test figure; the table holds their mean.
            for row in members:
                adapt = json.loads((run / "rows" / row["name"] / "summary.json").read_text())
                assert row[metric] == adapt["test"][metric]
            assert line[metric] == pytest.approx(sum(r[metric] for r in members) / 2)
    assert table[0]["overall"] == json.loads((pretrained / "summary.json").read_text())["test"]["overall"]
    csv_lines = (run / "table.csv").read_text().splitlines()
    assert len(csv_lines) == 7 and csv_lines[0].startswith("method,rank,forgetting")
    png = (run / "accuracy-vs-parameters.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width > 1000 and height > 400
    assert not list(run.glob("rows/*/*.png"))  # the rows leave the picture to the comparison
    assert "accuracy-vs-parameters.png" in result.err
    assert "lora" in result.out and "head" in result.out
    progress = re.findall(r"; (\d+)/10 rows done at [\d,.]+ rows/hour(, about \d+s left)?$", result.err, re.MULTILINE)
    assert [int(done) for done, _ in progress] == list(range(1, 11))
    assert all(left for _, left in progress[:-1]) and not progress[-1][1]


def test_the_rows_of_a_comparison_evaluate_their_base_once(vera, pretrained, cifar_root, monkeypatch):
    from vera_cli.commands import adapt as adapt_module
    from vera_cli.data import load_cifar10

    test_images = len(load_cifar10(cifar_root, download=False).test)
    evaluations = []
    original = adapt_module.fast.predict_logits

    def counting(forward, images, *args, **kwargs):
        evaluations.append(len(images))
        return original(forward, images, *args, **kwargs)

    monkeypatch.setattr(adapt_module.fast, "predict_logits", counting)
    result = vera("compare", "--methods", "head,vera", "--ranks", "2", "--seeds", "2", "--epochs", "1", "--workers", "1",
                  "--run-dir", "runs/cmp")
    assert result.code == 0, result.err
    assert evaluations.count(test_images) == 1
    summaries = [json.loads(path.read_text()) for path in sorted(Path("runs/cmp/rows").glob("*/summary.json"))]
    assert len(summaries) == 4 and all(summary["base"] == summaries[0]["base"] for summary in summaries)
    # What the one evaluation gave is what a row alone measures.
    alone = vera("adapt", "--method", "head", "--epochs", "1", "--run-dir", "runs/alone")
    assert alone.code == 0, alone.err
    assert json.loads(Path("runs/alone/summary.json").read_text())["base"] == summaries[0]["base"]
    assert evaluations.count(test_images) == 2


@pytest.mark.slow
def test_interrupted_compare_keeps_finished_rows_and_resume_runs_only_the_rest(vera, pretrained, monkeypatch):
    calls = []
    armed = [True]
    original = compare_module.run_adapt

    def counting(cfg, *args, **kwargs):
        calls.append(Path(cfg.run_dir).name)
        if armed[0] and len(calls) == 3:
            armed[0] = False
            raise KeyboardInterrupt
        return original(cfg, *args, **kwargs)

    monkeypatch.setattr(compare_module, "run_adapt", counting)
    stopped = vera("compare", *GRID, "--run-dir", "runs/cmp")
    assert stopped.code == 130
    assert "vera compare --resume runs/cmp" in stopped.err
    finished = [json.loads(line)["name"] for line in Path("runs/cmp/rows.jsonl").read_text().splitlines()]
    assert finished == calls[:2]
    # Rows run seed by seed: the base and the two settings whose first seed finished.
    assert finished == ["vera-r2-replay-s0", "vera-r4-replay-s0"]
    assert len(json.loads(Path("runs/cmp/table.json").read_text())) == 3

    calls.clear()
    resumed = vera("compare", "--resume", "runs/cmp")
    assert resumed.code == 0, resumed.err
    assert len(calls) == 8 and not set(calls) & set(finished)
    assert re.search(r"; 3/10 rows done at [\d,.]+ rows/hour, about", resumed.err) and "; 10/10 rows done" in resumed.err
    assert len(Path("runs/cmp/rows.jsonl").read_text().splitlines()) == 10


@pytest.mark.parametrize("args, message", [
    (["--methods", "vera,dora"], "error: methods[1] must be one of vera, lora, full, head, vera-sliced, vera+head, "
                                 "lora+head, vera-sliced+head, an adapter with its own rank or targets as in lora-r8 or "
                                 "vera-r256@all-linear+head; got 'dora'"),
    (["--methods", "vera,head-r8"], "error: methods[1] (head-r8) gives a rank or targets to head, which trains whole "
                                    "modules: write head"),
    (["--methods", "lora-r8,head", "--ranks", "4"], "error: --ranks (ranks) means nothing here"),
    (["--ranks", "4,0"], "error: ranks must be positive integers"),
    (["--classes", "cat,cta"], "error: unknown class 'cta': did you mean cat?"),
])
def test_bad_compare_input_is_refused_before_anything_runs(vera, pretrained, args, message):
    result = vera("compare", *args, "--run-dir", "runs/never")
    assert result.code == 2
    assert result.err.startswith(message), result.err
    assert not Path("runs/never").exists()


def test_grid_progress_estimates_from_the_rows_run_here():
    now = [100.0]
    progress = GridProgress(total=5, done=2, clock=lambda: now[0])
    assert progress.rows_per_hour() is None
    now[0] += 30
    assert progress.row_done() == "3/5 rows done at 120 rows/hour, about 1m00s left"
    assert progress.row_done(ran_here=False) == "4/5 rows done at 120 rows/hour, about 30s left"
    now[0] += 7230
    assert progress.row_done() == "5/5 rows done at 0.99 rows/hour"
    assert progress.rows_per_hour(seconds=1800) == 4.0
    # Tests left for after the rows count in the time left, and are named once the rows are done.
    tested = GridProgress(total=3, clock=lambda: now[0])
    tested.after_rows = 45.0
    now[0] += 30
    assert tested.row_done() == "1/3 rows done at 120 rows/hour, about 1m45s left"
    now[0] += 60
    tested.row_done()
    assert tested.row_done() == "3/3 rows done at 120 rows/hour, about 45s of tests left"
    assert duration(3725) == "1h02m"
