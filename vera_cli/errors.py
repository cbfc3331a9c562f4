"""The project's one error type: anything the user can fix by changing their input."""


class VeraError(Exception):
    """A user-facing problem. The CLI prints its message on one line and exits with code 2."""
