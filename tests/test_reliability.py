"""Interruption, resume, divergence and damaged files, met through the CLI as a user meets them."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import QUICK


def status(run: str) -> str:
    return json.loads((Path(run) / "status.json").read_text())["status"]


def same_tensors(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_interrupted_pretrain_resumes_to_identical_weights(vera, interrupt_after_epoch):
    args = ["--epochs", "3", "--batch-size", "32"]
    assert vera("pretrain", *args, "--run-dir", "runs/straight").code == 0
    interrupt_after_epoch(1)
    stopped = vera("pretrain", *args, "--run-dir", "runs/cut")
    assert stopped.code == 130
    assert "interrupted: runs/cut keeps what it completed; continue it with: vera pretrain --resume runs/cut" in stopped.err
    assert status("runs/cut") == "interrupted"
    assert Path("runs/cut/checkpoint.pt").is_file() and not Path("runs/cut/summary.json").exists()
    refused = vera("eval", "runs/cut")
    assert refused.code == 2 and "runs/cut is interrupted, not finished" in refused.err

    resumed = vera("pretrain", "--resume", "runs/cut")
    assert resumed.code == 0, resumed.err
    assert "on 250 images, 3 epochs, 24 optimizer steps (batch 32), cpu, run runs/cut, resuming at epoch 2" in resumed.err
    assert status("runs/cut") == "finished" and not Path("runs/cut/checkpoint.pt").exists()
    assert same_tensors(load_file("runs/straight/model.safetensors"), load_file("runs/cut/model.safetensors"))
    epochs = [json.loads(line)["epoch"] for line in Path("runs/cut/metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


def test_interrupted_adapt_resumes_to_identical_adapter(vera, pretrained, interrupt_after_epoch):
    args = ["--method", "lora", "--rank", "4", "--epochs", "3", "--batch-size", "16"]
    assert vera("adapt", *args, "--run-dir", "runs/straight").code == 0
    interrupt_after_epoch(2)
    assert vera("adapt", *args, "--run-dir", "runs/cut").code == 130
    resumed = vera("adapt", "--resume", "runs/cut")
    assert resumed.code == 0, resumed.err
    assert same_tensors(load_file("runs/straight/adapter.safetensors"), load_file("runs/cut/adapter.safetensors"))


def test_resume_refuses_finished_runs_and_new_settings(vera, pretrained):
    finished = vera("pretrain", "--resume", str(pretrained))
    assert finished.code == 2 and "already finished; there is nothing to resume" in finished.err
    changed = vera("pretrain", "--resume", str(pretrained), "--epochs", "5")
    assert changed.code == 2 and "drop train.epochs" in changed.err
    wrong_kind = vera("adapt", "--resume", str(pretrained))
    assert wrong_kind.code == 2 and "resume it with vera pretrain --resume" in wrong_kind.err


@pytest.mark.slow
def test_sigterm_stops_a_run_cleanly(cifar_root, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "vera_cli", "pretrain", "--epochs", "500", "--batch-size", "32", "--device", "cpu",
         "--data-dir", str(cifar_root), "--run-dir", "runs/term", "--no-progress"],
        cwd=tmp_path, stderr=subprocess.PIPE, text=True, env=env)
    for line in process.stderr:
        if line.startswith("epoch 1:"):
            process.send_signal(signal.SIGTERM)
            break
    rest = process.stderr.read()
    assert process.wait(timeout=60) == 130
    assert "continue it with: vera pretrain --resume runs/term" in rest
    assert "Traceback" not in rest
    assert status(tmp_path / "runs/term") == "interrupted"
    assert (tmp_path / "runs/term/checkpoint.pt").is_file()


def test_a_diverging_run_stops_with_a_clear_message(vera):
    result = vera("pretrain", "--epochs", "2", "--lr", "1e30", "--set", "train.schedule=constant", "--run-dir", "runs/nan")
    assert result.code == 2
    assert re.search(r"error: the loss became non-finite at epoch 2, step \d+: the learning rate \(1e\+30\) is "
                     r"probably too high; lower it with --lr", result.err)
    assert status("runs/nan") == "failed"
    # The last good epoch stays on disk.
    assert torch.load("runs/nan/checkpoint.pt", weights_only=True)["epoch"] == 1
    assert not Path("runs/nan/summary.json").exists()


def test_damaged_weights_and_adapter_files_are_reported(vera, pretrained):
    assert vera("adapt", *QUICK, "--run-dir", "runs/a").code == 0
    weights = pretrained / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = vera("eval", str(pretrained))
    assert result.code == 2 and "model.safetensors is truncated or corrupted" in result.err
    adapter = Path("runs/a/adapter.safetensors")
    adapter.write_bytes(b"\x00" * 16)
    result = vera("eval", "runs/a")
    assert result.code == 2 and ("truncated or corrupted" in result.err)


def test_unfinished_runs_are_not_used_as_a_base(vera, pretrained):
    status_file = pretrained / "status.json"
    state = json.loads(status_file.read_text())
    status_file.write_text(json.dumps({**state, "status": "running"}))
    result = vera("adapt", "--run-dir", "runs/x")
    assert result.code == 2 and "no finished pretrain run" in result.err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused(vera):
    result = vera("pretrain", "--device", "cuda", "--run-dir", "runs/x")
    assert result.code == 2 and "CUDA is not available here: use --device cpu or auto" in result.err
    assert not Path("runs/x").exists()


def test_an_interrupted_experiment_names_the_inner_run_to_resume(vera, interrupt_after_epoch):
    interrupt_after_epoch(1)
    result = vera("experiment", "--run-dir", "runs/exp", "--set", "pretrain.train.epochs=2")
    assert result.code == 130
    assert "continue it with: vera pretrain --resume runs/exp/pretrain" in result.err
    assert status("runs/exp") == "interrupted" and status("runs/exp/pretrain") == "interrupted"


def _write(path: str, text: str) -> str:
    Path(path).write_text(text)
    return path


@pytest.mark.parametrize("args, message", [
    (["--config", "bad.yaml"], r"error: config file bad.yaml is not valid YAML at line 4: expected ',' or '\]', "
                              r"but got '<stream end>' \(while parsing a flow sequence that starts at line 3\)"),
    (["--config", "missing.yaml"], r"error: config file missing.yaml does not exist: pass an existing file with --config, or a shipped config"),
    (["--set", "classes=[]"], r"error: classes is empty: name at least one class"),
    (["--rank", "two"], r"error: Invalid value for '--rank'"),
    (["--set", "adapter.rank=2.5"], r"error: adapter.rank must be an integer, got 2.5 \(float\)"),
    (["--set", "adapter.sharing=diagonal"], r"error: adapter.sharing must be one of per-shape, sliced; got 'diagonal'"),
])
def test_bad_adapt_configs_are_one_line_errors(vera, pretrained, args, message):
    _write("bad.yaml", "train:\n  epochs: 2\n  lr: [0.1\n")
    result = vera("adapt", *args, "--run-dir", "runs/never")
    assert result.code == 2
    assert re.match(message, result.err), result.err
    assert result.err.count("\n") == 1 and "Traceback" not in result.err
    assert not Path("runs/never").exists()


def test_damaged_data_is_reported_through_the_cli(vera, fresh_cifar):
    path = fresh_cifar / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(path.read_bytes()[:3000])
    result = vera("pretrain", "--data-dir", str(fresh_cifar), "--run-dir", "runs/never")
    assert result.code == 2 and "data_batch_2 is truncated or corrupted" in result.err
    assert not Path("runs/never").exists()


def test_offline_download_is_explained_through_the_cli(vera, tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    result = vera("pretrain", "--data-dir", str(tmp_path / "fresh"), "--run-dir", "runs/never")
    assert result.code == 2
    assert "could not download CIFAR-10" in result.err and "if this machine is offline" in result.err
    assert not Path("runs/never").exists()


def test_an_adapter_on_another_base_is_refused_through_the_cli(vera, pretrained):
    assert vera("adapt", *QUICK, "--run-dir", "runs/a").code == 0
    assert vera("pretrain", *QUICK, "--seed", "7", "--run-dir", "runs/other-base").code == 0
    result = vera("eval", "runs/other-base", "--adapter", "runs/a")
    assert result.code == 2
    assert "the adapter in runs/a was trained on another base model (its base run was runs/base)" in result.err
