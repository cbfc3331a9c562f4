"""Bad numbers, poisoned files, damaged runs, broken disks and options that lie, met through the CLI.

Every case must end as one `error:` line and exit 2 (no traceback), with nothing
half-written.
"""

import errno
import json
import os
import pickle
import resource
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import QUICK
from synthetic import synthetic_batch, write_cifar
from vera_cli import runs as runs_module
from vera_cli.data import FOLDER


def one_line_error(result, fragment: str) -> None:
    """Exit 2 and one `error:` line, the last thing said (progress lines may come before it)."""
    assert result.code == 2, (result.code, result.err)
    last = result.err.splitlines()[-1]
    assert last.startswith("error: ") and result.err.count("error: ") == 1 and "Traceback" not in result.err, result.err
    assert fragment in last, result.err


def run_names() -> list[str]:
    return sorted(p.name for p in Path("runs").iterdir()) if Path("runs").is_dir() else []


@pytest.mark.parametrize("args, fragment", [
    (["pretrain", "--lr", "nan"], "train.lr must be a finite number, got nan"),
    (["pretrain", "--set", "train.weight_decay=.inf"], "train.weight_decay must be a finite number, got inf"),
    (["pretrain", "--set", "train.momentum=1.5"], "train.momentum must be in [0, 1), got 1.5"),
    (["pretrain", "--seed", str(2**64)], "seed must be an integer from 0 to 2**64 - 1, got 18446744073709551616"),
    (["adapt", "--set", "adapter.d_init=0"], "adapter.d_init must not be 0"),
    (["adapt", "--method", "lora", "--set", "adapter.alpha=0"], "adapter.alpha must be positive"),
    (["adapt", "--set", "replay_fraction=.nan"], "replay_fraction must be a finite number, got nan"),
    (["adapt", "--set", "adapter.projection_seed=-1"], "adapter.projection_seed must be an integer from 0"),
    (["compare", "--seeds", "100000"], "seeds must be from 1 to 1000, got 100000"),
    (["pretrain", "--set", "train.epochs="], "--set 'train.epochs=' gives no value"),
    (["pretrain", "--run-dir", os.fsdecode(b"runs/\xff\xfe")], "run_dir is not valid UTF-8 ('runs/\\udcff\\udcfe')"),
])
def test_bad_numbers_and_names_are_refused_before_a_run_exists(vera, args, fragment):
    one_line_error(vera(*args), fragment)
    assert run_names() == []


@pytest.mark.parametrize("args, fragment", [
    (["adapt", "--method", "lora", "--rank", "121"], "for lora it is min(in, out) per layer, at most 120 here (fc1: 400 -> 120)"),
    (["adapt", "--method", "vera", "--rank", "48001"], "for vera it is in x out per layer, at most 48000 here"),
    (["compare", "--methods", "head,lora", "--ranks", "500"], "row lora-r500-replay-s0: rank 500 is more than any adapted"),
])
def test_ranks_no_layer_can_use_are_refused_before_a_run_exists(vera, pretrained, args, fragment):
    one_line_error(vera(*args), fragment)
    assert run_names() == ["base"]


def test_eval_device_is_validated_like_the_other_commands(vera, pretrained):
    one_line_error(vera("eval", "runs/base", "--device", "gpu"), "--device must be one of auto, cpu, cuda, mps, got 'gpu'")


def yaml_bomb(levels: int = 9) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nclasses: *a{levels - 1}\n"


