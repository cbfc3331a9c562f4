"""TensorBoard event files: written through the trainer's step hooks and the epoch recorder, read back here."""

import json
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import QUICK
from vera_cli import config as config_module
from vera_cli.config import PretrainConfig
from vera_cli.train import lr_factor

STEPS_PER_EPOCH = 8  # 250 synthetic training images in batches of 32


def events(run: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run / "tensorboard"))
    accumulator.Reload()
    return accumulator


def scalars(accumulator: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_writes_step_and_epoch_scalars_and_the_config(vera):
    result = vera("pretrain", *QUICK, "--tensorboard", "--run-dir", "runs/tb")
    assert result.code == 0, result.err
    run = Path("runs/tb")
    logged = events(run)
    losses = scalars(logged, "train/loss")
    assert [step for step, _ in losses] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    # Each epoch's mean step loss is the loss metrics.jsonl records for it.
    for epoch, record in enumerate(metrics(run)):
        epoch_losses = [value for _, value in losses[epoch * STEPS_PER_EPOCH:(epoch + 1) * STEPS_PER_EPOCH]]
        assert sum(epoch_losses) / STEPS_PER_EPOCH == pytest.approx(record["loss"], rel=1e-5)
    train = config_module.load(PretrainConfig, "pretrain", {"train.epochs": 2, "train.batch_size": 32}).train  # as QUICK sets it
    expected_lr = [train.lr * lr_factor(step, 2 * STEPS_PER_EPOCH, train) for step in range(2 * STEPS_PER_EPOCH)]
    assert [value for _, value in scalars(logged, "train/lr")] == pytest.approx(expected_lr)

    epoch_ends = [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    accuracy = scalars(logged, "test/accuracy")
    assert [step for step, _ in accuracy] == epoch_ends
    assert [value for _, value in accuracy] == pytest.approx([m["test_accuracy"] for m in metrics(run)])
    assert [value for _, value in scalars(logged, "epoch/images_per_second")] == pytest.approx(
        [m["images_per_second"] for m in metrics(run)], rel=1e-5)
    per_class = json.loads((run / "summary.json").read_text())["test"]["per_class"]
    for row in per_class:
        assert scalars(logged, f"test_class/{row['class']}")[-1] == (epoch_ends[-1], pytest.approx(row["accuracy"]))
    config = logged.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "    logging:\n      tensorboard: true\n" in config and "batch_size: 32" in config


def test_adapt_logs_the_chosen_class_metrics_and_a_resumed_run_continues_its_curves(
        vera, pretrained, interrupt_after_epoch):
    interrupt_after_epoch(1)
    args = ("adapt", *QUICK, "--classes", "cat", "dog", "--set", "logging.tensorboard=true", "--run-dir", "runs/a")
    assert vera(*args).code == 130
    resumed = vera("adapt", "--resume", "runs/a")
    assert resumed.code == 0, resumed.err
    logged = events(Path("runs/a"))
    steps = [step for step, _ in scalars(logged, "train/loss")]
    assert steps == sorted(set(steps)) and steps[0] == 1 and len(steps) == steps[-1]
    for metric in ("chosen", "task", "rest"):
        assert [value for _, value in scalars(logged, f"test/{metric}")] == pytest.approx(
            [m[metric] for m in metrics(Path("runs/a"))])


def test_tensorboard_asked_for_but_missing_is_a_clear_error(vera, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    result = vera("pretrain", *QUICK, "--tensorboard", "--run-dir", "runs/none")
    assert result.code == 2
    assert result.err == ("error: logging.tensorboard needs the tensorboard package: pip install "
                          "'vera-cli[tensorboard]', or leave out --tensorboard\n")
    assert not Path("runs/none").exists()
