"""Run directories: created without overwriting, written atomically, found again.

A run directory holds `status.json` (kind, status, created), `config.yaml`,
its weights or adapter, `metrics.jsonl` and, once finished, `summary.json`.
Every file is written to a temporary name and renamed into place, so a reader
never sees half a file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from vera_cli.errors import RunInterrupted, VeraError, describe_os_error, warn
from vera_cli.files import blocking_file, read_json, unused_name, write_bytes_atomic, write_json
from vera_cli.runlock import HOLDER_FILE, LOCK_FILE, RunLock
from vera_cli.signals import interrupted

RUNS_ROOT = Path("runs")
STATUS_FILE = "status.json"
CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.yaml"
# A run directory under construction: `.NAME.partial-PID-RANDOM`, renamed to NAME once it holds its status.
PARTIAL = ".partial-"


class FinishedInterrupted(RunInterrupted):
    """An interrupt that came after the run had finished: it keeps its results and has nothing to resume."""


@dataclass
class Run:
    path: Path

    @property
    def status(self) -> dict[str, Any]:
        status = read_json(self.path / STATUS_FILE)
        if not (isinstance(status, dict) and isinstance(status.get("kind"), str) and isinstance(status.get("status"), str)):
            raise VeraError(f"{self.path / STATUS_FILE} is damaged (it needs a kind and a status): "
                            "repeat the run or remove it")
        return status

    @property
    def kind(self) -> str:
        return self.status["kind"]

    def set_status(self, state: str, **extra: Any) -> None:
        status = self.status
        status.update(status=state, updated=time.strftime("%Y-%m-%dT%H:%M:%S"), **extra)
        write_json(self.path / STATUS_FILE, status)

    def finish(self) -> None:
        """Mark the run finished; the resume checkpoint has served its purpose and is removed."""
        self.set_status("finished")
        self.file(CHECKPOINT_FILE).unlink(missing_ok=True)
        # Nobody writes a finished run again (a resume re-checks the status once it holds the lock).
        self.file(LOCK_FILE).unlink(missing_ok=True)
        self.file(HOLDER_FILE).unlink(missing_ok=True)

    def file(self, name: str) -> Path:
        return self.path / name

    def _finished(self) -> bool:
        with contextlib.suppress(Exception):
            return self.status["status"] == "finished"
        return False

    @contextlib.contextmanager
    def recording(self, resumable: bool = True) -> Iterator[None]:
        """Mark the run interrupted or failed if the body does not finish; the caller marks success.

        An interruption names the command that continues the run; a run that cannot
        resume passes on the message of the inner run that can.
        """
        try:
            yield
        except BaseException as exc:
            # Library code may swallow the KeyboardInterrupt of a signal and fail later for it
            # (a module left half-imported): once a signal came, any failure is that interruption.
            stopped = isinstance(exc, (KeyboardInterrupt, RunInterrupted)) or (isinstance(exc, Exception) and interrupted())
            if self._finished():
                # It finished before this came (its summary written, its checkpoint removed): marked otherwise, a
                # resume would train it again from the start.
                if stopped:
                    raise FinishedInterrupted(f"interrupted: {self.path} had finished, and keeps its results") from None
                raise
            if stopped:
                self.set_status("interrupted")
                # An inner run's message says how to continue it; one that had finished has nothing to continue.
                if not resumable and isinstance(exc, RunInterrupted) and not isinstance(exc, FinishedInterrupted):
                    raise
                hint = f"continue it with: vera {self.kind} --resume {self.path}" if resumable else "start it again"
                raise RunInterrupted(f"interrupted: {self.path} keeps what it completed; {hint}") from None
            if isinstance(exc, OSError):
                # A full or read-only disk: the run keeps its last checkpoint and continues once there is room.
                with contextlib.suppress(Exception):
                    self.set_status("failed", error=describe_os_error(exc))
                raise VeraError(f"{describe_os_error(exc)}; {self.path} keeps what it completed: once the disk is "
                                f"fixed, continue it with: vera {self.kind} --resume {self.path} (or remove it)") from exc
            self.set_status("failed", error=str(exc))
            raise


def ensure_new(run_dir: str | None) -> None:
    """Refuse an explicit run directory that exists; called before any slow work starts."""
    if run_dir is None:
        return
    if Path(run_dir).exists():
        raise VeraError(f"run directory {run_dir} already exists: choose another --run-dir or remove it")
    blocking = blocking_file(Path(run_dir))
    if blocking is not None:
        raise VeraError(f"run directory {run_dir} cannot be made: {blocking} is a file; choose another --run-dir")


@contextlib.contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """A hidden temporary directory beside `target`, removed unless the body moves it into place.

    Whatever interrupts the body, `target` is left as it was: nothing half-written appears there.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(target.parent)
    staging = unused_name(target.parent, f".{target.name}{PARTIAL}{os.getpid()}-")
    try:
        staging.mkdir()
        yield staging
    except OSError as exc:
        # Name the folder the user asked for, not the temporary one that is about to go.
        raise OSError(exc.errno, exc.strerror, str(target)) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, target: Path) -> bool:
    """Rename `staging` to `target` if that name is free (or an empty folder); False if it is taken."""
    if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
        target.rmdir()
    # rename() would replace an empty directory that appeared meanwhile: only a free name is taken.
    if target.exists() or target.is_symlink():
        return False
    try:
        os.rename(staging, target)
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
            raise
        return False
    return True