def test_yaml_alias_bombs_are_refused_fast_in_little_memory(vera, pretrained):
    Path("bomb.yaml").write_text(yaml_bomb())
    Path("deep.yaml").write_text("classes: " + "[" * 400_000 + "]" * 400_000 + "\n")
    before, started = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    one_line_error(vera("adapt", "--config", "bomb.yaml"), "expands to more than 100,000 values through its aliases")
    one_line_error(vera("adapt", "--config", "deep.yaml"), "deep.yaml nests brackets more than 100 levels deep")
    one_line_error(vera("adapt", "--set", "classes=" + yaml_bomb().replace("\n", ", ").join("{}")),
                   "--set classes expands to more than")
    # A run's own config.yaml is read with the same cap.
    Path("runs/base/config.yaml").write_text(yaml_bomb())
    one_line_error(vera("eval", "runs/base"), "runs/base/config.yaml expands to more than")
    assert time.perf_counter() - started < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB


def pickle_alias_bomb(levels: int = 40) -> list:
    """A list that pickles in a few hundred bytes and stands for 2**levels integers."""
    node: list = [0, 1]
    for _ in range(levels):
        node = [node, node]
    return node


@pytest.mark.parametrize("labels, fragment", [
    ([0.5] * 52, "'labels' must be a flat list of integers (class ids 0..9), got list holding other values"),
    (["cat"] * 52, "got list holding other values"),
    ([[1]] * 52, "got list holding other values"),
    (pickle_alias_bomb(), "got list holding other values"),
    ({"a": 1}, "got dict"),
])
def test_labels_of_the_wrong_type_are_refused(vera, fresh_cifar, labels, fragment):
    path = fresh_cifar / FOLDER / "data_batch_1"
    batch = synthetic_batch(52, 0)
    path.write_bytes(pickle.dumps({**batch, b"labels": labels}))
    started = time.perf_counter()
    one_line_error(vera("pretrain", "--data-dir", str(fresh_cifar), "--run-dir", "runs/never"), fragment)
    assert time.perf_counter() - started < 5 and not Path("runs/never").exists()


def test_class_names_alias_bomb_and_huge_arrays_are_refused(vera, fresh_cifar):
    meta = fresh_cifar / FOLDER / "batches.meta"
    meta.write_bytes(pickle.dumps({b"label_names": pickle_alias_bomb()}))
    one_line_error(vera("pretrain", "--data-dir", str(fresh_cifar)), "its label_names are not CIFAR-10's 10 class names")
    # An array header asking for 2**50 bytes: refused, nothing allocated.
    import numpy as np

    class Huge:
        def __reduce__(self):
            return (np.ndarray, ((2**50,), np.dtype("u1")))

    (fresh_cifar / FOLDER / "data_batch_3").write_bytes(pickle.dumps({b"data": Huge(), b"labels": []}))
    one_line_error(vera("pretrain", "--data-dir", str(fresh_cifar)), "data_batch_3 is truncated or corrupted (MemoryError)")
    assert run_names() == []


def test_a_class_without_training_images_and_empty_splits_are_refused(vera, pretrained, tmp_path):
    no_cats = tmp_path / "no-cats"
    write_cifar(no_cats)
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"):
        path = no_cats / FOLDER / name
        batch = pickle.loads(path.read_bytes())
        batch[b"labels"] = [4 if label == 3 else label for label in batch[b"labels"]]
        path.write_bytes(pickle.dumps(batch))
    one_line_error(vera("adapt", "--data-dir", str(no_cats), "--classes", "cat", "dog", "--run-dir", "runs/never"),
                   "the training split has no images of cat")
    empty = tmp_path / "empty"
    write_cifar(empty, test_size=0)
    one_line_error(vera("pretrain", "--data-dir", str(empty), "--run-dir", "runs/never"),
                   f"the test split in {empty / FOLDER} holds no images")
    assert run_names() == ["base"]


def corrupt(path: Path, how: str) -> None:
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    elif how == "list":
        path.write_text("[1, 2, 3]\n")
    elif how == "nan":
        tensors = load_file(str(path))
        name = sorted(tensors)[0]
        tensors[name] = torch.full_like(tensors[name], float("nan"))
        save_file(tensors, str(path))
    elif how == "shape":
        tensors = load_file(str(path))
        save_file({k: torch.zeros(3, 3) for k in tensors}, str(path))


