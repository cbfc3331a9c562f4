"""Local worker processes that share a grid's rows on one machine (`vera compare --workers`).

The parent starts N processes (spawn: a fresh interpreter each, so no lock or thread of the parent's
is inherited half-held), each with its share of this process's CPU threads. Each claims rows the way torchrun's
ranks do (vera_cli.distributed.claimed: the first process to create a row's claim file runs it) and
sends back each row it finishes; the parent writes the run. What a worker runs is the task the
command gives, the same function one process calls, so a row computes the same numbers in a worker
as in one process with the same thread count.

Signals: the workers start with SIGINT blocked, so a Ctrl-C at the terminal (which reaches the
whole process group) is the parent's alone. The parent stops its workers with SIGTERM, which
vera_cli.signals turns into the interrupt every run already handles (the row's run is marked
interrupted and resumes later), waits for them, and kills any that does not end in time. A worker
whose parent dies (SIGKILL) stops itself the same way. A worker's error ends the whole grid: bad
input as the parent's one-line error (exit 2), anything else as `WorkerFailed` naming the row.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import traceback
from multiprocessing import connection, parent_process, resource_tracker
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.multiprocessing

from vera_cli import signals
from vera_cli.allocator import keep_freed_memory
from vera_cli.adapters.errors import AdapterError
from vera_cli.distributed import claimed, cores, fresh_claims
from vera_cli.errors import RunInterrupted, VeraError, WorkerFailed, describe_os_error
from vera_cli.models import ModelConfig, vit_parameters

# A ViT up to this size counts as small: the CPU ViT of pretrain-vit has 0.55 M parameters, pretrain-vit-gpu's 14.2 M.
# Small rows give a process's threads little to share: on the ConvNet, two single-thread processes ran a grid 1.22x
# faster than one process on both cores (docs/distributed.md). A larger model keeps its process's threads busy
# itself, and more processes would mostly multiply its memory.
SMALL_MODEL_PARAMETERS = 2_000_000
# A stopped worker marks its row interrupted within a moment; one stuck in a long operator is killed after this.
STOP_SECONDS = 10.0
# What the CLI reports as bad input (exit 2): a worker's error of these kinds is the parent's one-line error.
_USER_ERRORS = (VeraError, AdapterError, OSError)

Task = Callable[[Any, str, Callable[[str], None]], Any]


def small_model(model: ModelConfig) -> bool:
    """The ConvNet (fixed and small), or a ViT of at most SMALL_MODEL_PARAMETERS."""
    return model.name != "vit" or vit_parameters(model.vit) <= SMALL_MODEL_PARAMETERS


def worker_count(setting: int | str, device: torch.device, world_size: int, rows: int, models: list[ModelConfig]) -> int:
    """How many local processes run `rows` rows: at most one per row, and 1 means the rows run in this process.

    `auto` takes one per core when the rows are small CPU work (device cpu, not under torchrun, every base a
    small model), else 1. A number larger than 1 runs on the CPU only, and not under torchrun, whose
    processes already share the rows.
    """
    if setting == "auto":
        wanted = cores() if device.type == "cpu" and world_size == 1 and all(map(small_model, models)) else 1
    else:
        wanted = int(setting)
        if wanted > 1 and device.type != "cpu":
            raise VeraError(f"workers {wanted} runs rows in local CPU processes, and this comparison runs on {device}: "
                            "set workers to 1 or auto, or use --device cpu")
        if wanted > 1 and world_size > 1:
            raise VeraError(f"workers {wanted} starts local processes, but under torchrun each of the {world_size} "
                            "processes already takes whole rows: set workers to 1 or auto")
    return max(1, min(wanted, rows))


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """SIGINT blocked in this thread for the body (a child started meanwhile inherits that), pending, not lost;
    where signals cannot be blocked, nothing changes."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    # multiprocessing's resource tracker, started with the first spawned process, unblocks SIGINT once it is up:
    # started now, it cannot undo the block below.
    resource_tracker.ensure_running()
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


