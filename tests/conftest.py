"""Fixtures: a small CIFAR-10 in the real on-disk format, a CLI runner, and trained bases.

The bases (`pretrained`, `vit_base`) are trained once per pytest run and each test gets its own copy.
Tests marked `slow` run only when asked for: `pytest -m slow` (see pyproject.toml).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml

from vera_cli import cli, workers
from vera_cli.checkpoint import EpochRecorder
from vera_cli.config import PretrainConfig, load
from vera_cli.fast.build import library, vector_width
from vera_cli.models import ModelConfig, ViTConfig
from synthetic import write_cifar


def pytest_configure(config) -> None:
    # A runner that starts pytest in the background of a script (`cmd &`) leaves SIGINT ignored, and every
    # child inherits that; vera rightly keeps an inherited SIG_IGN, so the interrupt tests' Ctrl-C would be
    # lost. They play a user at a terminal: children start with Python's usual SIGINT.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # Torch's operators on one thread: on these tiny models and batches a second thread buys nothing and costs
    # a wait at every operator, many times the work where the cores are shared with another job. Tests that
    # exercise the kernels' threading set their thread count themselves (or take `machine_threads`).
    config.machine_threads = torch.get_num_threads()
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_core(monkeypatch) -> None:
    """`vera compare --workers auto` sees one core, as torch's operators above do: a comparison here runs its rows
    in the test's own process on any machine; tests that mean several processes say --workers N."""
    monkeypatch.setattr(workers, "cores", lambda: 1)


@pytest.fixture(params=[8, 16])
def kernel_width(request) -> int:
    """Each vector width the compiled kernels have, AVX2's 8 floats and AVX-512's 16: a machine with AVX-512 tests
    both; one without it skips 16, and one where the kernels cannot run skips both."""
    if library() is None:
        pytest.skip("no C compiler or no AVX2 here: torch's operators run instead of the kernels")
    if request.param > vector_width():
        pytest.skip("no AVX-512 here: the kernels run 8 floats a vector")
    return request.param


@pytest.fixture
def machine_threads(request) -> int:
    """Torch's own thread count for this machine, for this test (the others run on one thread)."""
    threads = request.config.machine_threads
    torch.set_num_threads(threads)
    yield threads
    torch.set_num_threads(1)


def train_config(**changes):
    """The shipped pretrain recipe's train section, with `changes`."""
    return load(PretrainConfig, "pretrain", {f"train.{key}": value for key, value in changes.items()}).train


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


# A Vision Transformer small enough for a test: 16 tokens of width 16, two blocks.
TINY_VIT = ModelConfig("vit", ViTConfig(patch_size=8, dim=16, depth=2, heads=2, mlp_ratio=2))
TINY_VIT_SETTINGS = "model.vit={patch_size: 8, dim: 16, depth: 2, heads: 2, mlp_ratio: 2}"
# The VeRA paper's targets on a ViT: query and value of every attention block (a preset).
ATTENTION = "attention"


def train_once(tmp_path_factory, data_dir: Path, *args: str, interrupt_after: int | None = None,
               runs_from: Path | None = None) -> Path:
    """Run `vera` (as the `vera` fixture does: local data, cpu, no progress) in a folder of its own;
    the folder it ran in. For runs that many tests start from: trained once, copied per test.
    With `interrupt_after`, the run stops as if Ctrl-C were pressed once that epoch was recorded;
    `runs_from`'s runs/ (a base to adapt) is copied in first."""
    folder = tmp_path_factory.mktemp("trained")
    if runs_from is not None:
        shutil.copytree(runs_from / "runs", folder / "runs")
    argv = [args[0], "--data-dir", str(data_dir), "--device", "cpu", "--no-progress", *args[1:]]
    said = io.StringIO()
    before = os.getcwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said), pytest.MonkeyPatch.context() as patch:
            if interrupt_after is not None:
                _interrupt_after(patch, interrupt_after)
            code = cli.run(argv)
    finally:
        os.chdir(before)
    assert code == (0 if interrupt_after is None else 130), said.getvalue()
    return folder


def copy_run(trained: Path, run: str) -> Path:
    """A private copy of `trained`'s run `run` at the same relative path in the test's working folder
    (the copy keeps the files, their times and the recorded paths, all relative: a test may change it freely)."""
    shutil.copytree(trained / run, run)
    return Path(run)


@pytest.fixture(scope="session")
def trained_vit_base(tmp_path_factory, cifar_root) -> Path:
    return train_once(tmp_path_factory, cifar_root, "pretrain", "--config", "pretrain-vit", "--set", TINY_VIT_SETTINGS,
                      "--epochs", "1", "--batch-size", "32", "--run-dir", "runs/vit")


@pytest.fixture
def vit_base(vera, trained_vit_base) -> Path:
    """A finished pretrain run of the tiny ViT in the test's working folder (a copy of one trained once per pytest run)."""
    return copy_run(trained_vit_base, "runs/vit")


@pytest.fixture(scope="session")
def trained_base(tmp_path_factory, cifar_root) -> Path:
    return train_once(tmp_path_factory, cifar_root, "pretrain", *QUICK, "--run-dir", "runs/base")


