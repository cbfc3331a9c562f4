"""What must hold off Linux: the package imports where fcntl does not exist (Windows), the run lock
falls back sanely, and --device picks among cuda, mps and cpu as the machine allows."""

import errno
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import filelock
import pytest
import torch
from torch import nn

from vera_cli import runlock
from vera_cli.errors import VeraError
from vera_cli.runlock import GRACE, HOLDER_FILE, LOCK_FILE, RunLock, process_start
from vera_cli.train import Trainer, resolve_device

from conftest import train_config

ROOT = Path(__file__).resolve().parent.parent


def test_without_fcntl_every_module_imports_and_commands_that_write_no_run_work(tmp_path):
    # `import fcntl` raises ImportError as on Windows; a fresh interpreter so no module is imported yet.
    code = textwrap.dedent("""
        import importlib, json, pkgutil, sys
        sys.modules["fcntl"] = None
        import vera_cli
        for module in pkgutil.walk_packages(vera_cli.__path__, "vera_cli."):
            if not module.name.endswith("__main__"):  # that one runs the CLI
                importlib.import_module(module.name)
        from pathlib import Path
        from vera_cli import cli
        from vera_cli.runlock import RunLock
        assert cli.run(["config", "list"]) == 0
        assert cli.run(["count-params", "--json"]) == 0
        # A run can still be written, unlocked, rather than not at all.
        Path("run").mkdir()
        RunLock.acquire(Path("run")).release()
        print(json.dumps(sorted(p.name for p in Path("run").iterdir())))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=240)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "pretrain" in lines and json.loads(lines[-1]) == []
    assert '"trainable"' in done.stdout
    assert done.stderr == ""  # no warning about filelock's soft lock either


def test_the_lock_file_stays_and_the_holder_is_named_beside_it(tmp_path):
    lock = RunLock.acquire(tmp_path)
    holder = json.loads((tmp_path / HOLDER_FILE).read_text())
    assert holder == {"pid": os.getpid(), "start": process_start(os.getpid())}
    lock.release()
    lock.release()  # a second release does nothing
    assert (tmp_path / LOCK_FILE).exists()
    RunLock.acquire(tmp_path).release()


def test_a_second_writer_in_the_same_process_is_refused_too(tmp_path):
    lock = RunLock.acquire(tmp_path)
    try:
        with pytest.raises(VeraError, match=rf"being written by another vera process \(pid {os.getpid()}\)"):
            RunLock.acquire(tmp_path)
    finally:
        lock.release()


def test_a_lock_held_for_an_instant_is_waited_for(tmp_path):
    # Another rank of one torchrun launch checking the run at the same moment, or `vera runs` looking.
    instant = RunLock.acquire(tmp_path)
    threading.Timer(0.1, instant.release).start()
    started = time.monotonic()
    RunLock.acquire(tmp_path).release()
    assert 0.05 < time.monotonic() - started < GRACE


def test_a_file_system_without_flock_is_written_unlocked(tmp_path, monkeypatch):
    fcntl = pytest.importorskip("fcntl")  # this file runs where fcntl is missing too
    real = fcntl.flock

    def no_flock(fd, operation):
        if operation & fcntl.LOCK_EX:
            raise OSError(errno.ENOSYS, "Function not implemented")
        return real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", no_flock)
    first = RunLock.acquire(tmp_path)
    second = RunLock.acquire(tmp_path)  # nothing to refuse with
    first.release()
    second.release()
    # No soft lock's marker: one would outlive a killed process and block its resume.
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]


def test_a_soft_lock_is_never_kept(tmp_path, monkeypatch):
    # What an older filelock does on a file system without flock: it turns itself into its soft lock.
    monkeypatch.setattr(runlock, "_os_lock", lambda module, path: filelock.SoftFileLock(path))
    lock = RunLock.acquire(tmp_path)
    assert lock._lock is None
    assert list(tmp_path.iterdir()) == []
    RunLock.acquire(tmp_path).release()


@pytest.mark.parametrize("cuda, mps, asked, chosen", [
    (True, True, "auto", "cuda"),
    (False, True, "auto", "mps"),
    (False, False, "auto", "cpu"),
    (True, True, "cpu", "cpu"),
    (True, False, "cuda", "cuda"),
    (False, True, "mps", "mps"),
    (True, True, "mps", "mps"),
])
def test_devices_are_chosen_by_what_the_machine_has(monkeypatch, cuda, mps, asked, chosen):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert resolve_device(asked) == torch.device(chosen)


@pytest.mark.parametrize("asked, message", [
    ("cuda", "--device cuda was asked for but CUDA is not available here: use --device cpu or auto"),
    ("mps", "--device mps was asked for but MPS (Apple silicon) is not available here: use --device cpu or auto"),
    ("tpu", "--device must be one of auto, cpu, cuda, mps, got 'tpu'"),
])
def test_a_device_the_machine_lacks_is_refused_in_one_line(monkeypatch, asked, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(VeraError) as refused:
        resolve_device(asked)
    assert str(refused.value) == message


def test_bf16_is_refused_on_mps(monkeypatch):
    model = nn.Linear(2, 2)
    # A parameter that says it lives on mps: this machine has none to put it on.
    monkeypatch.setattr(nn.Linear, "parameters", lambda self: iter([SimpleNamespace(requires_grad=True,
                                                                                      device=torch.device("mps"))]))
    with pytest.raises(VeraError, match="train.precision bf16 runs on cuda or cpu, not on mps"):
        Trainer(model, model, train_config(precision="bf16"), steps_per_epoch=1)


def test_fp32_training_makes_no_autocast(monkeypatch):
    # torch before 2.5 refuses torch.autocast("mps") even disabled; fp32 steps must never make one.
    def no_autocast(*args, **kwargs):
        raise RuntimeError("User specified an unsupported autocast device_type 'mps'")

    monkeypatch.setattr(torch, "autocast", no_autocast)
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    trainer = Trainer(model, model, train_config(epochs=1, batch_size=2), steps_per_epoch=2)
    batches = [(torch.randn(2, 4), torch.tensor([0, 1])), (torch.randn(2, 4), torch.tensor([2, 0]))]
    stats = trainer.epoch(1, iter(batches), 4, progress=False)
    assert stats.images == 4
