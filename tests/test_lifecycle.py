"""The run lifecycle every command shares: config kept on resume, wall time across interruptions."""

import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml

from vera_cli import config, lifecycle, signals
from vera_cli.commands.pretrain import run_pretrain
from vera_cli.data import load_cifar10
from vera_cli.errors import RunInterrupted, VeraError
from vera_cli.lifecycle import load_settings
from vera_cli.runs import Run, create_run


def _cut_run(vera, interrupt_after_epoch) -> Run:
    interrupt_after_epoch(1)
    assert vera("pretrain", "--epochs", "2", "--batch-size", "64", "--run-dir", "runs/cut").code == 130
    return Run(Path("runs/cut"))


def test_a_resumed_run_keeps_its_own_config_even_through_the_python_api(vera, interrupt_after_epoch, cifar_root):
    run = _cut_run(vera, interrupt_after_epoch)
    _, recorded = load_settings(config.PretrainConfig, "pretrain", "pretrain", None, {}, str(run.path))
    changed = dataclasses.replace(recorded, train=dataclasses.replace(recorded.train, lr=0.5))
    with pytest.raises(VeraError, match=r"these keys differ from it: train.lr"):
        run_pretrain(changed, log=lambda m: None, progress=False, data=load_cifar10(cifar_root, download=False), resume=run)
    assert run.status["status"] == "interrupted"
    with pytest.raises(VeraError, match=r"drop train.epochs"):
        load_settings(config.PretrainConfig, "pretrain", "pretrain", None, {"train.epochs": 3}, str(run.path))


def test_a_run_started_before_a_config_key_existed_resumes_with_its_default(vera, interrupt_after_epoch):
    run = _cut_run(vera, interrupt_after_epoch)
    # As written before model.tta and train.crop_padding were keys: those runs were measured on images alone
    # with a padding of 4 (config.RECORDED_BEFORE_KEYS).
    recorded = yaml.safe_load(run.file("config.yaml").read_text())
    del recorded["model"]["tta"], recorded["train"]["crop_padding"]
    run.file("config.yaml").write_text(yaml.safe_dump(recorded))
    resumed = vera("pretrain", "--resume", "runs/cut")
    assert resumed.code == 0, resumed.err
    assert json.loads(run.file("summary.json").read_text())["tta"] == "none"
    assert yaml.safe_load(run.file("config.yaml").read_text())["train"]["crop_padding"] == 4
    assert "images alone" not in resumed.err


def test_a_resumed_run_reports_the_wall_time_of_all_its_parts(vera, interrupt_after_epoch):
    run = _cut_run(vera, interrupt_after_epoch)
    first_part = run.status["wall_seconds"]
    assert first_part > 0
    resumed = vera("pretrain", "--resume", "runs/cut")
    assert resumed.code == 0, resumed.err
    summary = json.loads(Path("runs/cut/summary.json").read_text())
    metrics = [json.loads(line) for line in Path("runs/cut/metrics.jsonl").read_text().splitlines()]
    # Two epochs were trained, one in each part: the total holds both, and is what the run says it took.
    assert summary["wall_seconds"] > first_part + metrics[1]["seconds"]
    assert f"in {summary['wall_seconds']:.1f}s" in resumed.err


@pytest.mark.parametrize("after", ["interrupt", "failure"])
def test_what_comes_after_a_run_finished_leaves_it_finished(tmp_path, after):
    # An interrupt (or a fault) between the run's finish and the end of its recording: marked interrupted, its
    # checkpoint already gone, a resume of `vera compare` would train that row again from the start.
    run, lock = create_run("adapt", str(tmp_path / "row"), {"config.yaml": b"seed: 0\n"})
    raised = (RunInterrupted, "had finished, and keeps its results") if after == "interrupt" else (ValueError, "late")
    try:
        with pytest.raises(raised[0], match=raised[1]), run.recording():
            run.finish()
            raise KeyboardInterrupt if after == "interrupt" else ValueError("late")
    finally:
        lock.release()
    assert run.status["status"] == "finished" and "error" not in run.status


def test_an_interrupt_after_an_inner_run_finished_ends_the_outer_run_with_its_own_message(tmp_path):
    # `vera experiment` cannot resume and passes on its inner run's message, which says how to continue that run.
    # An inner run that had finished has nothing to continue: the experiment, cut short, has to be started again.
    outer, outer_lock = create_run("experiment", str(tmp_path / "experiment"), {"config.yaml": b"seed: 0\n"})
    try:
        with pytest.raises(RunInterrupted) as raised, outer.recording(resumable=False):
            inner, inner_lock = create_run("pretrain", str(outer.file("pretrain")), {"config.yaml": b"seed: 0\n"})
            try:
                with inner.recording():
                    inner.finish()
                    raise KeyboardInterrupt
            finally:
                inner_lock.release()
    finally:
        outer_lock.release()
    assert str(raised.value) == f"interrupted: {outer.path} keeps what it completed; start it again"
    assert (outer.status["status"], inner.status["status"]) == ("interrupted", "finished")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupt_as_the_run_directory_is_published_marks_the_run_interrupted(tmp_path, monkeypatch, signum):
    """The signal lands just after the directory appears, before its recording starts: without holding it back
    the run would stay marked running, with no process behind it."""
    def create_then_signal(*args, **kwargs):
        created = create_run(*args, **kwargs)
        os.kill(os.getpid(), signum)
        time.sleep(0.5)  # the handler runs at the next bytecode boundary: within this sleep
        return created

    monkeypatch.setattr(lifecycle, "create_run", create_then_signal)
    cfg = config.load(config.PretrainConfig, "pretrain", {"run_dir": str(tmp_path / "run")})
    previous = signals.install()
    try:
        try:
            with pytest.raises(RunInterrupted, match="keeps what it completed"):
                with lifecycle.RunLifecycle("pretrain", cfg).open():
                    raise AssertionError("the body runs after the interrupt was raised")
        except KeyboardInterrupt:
            pytest.fail("the interrupt came out before the run's recording started, which leaves it marked running")
        assert Run(tmp_path / "run").status["status"] == "interrupted"
        assert signals.interrupted()
        signals.release()  # nothing held back any more: raises nothing
    finally:
        signals.restore(previous)


def test_a_run_opened_in_another_thread_leaves_the_interrupt_to_the_main_thread(tmp_path, monkeypatch):
    """Signals are handled in the main thread only: a hold taken by another thread's run would take the main
    thread's interrupt away from it and raise it in that other thread instead."""
    published, answered = threading.Event(), threading.Event()

    def create_then_wait(*args, **kwargs):
        created = create_run(*args, **kwargs)
        published.set()
        answered.wait(5)
        return created

    monkeypatch.setattr(lifecycle, "create_run", create_then_wait)
    cfg = config.load(config.PretrainConfig, "pretrain", {"run_dir": str(tmp_path / "run")})
    outcome: dict[str, object] = {}

    def other() -> None:
        try:
            with lifecycle.RunLifecycle("pretrain", cfg).open():
                outcome["other"] = "ran"
        except BaseException as exc:  # noqa: BLE001 - what the other thread met is the finding
            outcome["other"] = exc

    previous = signals.install()
    thread = threading.Thread(target=other)
    try:
        thread.start()
        assert published.wait(5)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):
                time.sleep(0.01)
            outcome["main"] = "not interrupted"
        except KeyboardInterrupt:
            outcome["main"] = "interrupted"
        answered.set()
        thread.join(5)
    finally:
        answered.set()
        signals.restore(previous)
    assert outcome == {"main": "interrupted", "other": "ran"}