@pytest.mark.parametrize("file, how, fragment", [
    ("status.json", "truncated", "status.json is corrupted (invalid JSON"),
    ("status.json", "list", "status.json is damaged (it needs a kind and a status)"),
    ("config.yaml", "missing", "config.yaml is missing"),
    ("config.yaml", "list", "config.yaml does not hold a config mapping"),
    ("model.safetensors", "nan", "model.safetensors holds NaN or infinite values (in "),
    ("model.safetensors", "shape", "model.safetensors does not fit model convnet"),
])
def test_damaged_base_run_files_are_one_line_errors(vera, pretrained, file, how, fragment):
    corrupt(pretrained / file, how)
    one_line_error(vera("eval", "runs/base"), fragment)


@pytest.mark.parametrize("file, how, fragment", [
    ("adapter.json", "list", "adapter.json is damaged (not a mapping)"),
    ("adapter.json", "drop-key", "adapter.json is damaged (base_fingerprint missing or of the wrong type)"),
    ("adapter.safetensors", "nan", "adapter.safetensors holds NaN or infinite values (in "),
    ("adapter.safetensors", "shape", "has shape (3, 3), the model expects"),
])
def test_damaged_adapter_files_are_refused_by_eval_and_export(vera, pretrained, file, how, fragment):
    assert vera("adapt", *QUICK, "--method", "lora", "--rank", "2", "--run-dir", "runs/a").code == 0
    path = Path("runs/a") / file
    if how == "drop-key":
        meta = json.loads(path.read_text())
        del meta["base_fingerprint"]
        path.write_text(json.dumps(meta))
    else:
        corrupt(path, how)
    one_line_error(vera("eval", "runs/a"), fragment)
    one_line_error(vera("export", "runs/a", "--out", "exported"), fragment)
    assert not Path("exported").exists()


def test_a_damaged_run_is_skipped_by_latest_run_lookups(vera, pretrained):
    shutil.copytree(pretrained, "runs/newer")
    status = json.loads(Path("runs/newer/status.json").read_text())
    Path("runs/newer/status.json").write_text(json.dumps({**status, "created_ns": "soon"}))
    os.mkdir("runs/garbage")
    Path("runs/garbage/status.json").write_bytes(b"\xff\xfe\x00")
    result = vera("eval")
    assert result.code == 0, result.err
    assert "Test accuracy, runs/base" in result.out
    assert "warning: skipping runs/garbage" in result.err and "warning: skipping runs/newer" in result.err


def test_damaged_resume_files_are_one_line_errors(vera, interrupt_after_epoch):
    interrupt_after_epoch(2)
    assert vera("pretrain", "--epochs", "3", "--batch-size", "64", "--run-dir", "runs/cut").code == 130
    metrics = Path("runs/cut/metrics.jsonl")
    # A torn last line (the process was killed while appending it) is dropped; the run resumes.
    metrics.write_text(metrics.read_text() + '{"epoch": 3, "lo')
    checkpoint = Path("runs/cut/checkpoint.pt")
    saved = checkpoint.read_bytes()
    state = torch.load(checkpoint, weights_only=True)
    first = sorted(state["model"])[0]
    state["model"][first] = torch.full_like(state["model"][first], float("inf"))
    torch.save(state, checkpoint)
    one_line_error(vera("pretrain", "--resume", "runs/cut"), f"checkpoint.pt holds NaN or infinite values (in {first})")
    checkpoint.write_bytes(saved[:500])
    one_line_error(vera("pretrain", "--resume", "runs/cut"), "checkpoint.pt is truncated or corrupted")
    checkpoint.write_bytes(saved)
    assert vera("pretrain", "--resume", "runs/cut").code == 0
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [1, 2, 3]


