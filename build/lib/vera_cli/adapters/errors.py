"""The adapters package's one error type: input it cannot work with, named in the message."""


class AdapterError(ValueError):
    """A ValueError, as PEFT raises: callers need no import from outside this package to catch it."""
