"""Seeded fuzzing of the run files: any JSON or YAML value at any key of a real run's files.

Each case writes one random value (null, a boolean, a small, negative or huge integer, a float, NaN, an
infinity, a string, a list, a mapping) at one key of one file of a finished or interrupted run, then runs
what reads that file: `vera runs` (with --json), `vera eval`, `vera export` and `--resume`. Every one must
end with exit code 0 or 2 and no traceback; `vera runs` must always list every run.
"""

import json
import random
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import train_once

CASES = 200
# One step an epoch (250 images at batch 256): a resume that goes through trains one short epoch.
QUICK_RUN = ["--epochs", "2", "--batch-size", "256"]
# A resume may change what it logs: pictures cost more than the epoch it trains.
NO_PLOTS = ["--set", "logging.plots=false"]
BASE_READERS = (["eval", "runs/base"], ["eval", "runs/a"], ["export", "runs/a", "--out", "out"])
ADAPTER_READERS = (["eval", "runs/a"], ["export", "runs/a", "--out", "out"], ["eval", "runs/base", "--adapter", "runs/a"])
# run -> {file: the commands that read it besides `vera runs`, which reads them all}
RUNS = {
    "base": {"status.json": BASE_READERS, "config.yaml": BASE_READERS, "summary.json": (), "metrics.jsonl": ()},
    "a": {"status.json": ADAPTER_READERS, "adapter.json": ADAPTER_READERS, "config.yaml": (), "summary.json": (),
          "metrics.jsonl": (), "selection.json": ()},
    "cut": dict.fromkeys(("status.json", "config.yaml", "metrics.jsonl"), (["pretrain", "--resume", "runs/cut", *NO_PLOTS],)),
    "acut": dict.fromkeys(("status.json", "config.yaml", "metrics.jsonl", "selection.json"),
                          (["adapt", "--resume", "runs/acut", *NO_PLOTS],)),
}


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory, cifar_root, trained_base) -> Path:
    """runs/base (finished pretrain), runs/a (finished LoRA adapt: PEFT can load it), runs/cut and runs/acut
    (a pretrain and an adapt stopped after their first epoch), in one folder."""
    folder = tmp_path_factory.mktemp("fuzzed")
    lora = ["--method", "lora", "--rank", "2", *QUICK_RUN]
    for run, args, interrupt in (("a", ["adapt", *lora], None), ("cut", ["pretrain", *QUICK_RUN], 1),
                                 ("acut", ["adapt", *lora], 1)):
        trained = train_once(tmp_path_factory, cifar_root, *args, "--run-dir", f"runs/{run}", interrupt_after=interrupt,
                             runs_from=trained_base)
        shutil.copytree(trained / "runs" / run, folder / "runs" / run)
    shutil.copytree(trained_base / "runs" / "base", folder / "runs" / "base")
    return folder


def random_value(rng: random.Random, depth: int = 0):
    kinds = ["null", "bool", "int", "negative", "huge", "float", "nan", "inf", "string", "empty"]
    if depth < 2:
        kinds += ["list", "dict"]
    kind = rng.choice(kinds)
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == "dict":
        return {rng.choice(["epoch", "kind", "status", "x", "overall", "method"]): random_value(rng, depth + 1)
                for _ in range(rng.randint(0, 3))}
    return {"null": None, "bool": rng.random() < 0.5, "int": rng.randint(0, 10), "negative": -rng.randint(1, 10**6),
            "huge": 2**rng.choice([63, 64, 200]) + rng.randint(0, 9), "float": rng.uniform(-3, 3), "nan": float("nan"),
            "inf": rng.choice([float("inf"), float("-inf")]), "empty": "",
            "string": rng.choice(["finished", "adapt", "pretrain", "running", "x" * 300, "é✓", "../..", "none", "1e3",
                                  "runs/base", "cat"])}[kind]


def key_paths(value, path=()):
    """Every place in a parsed file a value can go: the file itself, and each key and item below it."""
    yield path
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from key_paths(inner, (*path, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value[:4]):
            yield from key_paths(inner, (*path, index))


def put(document, path, value):
    if not path:
        return value
    node = document
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return document


def mutate(rng: random.Random, file: Path) -> str:
    """Write one random value at one random place of `file`; what was done, for the failure message."""
    text = file.read_text()
    if file.suffix == ".jsonl":
        document = [json.loads(line) for line in text.splitlines()]
    else:
        document = yaml.safe_load(text) if file.suffix == ".yaml" else json.loads(text)
    path = rng.choice(list(key_paths(document)))
    value = random_value(rng)
    document = put(document, path, value)
    if file.suffix == ".jsonl":
        lines = document if isinstance(document, list) else [document]
        file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    elif file.suffix == ".yaml":
        file.write_text(yaml.safe_dump(document))
    else:
        file.write_text(json.dumps(document))
    return f"{file} at {list(path)} = {value!r}"


# The first FAST cases run in `pytest -q`; the rest in the slow tier (`pytest -m slow`).
FAST = 60


@pytest.mark.parametrize("case", [case if case < FAST else pytest.param(case, marks=pytest.mark.slow) for case in range(CASES)])
def test_any_value_in_any_run_file_is_a_clear_outcome(vera, trained_runs, cifar_root, case):
    shutil.copytree(trained_runs / "runs", "runs", ignore=shutil.ignore_patterns("*.png"))
    rng = random.Random(case)
    run = rng.choice(sorted(RUNS))
    file = rng.choice(sorted(RUNS[run]))
    commands = RUNS[run][file]
    done = mutate(rng, Path("runs", run, file))
    listed = vera("runs", "--json")
    assert listed.code == 0 and "Traceback" not in listed.err, (done, listed.err)
    rows = {row["name"]: row for row in json.loads(listed.out)}
    assert sorted(rows) == sorted(RUNS), done
    assert rows[run]["status"] != "unreadable" or rows[run]["problem"], done
    table = vera("runs")
    assert table.code == 0 and "Traceback" not in table.err, (done, table.err)
    for command in commands:
        data = ["--data-dir", str(cifar_root)] if command[0] == "eval" else []
        result = vera(*command, *data)
        assert result.code in (0, 2) and "Traceback" not in result.err + result.out, (done, command, result.err)
        if result.code == 2:  # notes may come first; the error is the one last line
            last = result.err.splitlines()[-1]
            assert last.startswith("error: ") and result.err.count("error: ") == 1, (done, command, result.err)
        shutil.rmtree("out", ignore_errors=True)
