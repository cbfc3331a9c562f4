"""Fixtures: a small CIFAR-10 in the real on-disk format, and a CLI runner."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from vera_cli import cli
from vera_cli.checkpoint import EpochRecorder
from vera_cli.data import CLASSES, FOLDER, TEST_FILE, TRAIN_FILES

# Uneven on purpose: the loader must accept any number of images per batch file.
TRAIN_SIZES = [52, 47, 61, 40, 50]
TEST_SIZE = 100


def synthetic_batch(count: int, seed: int) -> dict:
    """Images whose colour depends on the class, so that a model can learn them in an epoch or two."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % len(CLASSES)
    rng.shuffle(labels)
    palette = np.linspace(20, 235, len(CLASSES) * 3).reshape(len(CLASSES), 3)
    base = palette[labels][:, :, None].repeat(1024, axis=2)
    noise = rng.normal(0, 25, size=base.shape)
    data = np.clip(base + noise, 0, 255).astype(np.uint8).reshape(count, 3072)
    return {b"batch_label": b"synthetic", b"labels": labels.tolist(), b"data": data,
            b"filenames": [f"img{i}.png".encode() for i in range(count)]}


def write_cifar(root: Path, train_sizes=TRAIN_SIZES, test_size=TEST_SIZE) -> Path:
    folder = root / FOLDER
    folder.mkdir(parents=True)
    for index, (name, size) in enumerate(zip(TRAIN_FILES, train_sizes)):
        (folder / name).write_bytes(pickle.dumps(synthetic_batch(size, index)))
    (folder / TEST_FILE).write_bytes(pickle.dumps(synthetic_batch(test_size, 99)))
    meta = {b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": 10000, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return root


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    return write_cifar(tmp_path_factory.mktemp("cifar"))


@pytest.fixture
def fresh_cifar(tmp_path) -> Path:
    """A private copy that a test may damage."""
    return write_cifar(tmp_path / "data")


class Cli:
    """Runs `vera` in-process from a working folder and captures what a user sees."""

    def __init__(self, capsys, workdir: Path, data_dir: Path) -> None:
        self.capsys = capsys
        self.workdir = workdir
        self.data_dir = data_dir

    def __call__(self, *args: str, data: bool = True):
        argv = list(args)
        if data and argv and argv[0] in ("pretrain", "adapt", "experiment", "compare"):
            # Given first so that a test's own options win (the last occurrence counts).
            argv[1:1] = ["--data-dir", str(self.data_dir), "--device", "cpu", "--no-progress"]
        code = cli.run(argv)
        captured = self.capsys.readouterr()
        return Result(code, captured.out, captured.err)


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def json(self):
        return json.loads(self.out)


@pytest.fixture
def vera(capsys, tmp_path, cifar_root, monkeypatch) -> Cli:
    monkeypatch.chdir(tmp_path)
    return Cli(capsys, tmp_path, cifar_root)


QUICK = ["--epochs", "2", "--batch-size", "32"]


@pytest.fixture
def pretrained(vera) -> Path:
    """A finished pretrain run in the test's working folder."""
    result = vera("pretrain", *QUICK, "--run-dir", "runs/base")
    assert result.code == 0, result.err
    return Path("runs/base")


@pytest.fixture
def interrupt_after_epoch(monkeypatch):
    """Make the next run stop as if Ctrl-C were pressed right after epoch `n` was recorded."""
    def arm(n: int) -> None:
        original = EpochRecorder.__call__

        def recorder(self, stats, report):
            original(self, stats, report)
            if stats.epoch == n:
                monkeypatch.setattr(EpochRecorder, "__call__", original)
                raise KeyboardInterrupt
        monkeypatch.setattr(EpochRecorder, "__call__", recorder)
    return arm
