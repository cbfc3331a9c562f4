"""What a resumed run trusts (metrics.jsonl, checkpoint.pt, config.yaml, selection.json) must agree.

Each case edits an interrupted run's files as damage or a hand edit would, then resumes it: the record is
rebuilt from what is intact (with a note) or the resume is refused with one line naming the file.
"""

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import copy_run, train_once
from test_faults import one_line_error

# Three epochs of 250 images at batch 64 (4 steps each), stopped after the second.
CUT = ["pretrain", "--epochs", "3", "--batch-size", "64", "--run-dir", "runs/cut"]


@pytest.fixture(scope="module")
def trained_cut(tmp_path_factory, cifar_root) -> Path:
    return train_once(tmp_path_factory, cifar_root, *CUT, interrupt_after=2)


@pytest.fixture
def cut(vera, trained_cut) -> Path:
    return copy_run(trained_cut, "runs/cut")


def lines(run: Path) -> list:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def write_lines(run: Path, records: list) -> None:
    (run / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))


def edit_checkpoint(run: Path, **changes) -> None:
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    torch.save({**state, **changes}, run / "checkpoint.pt")


def edit_config(run: Path, section: str, key: str, value) -> None:
    config = yaml.safe_load((run / "config.yaml").read_text())
    config[section][key] = value
    (run / "config.yaml").write_text(yaml.safe_dump(config))


# (edit, the note a resume prints): each rebuilt record ends as epochs 1, 2, 3, once each.
REBUILT = {
    "epochs past the checkpoint": (lambda run, m: write_lines(run, m + [{**m[1], "epoch": 3}, {**m[1], "epoch": 4}]),
                                   "held epoch(s) 3, 4 past the checkpoint's 2: dropped, they run again"),
    "an epoch repeated word for word": (lambda run, m: write_lines(run, [m[0], m[0], m[1]]),
                                        "held epochs repeated or out of order: rewritten once each, in order"),
    "epochs out of order": (lambda run, m: write_lines(run, [m[1], m[0]]),
                            "held epochs repeated or out of order: rewritten once each, in order"),
    "a torn last line past the checkpoint": (
        lambda run, m: (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + '{"epoch": 3, "lo'), None),
}


@pytest.mark.parametrize("case", REBUILT)
def test_a_damaged_metrics_record_is_rebuilt_from_what_is_intact(vera, cut, case):
    edit, note = REBUILT[case]
    kept = lines(cut)
    edit(cut, kept)
    result = vera("pretrain", "--resume", "runs/cut")
    assert result.code == 0, result.err
    assert (note is None and "note:" not in result.err) or f"note: runs/cut/metrics.jsonl {note}" in result.err
    records = lines(cut)
    assert [r["epoch"] for r in records] == [1, 2, 3] and records[:2] == kept
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["test"]["overall"] == records[-1]["test_accuracy"]


