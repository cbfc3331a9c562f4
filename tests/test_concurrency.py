"""Two processes never write one run; run directories named in the same second never collide."""

import json
import os
import signal
import time
from pathlib import Path

import pytest

from vera_cli import files as files_module
from vera_cli import runs as runs_module
from vera_cli.runlock import RunLock


def forked(body) -> int:
    """Run `body` in a child process; returns its pid. The child never returns into pytest."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            body()
            code = 0
        finally:
            os._exit(code)
    return pid


def test_a_run_another_process_writes_refuses_resume_and_removal_until_that_process_dies_then_shows_crashed(
        vera, interrupt_after_epoch):
    interrupt_after_epoch(1)
    assert vera("pretrain", "--epochs", "2", "--batch-size", "64", "--run-dir", "runs/cut").code == 130
    read, write = os.pipe()

    def resume_and_hang():
        lock = RunLock.acquire(Path("runs/cut"))
        runs_module.Run(Path("runs/cut")).set_status("running")
        os.write(write, b"locked")
        time.sleep(60)
        lock.release()

    def listed() -> str:
        (row,) = vera("runs", "--json").json()
        return row["status"]

    holder = forked(resume_and_hang)
    try:
        assert os.read(read, 6) == b"locked"
        refused = vera("pretrain", "--resume", "runs/cut")
        assert refused.code == 2
        assert f"runs/cut is being written by another vera process (pid {holder})" in refused.err
        assert listed() == "running"
        refused = vera("runs", "rm", "runs/cut", "--yes")
        assert refused.code == 2 and "refusing to remove running run(s): runs/cut" in refused.err
    finally:
        # A crash leaves the lock file behind and the status running; the kernel drops the lock itself.
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
    assert json.loads(Path("runs/cut/.lock.holder").read_text())["pid"] == holder
    assert json.loads(Path("runs/cut/status.json").read_text())["status"] == "running"
    assert listed() == "crashed"
    resumed = vera("pretrain", "--resume", "runs/cut")
    assert resumed.code == 0, resumed.err
    assert listed() == "finished"
    assert not Path("runs/cut/.lock").exists() and not Path("runs/cut/.lock.holder").exists()


def test_runs_created_in_the_same_second_by_several_processes_get_distinct_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Every process sees the same second, so every one of them starts from the same name.
    monkeypatch.setattr(runs_module.time, "strftime", lambda fmt, *args: "20260101-000000")
    start = time.time() + 0.5

    def create():
        time.sleep(max(0.0, start - time.time()))
        run, lock = runs_module.create_run("pretrain", None, {"config.yaml": b"seed: 0\n"})
        lock.release()
        Path(f"made-{os.getpid()}").write_text(str(run.path))

    children = [forked(create) for _ in range(8)]
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
    assert codes == [0] * 8
    made = sorted(Path(f"made-{pid}").read_text() for pid in children)
    assert len(set(made)) == 8
    assert sorted(p.name for p in Path("runs").iterdir()) == ["pretrain-20260101-000000"] + [
        f"pretrain-20260101-000000-{n}" for n in range(2, 9)]
    for path in made:
        assert json.loads((Path(path) / "status.json").read_text())["status"] == "running"
        assert (Path(path) / "config.yaml").read_text() == "seed: 0\n"


def test_a_lock_interrupted_while_releasing_never_closes_its_descriptor_twice(tmp_path, monkeypatch):
    lock = RunLock.acquire(tmp_path)
    closed = []
    real_close = os.close

    def close_then_interrupt(fd):
        real_close(fd)
        closed.append(fd)
        raise KeyboardInterrupt  # Ctrl-C right after the close

    monkeypatch.setattr(os, "close", close_then_interrupt)
    try:
        lock.release()
    except KeyboardInterrupt:
        pass
    monkeypatch.setattr(os, "close", closed.append)
    lock.release()
    lock.__del__()  # what the interpreter calls at exit
    assert len(closed) == 1


def test_ctrl_c_right_after_a_temporary_folder_or_file_is_made_leaves_nothing(tmp_path, monkeypatch):
    # The moment tempfile.mkdtemp and mkstemp leave open: the folder or file exists, the code that would
    # remove it has not started. A random-interrupt trial once left `.t1.partial-...` there.
    make_dir = os.mkdir

    def mkdir_then_ctrl_c(path, *args, **kwargs):
        make_dir(path, *args, **kwargs)
        if runs_module.PARTIAL in str(path):
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "mkdir", mkdir_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        with runs_module.staged_dir(tmp_path / "run"):
            pass
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    def open_then_ctrl_c(path, mode):
        open(path, mode).close()
        raise KeyboardInterrupt

    monkeypatch.setattr(files_module, "open", open_then_ctrl_c, raising=False)
    with pytest.raises(KeyboardInterrupt):
        files_module.write_bytes_atomic(tmp_path / "config.yaml", b"seed: 0\n")
    assert list(tmp_path.iterdir()) == []
