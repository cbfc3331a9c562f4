"""Shell completion through the shells' own protocol (the _VERA_COMPLETE variable click reads), and --version."""

import os
import shlex
import subprocess
import sys

import pytest

from conftest import fake_run
from vera_cli import __version__, cli


def bash_env(line: str) -> dict[str, str]:
    """What bash passes: the words typed, and the index of the one being completed."""
    words = shlex.split(line)
    index = len(words) if line.endswith(" ") else len(words) - 1
    return {"_VERA_COMPLETE": "complete_bash", "COMP_WORDS": line, "COMP_CWORD": str(index)}


@pytest.fixture
def complete(capsys, monkeypatch, tmp_path):
    """Completions for a command line, asked of the CLI in this process the way bash asks it."""
    monkeypatch.chdir(tmp_path)

    def ask(line: str, env: dict[str, str] | None = None) -> list[str]:
        for key, value in (env or bash_env(line)).items():
            monkeypatch.setenv(key, value)
        with pytest.raises(SystemExit) as stopped:
            cli.run([])
        assert stopped.value.code == 0
        return capsys.readouterr().out.split()
    return ask


def test_class_names_complete_after_each_value_of_classes(complete):
    assert complete("vera adapt --classes ca") == ["cat"]
    assert complete("vera adapt --classes cat bi") == ["bird"]
    assert complete("vera adapt --epochs 2 --classes cat dog d") == ["deer", "dog"]
    assert complete("vera adapt --classes cat,d") == ["cat,deer", "cat,dog"]
    assert complete("vera experiment --classes cat ") == [
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    # After another option, its own completion applies again.
    assert complete("vera adapt --classes cat bird --method l") == ["lora"]


def test_methods_and_run_directories_complete(complete, tmp_path):
    root = tmp_path / "runs"
    fake_run(root, "base", kind="pretrain")
    fake_run(root, "broken-base", kind="pretrain", status="failed")
    fake_run(root, "a1")
    fake_run(root, "a2", status="interrupted")
    fake_run(root, "p2", kind="pretrain", status="interrupted")
    assert complete("vera adapt --method ") == ["vera", "lora", "full", "head"]
    assert complete("vera compare --methods vera,vera-") == ["vera,vera-sliced", "vera,vera-sliced+head"]
    assert complete("vera adapt --base ") == ["runs/base"]
    assert complete("vera adapt --resume runs/") == ["runs/a2"]
    assert complete("vera pretrain --resume ") == ["runs/broken-base", "runs/p2"]  # a failed run resumes too
    assert complete("vera eval ") == ["runs/a1", "runs/base"]
    assert complete("vera eval runs/base --adapter runs/a") == ["runs/a1"]


def test_zsh_protocol_completes_list_values_too(complete):
    zsh = {"_VERA_COMPLETE": "complete_zsh", "_TYPER_COMPLETE_ARGS": "vera adapt --classes cat do"}
    assert complete("", zsh) == ["_arguments", "'*:", ":((\"dog\"))'"]


def test_completion_through_the_real_entry_point_imports_no_torch(tmp_path):
    fake_run(tmp_path / "runs", "base", kind="pretrain")
    code = ("import runpy, sys\ntry:\n    runpy.run_module('vera_cli', run_name='__main__')\n"
            "except SystemExit:\n    print('torch' in sys.modules, file=sys.stderr)")
    env = {**os.environ, **bash_env("vera adapt --classes cat bi")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert (done.stdout, done.stderr) == ("bird\n", "False\n")
    env = {**os.environ, **bash_env("vera adapt --base ")}
    done = subprocess.run([sys.executable, "-m", "vera_cli"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert done.stdout == "runs/base\n" and done.returncode == 0
    source = subprocess.run([sys.executable, "-m", "vera_cli"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "_VERA_COMPLETE": "source_bash"})
    assert "complete -o default -F _vera_completion vera" in source.stdout


def test_version(vera):
    result = vera("--version")
    assert result.code == 0 and result.out == f"vera {__version__}\n"
