"""Starts `vera` processes in milliseconds: imports the CLI once, then forks one process per request.

Each child is a real process of its own (own pid, signals, exit code) that runs the
entry point exactly as `python -m vera_cli` does, minus the seconds of importing torch.
Protocol, one JSON line each way: {"argv", "cwd", "log"} in; {"pid"} then {"code"} out,
where code is the exit status (negative: killed by that signal).
"""

import json
import os
import signal
import sys

import torch._dynamo  # noqa: F401 - what the first optimizer imports: seconds, paid once here
from vera_cli import cli, entry, signals  # noqa: F401 - imported once, before any fork
from vera_cli.commands import adapt, compare, evaluate, export, pretrain  # noqa: F401

# Installed here so that a child interrupted before its own entry point runs still ends with 130.
signals.install()


def child(request: dict) -> int:
    try:
        os.chdir(request["cwd"])
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1)
        os.dup2(log, 2)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        sys.argv = ["vera", *request["argv"]]
        entry.main()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except KeyboardInterrupt:
        # Before the entry point ran: what `python -m vera_cli` says when interrupted that early.
        sys.stderr.write("interrupted\n")
        return signals.INTERRUPTED
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return 0


for line in sys.stdin:
    request = json.loads(line)
    # Signals wait until the child has its log open: an interrupt then always has somewhere to be reported.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = child(request)
        finally:
            os._exit(code)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
