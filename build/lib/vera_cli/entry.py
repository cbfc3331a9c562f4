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

from vera_cli import signals


def main() -> None:
    signals.install()
    # A stream that cannot encode a character (PYTHONIOENCODING=ascii, a legacy console) shows it escaped
    # (h\xe4ld for häld) instead of failing on a run's name half-way through a table.
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    try:
        from vera_cli.cli import run

        code = run(sys.argv[1:])
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        code = signals.INTERRUPTED
    # Late signals (while Python shuts down) must not turn the code into a traceback or a kill.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if signals.interrupted():
        # Everything the run needs is on disk; interpreter shutdown after an interrupt (an import cut
        # half-way, a KeyboardInterrupt left pending) could still end the process by SIGINT instead.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(signals.INTERRUPTED)
    sys.exit(code)