@pytest.fixture
def pretrained(vera, trained_base) -> Path:
    """A finished pretrain run in the test's working folder (a copy of one trained once per pytest run)."""
    return copy_run(trained_base, "runs/base")


def _interrupt_after(monkeypatch, n: int) -> None:
    original = EpochRecorder.__call__

    def recorder(self, stats, report):
        original(self, stats, report)
        if stats.epoch == n:
            monkeypatch.setattr(EpochRecorder, "__call__", original)
            raise KeyboardInterrupt
    monkeypatch.setattr(EpochRecorder, "__call__", recorder)


@pytest.fixture
def interrupt_after_epoch(monkeypatch):
    """Make the next run stop as if Ctrl-C were pressed right after epoch `n` was recorded."""
    return lambda n: _interrupt_after(monkeypatch, n)


# Keys of a comparison's table line that depend on how busy the machine was: timings, memory, and with
# them the Pareto front against training time.
TIMED = ("seconds", "train_seconds", "inference_ms", "peak_memory", "pareto")


def untimed(line: dict) -> dict:
    return {key: value for key, value in line.items() if not key.startswith(TIMED)}


def fake_run(root: Path, name: str, kind: str = "adapt", status: str = "finished", overall: float = 0.5,
             classes=("cat", "dog"), method: str = "vera", **status_extra) -> Path:
    """A run directory with the small files vera writes, and no weights: enough for the table."""
    path = root / name
    path.mkdir(parents=True)
    (path / "status.json").write_text(json.dumps({"kind": kind, "status": status, "created": f"2026-01-01T00:00:{len(name):02d}",
                                                  **status_extra}))
    adapter = {"method": method, "rank": 8, "targets": []}
    (path / "config.yaml").write_text(yaml.safe_dump({"base": "runs/base", "classes": list(classes), "adapter": adapter}))
    if status == "finished" and kind == "adapt":
        (path / "adapter.json").write_text(json.dumps({"adapter": adapter, "base_run": "runs/base", "classes": list(classes)}))
    if status == "finished":
        report = {"overall": overall, "chosen": overall + 0.1, "task": 0.9, "rest": overall - 0.1, "per_class": []}
        (path / "summary.json").write_text(json.dumps({"kind": kind, "base_run": "runs/base", "test": report,
                                                       "wall_seconds": 12.5}))
    return path


def accuracy_dict(accuracy: float, chosen=("cat", "bird", "dog")) -> dict:
    """An accuracy report (AccuracyReport.to_dict) with every class at `accuracy` (100 test images each)."""
    from vera_cli.data import CLASSES

    correct = round(100 * accuracy)
    return {"overall": correct / 100, "correct": 10 * correct, "total": 1000,
            "per_class": [{"class": name, "correct": correct, "total": 100, "accuracy": correct / 100} for name in CLASSES],
            "chosen_classes": list(chosen), "chosen": correct / 100, "task": correct / 100, "rest": correct / 100}


def fake_compare_run(root: Path, accuracy: dict, seeds: int = 3, plan: dict | None = None, **settings) -> Path:
    """A finished compare run as `vera compare` leaves it, without training: `accuracy` maps each method to its
    test accuracy per seed (a list); every row records costs that grow with its method's place in the list."""
    from vera_cli.comparison import Row, grid
    from vera_cli.config import CompareConfig, load, to_dict

    cfg = load(CompareConfig, "compare", {"methods": list(accuracy), "ranks": [8], "seeds": seeds, **settings})
    root.mkdir(parents=True)
    (root / "status.json").write_text(json.dumps({"kind": "compare", "status": "finished", "created": "2026-01-02T03:04:05"}))
    (root / "config.yaml").write_text(yaml.safe_dump({**to_dict(cfg), "base": "runs/base", "run_dir": str(root)},
                                                     sort_keys=False))
    (root / "summary.json").write_text(json.dumps({"kind": "compare", "base_run": "runs/base", "wall_seconds": 42.0}))
    lines = []
    for point in grid(cfg):
        place = list(accuracy).index(point.method) + 1
        test = accuracy_dict(accuracy[point.method][point.seed])
        row = Row(point.name, point.method, point.rank, point.forgetting, point.targets, point.seed, 100 * place,
                  1000 * place, test["chosen"], test["task"], test["rest"], test["overall"], 5.0 * place, point.setting,
                  shots=point.shots, base=point.base, train_seconds=4.0 * place, train_seconds_per_1k_images=0.5 * place,
                  inference_ms_per_image=0.01 * place, peak_memory_bytes=2**20 * 100 * place)
        lines.append(json.dumps(row.to_dict()))
        (root / "rows" / point.name).mkdir(parents=True)
        (root / "rows" / point.name / "summary.json").write_text(json.dumps({"test": test, "base": accuracy_dict(0.5)}))
    (root / "rows.jsonl").write_text("\n".join(lines) + "\n")
    if plan is not None:
        (root / "plan.json").write_text(json.dumps(plan))
    return root