class Pool:
    """`count` processes that run `task(job, name, log)` for the `names` each claims in `claims`.

    Iterating gives (name, result) as rows finish, in any order; `log` hears the workers' lines. Leaving
    the `with` block (finished, failed or interrupted) ends every worker before it returns.
    """

    def __init__(self, count: int, task: Task, job: Any, names: list[str], claims: Path, log: Callable[[str], None]) -> None:
        self.count, self.task, self.job, self.names, self.claims, self.log = count, task, job, names, claims, log
        # This process's thread count (torch's, which OMP_NUM_THREADS sets) shared out: a row then computes in a
        # worker with the threads it would have had here whenever the rows left are few enough to run here.
        self.threads = max(1, torch.get_num_threads() // count)
        self.processes: list[Any] = []
        self.running: dict[connection.Connection, Any] = {}  # a worker's pipe -> its process, until it says done
        self.rows: dict[connection.Connection, str] = {}  # the row each worker runs now

    def __enter__(self) -> "Pool":
        try:
            self._start()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def _start(self) -> None:
        fresh_claims(self.claims)
        # torch's spawn context hands the job's tensors (the data) over in shared memory instead of copying them.
        context = torch.multiprocessing.get_context("spawn")
        # The workers inherit SIGINT blocked: a Ctrl-C at the terminal is this process's alone, which stops them.
        with _sigint_blocked():
            for index in range(self.count):
                reader, writer = context.Pipe(duplex=False)
                process = context.Process(target=_serve, name=f"vera-worker-{index + 1}", daemon=True,
                                          args=(writer, self.task, self.job, self.names, self.claims, self.threads))
                process.start()
                self.processes.append(process)
                # Only the worker holds the writing end: its end of the pipe closing is how a worker's death shows.
                writer.close()
                self.running[reader] = process

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        while self.running:
            for reader in connection.wait(list(self.running)):
                try:
                    message = reader.recv()
                except EOFError:
                    raise self._lost(reader) from None
                kind, *rest = message
                if kind == "log":
                    self.log(rest[0])
                elif kind == "start":
                    self.rows[reader] = rest[0]
                elif kind == "result":
                    self.rows.pop(reader, None)
                    yield rest[0], rest[1]
                elif kind == "done":
                    del self.running[reader]
                    reader.close()
                elif kind == "interrupted":
                    # Someone stopped a worker itself (a SIGTERM to its pid): the grid stops as on Ctrl-C.
                    raise KeyboardInterrupt
                else:
                    user, text, details = rest
                    if user:
                        raise VeraError(text)
                    row = self.rows.get(reader)
                    where = f"row {row} failed in a worker process" if row else "a worker process failed before its first row"
                    raise WorkerFailed(f"{where}: {text}") from _Remote(details)

    def _lost(self, reader: connection.Connection) -> WorkerFailed:
        """A worker that ended without saying why (killed, out of memory, a crash in native code)."""
        process = self.running.pop(reader)
        reader.close()
        process.join(STOP_SECONDS)
        code = process.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        row = self.rows.get(reader)
        return WorkerFailed(f"worker process {process.pid} ended ({how})" + (f" while running row {row}" if row else "")
                            + "; finished rows are kept, continue with --resume")

    def _stop(self) -> None:
        try:
            self._end_workers()
        except KeyboardInterrupt:
            # The one interrupt vera_cli.signals raises came half-way: end the rest (no second one comes), then pass it on.
            self._end_workers()
            raise

    def _end_workers(self) -> None:
        for process in self.processes:
            if process.exitcode is None:
                process.terminate()
        deadline = time.monotonic() + STOP_SECONDS
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                process.kill()
                process.join()
        for reader in self.running:
            reader.close()
        self.running.clear()


class _Remote(Exception):
    """A worker's traceback, shown under the parent's with --debug."""


def _serve(writer: connection.Connection, task: Task, job: Any, names: list[str], claims: Path, threads: int) -> None:
    """A worker's life: claim rows and run them until none is left, then say how it ended."""
    message: tuple = ("interrupted",)
    try:
        keep_freed_memory()  # a spawned interpreter starts with the allocator as glibc sets it, as the CLI's did
        signals.install()
        if hasattr(signal, "pthread_sigmask"):
            # Inherited from the parent already where spawning keeps the mask; the parent's to hear in any case.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        torch.set_num_threads(threads)
        _stop_with_parent()
        for name in claimed(names, claims):
            writer.send(("start", name))
            writer.send(("result", name, task(job, name, lambda line: writer.send(("log", line)))))
        message = ("done",)
    except (KeyboardInterrupt, RunInterrupted):
        pass
    except BaseException as exc:  # noqa: BLE001 - every failure goes to the parent, which decides
        if isinstance(exc, OSError):
            text = describe_os_error(exc)
        else:
            text = str(exc) if isinstance(exc, _USER_ERRORS) else f"{type(exc).__name__}: {exc}"
        message = ("failed", isinstance(exc, _USER_ERRORS), text, traceback.format_exc())
    finally:
        # A signal from here on (the parent stopping everyone) must not turn the end into a traceback.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError):  # a parent that is gone hears nothing
        writer.send(message)
    writer.close()


def _stop_with_parent() -> None:
    """Interrupt this worker when its parent dies, as the parent would have: no worker outlives a killed parent."""
    parent = parent_process()
    if parent is None:
        return
    if connection.wait([parent.sentinel], timeout=0):
        # It died while this worker started: a resume may be claiming rows already, so this one claims none.
        raise KeyboardInterrupt

    def watch() -> None:
        connection.wait([parent.sentinel])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