# (edit, the one line that refuses the resume)
REFUSED = {
    "an epoch missing": (lambda run, m: write_lines(run, [m[1]]),
                         "metrics.jsonl lacks epoch(s) 1 of the 2 the checkpoint has trained; the record cannot be rebuilt"),
    "an epoch twice, with different values": (lambda run, m: write_lines(run, [m[0], {**m[0], "loss": 9.0}, m[1]]),
                                              "metrics.jsonl records epoch 1 twice, with different values"),
    "a line that is not a record": (lambda run, m: (run / "metrics.jsonl").write_text(
        json.dumps(m[0]) + "\n[1, 2]\n" + json.dumps(m[1]) + "\n"), "metrics.jsonl is corrupted (line 2 is not a record)"),
    "an epoch as a string": (lambda run, m: write_lines(run, [{**m[0], "epoch": "1"}, m[1]]),
                             "metrics.jsonl is damaged (line 1: epoch is '1')"),
    "an epoch as true": (lambda run, m: write_lines(run, [{**m[0], "epoch": True}, m[1]]),
                         "metrics.jsonl is damaged (line 1: epoch is True)"),
    "a loss as a string": (lambda run, m: write_lines(run, [m[0], {**m[1], "loss": "low"}]),
                           "metrics.jsonl is damaged (line 2: loss is 'low')"),
    "an accuracy above 1": (lambda run, m: write_lines(run, [m[0], {**m[1], "test_accuracy": 57.0}]),
                            "metrics.jsonl is damaged (line 2: test_accuracy is 57.0)"),
    "a checkpoint past train.epochs": (lambda run, m: edit_checkpoint(run, epoch=9),
                                       "checkpoint.pt is at epoch 9, past the 3 epochs the run's config trains"),
    "train.epochs edited below the checkpoint": (lambda run, m: edit_config(run, "train", "epochs", 1),
                                                 "checkpoint.pt is at epoch 2, past the 1 epochs the run's config trains"),
    "a checkpoint epoch that is not a count": (lambda run, m: edit_checkpoint(run, epoch=2.0),
                                               "checkpoint.pt is damaged (its epoch is 2.0, not a count of epochs)"),
    "train.batch_size edited": (lambda run, m: edit_config(run, "train", "batch_size", 128),
                                "checkpoint.pt has taken 8 optimizer steps by epoch 2, but the run makes 2 a pass"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_record_that_cannot_be_rebuilt_refuses_the_resume(vera, cut, case):
    edit, fragment = REFUSED[case]
    before = lines(cut)
    edit(cut, before)
    edited = (cut / "metrics.jsonl").read_bytes()
    one_line_error(vera("pretrain", "--resume", "runs/cut"), f"runs/cut/{fragment}")
    # Nothing was shortened or rewritten: the files stay as the user left them.
    assert (cut / "metrics.jsonl").read_bytes() == edited and not (cut / "summary.json").exists()


def test_metrics_without_a_checkpoint_start_over_with_a_note(vera, cut):
    (cut / "checkpoint.pt").unlink()
    result = vera("pretrain", "--resume", "runs/cut")
    assert result.code == 0, result.err
    assert "note: runs/cut/metrics.jsonl held 2 line(s) but there is no checkpoint yet: removed, the run starts over" in result.err
    assert "resuming at epoch 1" in result.err and [r["epoch"] for r in lines(cut)] == [1, 2, 3]


@pytest.fixture(scope="module")
def trained_adapt_cut(tmp_path_factory, cifar_root, trained_base) -> Path:
    return train_once(tmp_path_factory, cifar_root, "adapt", "--method", "lora", "--rank", "2", "--epochs", "2",
                      "--batch-size", "32", "--run-dir", "runs/acut", interrupt_after=1, runs_from=trained_base)


@pytest.fixture
def adapt_cut(pretrained, trained_adapt_cut) -> Path:
    return copy_run(trained_adapt_cut, "runs/acut")


def test_an_adapt_resume_refuses_other_training_images_than_it_recorded(vera, adapt_cut):
    selection = json.loads((adapt_cut / "selection.json").read_text())
    (adapt_cut / "selection.json").write_text(json.dumps({**selection, "sha256": "0" * 64}))
    one_line_error(vera("adapt", "--resume", "runs/acut"),
                   "runs/acut/selection.json records other training images than the run draws now (sha256 000000000000...")


@pytest.mark.parametrize("damage", ['{"sha256": 5}', "[1, 2]", "{not json"])
def test_an_adapt_resume_rewrites_a_damaged_selection_record(vera, adapt_cut, damage):
    recorded = json.loads((adapt_cut / "selection.json").read_text())
    (adapt_cut / "selection.json").write_text(damage)
    result = vera("adapt", "--resume", "runs/acut")
    assert result.code == 0, result.err
    assert "note: runs/acut/selection.json is missing or damaged (no sha256 of the images): written again" in result.err
    assert json.loads((adapt_cut / "selection.json").read_text()) == recorded
    assert json.loads((adapt_cut / "summary.json").read_text())["selection_sha256"] == recorded["sha256"]
