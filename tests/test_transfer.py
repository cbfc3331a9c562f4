"""Transfer protocols: held-out classes, few shots, head + adapter, tuning on validation, distillation."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vera_cli.adapters.inject import inject
from vera_cli.commands import compare as compare_module
from vera_cli.commands.compare import grid
from vera_cli.comparison import Row, aggregate, read_rows
from vera_cli.param_count import count_params
from vera_cli import config
from vera_cli.config import AdapterConfig, CompareConfig
from vera_cli.data import CLASSES, load_cifar10
from vera_cli.metrics import AccuracyReport
from vera_cli.distill import distillation_loss
from vera_cli.errors import VeraError
from vera_cli.models import ConvNet
from vera_cli.selection import select, without_classes
from vera_cli.train import Trainer

from conftest import QUICK, copy_run, train_config, train_once

HELD_OUT = ["cat", "bird", "dog"]
HELD_OUT_IDS = [CLASSES.index(name) for name in HELD_OUT]


def summary(path: str) -> dict:
    return json.loads(Path(path, "summary.json").read_text())


@pytest.fixture(scope="module")
def trained_held_out_base(tmp_path_factory, cifar_root) -> Path:
    return train_once(tmp_path_factory, cifar_root, "pretrain", *QUICK, "--exclude-classes", *HELD_OUT,
                      "--run-dir", "runs/held-out")


@pytest.fixture
def held_out_base(vera, trained_held_out_base) -> Path:
    return copy_run(trained_held_out_base, "runs/held-out")


def test_excluding_classes_removes_every_image_of_them(cifar_root):
    train = load_cifar10(cifar_root, download=False).train
    kept = without_classes(train, HELD_OUT_IDS)
    assert not set(kept.labels.tolist()) & set(HELD_OUT_IDS)
    assert len(kept) == len(train) - int(torch.isin(train.labels, torch.tensor(HELD_OUT_IDS)).sum())


def test_held_out_base_records_its_exclusion_and_never_predicts_those_classes(held_out_base, vera):
    recorded = summary(held_out_base)
    assert recorded["excluded_classes"] == HELD_OUT
    per_class = {c["class"]: c for c in recorded["test"]["per_class"]}
    assert all(per_class[name]["correct"] == 0 and per_class[name]["total"] > 0 for name in HELD_OUT)
    assert sum(per_class[name]["correct"] for name in CLASSES if name not in HELD_OUT) > 0
    shown = vera("eval", str(held_out_base))
    assert shown.code == 0 and "cat" in shown.out


def test_adapting_a_held_out_base_reports_new_and_retained_classes(held_out_base, vera):
    result = vera("adapt", "--base", str(held_out_base), "--classes", *HELD_OUT, *QUICK, "--run-dir", "runs/new")
    assert result.code == 0, result.err
    assert "cat * (new)" in result.out and "new classes (10-way)" in result.out and "retained classes" in result.out
    assert summary("runs/new")["held_out"] == HELD_OUT


def test_ten_shots_of_new_classes_with_the_shipped_configs_train_by_steps_with_the_head_and_learn_them(held_out_base, vera):
    result = vera("adapt", "--base", str(held_out_base), "--classes", *HELD_OUT, "--shots", "10", "--run-dir", "runs/k10")
    assert result.code == 0, result.err
    said = result.err.splitlines()
    # 30 shots and 15 replayed images at the few-shot batch of 16: 3 steps a pass, 50 passes for 150 steps.
    assert "(rank 32, 1,350 trainable) on cat, bird, dog (forgetting: replay): 45 images (15 replayed), 50 epochs, " \
           "150 optimizer steps (batch 16), cpu" in said[0]
    assert said[1] == ("cat, bird, dog are new to runs/held-out (held out at its pretraining): the classifier layer "
                       "trains fully beside the adapter (adapter.train_head: true); --no-train-head keeps it frozen")
    assert said[2] == ("10 shots a class: trained by steps: 45 images make 3 batch(es) of 16 a pass, so 50 passes reach "
                       "min_steps 150 (train.epochs 6 would be 18 steps)")
    recorded = summary("runs/k10")
    assert (recorded["epochs"], recorded["shots"], recorded["train_images"], recorded["head_parameters"]) == (50, 10, 45, 850)
    # Above chance among the three new classes, which the base never predicts (10-way: 0 %).
    assert recorded["base"]["chosen"] == 0 and recorded["test"]["task"] > 1 / 3 and recorded["test"]["chosen"] > 0
    config_yaml = Path("runs/k10/config.yaml").read_text()
    assert "train_head: true" in config_yaml and "min_steps: 150" in config_yaml and "batch_size: 16" in config_yaml


def test_epochs_given_with_shots_train_those_epochs_and_say_they_are_few(held_out_base, vera):
    result = vera("adapt", "--base", str(held_out_base), "--classes", *HELD_OUT, "--shots", "10", "--epochs", "2",
                  "--run-dir", "runs/k10")
    assert result.code == 0, result.err
    assert "45 images (15 replayed), 2 epochs, 2 optimizer steps (batch 256)" in result.err
    assert ("note: 10 shots a class at batch 256 make 2 optimizer steps in 2 epochs, fewer than the few-shot budget of "
            "150 (few_shot.min_steps): new classes may not be learned") in result.err


def test_new_classes_with_the_head_kept_frozen_need_an_adapter_on_it(held_out_base, vera):
    base = ["--base", str(held_out_base), "--classes", *HELD_OUT, "--no-train-head", "--epochs", "1"]
    refused = vera("adapt", *base, "--target", "fc1", "--run-dir", "runs/never")
    assert refused.code == 2 and not Path("runs/never").exists()
    assert refused.err == ("error: cat, bird, dog are new to runs/held-out (held out at its pretraining) and nothing here "
                           "trains its classifier layer fc5 (adapter.train_head is false and fc5 is not among the adapter's "
                           "targets): their logits could not be learned; train the head (drop --no-train-head; in vera "
                           "compare, a method with +head), or add fc5 to the targets\n")
    # A comparison refuses such a row before any row runs, and names it.
    grid = vera("compare", "--base", str(held_out_base), "--classes", *HELD_OUT, "--methods", "vera+head,vera",
                "--ranks", "4", "--targets", "fc1", "--epochs", "1", "--run-dir", "runs/never-grid")
    assert grid.code == 2 and not Path("runs/never-grid").exists()
    assert grid.err.startswith("error: row vera-r4") and "nothing here trains its classifier layer fc5" in grid.err
    adapted = vera("adapt", *base, "--run-dir", "runs/frozen-head")
    assert adapted.code == 0, adapted.err
    assert ("note: cat, bird, dog are new to runs/held-out and adapter.train_head is false: only the adapter on fc5 can "
            "move their logits") in adapted.err
    assert "train_head: false" in Path("runs/frozen-head/config.yaml").read_text()


def test_a_selection_is_reproducible_per_class_disjoint_from_validation_and_nested_in_more_shots(cifar_root):
    labels = load_cifar10(cifar_root, download=False).train.labels
    chosen, others = [3, 2, 5], [0, 1, 4]
    first = select(labels, chosen, others, shots=2, validation_per_class=1, replay_fraction=0.5, seed=7)
    again = select(labels, chosen, others, shots=2, validation_per_class=1, replay_fraction=0.5, seed=7)
    assert torch.equal(first.train, again.train) and first.digest() == again.digest()
    assert first.digest() != select(labels, chosen, others, 2, 1, 0.5, seed=8).digest()
    shots = labels[first.train[:len(first.train) - first.replayed]].tolist()
    assert sorted(shots) == sorted(chosen * 2)
    assert set(labels[first.train[-first.replayed:]].tolist()) <= set(others) and first.replayed == 3
    assert sorted(labels[first.validation].tolist()) == list(range(len(CLASSES)))
    assert not set(first.train.tolist()) & set(first.validation.tolist())
    more = select(labels, chosen, others, shots=4, validation_per_class=1, replay_fraction=0.0, seed=7)
    assert set(first.train[:6].tolist()) <= set(more.train.tolist())
    assert torch.equal(first.validation, more.validation)


def test_same_seed_gives_the_same_shots_and_the_same_numbers(pretrained, vera):
    runs = []
    for name in ("a", "b"):
        result = vera("adapt", "--shots", "2", *QUICK, "--seed", "3", "--set", "validation=1", "--run-dir", f"runs/{name}")
        assert result.code == 0, result.err
        runs.append(summary(f"runs/{name}"))
    first, second = runs
    assert first["shots"] == 2 and first["train_images"] == 6 + 3
    assert first["selection_sha256"] == second["selection_sha256"]
    assert json.loads(Path("runs/a/selection.json").read_text())["sha256"] == first["selection_sha256"]
    assert first["test"] == second["test"] and first["validation"] == second["validation"]
    assert first["validation"]["total"] == len(CLASSES)


def test_head_lr_reaches_the_optimizer_in_a_group_of_the_head_alone():
    model = inject(ConvNet(), AdapterConfig(method="vera", rank=4, train_head=True))
    # An adapt run's train section: a pretrain run refuses head_lr, it has no head beside an adapter.
    train = config.load(config.AdaptConfig, "adapt-vera", {"train.lr": 0.05, "train.head_lr": 0.003,
                                                           "train.schedule": "constant"}).train
    trainer = Trainer(model, model, train, steps_per_epoch=1)
    groups = trainer.optimizer.param_groups
    assert [group["lr"] for group in groups] == [0.05, 0.003]
    assert {id(p) for p in groups[1]["params"]} == {id(model.fc5.weight), id(model.fc5.bias)}
    assert all(p.requires_grad for p in model.fc5.parameters())
    assert not any(name.startswith("fc5.") and "vera" in name for name, _ in model.named_parameters())
    plain = Trainer(model, model, train_config(lr=0.05), steps_per_epoch=1)
    assert len(plain.optimizer.param_groups) == 1
    unnamed = torch.nn.Sequential(torch.nn.Linear(4, 3))  # names no head: a head_lr would go nowhere
    with pytest.raises(VeraError, match="train.head_lr is set, but Sequential names no classifier head"):
        Trainer(unnamed, unnamed, train, steps_per_epoch=1)


def test_count_params_shows_the_head_apart_from_the_adapter():
    count = count_params(ConvNet(), AdapterConfig(method="vera", rank=32, train_head=True))
    assert count.head_trainable == 84 * 10 + 10
    assert count.adapter_trainable == 4 * 32 + 120 + 3 * 84 == count.trainable - count.head_trainable
    assert count_params(ConvNet(), AdapterConfig(method="head")).adapter_trainable == 0


def test_distillation_adds_nothing_where_the_model_keeps_the_base_logits():
    torch.manual_seed(0)
    base = torch.randn(6, 10)
    labels = torch.tensor([3, 2, 5, 3, 2, 5])
    kept = [0, 1, 4, 6, 7, 8, 9]
    loss = distillation_loss(labels, base, kept, weight=1.0, temperature=2.0)
    rows = torch.arange(6)
    moved = base.clone()
    moved[:, [2, 3, 5]] += 5.0  # only the trained classes' logits change
    assert loss(moved, rows) == pytest.approx(F.cross_entropy(moved, labels).item(), abs=1e-6)
    drifted = moved.clone()
    drifted[:, kept] = torch.randn(6, 7)
    assert loss(drifted, rows) > F.cross_entropy(drifted, labels) + 0.01


def test_distillation_with_no_class_to_keep_is_plain_cross_entropy():
    # Every class trained on (or the rest held out of the base): nothing to keep close to the base.
    torch.manual_seed(0)
    logits, labels = torch.randn(4, 10), torch.tensor([0, 9, 4, 4])
    loss = distillation_loss(labels, torch.randn(4, 10), [], weight=1.0, temperature=2.0)
    assert loss(logits, torch.arange(4)) == pytest.approx(F.cross_entropy(logits, labels).item(), abs=1e-6)


def test_distill_on_every_class_trains(pretrained, vera):
    result = vera("adapt", *QUICK, "--classes", *CLASSES, "--set", "forgetting=distill", "--run-dir", "runs/all")
    assert result.code == 0, result.err
    assert summary("runs/all")["forgetting"] == "distill"


def test_distill_forgetting_runs_end_to_end(pretrained, vera):
    result = vera("adapt", *QUICK, "--set", "forgetting=distill", "--run-dir", "runs/distill")
    assert result.code == 0, result.err
    assert summary("runs/distill")["forgetting"] == "distill"


def test_compare_picks_the_learning_rate_that_wins_on_validation_not_on_test():
    rows = [Row(name=f"vera-r4-replay-lr{lr:g}-s0", method="vera", rank=4, forgetting="replay", targets="linear", seed=0,
                trainable=10, adapter_bytes=100, chosen=None, task=None, rest=None, overall=test, seconds=1.0,
                setting=f"vera-r4-replay-lr{lr:g}", lr=lr,
                validation={"overall": validation, "task": None, "chosen": None, "rest": None})
            for lr, validation, test in ((0.01, 0.6, 0.9), (0.05, 0.7, 0.5))]
    table = aggregate([], rows)
    assert [(entry.lr, entry.selected) for entry in table] == [(0.01, False), (0.05, True)]


def test_compare_axes_name_each_point_and_leave_head_lrs_to_head_methods():
    cfg = config.load(CompareConfig, "compare", {"methods": ["vera", "vera+head"], "ranks": [4], "lrs": [0.01, 0.05],
                                                 "head_lrs": [0.1, 0.2], "shots": [10, "all"], "validation": 5})
    names = [point.name for point in grid(cfg)]
    assert len(names) == len(set(names)) == 2 * 2 + 2 * 2 * 2
    assert "vera-r4-replay-lr0.01-k10-s0" in names and "vera+head-r4-replay-lr0.05-hlr0.2-kall-s0" in names


def test_compare_tunes_on_validation_end_to_end(pretrained, vera):
    result = vera("compare", "--methods", "vera+head,head", "--ranks", "2", "--lrs", "0.01,0.05", "--head-lrs", "0.02",
                  "--shots", "3", "--epochs", "1", "--set", "validation=1", "--run-dir", "runs/tuned")
    assert result.code == 0, result.err
    table = json.loads(Path("runs/tuned/table.json").read_text())
    assert [entry["selected"] for entry in table if entry["method"] == "vera+head"].count(True) == 1
    assert [entry["selected"] for entry in table if entry["method"] == "head"].count(True) == 1
    tuned = [entry for entry in table if entry["method"] != "base"]
    assert all(entry["validation"] is not None and entry["head_trainable"] == 850 for entry in tuned)
    words = " ".join(result.out.split())
    assert "val: overall accuracy on the validation split" in words and "vera+head" in words
    # Wider than 130 columns with shots, both learning rates and val: printed whole, no number cut to an ellipsis.
    assert "…" not in result.out


# The winners tested in this process, or in two worker processes (the slow tier's, with the other multi-process tests).
@pytest.mark.parametrize("workers", ["1", pytest.param("2", marks=pytest.mark.slow)])
def test_a_contest_of_learning_rates_tests_only_its_winner_and_the_winner_reads_as_if_run_alone(pretrained, vera,
                                                                                              cifar_root, workers):
    common = ["--methods", "vera", "--ranks", "2", "--seeds", "2", "--epochs", "1", "--set", "validation=1",
              "--workers", workers]
    result = vera("compare", *common, "--lrs", "0.002,0.05", "--run-dir", "runs/contest")
    assert result.code == 0, result.err
    # In grid order, as the comparison aggregates them: two workers record rows as they finish, the rates of a
    # seed side by side, and a tie on validation (likely on these few images) goes to the first.
    rows = sorted(read_rows(Path("runs/contest/rows.jsonl")), key=lambda row: ([0.002, 0.05].index(row.lr), row.seed))
    [winner] = [line.setting for line in aggregate([], rows) if line.selected]
    assert "testing the 2 row(s) of the learning rates chosen on validation" in result.err
    # The plan counts those tests: 4 rows in a contest of 2 rates, each test timed by the base's own evaluation.
    plan = json.loads(Path("runs/contest/plan.json").read_text())
    assert plan["tests"] == 2 and plan["test_seconds"] > 0
    assert plan["estimate_seconds"] == pytest.approx(4 * plan["seconds_per_row"] / plan["workers"] + 2 * plan["test_seconds"])
    assert "to test the 2 row(s) of the learning rates chosen on validation" in result.err
    for row in rows:
        recorded = summary(f"runs/contest/rows/{row.name}")["test"]
        if row.setting == winner:
            assert row.overall is not None and recorded["overall"] == row.overall
        else:  # the losing rate's rows: validation only, never the test split
            assert row.overall is None and recorded is None and row.validation["overall"] is not None
    # The same rate run alone (no contest: tested as it trains) gives the winner's figures, to float rounding
    # (its test images went through the cached-feature path there, through the loaded adapter here).
    rate = next(row.lr for row in rows if row.setting == winner)
    alone = vera("compare", *common, "--lrs", str(rate), "--run-dir", "runs/alone")
    assert alone.code == 0, alone.err
    images = len(load_cifar10(cifar_root, download=False).test)
    by_seed = {row.seed: row for row in read_rows(Path("runs/alone/rows.jsonl"))}
    for row in rows:
        if row.setting == winner:
            for metric in ("chosen", "task", "rest", "overall"):
                assert abs(getattr(row, metric) - getattr(by_seed[row.seed], metric)) <= 1 / images + 1e-9, metric
    table = json.loads(Path("runs/contest/table.json").read_text())
    assert [entry["overall"] is not None for entry in table if entry["method"] == "vera"] == [
        entry["selected"] for entry in table if entry["method"] == "vera"]
    loser = next(row.name for row in rows if row.setting != winner)
    refused = vera("report", f"runs/contest/rows/{loser}")
    assert refused.code == 2 and "was never tested" in refused.err and f"vera eval runs/contest/rows/{loser}" in refused.err


def test_a_tie_on_validation_tests_the_rows_the_table_then_shows():
    def row(lr, seed):
        return Row(f"vera-r2-replay-lr{lr}-s{seed}", "vera", 2, "replay", None, seed, 10, 100, None, None, None, None,
                   1.0, f"vera-r2-replay-lr{lr}", lr, validation={"chosen": 1.0, "task": 1.0, "rest": 1.0, "overall": 1.0})
    in_grid_order = [row(0.002, 0), row(0.002, 1), row(0.05, 0), row(0.05, 1)]
    report = AccuracyReport.from_dict({"per_class": [{"class": name, "correct": 1, "total": 2} for name in CLASSES]})
    tested = compare_module.test_chosen(in_grid_order, [], "overall", lambda message: None,
                                        lambda names: ((name, report) for name in names), lambda row: None)
    [shown] = [line for line in aggregate([], tested) if line.selected]
    assert shown.setting == "vera-r2-replay-lr0.002" and shown.mean["overall"] == 0.5


@pytest.mark.slow
def test_a_comparison_interrupted_while_testing_its_winners_tests_the_rest_on_resume(pretrained, vera, monkeypatch):
    tested = []
    original = compare_module.evaluate_later

    def interrupting(run, data):
        if not tested:
            tested.append("interrupted")
            raise KeyboardInterrupt
        tested.append(run.path.name)
        return original(run, data)

    monkeypatch.setattr(compare_module, "evaluate_later", interrupting)
    grid_args = ["--methods", "vera", "--ranks", "2", "--seeds", "2", "--epochs", "1", "--set", "validation=1",
                 "--workers", "1", "--lrs", "0.002,0.05", "--run-dir", "runs/contest"]
    assert vera("compare", *grid_args).code == 130
    assert all(row.overall is None for row in read_rows(Path("runs/contest/rows.jsonl")))
    resumed = vera("compare", "--resume", "runs/contest")
    assert resumed.code == 0, resumed.err
    rows = read_rows(Path("runs/contest/rows.jsonl"))
    assert sorted(tested[1:]) == sorted(row.name for row in rows if row.overall is not None) and len(tested) == 3


def test_several_learning_rates_without_a_validation_split_are_refused(pretrained, vera):
    result = vera("compare", "--lrs", "0.01,0.05", "--run-dir", "runs/never")
    assert result.code == 2 and "need a validation split" in result.err
    assert not Path("runs/never").exists()


@pytest.mark.slow
def test_fewshot_experiment_holds_out_adapts_ten_shots_and_trains_the_head(vera):
    result = vera("experiment", "--config", "experiment-fewshot", "--run-dir", "runs/fewshot",
                  "--set", "pretrain.train.epochs=1", "--set", "adapt.min_steps=4")
    assert result.code == 0, result.err
    pretrained, adapted = summary("runs/fewshot/pretrain"), summary("runs/fewshot/adapt")
    assert pretrained["excluded_classes"] == adapted["held_out"] == HELD_OUT
    assert adapted["shots"] == 10 and adapted["train_images"] == 30 + 90
    assert adapted["head_parameters"] == 850 and adapted["forgetting"] == "distill"
    assert summary("runs/fewshot")["counts"]["head_trainable"] == 850
    assert "retained classes" in result.out


def test_a_head_trained_beside_the_adapter_is_refused_by_the_peft_export(pretrained, vera):
    assert vera("adapt", *QUICK, "--sharing", "sliced", "--train-head", "--run-dir", "runs/headed").code == 0
    result = vera("export", "runs/headed", "--out", "exported")
    assert result.code == 2 and "adapter.train_head" in result.err and not Path("exported").exists()


def test_a_tiny_set_trains_by_steps_and_is_evaluated_at_most_five_times(pretrained, vera):
    result = vera("adapt", "--shots", "2", "--batch-size", "4", "--epochs", "1", "--set", "min_steps=60",
                  "--run-dir", "runs/steps")
    assert result.code == 0, result.err
    assert summary("runs/steps")["epochs"] == 20  # 6 shots + 3 replayed = 3 batches of 4 per epoch
    lines = [json.loads(line) for line in Path("runs/steps/metrics.jsonl").read_text().splitlines()]
    evaluated = [line["epoch"] for line in lines if line["test_accuracy"] is not None]
    assert len(lines) == 20 and evaluated == [4, 8, 12, 16, 20]
