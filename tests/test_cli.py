"""End to end through the `vera` command line on the synthetic CIFAR-10."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import QUICK
from vera_cli.errors import VeraError
from vera_cli.fast.build import library


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_pretrain_writes_a_complete_run_and_eval_reproduces_it(vera, pretrained):
    assert sorted(p.name for p in pretrained.iterdir()) == [
        "config.yaml", "metrics.jsonl", "model.safetensors", "status.json", "summary.json", "training-curves.png"]
    assert json.loads((pretrained / "status.json").read_text())["status"] == "finished"
    metrics = [json.loads(line) for line in (pretrained / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    result = summary(pretrained)
    assert result["epochs"] == 2 and result["seed"] == 0 and result["device"] == "cpu"
    assert result["parameters"] == 76_286
    environment = result["environment"]
    assert {"torch", "torchvision", "python"} <= set(environment) and environment["cpu_threads"] == str(torch.get_num_threads())
    # The shipped recipe augments its batches and trains the ConvNet: both through the kernels where they run.
    assert environment["compute"].startswith(
        "compiled kernels for batch augmentation and the ConvNet's features (compiler " if library() is not None
        else "torch's operators (")
    assert [row["total"] for row in result["test"]["per_class"]] == [10] * 10
    assert result["test"]["overall"] == metrics[-1]["test_accuracy"]

    evaluated = vera("eval", str(pretrained), "--json")
    assert evaluated.code == 0, evaluated.err
    assert evaluated.json()["reports"]["base"] == result["test"]


def test_adapt_runs_its_cached_prefix_and_its_evaluations_through_the_fast_paths(vera, pretrained):
    # Nothing is augmented in adapt: the compiled pass gathers and normalises the evaluations' batches.
    result = vera("adapt", *QUICK, "--run-dir", "runs/adapted")
    assert result.code == 0, result.err
    # The shipped adapt recipe trains VeRA on the classifier: on its cached features, through the chain's kernel.
    assert summary(Path("runs/adapted"))["environment"]["compute"].startswith(
        "compiled kernels for batch augmentation and the ConvNet's features and the classifier on cached features "
        "(compiler " if library() is not None else "torch's operators (")


def test_eval_defaults_to_the_latest_run_and_prints_a_table(vera, pretrained):
    result = vera("eval")
    assert result.code == 0, result.err
    assert "airplane" in result.out and "overall" in result.out
    assert f"{summary(pretrained)['test']['overall']:.2%}" in result.out


def test_same_seed_gives_identical_weights(vera, pretrained):
    assert vera("pretrain", *QUICK, "--run-dir", "runs/again").code == 0
    first, second = load_file(pretrained / "model.safetensors"), load_file("runs/again/model.safetensors")
    assert all((first[k] == second[k]).all() for k in first)
    assert vera("pretrain", *QUICK, "--seed", "1", "--run-dir", "runs/other").code == 0
    third = load_file("runs/other/model.safetensors")
    assert any((first[k] != third[k]).any() for k in first)


def test_a_run_repeats_from_its_written_config(vera, pretrained):
    config = yaml.safe_load((pretrained / "config.yaml").read_text())
    assert config["train"]["epochs"] == 2 and config["train"]["batch_size"] == 32
    result = vera("pretrain", "--config", str(pretrained / "config.yaml"), "--run-dir", "runs/repeat")
    assert result.code == 0, result.err
    first, again = load_file(pretrained / "model.safetensors"), load_file("runs/repeat/model.safetensors")
    assert all((first[k] == again[k]).all() for k in first)


def test_an_existing_run_directory_is_never_overwritten(vera, pretrained):
    before = (pretrained / "model.safetensors").read_bytes()
    result = vera("pretrain", *QUICK, "--run-dir", str(pretrained))
    assert result.code == 2
    assert result.err.strip() == f"error: run directory {pretrained} already exists: choose another --run-dir or remove it"
    assert (pretrained / "model.safetensors").read_bytes() == before


def test_set_and_overrides_reach_the_written_config(vera):
    result = vera("pretrain", "--epochs", "1", "--lr", "0.01", "--set", "train.label_smoothing=0.1",
                  "--set", "train.crop=false", "--run-dir", "runs/set")
    assert result.code == 0, result.err
    config = yaml.safe_load(Path("runs/set/config.yaml").read_text())
    assert config["train"]["lr"] == 0.01 and config["train"]["label_smoothing"] == 0.1
    assert config["train"]["crop"] is False and config["train"]["epochs"] == 1


@pytest.mark.parametrize("args, message", [
    (["--set", "train.epoch=3"], "error: unknown config key train.epoch; did you mean train.epochs?"),
    (["--set", "train.epochs=many"], "error: train.epochs must be an integer, got 'many' (str)"),
    (["--device", "tpu"], "error: device must be one of auto, cpu, cuda, mps; got 'tpu'"),
    (["--epochs", "x"], "error: Invalid value for '--epochs'"),
])
def test_bad_options_are_one_line_errors_with_exit_code_2(vera, args, message):
    result = vera("pretrain", *args, "--run-dir", "runs/bad")
    assert result.code == 2
    assert result.err.startswith(message) and result.err.count("\n") == 1
    assert "Traceback" not in result.err
    assert not Path("runs/bad").exists()


def test_missing_data_with_download_off_is_a_clear_error(vera, tmp_path):
    result = vera("pretrain", "--data-dir", str(tmp_path / "empty"), "--set", "data.download=false",
                  "--run-dir", "runs/nodata", "--device", "cpu", data=False)
    assert result.code == 2
    assert "no CIFAR-10 found at" in result.err and "pass --data-dir" in result.err
    assert not Path("runs/nodata").exists()


def test_debug_shows_the_traceback(vera):
    Path("runs/x").mkdir(parents=True)
    with pytest.raises(VeraError, match="already exists"):
        vera("pretrain", "--debug", "--run-dir", "runs/x")


def test_config_list_and_show_give_the_shipped_configs_resolved(vera):
    listed = vera("config", "list").out.split()
    assert {"pretrain", "adapt-vera", "adapt-lora", "experiment", "seed-replica"} <= set(listed)
    shown = yaml.safe_load(vera("config", "show", "adapt-lora", "--set", "train.lr=0.02").out)
    assert shown["adapter"]["method"] == "lora" and shown["train"]["lr"] == 0.02 and shown["train"]["epochs"] == 6
    assert "extends" not in shown


def test_print_config_prints_the_effective_config_and_runs_nothing(vera):
    result = vera("adapt", "--method", "lora", "--rank", "4", "--print-config", "--run-dir", "runs/never")
    assert result.code == 0, result.err
    printed = yaml.safe_load(result.out)
    assert printed["adapter"] == {**printed["adapter"], "method": "lora", "rank": 4}
    assert printed["run_dir"] == "runs/never" and not Path("runs/never").exists()
    # What it prints is a config that the command accepts as it is.
    Path("printed.yaml").write_text(result.out)
    again = vera("adapt", "--config", "printed.yaml", "--print-config")
    assert yaml.safe_load(again.out) == printed


def test_count_params_json_reproduces_the_write_up(vera):
    result = vera("count-params", "--json")
    assert result.code == 0, result.err
    counts = result.json()
    assert counts["trainable"] == 542 and counts["frozen_projections"] == 31_552 and len(counts["pairs"]) == 4
    lora = vera("count-params", "--method", "lora", "--rank", "16", "--json").json()
    assert lora["trainable"] == 16 * (520 + 204 + 168 + 168 + 94)
    table = vera("count-params", "--sharing", "sliced")
    assert "Shared frozen projections (sliced): 1 pair(s)" in table.out


def test_adapt_trains_an_adapter_and_eval_reproduces_it(vera, pretrained):
    result = vera("adapt", "--classes", "cat", "bird", "dog", *QUICK, "--run-dir", "runs/vera")
    assert result.code == 0, result.err
    run = Path("runs/vera")
    assert sorted(p.name for p in run.iterdir()) == [
        "adapter.json", "adapter.safetensors", "config.yaml", "metrics.jsonl", "per-class-accuracy.png", "selection.json",
        "status.json", "summary.json", "training-curves.png"]
    result_summary = summary(run)
    assert result_summary["base_run"] == str(pretrained)
    assert result_summary["trainable_parameters"] == 542
    assert result_summary["adapter_bytes"] == (run / "adapter.safetensors").stat().st_size < 4096
    assert result_summary["test"]["chosen_classes"] == ["cat", "bird", "dog"]
    assert result_summary["base"]["overall"] == summary(pretrained)["test"]["overall"]
    assert "chosen classes (task)" in result.out and "other classes" in result.out

    evaluated = vera("eval", str(run), "--json").json()["reports"]
    assert evaluated["base"] == result_summary["base"]
    assert evaluated[str(run)] == result_summary["test"]
    merged = vera("eval", str(run), "--merge", "--json").json()["reports"]
    assert merged[str(run)]["per_class"] == result_summary["test"]["per_class"]


def test_several_adapters_over_one_base_side_by_side(vera, pretrained):
    assert vera("adapt", "--classes", "cat", "dog", *QUICK, "--run-dir", "runs/a").code == 0
    assert vera("adapt", "--classes", "ship,truck", "--method", "lora", "--rank", "4", *QUICK, "--run-dir", "runs/b").code == 0
    result = vera("eval", str(pretrained), "--adapter", "runs/a", "runs/b", "--json")
    assert result.code == 0, result.err
    reports = result.json()["reports"]
    assert list(reports) == ["base", "runs/a", "runs/b"]
    assert reports["runs/b"] == summary(Path("runs/b"))["test"]
    assert reports["runs/b"]["chosen_classes"] == ["ship", "truck"]


@pytest.mark.parametrize("args, message", [
    (["--classes", "cta"], "error: unknown class 'cta': did you mean cat?"),
    (["--classes", "cat", "cat"], "error: class 'cat' is named twice"),
    (["--rank", "0"], "error: adapter.rank must be a positive integer, got 0"),
    (["--method", "dora"], "error: unknown method 'dora'"),
    (["--sharing", "shared"], "error: adapter.sharing must be one of per-shape, sliced"),
    (["--base", "runs/missing"], "error: runs/missing is not a run directory"),
])
def test_bad_adapt_input_is_refused_before_anything_is_written(vera, pretrained, args, message):
    result = vera("adapt", *args, "--run-dir", "runs/never")
    assert result.code == 2
    assert result.err.startswith(message), result.err
    assert not Path("runs/never").exists()


def test_adapting_an_adapt_run_is_refused(vera, pretrained):
    assert vera("adapt", *QUICK, "--run-dir", "runs/first").code == 0
    result = vera("adapt", "--base", "runs/first", "--run-dir", "runs/second")
    assert result.code == 2 and "runs/first is an adapt run; this needs a pretrain run" in result.err


@pytest.mark.slow
def test_experiment_runs_the_whole_write_up(vera):
    result = vera("experiment", "--run-dir", "runs/exp", "--set", "pretrain.train.epochs=1", "--set", "adapt.train.epochs=1")
    assert result.code == 0, result.err
    run = Path("runs/exp")
    assert (run / "pretrain" / "model.safetensors").is_file()
    assert (run / "adapt" / "adapter.safetensors").is_file()
    exp = summary(run)
    assert exp["counts"]["trainable"] == 542
    assert exp["adapted"] == summary(run / "adapt")["test"]
    assert "before and after" in result.out
