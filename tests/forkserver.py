"""Starts `vera` processes in milliseconds: imports the CLI once, then forks one process per request.

Each child is a real process of its own (own pid, signals, exit code) that runs the
entry point exactly as `python -m vera_cli` does, minus the seconds of importing torch;
or, asked for a `call`, a function of a module under tests/, so that a trial that may
crash its process (a damaged compiled library) costs a child, not pytest.
Protocol, one JSON line each way: {"argv", "cwd", "log"} (and "call": "module:function",
which gets argv as its arguments) in; {"pid"} then {"code"} out, where code is the exit
status (negative: killed by that signal).
Run as a script it serves (`forkserver.py MODULE` imports that module instead of the CLI);
imported (by the tests) it gives `ForkServer`, the client.
"""

import importlib
import json
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path


class ForkServer:
    def __init__(self, env: dict[str, str], preload: str | None = None) -> None:
        self.process = subprocess.Popen([sys.executable, __file__, *([preload] if preload else [])], env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.children: list[int] = []

    def start(self, argv: list[str], cwd: Path, log: Path, call: str | None = None) -> int:
        request = {"argv": argv, "cwd": str(cwd), "log": str(log), **({"call": call} if call else {})}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        pid = json.loads(self.process.stdout.readline())["pid"]
        self.children.append(pid)
        return pid

    def wait(self) -> int:
        return json.loads(self.process.stdout.readline())["code"]

    def run(self, argv: list[str], cwd: Path, log: Path, call: str | None = None) -> int:
        self.start(argv, cwd, log, call)
        return self.wait()

    def close(self) -> None:
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.kill()
        self.process.wait()


def child(request: dict) -> int:
    from vera_cli import entry, signals

    try:
        os.chdir(request["cwd"])
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1)
        os.dup2(log, 2)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        if "call" in request:
            module, _, function = request["call"].partition(":")
            try:
                getattr(importlib.import_module(module), function)(*request["argv"])
            except Exception:
                traceback.print_exc()
                return 1
            return 0
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


def serve(preload: list[str]) -> None:
    from vera_cli import entry, signals  # noqa: F401 - imported once, before any fork

    if preload:
        importlib.import_module(preload[0])
    else:
        import torch._dynamo  # noqa: F401 - what the first optimizer imports: seconds, paid once here
        from vera_cli import cli  # noqa: F401
        from vera_cli.commands import adapt, compare, evaluate, export, pretrain  # noqa: F401

    # Installed here so that a child interrupted before its own entry point runs still ends with 130.
    signals.install()
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


if __name__ == "__main__":
    serve(sys.argv[1:])
