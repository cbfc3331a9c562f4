"""The project's one error type: anything the user can fix by changing their input."""


class VeraError(Exception):
    """A user-facing problem. The CLI prints its message on one line and exits with code 2."""


class RunInterrupted(VeraError):
    """Ctrl-C or SIGTERM stopped a run after its last completed epoch was saved. Exit code 130."""
