"""Shell completion: class names, run directories, method names, and options that take several values.

A completer runs on every Tab press, so none of them imports torch: they read the
run folders' status files and constant lists only.

The shell hands the words typed so far to `vera` in environment variables (bash:
COMP_WORDS and COMP_CWORD; zsh, fish and PowerShell: _TYPER_COMPLETE_ARGS). Click
knows nothing of `--classes cat bird dog`, which the CLI expands before parsing;
`expand_completion_words` gives click those words already expanded, so that `bird`
completes as a value of --classes just as the CLI will read it.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Callable, MutableMapping

import typer

from vera_cli.cifar_classes import CLASSES
from vera_cli.config import METHODS, CompareMethod

if TYPE_CHECKING:
    from vera_cli.run_list import RunEntry

Expand = Callable[[list[str]], list[str]]


def _items(choices: list[str], incomplete: str) -> list[str]:
    """Completions of the last item of a comma list (`cat,bi` -> `cat,bird`)."""
    head, comma, last = incomplete.rpartition(",")
    return [f"{head}{comma}{choice}" for choice in choices if choice.startswith(last)]


def complete_classes(incomplete: str) -> list[str]:
    return _items(CLASSES, incomplete)


def complete_methods(incomplete: str) -> list[str]:
    return _items(list(METHODS), incomplete)


def complete_compare_methods(incomplete: str) -> list[str]:
    import typing

    return _items(list(typing.get_args(CompareMethod)), incomplete)


def _run_paths(incomplete: str, keep: Callable[["RunEntry"], bool]) -> list[str]:
    from vera_cli.run_list import find_runs
    from vera_cli.runs import RUNS_ROOT

    # The runs in the folder typed so far (`other/ex` -> other/), else under runs/.
    root = Path(incomplete.rpartition("/")[0] or RUNS_ROOT)
    if not root.is_dir():
        return []
    return [str(entry.path) for entry in find_runs(root) if keep(entry) and str(entry.path).startswith(incomplete)]


def complete_bases(incomplete: str) -> list[str]:
    """Finished pretrain runs."""
    return _run_paths(incomplete, lambda e: e.kind == "pretrain" and e.status == "finished")


def complete_finished(incomplete: str) -> list[str]:
    """Finished pretrain and adapt runs (what `vera eval` loads)."""
    return _run_paths(incomplete, lambda e: e.kind in ("pretrain", "adapt") and e.status == "finished")


def complete_adapters(incomplete: str) -> list[str]:
    return _run_paths(incomplete, lambda e: e.kind == "adapt" and e.status == "finished")


def complete_resumable(ctx: typer.Context, incomplete: str) -> list[str]:
    """Unfinished runs of the command being completed (`vera adapt --resume` offers adapt runs)."""
    return _run_paths(incomplete, lambda e: e.kind == ctx.info_name and e.status in ("interrupted", "failed", "crashed", "running"))


def complete_any_run(incomplete: str) -> list[str]:
    return _run_paths(incomplete, lambda e: True)


def _expanded(args: list[str], incomplete: str, expand: Expand, list_options: set[str]) -> list[str]:
    """`args` as the CLI will expand them; when `incomplete` continues a list option's values,
    ending with that option so that click completes it as one of them."""
    if not incomplete.startswith("-"):
        probe = expand([*args, "value"])
        if len(probe) >= 2 and probe[-2] in list_options:
            return probe[:-1]
    return expand(args)


def expand_completion_words(env: MutableMapping[str, str], expand: Expand, list_options: set[str]) -> None:
    """Rewrite the words the shell passed for completion as the CLI would expand them (see the module notes)."""
    if "COMP_WORDS" in env and "COMP_CWORD" in env:
        words = shlex.split(env["COMP_WORDS"])
        index = int(env["COMP_CWORD"])
        incomplete = words[index] if index < len(words) else ""
        args = _expanded(words[1:index], incomplete, expand, list_options)
        env["COMP_WORDS"] = shlex.join([words[0], *args, incomplete])
        env["COMP_CWORD"] = str(len(args) + 1)
    elif "_TYPER_COMPLETE_ARGS" in env:
        line = env["_TYPER_COMPLETE_ARGS"]
        words = shlex.split(line)
        # No trailing space: the last word is the one being completed.
        incomplete = words.pop() if len(words) > 1 and not line.endswith(" ") else ""
        args = _expanded(words[1:], incomplete, expand, list_options)
        env["_TYPER_COMPLETE_ARGS"] = shlex.join([words[0], *args]) + " " + (shlex.quote(incomplete) if incomplete else "")


def completing(prog_name: str) -> bool:
    """True when the shell asked `vera` for completions rather than to run a command."""
    return bool(os.environ.get(f"_{prog_name}_COMPLETE".upper()))