def test_a_full_disk_mid_run_is_one_line_and_the_run_resumes(vera, monkeypatch):
    original, calls = runs_module.write_bytes_atomic, []

    def full_at_second_checkpoint(path, data):
        calls.append(path.name)
        if path.name == "checkpoint.pt" and calls.count("checkpoint.pt") == 2 and "runs/full" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        original(path, data)

    monkeypatch.setattr(runs_module, "write_bytes_atomic", full_at_second_checkpoint)
    monkeypatch.setattr("vera_cli.checkpoint.write_bytes_atomic", full_at_second_checkpoint)
    result = vera("pretrain", "--epochs", "3", "--batch-size", "64", "--run-dir", "runs/full")
    one_line_error(result, "No space left on device: runs/full/checkpoint.pt; runs/full keeps what it completed")
    assert "continue it with: vera pretrain --resume runs/full" in result.err
    assert json.loads(Path("runs/full/status.json").read_text())["status"] == "failed"
    assert vera("pretrain", "--resume", "runs/full").code == 0
    assert vera("pretrain", "--epochs", "3", "--batch-size", "64", "--run-dir", "runs/straight").code == 0
    straight, resumed = load_file("runs/straight/model.safetensors"), load_file("runs/full/model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_full_disk_while_creating_a_run_or_exporting_leaves_nothing(vera, pretrained, monkeypatch):
    assert vera("adapt", *QUICK, "--method", "lora", "--rank", "2", "--set", "adapter.targets=[fc1]",
                "--run-dir", "runs/a").code == 0
    original = runs_module.write_bytes_atomic

    def full(path, data):
        if path.name in ("config.yaml", "adapter_config.json"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        original(path, data)

    monkeypatch.setattr(runs_module, "write_bytes_atomic", full)
    monkeypatch.setattr("vera_cli.commands.export.write_bytes_atomic", full)
    one_line_error(vera("pretrain", *QUICK, "--run-dir", "runs/new"), "No space left on device: runs/new")
    one_line_error(vera("export", "runs/a", "--out", "exported"), "No space left on device")
    assert run_names() == ["a", "base"] and not Path("exported").exists()
    assert not list(Path(".").glob(".exported*")) and not list(Path("runs").glob(".*partial*"))


@pytest.mark.parametrize("out, base_out", [("x/adapter", "x"), ("x", "x/base"), ("x/adapter", "./x/")])
def test_export_folders_one_inside_the_other_are_refused_before_anything_is_written(vera, pretrained, out, base_out):
    assert vera("adapt", *QUICK, "--method", "lora", "--rank", "2", "--run-dir", "runs/a").code == 0
    one_line_error(vera("export", "runs/a", "--out", out, "--base-out", base_out),
                   f"--out {out} and --base-out {base_out} lie one inside the other")
    assert not Path("x").exists() and not list(Path(".").glob(".x*"))


def test_one_export_folder_named_two_ways_holds_both_parts(vera, pretrained):
    assert vera("adapt", *QUICK, "--method", "lora", "--rank", "2", "--run-dir", "runs/a").code == 0
    result = vera("export", "runs/a", "--out", "x", "--base-out", str(Path("x").resolve()))
    assert result.code == 0, result.err
    assert sorted(p.name for p in Path("x").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "model.json", "model.safetensors", "preprocessing.json"]
    assert not list(Path(".").glob(".x*"))


def test_an_export_stopped_between_its_two_folders_leaves_neither(vera, pretrained, monkeypatch):
    assert vera("adapt", *QUICK, "--method", "lora", "--rank", "2", "--run-dir", "runs/a").code == 0
    renamed = []

    def interrupted_at_the_second(staging, target):
        if renamed:
            raise KeyboardInterrupt
        renamed.append(target)
        return runs_module.publish(staging, target)

    monkeypatch.setattr("vera_cli.commands.export.publish", interrupted_at_the_second)
    assert vera("export", "runs/a", "--out", "adapter", "--base-out", "base").code == 130
    assert renamed == [Path("adapter")]
    assert sorted(p.name for p in Path(".").iterdir()) == ["runs"]


def test_paths_that_are_files_are_one_line_errors(vera, pretrained):
    assert vera("adapt", *QUICK, "--method", "lora", "--rank", "2", "--run-dir", "runs/a").code == 0
    Path("a-file").write_text("x")
    one_line_error(vera("pretrain", *QUICK, "--run-dir", "a-file"), "run directory a-file already exists")
    one_line_error(vera("pretrain", *QUICK, "--run-dir", "a-file/run"), "run directory a-file/run cannot be made: a-file is a file")
    one_line_error(vera("export", "runs/a", "--out", "a-file"), "a-file is a file: --out and --base-out name folders")
    one_line_error(vera("export", "runs/a", "--out", "x", "--base-out", "a-file/base"),
                   "a-file/base cannot be made: a-file is a file; choose another folder")
    assert not Path("x").exists()
    # Refused before the evaluation runs, not by the system's 'File exists' once it has.
    one_line_error(vera("eval", "runs/a", "--plot", "a-file/plot.png"),
                   "--plot a-file/plot.png cannot be made: a-file is a file; choose another path")
    assert sorted(p.name for p in Path(".").iterdir()) == ["a-file", "runs"]


def test_moved_runs_are_found_from_another_working_directory(vera, pretrained, tmp_path):
    assert vera("adapt", *QUICK, "--method", "lora", "--rank", "2", "--run-dir", "runs/a").code == 0
    expected = vera("eval", "runs/a", "--json").json()["reports"]["runs/a"]
    shutil.move("runs", tmp_path / "moved")
    os.chdir(tmp_path / "moved")
    report = vera("eval", "a", "--json").json()["reports"]["a"]
    assert report == expected
    assert vera("export", "a", "--out", str(tmp_path / "exported")).code == 0


def test_list_options_keep_regexes_and_paths_with_commas_whole(vera, pretrained):
    counted = vera("count-params", "--method", "lora", "--rank", "2", "--target", "fc[1,2]", "--json").json()
    assert [layer["name"] for layer in counted["layers"] if layer["trainable"]] == ["fc1", "fc2"]
    assert vera("adapt", *QUICK, "--method", "lora", "--rank", "2", "--run-dir", "runs/a,b").code == 0
    result = vera("eval", "runs/base", "--adapter", "runs/a,b", "--json")
    assert result.code == 0, result.err
    assert list(result.json()["reports"]) == ["base", "runs/a,b"]


def test_a_compare_grid_with_duplicate_points_runs_each_once(vera, pretrained):
    result = vera("compare", "--methods", "head,lora,head", "--ranks", "2,2", "--targets", "fc1", "--epochs", "1",
                  "--run-dir", "runs/c")
    assert result.code == 0, result.err
    assert sorted(p.name for p in Path("runs/c/rows").iterdir()) == ["head-replay-s0", "lora-r2-fc1-replay-s0"]
    # Each row says its plan before it trains: 250 images of every class but the 3 chosen at half replay, batch 256.
    assert result.err.count(", 1 epochs, 1 optimizer steps (batch 256), cpu, run runs/c/rows/") == 2
    assert len(Path("runs/c/rows.jsonl").read_text().splitlines()) == 2


def test_other_classes_print_na_when_every_class_is_chosen(vera, pretrained):
    every = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    result = vera("adapt", *QUICK, "--method", "head", "--classes", *every, "--run-dir", "runs/all")
    assert result.code == 0, result.err
    assert "n/a" in result.out and "rest n/a" in result.err
    assert json.loads(Path("runs/all/summary.json").read_text())["test"]["rest"] is None


def test_the_usable_rank_of_a_convolution_counts_its_kernel():
    from torch import nn

    from vera_cli.adapters.inject import useful_rank

    conv = nn.Conv2d(3, 6, 5)  # a 6 x 75 matrix
    assert (useful_rank(conv, "lora"), useful_rank(conv, "vera")) == (6, 450)
