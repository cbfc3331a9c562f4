"""No option means nothing: an empty value, an option the chosen method has no use for, or a value the data
cannot give is refused with one line (exit 2) before anything is written, never taken as something else."""

import json
from pathlib import Path

import pytest
import typer

from conftest import QUICK
from test_faults import one_line_error, run_names
from vera_cli.cli import app


def value_params():
    """(command path, parameter) for every option and argument of every command that takes a value."""
    def walk(command, path):
        for param in command.params:
            if not getattr(param, "is_flag", False):
                yield path, param
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, [*path, name])
    return list(walk(typer.main.get_command(app), []))


def empty_value_argv(path: list[str], param) -> list[str]:
    """The command with `param` given empty and every other required parameter given a plain value."""
    argv = list(path)
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    for other in command.params:
        if other.name == param.name:
            argv += [other.opts[0], ""] if other.param_type_name == "option" else [""]
        elif other.required:
            argv += [other.opts[0], "x"] if other.param_type_name == "option" else ["x"]
    return argv


CASES = value_params()


def test_the_table_covers_every_command():
    commands = {" ".join(path) for path, _ in CASES}
    assert commands >= {"pretrain", "adapt", "eval", "count-params", "experiment", "compare", "export", "config show",
                        "runs", "runs rm", "runs clean"}
    assert len(CASES) > 60


@pytest.mark.parametrize("path, param", CASES, ids=[" ".join(path + [p.opts[0]]) for path, p in CASES])
def test_an_empty_value_is_refused_naming_the_option(vera, path, param):
    result = vera(*empty_value_argv(path, param))
    one_line_error(result, f"Invalid value for '{param.opts[0]}'")
    assert run_names() == []


@pytest.mark.parametrize("args, fragment", [
    (["adapt", "--method", "head", "--rank", "4"], "--rank (adapter.rank) means nothing here: it applies with method vera "
                                                  "or lora, and this run has method head; drop it"),
    (["adapt", "--method", "full", "--target", "fc1"], "--target (adapter.targets) means nothing here"),
    (["adapt", "--method", "head", "--sharing", "sliced"], "--sharing (adapter.sharing) means nothing here"),
    (["adapt", "--method", "lora", "--sharing", "sliced"], "it applies with method vera, and this run has method lora"),
    (["adapt", "--method", "full", "--train-head"], "--train-head/--no-train-head (adapter.train_head) means nothing here"),
    (["adapt", "--method", "head", "--head-lr", "0.1"], "--head-lr (train.head_lr) means nothing here"),
    (["adapt", "--no-train-head", "--head-lr", "0.1"], "and this run has method vera with train_head false"),
    (["adapt", "--method", "lora", "--set", "adapter.d_init=0.5"], "adapter.d_init means nothing here"),
    (["adapt", "--set", "forgetting=none", "--set", "replay_fraction=2"], "replay_fraction means nothing here: it applies "
                                                                         "with forgetting replay or distill"),
    (["adapt", "--set", "distill_weight=2"], "distill_weight means nothing here: it applies with forgetting distill"),
    (["pretrain", "--set", "train.head_lr=0.1"], "train.head_lr means nothing here"),
    (["pretrain", "--set", "train.optimizer=adamw", "--set", "train.momentum=0.5"],
     "train.momentum means nothing here: it applies with train.optimizer sgd, and this run has train.optimizer adamw"),
    (["count-params", "--method", "head", "--rank", "8"], "--rank (adapter.rank) means nothing here"),
    (["compare", "--methods", "head,full", "--ranks", "4"], "--ranks (ranks) means nothing here"),
    (["compare", "--methods", "head", "--targets", "all"], "--targets (targets) means nothing here"),
    (["compare", "--methods", "vera,lora", "--head-lrs", "0.1"], "--head-lrs (head_lrs) means nothing here: it applies "
                                                                "with a +head method"),
    (["experiment", "--set", "adapt.adapter.method=head", "--set", "adapt.adapter.rank=4"], "adapt.adapter.rank means nothing"),
    (["experiment", "--set", "adapt.base=runs/base"], "adapt.base means nothing here: it applies with vera adapt, and "
                                                     "this run has an experiment, which adapts the run its base names "
                                                     "(--base), else its own pretraining; drop it"),
    (["experiment", "--set", "pretrain.run_dir=runs/p"], "pretrain.run_dir means nothing here: it applies with vera pretrain"),
    (["experiment", "--set", "adapt.run_dir=runs/a"], "adapt.run_dir means nothing here: it applies with vera adapt, and "
                                                     "this run has an experiment, which writes its steps inside its own "
                                                     "run_dir (--run-dir)"),
    (["compare", "--methods", "vera", "--set", "ranks=[]"], "ranks is empty: vera and lora need at least one"),
    (["compare", "--set", "forgetting=[]"], "forgetting is empty"),
    (["adapt", "--set", "data.dir=' '"], "data.dir is empty (' ')"),
    (["adapt", "--set", "adapter.targets=['']"], "adapter.targets[0] is empty"),
])
def test_an_option_that_means_nothing_for_the_run_is_refused(vera, pretrained, args, fragment):
    run_dir = ["--run-dir", "runs/never"] if args[0] != "count-params" else []
    one_line_error(vera(*args, *run_dir), fragment)
    assert run_names() == ["base"]


def test_head_lr_beside_a_frozen_head_is_refused_once_the_base_decides(vera, pretrained):
    # train_head null: the base (which saw every class) leaves the head frozen, so a head rate would mean nothing.
    one_line_error(vera("adapt", *QUICK, "--head-lr", "0.1", "--run-dir", "runs/never"),
                   "--head-lr (train.head_lr) is the classifier layer's rate when it trains beside the adapter, and "
                   "adapter.train_head is false here: add --train-head or drop --head-lr")
    assert run_names() == ["base"]


# The synthetic training split holds 25 images of cat, bird and dog each, 24 of horse.
@pytest.mark.parametrize("args, fragment", [
    (["adapt", "--shots", "26"], "shots 26: cat has 25 training images; ask for at most 25 shots"),
    (["adapt", "--shots", "20", "--set", "validation=10"],
     "shots 20: cat has 15 training images outside the validation split (25 in all, 10 held out); ask for at most 15 "
     "shots or a smaller validation split"),
    (["adapt", "--set", "validation=25"], "validation 25 images per class: horse has 24 training images; choose "
                                          "validation of at most 24"),
    (["adapt", "--classes", "horse", "--set", "validation=24"], "validation 24 takes every training image of horse"),
    (["compare", "--methods", "head", "--shots", "10,30"], "shots 30: cat has 25 training images"),
])
def test_more_images_than_the_data_holds_are_refused_with_the_numbers(vera, pretrained, args, fragment):
    one_line_error(vera(*args, "--epochs", "1", "--run-dir", "runs/never"), fragment)
    assert run_names() == ["base"]


def test_every_image_of_a_class_is_recorded_as_used(vera, pretrained):
    result = vera("adapt", "--method", "head", "--classes", "cat", "--shots", "25", "--epochs", "1",
                  "--set", "forgetting=none", "--run-dir", "runs/all-cats")
    assert result.code == 0, result.err
    summary = json.loads(Path("runs/all-cats/summary.json").read_text())
    selection = json.loads(Path("runs/all-cats/selection.json").read_text())
    assert summary["shots"] == 25 and summary["train_images"] == len(selection["train"]) == 25
    assert "25 images (0 replayed)" in result.err
