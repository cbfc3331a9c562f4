"""The process entry point: Ctrl-C and SIGTERM mean exit 130 from the first line on.

Handlers are installed before the CLI (typer, torch) is imported, so an interrupt
during imports, data loading or the final printing ends the same way as one during
training: a message and exit code 130, never a traceback, a signal death or exit 0.
This module imports nothing heavy for that reason.
"""

from __future__ import annotations

import os
import signal
import sys

INTERRUPTED = 130
_interrupted = False


def _raise_once(_signum, _frame) -> None:
    # A second signal while the first unwinds is ignored, so that the run's status and
    # temporary files are cleaned up instead of being cut off half-way.
    global _interrupted
    if not _interrupted:
        _interrupted = True
        raise KeyboardInterrupt


def install() -> dict:
    """Route SIGINT and SIGTERM into one KeyboardInterrupt; returns the handlers it replaced."""
    global _interrupted
    _interrupted = False
    # A signal ignored by whoever started us (`vera ... &` in a script ignores SIGINT) stays ignored.
    return {sig: signal.signal(sig, _raise_once) for sig in (signal.SIGINT, signal.SIGTERM)
            if signal.getsignal(sig) is not signal.SIG_IGN}


def interrupted() -> bool:
    """Whether a signal arrived since install(), even one that library code swallowed."""
    return _interrupted


def restore(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def main() -> None:
    install()
    try:
        from vera_cli.cli import run

        code = run(sys.argv[1:])
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        code = INTERRUPTED
    # Late signals (while Python shuts down) must not turn the code into a traceback or a kill.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if _interrupted:
        # Everything the run needs is on disk; interpreter shutdown after an interrupt (an import cut
        # half-way, a KeyboardInterrupt left pending) could still end the process by SIGINT instead.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(INTERRUPTED)
    sys.exit(code)
