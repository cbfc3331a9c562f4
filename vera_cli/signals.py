"""The one interrupt flag: Ctrl-C and SIGTERM as one KeyboardInterrupt, remembered once it came.

Imports nothing of ours, so that the entry point can install it before anything
heavy is imported, and every layer (run files, training) can ask whether an
interrupt arrived.
"""

from __future__ import annotations

import signal
import sys

INTERRUPTED = 130
_interrupted = False
_reported_by = sys.unraisablehook


def _raise_once(_signum, _frame) -> None:
    # A second signal while the first unwinds is ignored, so that the run's status and
    # temporary files are cleaned up instead of being cut off half-way.
    global _interrupted
    if not _interrupted:
        _interrupted = True
        raise KeyboardInterrupt


def _quiet_unraisable(unraisable) -> None:
    # Our KeyboardInterrupt raised inside a callback whose errors Python only reports (a weakref callback, a
    # __del__: matplotlib's, during garbage collection) would print a traceback on the way out; the flag already
    # holds the interrupt, and the command ends on it.
    if _interrupted and issubclass(unraisable.exc_type, KeyboardInterrupt):
        return
    _reported_by(unraisable)


def install() -> dict:
    """Route SIGINT and SIGTERM into one KeyboardInterrupt; returns the handlers it replaced. Installed again
    over itself (the entry point, then the CLI), it keeps what came in between: a signal during the CLI's
    imports may have had its KeyboardInterrupt swallowed (raised inside a callback whose errors Python
    ignores), and the flag is then all that is left of it."""
    global _interrupted, _reported_by
    if not any(signal.getsignal(sig) is _raise_once for sig in (signal.SIGINT, signal.SIGTERM)):
        _interrupted = False
    if sys.unraisablehook is not _quiet_unraisable:
        _reported_by, sys.unraisablehook = sys.unraisablehook, _quiet_unraisable
    # A signal ignored by whoever started us (`vera ... &` in a script ignores SIGINT) stays ignored.
    return {sig: signal.signal(sig, _raise_once) for sig in (signal.SIGINT, signal.SIGTERM)
            if signal.getsignal(sig) is not signal.SIG_IGN}


def interrupted() -> bool:
    """Whether a signal arrived since install(), even one that library code swallowed."""
    return _interrupted


def restore(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
