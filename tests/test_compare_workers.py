"""`vera compare --workers`: local processes that share a grid's rows, and their clean-up.

Every test that starts processes checks that none of them outlives it; the pools' own tests run toy
tasks (defined here, so that the spawned workers import them by name) instead of training.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vera_cli
from vera_cli import workers
from vera_cli.commands import compare as compare_module
from vera_cli.errors import VeraError, WorkerFailed
from vera_cli.models import ModelConfig, ViTConfig

from conftest import untimed

GRID = ["--methods", "lora,head", "--ranks", "2", "--seeds", "2", "--epochs", "1", "--classes", "cat", "dog"]
CPU = torch.device("cpu")


def children(pid: int) -> set[int]:
    """The processes whose parent is `pid` (Linux: from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def read(path: str) -> str:
    """A /proc file's text; empty once the process is gone."""
    try:
        return Path(path).read_bytes().decode(errors="replace")
    except OSError:
        return ""


def helper(pid: int) -> bool:
    """multiprocessing's resource tracker: one per process that started workers, ending with it."""
    return "multiprocessing.resource_tracker" in read(f"/proc/{pid}/cmdline")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def timeless(lines: list[dict]) -> list[dict]:
    return [untimed(line) for line in lines]


@pytest.fixture
def no_workers_left():
    """The test's processes (vera in-process, so the workers are this process's children) are gone at its end."""
    before = children(os.getpid())
    yield
    assert not {pid for pid in children(os.getpid()) - before if alive(pid) and not helper(pid)}


def test_auto_takes_a_worker_per_core_for_small_cpu_rows_and_one_otherwise(monkeypatch):
    monkeypatch.setattr(workers, "cores", lambda: 4)
    convnet, small_vit = ModelConfig("convnet"), ModelConfig("vit", ViTConfig(patch_size=4, dim=128, depth=4, heads=4, mlp_ratio=2))
    gpu_vit = ModelConfig("vit", ViTConfig(patch_size=4, dim=384, depth=8, heads=6, mlp_ratio=4))
    assert workers.small_model(small_vit) and not workers.small_model(gpu_vit)
    assert workers.worker_count("auto", CPU, 1, 10, [convnet, small_vit]) == 4
    assert workers.worker_count("auto", CPU, 1, 3, [convnet]) == 3  # at most one per row
    assert workers.worker_count("auto", CPU, 1, 1, [convnet]) == 1
    assert workers.worker_count("auto", CPU, 1, 10, [convnet, gpu_vit]) == 1
    assert workers.worker_count("auto", torch.device("cuda"), 1, 10, [convnet]) == 1
    assert workers.worker_count("auto", CPU, 2, 10, [convnet]) == 1  # under torchrun the ranks share the rows
    assert workers.worker_count(6, CPU, 1, 10, [gpu_vit]) == 6  # a number is taken as given, up to the rows
    monkeypatch.setattr(workers, "cores", lambda: 1)
    assert workers.worker_count("auto", CPU, 1, 10, [convnet]) == 1
    with pytest.raises(VeraError, match="workers 2 runs rows in local CPU processes, and this comparison runs on cuda"):
        workers.worker_count(2, torch.device("cuda"), 1, 10, [convnet])
    with pytest.raises(VeraError, match="under torchrun each of the 2 processes already takes whole rows"):
        workers.worker_count(2, CPU, 2, 10, [convnet])
    assert workers.worker_count(1, torch.device("cuda"), 2, 10, [convnet]) == 1


@pytest.mark.parametrize("value, message", [
    ("0", "error: workers must be auto or a number of processes from 1 to 1,024, got 0"),
    ("some", "error: workers must be one of auto; got 'some'"),
])
def test_a_bad_worker_count_is_refused_before_anything_runs(vera, pretrained, value, message):
    result = vera("compare", *GRID, "--workers", value, "--run-dir", "runs/never")
    assert (result.code, result.err.strip()) == (2, message)
    assert not Path("runs/never").exists()


class StoppedWhileCollected:
    def __del__(self):
        # The SIGTERM's handler runs here, inside a finalizer: Python drops what it raises after reporting it.
        signal.raise_signal(signal.SIGTERM)


def toy_task(job: dict, name: str, log) -> tuple[str, int]:
    """A pool's row: says where it runs, and fails as `job` asks on the row job["fail"]."""
    log(f"{name} runs")
    if name == job.get("fail"):
        if job["how"] == "bad input":
            raise VeraError(f"row {name} cannot run: fix its input")
        if job["how"] == "bug":
            raise ZeroDivisionError("division by zero")
        if job["how"] == "stopped in a finalizer":
            StoppedWhileCollected()
        else:
            os.kill(os.getpid(), signal.SIGTERM if job["how"] == "stopped" else signal.SIGKILL)
        time.sleep(5)  # the signal arrives meanwhile
    time.sleep(job.get("sleep", 0))
    return name.upper(), os.getpid()


@pytest.mark.slow
def test_a_pool_runs_each_name_once_in_its_worker_processes(tmp_path, no_workers_left, machine_threads):
    names, lines = list("abcdef"), []
    with workers.Pool(2, toy_task, {}, names, tmp_path / "claims", lines.append) as pool:
        results = list(pool)
        assert pool.threads == max(1, machine_threads // 2)  # this process's threads, shared out
    assert sorted(name for name, _ in results) == names
    assert all(value[0] == name.upper() for name, value in results)
    pids = {value[1] for _, value in results}
    assert len(pids) <= 2 and os.getpid() not in pids
    assert sorted(lines) == [f"{name} runs" for name in names]
    assert sorted(p.name for p in (tmp_path / "claims").iterdir()) == names


@pytest.mark.slow
@pytest.mark.parametrize("how, error, message", [
    ("bad input", VeraError, r"^row c cannot run: fix its input$"),
    ("bug", WorkerFailed, r"^row c failed in a worker process: ZeroDivisionError: division by zero$"),
    ("killed", WorkerFailed, r"^worker process \d+ ended \(killed by signal 9\) while running row c; finished rows are kept"),
    # Someone stopped one worker (SIGTERM to its pid): the grid stops as on Ctrl-C.
    ("stopped", KeyboardInterrupt, "^$"),
    # ... also when its interrupt lands in a finalizer (garbage collection), where Python drops it.
    ("stopped in a finalizer", KeyboardInterrupt, "^$"),
])
def test_a_workers_failure_ends_the_pool_with_one_error_and_no_process_left(tmp_path, no_workers_left, how, error, message):
    lines = []
    with pytest.raises(error, match=message) as raised:
        with workers.Pool(2, toy_task, {"fail": "c", "how": how, "sleep": 0.2}, list("abcdef"), tmp_path, lines.append) as pool:
            list(pool)
    assert "c runs" in lines
    if how == "bug":
        # --debug shows where it failed in the worker.
        assert 'raise ZeroDivisionError("division by zero")' in str(raised.value.__cause__)


@pytest.mark.slow  # spawns two worker processes (a few seconds each)
def test_two_workers_give_the_one_process_table_number_for_number(vera, pretrained, no_workers_left):
    assert vera("compare", *GRID, "--workers", "1", "--run-dir", "runs/one").code == 0
    result = vera("compare", *GRID, "--workers", "2", "--run-dir", "runs/two")
    assert result.code == 0, result.err
    one, two = Path("runs/one"), Path("runs/two")
    table = json.loads((one / "table.json").read_text())
    assert len(table) == 3 and [line["seeds"] for line in table[1:]] == [2, 2]
    assert timeless(json.loads((two / "table.json").read_text())) == timeless(table)
    rows = {r["name"]: r for r in map(json.loads, (two / "rows.jsonl").read_text().splitlines())}
    assert sorted(rows) == sorted(p.name for p in (one / "rows").iterdir()) and len(rows) == 4
    for line in map(json.loads, (one / "rows.jsonl").read_text().splitlines()):
        assert timeless([rows[line["name"]]]) == timeless([line])
        adapter = f"rows/{line['name']}/adapter.safetensors"
        if line["method"] == "lora":
            first, second = load_file(one / adapter), load_file(two / adapter)
            assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert not (two / "claims").exists()
    summaries = [json.loads((run / "summary.json").read_text()) for run in (one, two)]
    assert [s["workers"] for s in summaries] == [1, 2]
    assert [s["rows_run"] for s in summaries] == [4, 4]
    for summary in summaries:
        assert summary["rows_per_hour"] == pytest.approx(4 / summary["grid_seconds"] * 3600)
        assert 0 < summary["grid_seconds"] < summary["wall_seconds"]
    assert "2 worker processes (1 CPU thread(s) each) share the 4 rows" in result.err
    # Rows finish side by side: each line names its row, and the count goes up one by one.
    done = re.findall(r"^\[(\d)/4\] \S+ trainable, .*; (\d)/4 rows done at [\d,.]+ rows/hour", result.err, re.MULTILINE)
    assert sorted(int(row) for row, _ in done) == [1, 2, 3, 4] and [int(n) for _, n in done] == [1, 2, 3, 4]
    assert f"4 rows in {summaries[1]['grid_seconds']:.1f}s: " in result.err and "rows/hour with 2 workers" in result.err


worker_row = compare_module.worker_row


def failing_row(job, name: str, log):
    """The grid's second row fails as a bug would, in whichever worker takes it."""
    if job.order[name] == 1:
        raise RuntimeError("the kernels said no")
    return worker_row(job, name, log)


@pytest.mark.slow  # spawns two worker processes (a few seconds each)
def test_a_bug_in_a_worker_ends_compare_in_one_line_and_resume_may_change_the_workers(vera, pretrained, monkeypatch, no_workers_left):
    with monkeypatch.context() as patch:
        # Handed to the workers by name: they import this module and run it.
        patch.setattr(compare_module, "worker_row", failing_row)
        failed = vera("compare", *GRID, "--workers", "2", "--run-dir", "runs/cmp")
    assert failed.code == 1
    assert failed.err.splitlines()[-1] == "error: row lora-r2-replay-s1 failed in a worker process: RuntimeError: the kernels said no"
    status = json.loads(Path("runs/cmp/status.json").read_text())
    assert (status["status"], status["error"]) == ("failed", failed.err.splitlines()[-1][len("error: "):])
    # The worker count is not part of what a comparison computes: a resume may change it.
    resumed = vera("compare", "--resume", "runs/cmp", "--workers", "1")
    assert resumed.code == 0, resumed.err
    assert "[2/4] lora-r2-replay-s1" in resumed.err
    summary = json.loads(Path("runs/cmp/summary.json").read_text())
    assert summary["workers"] == 1 and [line["seeds"] for line in summary["rows"]] == [1, 2, 2]


def launch(cwd: Path, *args: str) -> subprocess.Popen:
    """`python -m vera_cli compare ...` in a session of its own: the test's signals reach only the parent."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(vera_cli.__file__).parents[1])}
    return subprocess.Popen([sys.executable, "-m", "vera_cli", "compare", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def ended(pids: set[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(map(alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(map(alive, pids))


def signalled(cwd: Path, data_dir: Path, epochs: int, signum: int, when: str = "training",
              group: bool = False) -> tuple[set[int], set[int], int, str]:
    """A 2-worker comparison into runs/cmp, sent `signum` once both workers are `starting` (importing torch:
    its library is mapped) or two rows are `training` (each has recorded an epoch), alone or with its whole
    process group (as a terminal's Ctrl-C is): its workers' pids, its other children (multiprocessing's
    resource tracker), exit code and stderr."""
    process = launch(cwd, *GRID, "--epochs", str(epochs), "--workers", "2", "--data-dir", str(data_dir), "--device",
                     "cpu", "--no-progress", "--run-dir", "runs/cmp")

    def ready(workers: set[int]) -> bool:
        if when == "starting":
            return len(workers) == 2 and all("libtorch" in read(f"/proc/{pid}/maps") for pid in workers)
        return len(list(cwd.glob("runs/cmp/rows/[!.]*/metrics.jsonl"))) >= 2

    try:
        deadline = time.monotonic() + 120
        while True:
            pids = children(process.pid)
            helpers = set(filter(helper, pids))
            if ready(pids - helpers):
                break
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.01)
        if group:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    return pids - helpers, helpers, process.returncode, err


def row_statuses(run: Path) -> set[str]:
    return {json.loads(p.read_text())["status"] for p in run.glob("rows/[!.]*/status.json")}


@pytest.mark.slow
@pytest.mark.parametrize("when, group", [("training", False), ("training", True), ("starting", True)],
                         ids=["to the parent", "to the process group", "to the group while workers start"])
def test_ctrl_c_stops_every_worker_and_resume_finishes_the_grid(vera, pretrained, tmp_path, when, group):
    pids, helpers, code, err = signalled(tmp_path, vera.data_dir, 20, signal.SIGINT, when, group)
    assert code == 130, err
    # One message, the parent's: the workers leave Ctrl-C to it (even while importing), and stop when it tells them.
    assert "Traceback" not in err and "vera compare --resume runs/cmp" in err.splitlines()[-1]
    # The parent waited for its workers; multiprocessing's resource tracker follows it within moments.
    assert len(pids) == 2 and ended(pids, 0) and ended(helpers, 10)
    # Each worker marked its row as any interrupted run: nothing is left "running".
    statuses = row_statuses(tmp_path / "runs/cmp")
    assert ("interrupted" in statuses or when == "starting") and statuses <= {"interrupted", "finished"}
    resumed = vera("compare", "--resume", "runs/cmp", "--workers", "2")
    assert resumed.code == 0, resumed.err
    names = [json.loads(line)["name"] for line in Path("runs/cmp/rows.jsonl").read_text().splitlines()]
    assert sorted(names) == sorted(p.name for p in Path("runs/cmp/rows").iterdir()) and len(names) == 4


@pytest.mark.slow
def test_workers_stop_when_their_parent_is_killed(vera, pretrained, tmp_path):
    pids, helpers, code, _ = signalled(tmp_path, vera.data_dir, 50, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert len(pids) == 2 and ended(pids | helpers, workers.STOP_SECONDS + 30)
    statuses = row_statuses(tmp_path / "runs/cmp")
    assert "interrupted" in statuses and statuses <= {"interrupted", "finished"}
