"""One writer per run directory: an advisory lock that dies with its process.

`flock` is released by the kernel when the holding process ends however it ends
(SIGKILL, a crash), so a stale lock can never block a resume; the holder's pid and
start time are written into the lock file only to say who holds it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path

from vera_cli.errors import VeraError

LOCK_FILE = ".lock"


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


class RunLock:
    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, folder: Path) -> "RunLock":
        """Hold `folder`'s lock or refuse with who holds it. A run directory that cannot be locked
        (a file system without flock) is written unlocked rather than not at all."""
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                return cls(fd)
            holder = _read_holder(fd)
            os.close(fd)
            raise VeraError(f"{folder} is being written by another vera process (pid {holder.get('pid', '?')}): "
                            "wait for it to end or stop it, then try again") from None
        payload = json.dumps({"pid": os.getpid(), "start": process_start(os.getpid())}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, payload, 0)
        return cls(fd)

    @classmethod
    def check(cls, folder: Path) -> None:
        """Refuse early (before slow work) when another process holds `folder`."""
        cls.acquire(folder).release()

    def release(self) -> None:
        # The file stays: unlinking it would let a waiting process lock an inode nobody else sees.
        # The descriptor is forgotten before it is closed: a Ctrl-C between the two steps would
        # otherwise leave __del__ closing it again (EBADF at exit, or another file's reused number).
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}
