"""One writer per run directory: an advisory lock that dies with its process.

The operating system's lock (flock on Linux and macOS, msvcrt on Windows, through `filelock`)
is released by the kernel when the holding process ends however it ends (SIGKILL, a crash),
so a stale lock can never block a resume, and a free lock on a run marked running tells that its
writer died (`owner_alive`, for `vera runs`). The holder's pid and start time go in a file of
their own beside it, only to say who holds it: filelock 3 empties the lock file whenever a
process opens it, and on Windows the locked region cannot be read by the process it refuses.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from vera_cli.errors import VeraError

if TYPE_CHECKING:
    from filelock import BaseFileLock

LOCK_FILE = ".lock"
HOLDER_FILE = ".lock.holder"
GRACE = 0.5  # seconds a lock taken for an instant is waited for before the run counts as busy


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


class RunLock:
    def __init__(self, lock: BaseFileLock | None) -> None:
        self._lock = lock

    @classmethod
    def acquire(cls, folder: Path) -> "RunLock":
        """Hold `folder`'s lock or refuse with who holds it. A run directory that cannot be locked
        (a file system without flock) is written unlocked rather than not at all.

        A lock held for an instant only (another process's `check`, `vera runs` telling whether a writer is
        alive, the other ranks of one torchrun launch checking together) is waited for, up to GRACE seconds:
        a writer holds it for its whole run."""
        waited_until = time.monotonic() + GRACE
        while True:
            try:
                lock = _take(folder / LOCK_FILE)
                break
            except _filelock().Timeout:
                if time.monotonic() < waited_until:
                    time.sleep(0.02)
                    continue
                holder = _read_holder(folder)
                raise VeraError(f"{folder} is being written by another vera process (pid {holder.get('pid', '?')}): "
                                "wait for it to end or stop it, then try again") from None
        if lock is None:
            return cls(None)
        try:
            _write_holder(folder)
        except BaseException:
            lock.release()
            raise
        return cls(lock)

    @classmethod
    def check(cls, folder: Path) -> None:
        """Refuse early (before slow work) when another process holds `folder`."""
        cls.acquire(folder).release()

    def release(self) -> None:
        # On Unix the file stays: unlinking it would let a waiting process lock an inode nobody else
        # sees. The lock is forgotten before it is released: a Ctrl-C inside the release would
        # otherwise leave __del__ releasing it again.
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    def __del__(self) -> None:
        self.release()


def owner_alive(folder: Path) -> bool | None:
    """Whether the process that writes `folder` is alive: False once it is gone (killed, crashed), None where
    neither its lock nor the holder file can tell (a file system without locks and no holder recorded).

    The lock is taken for an instant to find it free: a process starting to write the run in that instant waits
    for it (RunLock.acquire's grace).
    """
    if (folder / LOCK_FILE).is_file():
        try:
            lock = _take(folder / LOCK_FILE)
        except _filelock().Timeout:
            return True
        except OSError:  # a run this user cannot write: the holder file may still tell
            lock = None
        if lock is not None:
            lock.release()
            return False
    holder = _read_holder(folder)
    return process_alive(holder.get("pid"), holder.get("start"))


def process_alive(pid: object, start: object = None) -> bool | None:
    """Whether process `pid` still runs, and is the one that started at `start` (where that is known) rather
    than a later one given the same pid; None where it cannot be told."""
    if not isinstance(pid, int) or pid <= 0 or sys.platform == "win32":  # os.kill would end it there
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    now = process_start(pid)
    return start is None or now is None or now == start


def _take(path: Path) -> BaseFileLock | None:
    """`path`'s operating-system lock, taken without waiting; None where this file system or system has none.
    Raises filelock.Timeout while another process holds it, an OSError when the file cannot be opened."""
    filelock = _filelock()
    if sys.platform != "win32" and not filelock.has_fcntl:
        return None
    lock = _os_lock(filelock, path)
    try:
        lock.acquire(blocking=False)
    except filelock.Timeout:  # an OSError too, so caught first
        raise
    except OSError as exc:
        if exc.filename is not None:
            raise  # the lock file could not be opened: nor could the run's own files
        return None  # it opened but would not lock
    except NotImplementedError:  # what filelock 3 raises for a file system without flock
        return None
    if not isinstance(lock, (filelock.UnixFileLock, filelock.WindowsFileLock)):
        # A filelock without the fallback_to_soft option turned itself into its soft lock.
        lock.release()
        return None
    return lock


def _filelock() -> ModuleType:
    """Imported on first use: commands that never write a run do not pay for it at start-up."""
    with warnings.catch_warnings():
        # Without fcntl it warns that its default lock is the soft one, which is not used here.
        warnings.simplefilter("ignore")
        import filelock
    return filelock


def _os_lock(filelock: ModuleType, path: Path) -> BaseFileLock:
    """The operating system's lock, never filelock's soft one: a file that says "locked" outlives a
    killed process and would block its resume."""
    kind = filelock.WindowsFileLock if sys.platform == "win32" else filelock.UnixFileLock
    # A file system without flock then raises instead of getting a soft lock, and Windows keeps the
    # file as Unix does. Looked up rather than tried: an older filelock's half-made lock complains
    # on stderr when it is collected.
    options = inspect.signature(kind.__init__).parameters
    modern = {"preserve_lock_file": True, "fallback_to_soft": False} if "fallback_to_soft" in options else {}
    # Not thread-local: __del__ may release it from whichever thread the garbage collector runs in.
    return kind(path, thread_local=False, **modern)


def _write_holder(folder: Path) -> None:
    """Who holds the lock, replaced whole so a refused process never reads half of it. Only the
    holder writes it, so its pid names the temporary file. Failing to write it costs only the pid
    in another process's refusal."""
    payload = json.dumps({"pid": os.getpid(), "start": process_start(os.getpid())}).encode()
    tmp = folder / f"{HOLDER_FILE}.{os.getpid()}"
    try:
        tmp.write_bytes(payload)
        os.replace(tmp, folder / HOLDER_FILE)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if not isinstance(exc, OSError):
            raise


def _read_holder(folder: Path) -> dict:
    try:
        holder = json.loads((folder / HOLDER_FILE).read_bytes() or b"{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}
