"""The project's one error type: anything the user can fix by changing their input."""

import sys


class VeraError(Exception):
    """A user-facing problem. The CLI prints its message on one line and exits with code 2."""


class RunInterrupted(VeraError):
    """Ctrl-C or SIGTERM stopped a run after its last completed epoch was saved. Exit code 130."""


class WorkerFailed(Exception):
    """A worker process's unexpected error (not bad input), named with its row: one line, exit code 1;
    `--debug` shows the worker's traceback."""


def describe_os_error(exc: OSError) -> str:
    """`No space left on device: runs/x/model.safetensors`: what the system said, and where."""
    where = ": ".join(str(name) for name in (exc.filename, exc.filename2) if name is not None)
    reason = exc.strerror or str(exc)
    return f"{reason}: {where}" if where else reason


def warn(message: str) -> None:
    """A problem the command steps around (a damaged run it skips), on stderr."""
    print(f"warning: {message}".encode("utf-8", "backslashreplace").decode(), file=sys.stderr)
