"""The adapters package's error type: input it cannot work with, named in the message."""


class AdapterError(ValueError):
    """A ValueError, as PEFT raises: callers need no import from outside this package to catch it."""


class RankError(AdapterError):
    """A rank that no targeted layer can use: a grid that sweeps ranks leaves such a cell out rather than fail."""

    def __init__(self, reason: str, limit: int) -> None:
        super().__init__(f"{reason}; choose a rank up to {limit}")
        self.reason = reason
        self.limit = limit