def create_run(kind: str, run_dir: str | None, files: dict[str, bytes]) -> tuple[Run, RunLock]:
    """A new run directory holding its status and `files`, locked for this process.

    It is built under a hidden temporary name and renamed into place, so an interruption
    leaves either nothing or a whole run, never an empty directory. An explicit directory
    that exists is refused; a default name taken (by another process in the same second,
    say) moves on to the next suffix.
    """
    ensure_new(run_dir)
    if run_dir is not None:
        candidates: list[Path] | Iterator[Path] = [Path(run_dir)]
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        candidates = (RUNS_ROOT / (f"{kind}-{stamp}" + (f"-{n}" if n > 1 else "")) for n in range(1, 10_000))
    with staged_dir(Path(run_dir) if run_dir is not None else RUNS_ROOT / kind) as staging:
        now = time.strftime("%Y-%m-%dT%H:%M:%S")
        write_json(staging / STATUS_FILE, {"kind": kind, "status": "running", "created": now, "created_ns": time.time_ns()})
        for file_name, data in files.items():
            write_bytes_atomic(staging / file_name, data)
        lock = RunLock.acquire(staging)
        for path in candidates:
            if publish(staging, path):
                return Run(path), lock
        lock.release()
    raise VeraError(f"run directory {run_dir} already exists: choose another --run-dir or remove it")


def _remove_abandoned(parent: Path) -> None:
    """Temporary directories of processes that no longer exist (killed with SIGKILL mid-creation)."""
    if not Path("/proc/self").exists():
        return
    for staging in parent.glob(f".*{PARTIAL}*"):
        pid = staging.name.rpartition(PARTIAL)[2].partition("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(staging, ignore_errors=True)


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def open_run(path: str | Path, kinds: tuple[str, ...] | None = None) -> Run:
    """A finished run of one of `kinds`; anything else is a clear error."""
    path = Path(path)
    if not (path / STATUS_FILE).is_file():
        raise VeraError(f"{path} is not a run directory (no {STATUS_FILE}); pass a directory made by vera, e.g. under {RUNS_ROOT}/")
    run = Run(path)
    status = run.status
    if kinds is not None and status.get("kind") not in kinds:
        kind = str(status.get("kind"))
        needed = " or ".join(kinds)
        raise VeraError(f"{path} is {_article(kind)} {kind} run; this needs {_article(needed)} {needed} run")
    if status.get("status") != "finished":
        raise VeraError(f"{path} is {status.get('status')}, not finished: resume or repeat it before using it")
    return run


def open_resumable(path: str | Path, kind: str) -> Run:
    """An unfinished run of `kind` that `--resume` can continue."""
    path = Path(path)
    if not (path / STATUS_FILE).is_file():
        raise VeraError(f"{path} is not a run directory (no {STATUS_FILE}): pass the run to resume")
    run = Run(path)
    status = run.status
    if status.get("kind") != kind:
        raise VeraError(f"{path} is a {status.get('kind')} run; resume it with vera {status.get('kind')} --resume")
    if status.get("status") == "finished":
        raise VeraError(f"{path} is already finished; there is nothing to resume")
    return run


def latest_run(kinds: tuple[str, ...] | None = None, root: Path = RUNS_ROOT) -> Run:
    """The most recently created finished run under `root` (searched two levels deep).
    A damaged run is skipped with a warning rather than hiding every other run."""
    found = []
    for status_path in list(root.glob(f"*/{STATUS_FILE}")) + list(root.glob(f"*/*/{STATUS_FILE}")):
        if any(part.startswith(".") for part in status_path.relative_to(root).parts):
            continue
        run = Run(status_path.parent)
        try:
            status = run.status
            created = status.get("created_ns", 0)
            if not isinstance(created, int):
                raise VeraError(f"{status_path} is damaged (created_ns is not a number): repeat the run or remove it")
            if status["status"] == "finished" and not run.file(CONFIG_FILE).is_file():
                raise VeraError(f"{run.file(CONFIG_FILE)} is missing: repeat the run or remove it")
        except (VeraError, OSError) as exc:
            warn(f"skipping {run.path}: {exc}")
            continue
        if status["status"] == "finished" and (kinds is None or status["kind"] in kinds):
            found.append((created, str(run.path)))
    if not found:
        wanted = " or ".join(kinds) if kinds else "finished"
        raise VeraError(f"no finished {wanted} run under {root}/: run `vera pretrain` first or name a run directory")
    return Run(Path(max(found)[1]))


def environment() -> dict[str, str]:
    """Versions and machine facts recorded with every run, so a figure can be traced to its setup."""
    import platform
    from importlib.metadata import version

    import torch

    from vera_cli import __version__
    from vera_cli.fast import compute_path

    return {
        "vera_cli": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        # Read from the package metadata: importing torchvision costs about 160 MB of memory.
        "torchvision": version("torchvision"),
        "platform": platform.platform(),
        "cpu_threads": str(torch.get_num_threads()),  # torch's thread count, which the kernels use too
        # The compiled kernels (and the compiler that built them) or torch's operators (and why).
        "compute": compute_path(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
