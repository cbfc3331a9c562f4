"""Interrupts at random moments of real processes: SIGINT and SIGKILL, then resume.

Every trial starts a `vera` process, signals it after a seeded random delay within
the length of an uninterrupted run, and checks what a user would meet: exit 130
(SIGINT) or a killed process (SIGKILL), never exit 0 after a signal arrived mid-run,
no half-made run directory, and a run that `--resume` (or a fresh start, when the
signal came before the directory existed) finishes with exactly the weights,
adapters and accuracies of the uninterrupted run. Processes come from a fork server
(tests/forkserver.py) so that a trial costs the run, not the import of torch; a few
trials use `python -m vera_cli` itself to hit the imports.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import untimed
from vera_cli import cli as cli_module, signals
from forkserver import ForkServer

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
INTERRUPTED, KILLED = 130, -signal.SIGKILL

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    started = ForkServer(ENV)
    yield started
    started.close()


def signal_at(pid: int, delay: float, signum: int) -> None:
    time.sleep(delay)
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def tensors_equal(first: Path, second: Path) -> bool:
    a, b = load_file(str(first)), load_file(str(second))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def outcome(run: Path, kind: str) -> tuple:
    """What a finished run computed, wall times left out."""
    summary = json.loads((run / "summary.json").read_text())
    if kind == "pretrain":
        return summary["test"], sorted(load_file(str(run / "model.safetensors")).items())
    if kind == "adapt":
        return summary["test"], summary["base"]
    return ([untimed(line) for line in summary["rows"]],)


def same_result(run: Path, reference: Path, kind: str) -> bool:
    weights = {"pretrain": "model.safetensors", "adapt": "adapter.safetensors"}
    if kind in weights and not tensors_equal(run / weights[kind], reference / weights[kind]):
        return False
    if kind == "compare":
        rows = sorted(p.name for p in (reference / "rows").iterdir())
        if sorted(p.name for p in (run / "rows").iterdir()) != rows or not all(
                tensors_equal(run / "rows" / r / "adapter.safetensors", reference / "rows" / r / "adapter.safetensors")
                for r in rows):
            return False
    first, second = outcome(run, kind), outcome(reference, kind)
    return str(first) == str(second)


def leftovers(folder: Path, allowed: set[str]) -> list[str]:
    """Entries of `folder` that are neither an allowed run nor a whole run directory."""
    odd = []
    for entry in folder.iterdir():
        if entry.name in allowed:
            continue
        if entry.name.startswith(".") or not (entry / "status.json").is_file():
            odd.append(entry.name)
    return odd


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, server):
    from synthetic import write_cifar

    root = tmp_path_factory.mktemp("interrupts")
    data = write_cifar(root / "data")
    common = ["--data-dir", str(data), "--device", "cpu", "--no-progress"]
    commands = {
        "pretrain": ["pretrain", *common, "--epochs", "2", "--batch-size", "64"],
        "adapt": ["adapt", *common, "--base", str(root / "base"), "--method", "lora", "--rank", "2",
                  "--epochs", "2", "--batch-size", "32", "--classes", "cat", "dog"],
        "compare": ["compare", *common, "--base", str(root / "base"), "--methods", "lora,head", "--ranks", "2",
                    "--epochs", "1", "--classes", "cat", "dog"],
    }
    assert server.run(["pretrain", *common, "--epochs", "1", "--batch-size", "64", "--run-dir", "base"],
                      root, root / "base.log") == 0
    durations = {}
    for kind, argv in commands.items():
        started = time.perf_counter()
        code = server.run([*argv, "--run-dir", f"reference-{kind}"], root, root / f"reference-{kind}.log")
        durations[kind] = time.perf_counter() - started
        assert code == 0, (root / f"reference-{kind}.log").read_text()
    return root, commands, durations


TRIALS = {"pretrain": 12, "adapt": 10, "compare": 8}


def settle(server: ForkServer, folder: Path, name: str, kind: str, argv: list[str], context: str) -> str:
    """Bring an interrupted run to its end as a user would; returns how."""
    run, log = folder / name, folder / f"{name}.after.log"
    if not run.exists():
        how, code = "restarted", server.run([*argv, "--run-dir", name], folder, log)
    elif json.loads((run / "status.json").read_text())["status"] != "finished":
        how, code = "resumed", server.run([kind, "--resume", name, "--no-progress"], folder, log)
    else:
        how, code = "finished first", 0
    assert code == 0, context + log.read_text()
    return how


@pytest.mark.parametrize("kind", list(TRIALS))
def test_random_interrupts_resume_to_identical_results(server, workspace, kind):
    root, commands, durations = workspace
    rng = random.Random(f"interrupts-{kind}")
    folder = root / f"trials-{kind}"
    folder.mkdir()
    outcomes: dict[str, int] = {}
    for trial in range(TRIALS[kind]):
        name, signum = f"t{trial}", rng.choice([signal.SIGINT, signal.SIGKILL])
        log = folder / f"{name}.log"
        delay = rng.uniform(0, durations[kind])
        pid = server.start([*commands[kind], "--run-dir", name], folder, log)
        signal_at(pid, delay, signum)
        code = server.wait()
        said = log.read_text()
        context = f"trial {trial}: {signal.Signals(signum).name} after {delay:.3f}s, exit {code}\n{said}"
        expected = INTERRUPTED if signum == signal.SIGINT else KILLED
        assert code in (expected, 0), context
        assert "Traceback" not in said, context
        if code == INTERRUPTED:
            assert "interrupted" in said, context
        assert leftovers(folder, {name, *(p.name for p in folder.glob("*.log"))}) == [] or signum == signal.SIGKILL, context
        how = settle(server, folder, name, kind, commands[kind], context)
        assert same_result(folder / name, root / f"reference-{kind}", kind), context
        outcomes[how] = outcomes.get(how, 0) + 1
    # Seen with `pytest -s`: how the trials ended (all identical to the reference, or the test failed).
    print(f"\n{kind}: {TRIALS[kind]} trials identical to the uninterrupted run: {outcomes}")


def wait_for_entry_point(pid: int) -> None:
    """Until the process catches SIGTERM, i.e. vera's entry point runs. Before it, the interpreter
    starts and processes site-packages: a signal then meets Python's own defaults, not vera."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        if int(fields["SigCgt"], 16) & (1 << (signal.SIGTERM - 1)):
            return
        time.sleep(0.002)
    raise AssertionError("vera never reached its entry point")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_during_imports_or_startup_exits_130(server, workspace, signum):
    """A real `python -m vera_cli`, signalled while it imports, reads data or creates its run."""
    root, commands, durations = workspace
    name = f"startup-{signum}"
    process = subprocess.Popen([sys.executable, "-m", "vera_cli", *commands["pretrain"], "--run-dir", name],
                               cwd=root, env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_entry_point(process.pid)
        delay = random.Random(f"startup-{signum}").uniform(0, 3.0)
        time.sleep(delay)
        process.send_signal(signum)
        said = process.communicate(timeout=60)[1]
    finally:
        process.kill()
    context = f"{signal.Signals(signum).name} after {delay:.3f}s\n{said}"
    assert process.returncode == INTERRUPTED, context
    assert "interrupted" in said and "Traceback" not in said, context
    settle(server, root, name, "pretrain", commands["pretrain"], context)
    assert same_result(root / name, root / "reference-pretrain", "pretrain"), context


def test_a_swallowed_interrupt_survives_the_cli_installing_the_handlers_again(monkeypatch, capsys):
    """The entry point installs the handlers, then the CLI installs them again: a signal in between whose
    KeyboardInterrupt library code swallowed (an import's weakref callback) must still end the run as 130."""
    previous = signals.install()
    try:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs at the next bytecode boundary
        except KeyboardInterrupt:
            pass  # swallowed, as Python does inside a callback
        assert signals.interrupted()
        again = signals.install()
        assert signals.interrupted()
        signals.restore(again)
        # The CLI then stops before the command starts: its handlers would not raise a second time.
        ran = []
        monkeypatch.setattr(cli_module.click_command(), "main", lambda **kwargs: ran.append(kwargs))
        assert cli_module.run(["count-params"]) == INTERRUPTED
        assert capsys.readouterr().err.strip() == "interrupted" and ran == []
    finally:
        signals.restore(previous)
    fresh = signals.install()  # a new installation (another run in this process) starts clean
    assert not signals.interrupted()
    signals.restore(fresh)


CALLBACK = """
import signal, sys, time, weakref
from vera_cli import signals
signals.install()
class Thing:
    pass
thing = Thing()
def callback(_):
    if sys.argv[1] == "interrupt":
        signal.raise_signal(signal.SIGINT)  # Ctrl-C, its handler run while Python is inside the callback
    else:
        raise ValueError("a real fault")
watch = weakref.ref(thing, callback)
try:
    del thing
    time.sleep(10 if sys.argv[1] == "interrupt" else 0)  # the work that the interrupt must cut short
    print("ran on", signals.interrupted())
except KeyboardInterrupt:
    print("stopped", signals.interrupted())
"""


@pytest.mark.parametrize("raised", ["interrupt", "fault"])
def test_an_interrupt_inside_a_callback_python_only_reports_stops_the_work_without_a_traceback(raised):
    # A signal landing in a weakref callback or __del__ (matplotlib's, during garbage collection): Python prints
    # what it raised as "Exception ignored in ..." with a traceback, and drops it. Our interrupt is raised again
    # once the callback is left, so the work stops as on any Ctrl-C; any other error there is still reported.
    done = subprocess.run([sys.executable, "-c", CALLBACK, raised], capture_output=True, text=True, timeout=60,
                          env=ENV)
    if raised == "interrupt":
        assert (done.stdout.strip(), done.stderr) == ("stopped True", "")
    else:
        assert done.stdout.strip() == "ran on False" and "ValueError: a real fault" in done.stderr


WHILE_REPORTING = """
import signal, sys, time, weakref
from vera_cli import signals
def slow_report(unraisable):
    time.sleep(0.5)  # the interrupt is sent again while the hook still reports this error
    print("reported", unraisable.exc_type.__name__)
sys.unraisablehook = slow_report
signals.install()
class Thing:
    pass
first, second = Thing(), Thing()
def interrupt(_):
    signal.raise_signal(signal.SIGINT)
def fault(_):
    raise ValueError("a real fault")
watches = weakref.ref(first, interrupt), weakref.ref(second, fault)
try:
    del first, second
    time.sleep(10)
    print("ran on")
except KeyboardInterrupt:
    print("stopped")
"""


def test_an_interrupt_raised_again_while_the_hook_reports_another_error_waits_until_it_is_done():
    # Raised inside the hook, the interrupt would be the hook's own failure: "Exception ignored in
    # sys.unraisablehook" and a traceback, the interrupt dropped once more.
    done = subprocess.run([sys.executable, "-c", WHILE_REPORTING], capture_output=True, text=True, timeout=60,
                          env=ENV)
    assert (done.stdout.split("\n"), done.stderr) == (["reported ValueError", "stopped", ""], "")


def test_the_unraisable_hook_is_given_back_when_the_last_installation_is_undone(monkeypatch):
    # Left in place after a run in-process (as the tests run vera), it would silence every KeyboardInterrupt that
    # the host's callbacks raise once an interrupt came: the flag stays set until the next installation.
    def own(unraisable):
        pass

    monkeypatch.setattr(sys, "unraisablehook", own)
    outer = signals.install()
    inner = signals.install()  # the CLI's, over the entry point's
    signals.restore(inner)
    assert sys.unraisablehook is not own
    signals.restore(outer)
    assert sys.unraisablehook is own


DURING_A_STORM = """
import signal, sys, threading, time, weakref
from vera_cli import signals
signals.install()
class Thing:
    pass
peak = 0
def slow(_):
    global peak
    peak = max(peak, sum(thread.name == "interrupt-again" for thread in threading.enumerate()))
    time.sleep(0.002)
things = [Thing() for _ in range(300)]
watches = [weakref.ref(thing, slow) for thing in things]
watches.append(weakref.ref(things[-1], lambda _: signal.raise_signal(signal.SIGINT)))
try:
    del things[:]
    time.sleep(10)
    print("ran on", peak)
except KeyboardInterrupt:
    print("stopped", peak)
"""


def test_an_interrupt_dropped_again_and_again_through_a_run_of_finalizers_is_sent_by_one_thread():
    # Freeing a large structure runs its finalizers one after another (a figure's artists): the interrupt sent
    # again lands in the next one and is dropped again, each time. Had each drop started a thread of its own,
    # they would pile up by the hundred and signal the process ever faster; one thread keeps sending instead
    # (a second at most for the moment one ends as the next drop comes).
    done = subprocess.run([sys.executable, "-c", DURING_A_STORM], capture_output=True, text=True, timeout=60,
                          env=ENV)
    outcome, peak = done.stdout.split()
    assert (outcome, done.stderr) == ("stopped", "") and int(peak) <= 2
