"""`vera runs`: the table of runs, its filters and sorting, unreadable runs, safe removal."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import QUICK, fake_run
from vera_cli.runlock import HOLDER_FILE, LOCK_FILE, process_start


def test_the_table_reads_real_runs(vera, pretrained):
    adapted = vera("adapt", *QUICK, "--classes", "cat", "dog", "--method", "lora", "--rank", "4", "--run-dir", "runs/a")
    assert adapted.code == 0, adapted.err
    result = vera("runs", "--json")
    assert result.code == 0, result.err
    rows = {row["name"]: row for row in result.json()}
    assert list(rows) == ["base", "a"]  # oldest first
    base, adapt = rows["base"], rows["a"]
    summary = json.loads(Path("runs/a/summary.json").read_text())
    assert (base["kind"], base["status"], base["method"]) == ("pretrain", "finished", None)
    assert base["overall"] == json.loads(Path("runs/base/summary.json").read_text())["test"]["overall"]
    assert (adapt["kind"], adapt["base"], adapt["method"], adapt["rank"]) == ("adapt", "runs/base", "lora", 4)
    assert adapt["classes"] == ["cat", "dog"] and adapt["targets"] == []
    # Read from the adapter file the adapt run wrote (the table's own copy of its name must match the writer's).
    assert (adapt["status"], adapt["problem"]) == ("finished", None)
    assert [adapt[m] for m in ("overall", "chosen", "task", "rest", "wall_seconds")] == [
        summary["test"][m] for m in ("overall", "chosen", "task", "rest")] + [summary["wall_seconds"]]
    assert base["tta"] == adapt["tta"] == summary["tta"] == "flip"  # the shipped pretrain's rule, kept by the adapter

    table = vera("runs")
    assert table.code == 0, table.err
    line = next(line for line in table.out.splitlines() if line.lstrip().startswith("a "))
    assert "lora" in line and "cat,dog" in line and f"{summary['test']['task']:.2%}" in line and " flip " in line


def test_filters_and_sorting(vera, tmp_path):
    fake_run(tmp_path / "runs", "low", overall=0.2)
    fake_run(tmp_path / "runs", "high", overall=0.8, classes=("cat", "bird"))
    fake_run(tmp_path / "runs", "broken", status="failed")
    fake_run(tmp_path / "runs", "pre", kind="pretrain", overall=0.6)

    def names(*args):
        result = vera("runs", "--json", *args)
        assert result.code == 0, result.err
        return [row["name"] for row in result.json()]

    assert names("--kind", "adapt", "--sort", "overall") == ["high", "low", "broken"]  # highest first, none last
    assert names("--kind", "adapt", "--sort", "overall", "--reverse") == ["low", "high", "broken"]
    assert names("--status", "failed") == ["broken"]
    assert names("--classes", "cat", "dog") == ["low", "broken"]
    assert names("--classes", "cat,bird") == ["high"]
    assert names("--sort", "name") == ["broken", "high", "low", "pre"]
    # Summaries written before tta was recorded were measured on the images alone; a failed run has none.
    assert {row["name"]: row["tta"] for row in vera("runs", "--json").json()} == {
        "low": "none", "high": "none", "broken": None, "pre": "none"}
    wrong = vera("runs", "--sort", "accuracy")
    assert wrong.code == 2 and "cannot sort by 'accuracy': choose one of name, kind" in wrong.err
    # A run named as the folder of runs: the empty table says why.
    inside = vera("runs", "--runs-dir", str(tmp_path / "runs" / "pre"))
    assert inside.code == 0 and inside.out.startswith("0 run(s) under")
    assert f"note: {tmp_path / 'runs' / 'pre'} is a run itself; --runs-dir takes the folder that holds runs, e.g. " \
           f"--runs-dir {tmp_path / 'runs'}" in " ".join(inside.err.split())
    wrong = vera("runs", "--status", "done")
    assert wrong.code == 2 and ("--status 'done': choose one of running, finished, interrupted, failed, crashed, "
                                "unreadable") in wrong.err


def test_the_targets_column_names_the_default_preset_and_nothing_for_full_or_head(vera, tmp_path):
    fake_run(tmp_path / "runs", "default")  # adapter.targets [], as every run adapted without --target records
    fake_run(tmp_path / "runs", "head", method="head")
    table = vera("runs")
    assert table.code == 0, table.err
    # name kind status created (a date and a time) base method rank targets ...
    cells = {line.split()[0]: line.split()[6:9] for line in table.out.splitlines()[3:]}
    assert cells == {"default": ["vera", "8", "linear"], "head": ["head", "-", "-"]}
    assert {row["name"]: row["targets"] for row in vera("runs", "--json").json()} == {"default": [], "head": None}


def test_unreadable_runs_are_listed_not_fatal(vera, tmp_path):
    root = tmp_path / "runs"
    fake_run(root, "good")
    (fake_run(root, "bad-status") / "status.json").write_text("{not json")
    (fake_run(root, "no-summary") / "summary.json").unlink()
    (fake_run(root, "no-meta") / "adapter.json").unlink()
    (root / "stray").mkdir()
    experiment = fake_run(root, "exp", kind="experiment", status="running")
    fake_run(experiment, "adapt")
    result = vera("runs", "--json")
    assert result.code == 0, result.err
    rows = {row["name"]: (row["status"], row["problem"]) for row in result.json()}
    assert rows == {"bad-status": ("unreadable", "status.json: corrupted"), "exp": ("running", None),
                    "exp/adapt": ("finished", None), "good": ("finished", None),
                    "no-summary": ("unreadable", "summary.json: missing"), "stray": ("unreadable", "status.json: missing"),
                    "no-meta": ("unreadable", "adapter.json: missing")}
    table = vera("runs", "--status", "unreadable")
    assert table.code == 0 and "4 run(s)" in table.out
    assert "unreadable: no-summary: summary.json: missing" in table.out.splitlines()


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    change(data)
    path.write_text(json.dumps(data) if path.suffix == ".json" else yaml.safe_dump(data))


@pytest.mark.parametrize("file, change, problem", [
    ("status.json", lambda d: d.update(created=5), "status.json: created is 5, not a string"),
    ("status.json", lambda d: d.update(kind={"a": 1}), "status.json: kind is {'a': 1}, not one of pretrain, adapt, "
                                                       "compare, experiment"),
    ("status.json", lambda d: d.pop("status"), "status.json: status is None, not one of running, finished, "
                                               "interrupted, failed"),
    ("status.json", lambda d: d.update(wall_seconds=float("nan")), "status.json: wall_seconds is nan, not a number of "
                                                                   "seconds"),
    ("status.json", lambda d: d.update(pid=2**70), "status.json: pid is 1180591620717411303424, not a process id"),
    ("adapter.json", lambda d: d.update(classes=["cat", 3]), "adapter.json: classes is ['cat', 3], not a list of strings"),
    ("adapter.json", lambda d: d["adapter"].update(rank=True), "adapter.json: adapter.rank is True, not a positive integer"),
    ("summary.json", lambda d: d["test"].update(task=1.5), "summary.json: test.task is 1.5, not a rate from 0 to 1"),
    ("summary.json", lambda d: d.update(test=[0.5]), "summary.json: test is [0.5], not a mapping"),
    ("summary.json", lambda d: d.update(wall_seconds="12s"), "summary.json: wall_seconds is '12s', not a number of seconds"),
])
def test_a_value_of_the_wrong_kind_makes_the_run_unreadable_naming_it(vera, tmp_path, file, change, problem):
    fake_run(tmp_path / "runs", "good")
    _edit(fake_run(tmp_path / "runs", "edited") / file, change)
    for args in ((), ("--sort", "created"), ("--sort", "task"), ("--classes", "cat")):
        result = vera("runs", "--json", *args)
        assert result.code == 0, result.err
    rows = {row["name"]: row for row in vera("runs", "--json").json()}
    assert (rows["edited"]["status"], rows["edited"]["problem"]) == ("unreadable", problem)
    assert rows["good"]["status"] == "finished"
    assert f"unreadable: edited: {problem}" in vera("runs").out.splitlines()


def test_a_running_run_whose_config_holds_the_wrong_kind_of_value_is_unreadable(vera, tmp_path):
    run = fake_run(tmp_path / "runs", "live", status="running", pid=os.getpid())
    _edit(run / "config.yaml", lambda d: d.update(classes="cat"))
    rows = vera("runs", "--json").json()
    assert (rows[0]["status"], rows[0]["problem"]) == ("unreadable", "config.yaml: classes is 'cat', not a list of strings")


def test_rm_refuses_running_runs_and_removes_with_yes(vera, tmp_path):
    root = tmp_path / "runs"
    live = fake_run(root, "live", status="running", pid=os.getpid())
    no_pid = fake_run(root, "no-pid", status="running")
    done = fake_run(root, "done")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    crashed = fake_run(root, "crashed", status="running", pid=dead.pid)

    for running in (live, no_pid):
        refused = vera("runs", "rm", str(done), str(running), "--yes")
        assert refused.code == 2 and f"refusing to remove running run(s): {running}" in refused.err
    assert done.is_dir()
    not_a_run = vera("runs", "rm", str(tmp_path), "--yes")
    assert not_a_run.code == 2 and "is not a run directory" in not_a_run.err
    unconfirmed = vera("runs", "rm", str(done))  # stdin is not a terminal under pytest
    assert unconfirmed.code == 2 and "add --yes" in unconfirmed.err and done.is_dir()

    removed = vera("runs", "rm", str(done), str(crashed), "--yes")
    assert removed.code == 0, removed.err
    assert "removed 2 run(s)" in removed.err
    assert sorted(p.name for p in root.iterdir()) == ["live", "no-pid"]


def _statuses(vera, *args) -> dict[str, str]:
    listed = vera("runs", "--json", *args)
    assert listed.code == 0, listed.err
    return {row["name"]: row["status"] for row in listed.json()}


def _holder(run: Path, pid: int, start) -> None:
    (run / HOLDER_FILE).write_text(json.dumps({"pid": pid, "start": start}))


def test_a_running_run_whose_process_is_gone_is_listed_as_crashed_and_can_be_removed(vera, tmp_path):
    root = tmp_path / "runs"
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    (fake_run(root, "free-lock", status="running") / LOCK_FILE).touch()  # the kernel dropped a killed writer's lock
    _holder(fake_run(root, "holder-gone", status="running"), ended.pid, None)  # no lock here: the holder file tells
    _holder(fake_run(root, "holder-here", status="running"), os.getpid(), process_start(os.getpid()))
    live = fake_run(root, "live", status="running")
    fake_run(root, "untold", status="running")  # neither a lock nor a process recorded: taken at its word
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from vera_cli.runlock import RunLock; lock = RunLock.acquire(Path(sys.argv[1])); "
                               "print('locked', flush=True); time.sleep(60)", str(live)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        assert _statuses(vera) == {"free-lock": "crashed", "holder-gone": "crashed", "holder-here": "running",
                                   "live": "running", "untold": "running"}
        assert "crashed" in next(line for line in vera("runs").out.splitlines() if line.startswith("free-lock "))
        assert list(_statuses(vera, "--status", "crashed")) == ["free-lock", "holder-gone"]
        refused = vera("runs", "rm", str(root / "free-lock"), str(live), "--yes")
        assert refused.code == 2 and f"refusing to remove running run(s): {live}" in refused.err
        assert vera("runs", "rm", str(root / "free-lock"), "--yes").code == 0
        cleaned = vera("runs", "clean", "--crashed", "--yes")
        assert cleaned.code == 0 and "holder-gone  adapt, crashed" in cleaned.err
        assert sorted(p.name for p in root.iterdir()) == ["holder-here", "live", "untold"]
        assert _statuses(vera)["live"] == "running"  # looking did not take its lock away
    finally:
        holder.kill()
        holder.wait()
    assert _statuses(vera)["live"] == "crashed"


@pytest.mark.skipif(process_start(os.getpid()) is None, reason="needs process start times (/proc)")
def test_a_holder_pid_given_to_a_later_process_is_not_taken_for_the_writer(vera, tmp_path):
    run = fake_run(tmp_path / "runs", "reused", status="running")
    _holder(run, os.getpid(), str(int(process_start(os.getpid())) - 1))  # this pid, but a process started earlier
    assert _statuses(vera) == {"reused": "crashed"}
    _holder(run, os.getpid(), process_start(os.getpid()))
    assert _statuses(vera) == {"reused": "running"}


def test_rm_of_a_link_removes_the_link_and_never_what_it_points_to(vera, tmp_path):
    root = tmp_path / "runs"
    inside, outside = fake_run(root, "real"), fake_run(tmp_path / "elsewhere", "kept")
    (root / "alias").symlink_to(inside.resolve())
    (root / "outside").symlink_to(outside.resolve())
    before = {p: sorted(q.name for q in p.iterdir()) for p in (inside, outside)}
    removed = vera("runs", "rm", str(root / "alias"), str(root / "outside"), "--yes")
    assert removed.code == 0, removed.err
    assert f"a link to {outside.resolve()}: only the link goes" in removed.err and "removed 2 run(s), 0 bytes" in removed.err
    assert sorted(p.name for p in root.iterdir()) == ["real"]  # nothing half-renamed left beside it
    assert {p: sorted(q.name for q in p.iterdir()) for p in (inside, outside)} == before


def test_rm_of_one_run_named_twice_removes_it_once(vera, tmp_path):
    done = fake_run(tmp_path / "runs", "done")
    removed = vera("runs", "rm", str(done), f"{done}/", "runs/./done", "runs/done/../done", "--yes")
    assert removed.code == 0, removed.err
    assert "removed 1 run(s)" in removed.err and not done.exists()
    assert list((tmp_path / "runs").iterdir()) == []


def test_rm_refuses_the_run_it_is_run_from(vera, tmp_path, monkeypatch):
    fake_run(tmp_path / "runs", "here")
    monkeypatch.chdir(tmp_path / "runs" / "here")
    for name in (".", str(tmp_path / "runs" / "here")):
        result = vera("runs", "rm", name, "--yes")
        assert result.code == 2 and "holds the current folder: change to a folder outside it" in result.err, result.err
    assert (tmp_path / "runs" / "here" / "status.json").is_file()


def test_rm_refuses_a_run_that_is_part_of_another_run(vera, tmp_path):
    root = tmp_path / "runs"
    comparison = fake_run(root, "cmp", kind="compare")
    row = fake_run(comparison / "rows", "vera-r4-replay-s0")
    experiment = fake_run(root, "exp", kind="experiment")
    inner = fake_run(experiment, "pretrain", kind="pretrain")
    for part, whole in ((row, comparison), (inner, experiment)):
        refused = vera("runs", "rm", str(part), "--yes")
        assert refused.code == 2 and refused.err.count("\n") == 1, refused.err
        assert f"{part} is part of the run {whole}" in refused.err and f"vera runs rm {whole}" in refused.err
        assert (part / "status.json").is_file()
    assert vera("runs", "rm", str(comparison), "--yes").code == 0 and not comparison.exists()


def test_rm_refuses_a_base_that_other_runs_use_unless_they_go_with_it(vera, tmp_path, monkeypatch):
    root = tmp_path / "runs"
    base = fake_run(root, "base", kind="pretrain")
    adapted = fake_run(root, "adapted")  # fake runs record runs/base, from tmp_path
    comparison = fake_run(root, "cmp", kind="compare")
    other = fake_run(root, "other-base", kind="pretrain")
    refused = vera("runs", "rm", "runs/base", "--yes")
    assert refused.code == 2 and refused.err.count("\n") == 1, refused.err
    assert "runs/base is the base of runs/adapted, runs/cmp" in refused.err
    assert "vera runs rm runs/base runs/adapted runs/cmp" in refused.err
    assert vera("runs", "rm", str(base), str(adapted), "--yes").code == 2  # by any name; the comparison still uses it
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # runs/base is not found from here, but beside runs/ where vera ran
    assert vera("runs", "rm", "../runs/base", "--yes").code == 2
    monkeypatch.chdir(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["adapted", "base", "cmp", "other-base"]
    assert vera("runs", "rm", str(other), "--yes").code == 0
    (root / "alias").symlink_to(base.resolve())
    assert vera("runs", "rm", "runs/alias", "--yes").code == 0 and base.is_dir()
    removed = vera("runs", "rm", "runs/base", "runs/adapted", str(comparison), "--yes")
    assert removed.code == 0 and "removed 3 run(s)" in removed.err, removed.err
    assert list(root.iterdir()) == []


def test_clean_removes_only_failed_runs(vera, tmp_path):
    root = tmp_path / "runs"
    for name, state in (("f1", "failed"), ("f2", "failed"), ("i", "interrupted"), ("ok", "finished")):
        fake_run(root, name, status=state)
    nothing = vera("runs", "clean", "--yes")
    assert nothing.code == 2 and "say what to clean" in nothing.err
    result = vera("runs", "clean", "--failed", "--yes")
    assert result.code == 0, result.err
    assert sorted(p.name for p in root.iterdir()) == ["i", "ok"]
    again = vera("runs", "clean", "--failed", "--yes")
    assert again.code == 0 and "no failed runs under runs" in again.err
    (fake_run(root, "bad") / "status.json").write_text("{")
    (root / "notes").mkdir()  # not a run: no status.json
    unreadable = vera("runs", "clean", "--unreadable", "--yes")
    assert unreadable.code == 0, unreadable.err
    assert sorted(p.name for p in root.iterdir()) == ["i", "notes", "ok"]


def test_listing_imports_no_torch(tmp_path):
    fake_run(tmp_path / "runs", "one")
    code = ("import sys; from vera_cli import cli; code = cli.run(['runs', '--runs-dir', sys.argv[1]]); "
            "print('torch' in sys.modules, code)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "runs")], capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.strip().splitlines()[-1] == "False 0", done.stderr


class Terminal(io.StringIO):
    """Typed answers on a stdin that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("answer, code, kept", [("n\n", 1, True), ("y\n", 0, False)])
def test_rm_asks_at_a_terminal(vera, tmp_path, monkeypatch, answer, code, kept):
    run = fake_run(tmp_path / "runs", "done")
    monkeypatch.setattr("sys.stdin", Terminal(answer))
    result = vera("runs", "rm", str(run))
    assert result.code == code and "remove these 1 run(s)?" in result.err
    assert run.is_dir() == kept and ("nothing removed" in result.err) == kept
