"""`vera runs`: one table of the run directories under a folder, and safe removal of runs.

Only each run's small files are read (status.json, summary.json, and adapter.json or
config.yaml), never weights, and torch is not imported: reading 112 runs took 0.08 s.
A run whose files cannot be read is listed as unreadable, with the reason. A run marked running whose
process has died (its lock is free, or its recorded process is gone) is listed as crashed: it can be
resumed or removed.
"""

from __future__ import annotations

import json
import math
import os
import reprlib
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from vera_cli.adapters.config import DEFAULT_TARGETS
from vera_cli.errors import VeraError
from vera_cli.files import unused_name
from vera_cli.runlock import owner_alive, process_alive
from vera_cli.runs import STATUS_FILE

UNREADABLE = "unreadable"
CRASHED = "crashed"  # marked running, but its process is gone (killed, or the machine went down)
KINDS = ("pretrain", "adapt", "compare", "experiment")
STATES = ("running", "finished", "interrupted", "failed", CRASHED, UNREADABLE)
# adapter_files.META_FILE, named here because that module imports torch.
ADAPTER_META_FILE = "adapter.json"
# Where each kind's config keeps the adapter settings and classes, and its summary the test report.
CONFIG_SECTION = {"adapt": "", "experiment": "adapt.", "compare": ""}
REPORT_KEY = {"pretrain": "test", "adapt": "test", "experiment": "adapted"}
METRICS = ("overall", "chosen", "task", "rest")
# Sorting by these puts the largest first: the best run or the slowest one is what one looks for.
DESCENDING = (*METRICS, "wall_seconds")
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass
class RunEntry:
    """One row of the runs table; None where the run does not have the value (yet)."""

    path: Path
    name: str
    kind: Optional[str] = None
    status: str = UNREADABLE
    created: Optional[str] = None
    base: Optional[str] = None
    method: Optional[str] = None
    rank: Optional[int] = None
    targets: Optional[list[str]] = None
    classes: Optional[list[str]] = None
    overall: Optional[float] = None
    chosen: Optional[float] = None
    task: Optional[float] = None
    rest: Optional[float] = None
    tta: Optional[str] = None  # how its test accuracies were measured: "flip" averages each image with its mirror
    wall_seconds: Optional[float] = None
    pid: Optional[int] = None
    problem: Optional[str] = None
    created_ns: Optional[int] = None  # orders runs created within one second (`created` shows seconds)

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def _read_mapping(path: Path, parse) -> dict[str, Any]:
    with path.open("rb") as handle:
        value = parse(handle)
    if not isinstance(value, dict):
        raise ValueError("not a mapping")
    return value


def _dig(mapping: dict[str, Any], dotted: str) -> Any:
    node: Any = mapping
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


class _BadValue(ValueError):
    """A file that parses but holds a value of the wrong kind: named in the run's problem."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_texts(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


# What a value the table shows must be: (description, test). Anything else makes the run unreadable.
TEXT = ("a string", lambda v: isinstance(v, str))
TEXTS = ("a list of strings", _is_texts)
SECONDS = ("a number of seconds", lambda v: _is_number(v) and v >= 0)
RATE = ("a rate from 0 to 1", lambda v: _is_number(v) and 0 <= v <= 1)
RANK = ("a positive integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1)
PID = ("a process id", lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 < v < 2**31)
# What a status.json may say; crashed and unreadable are what the table concludes, never recorded.
RECORDED_STATES = tuple(state for state in STATES if state not in (CRASHED, UNREADABLE))


def _one_of(choices: tuple[str, ...]) -> tuple[str, Any]:
    return f"one of {', '.join(choices)}", lambda v: v in choices


def _typed(value: Any, key: str, expected: tuple[str, Any], required: bool = False) -> Any:
    """`value` (found at `key`) when it is what the table expects (or absent, unless `required`)."""
    if value is None and not required:
        return None
    if value is None or not expected[1](value):
        raise _BadValue(f"{key} is {reprlib.repr(value)}, not {expected[0]}")
    return value


def read_entry(path: Path, root: Path) -> RunEntry:
    """What the run at `path` says about itself; a damaged file makes it unreadable, not an error."""
    entry = RunEntry(path, str(path.relative_to(root)))
    try:
        status = _read_mapping(path / STATUS_FILE, json.load)
        kind = _typed(status.get("kind"), "kind", _one_of(KINDS), required=True)
        state = _typed(status.get("status"), "status", _one_of(RECORDED_STATES), required=True)
        created = _typed(status.get("created"), "created", TEXT)
        wall_seconds = _typed(status.get("wall_seconds"), "wall_seconds", SECONDS)
        pid = _typed(status.get("pid"), "pid", PID)
    except (OSError, ValueError) as exc:
        entry.problem = f"{STATUS_FILE}: {_reason(exc)}"
        return entry
    entry.kind, entry.status, entry.created, entry.wall_seconds, entry.pid = kind, state, created, wall_seconds, pid
    entry.created_ns = status.get("created_ns") if isinstance(status.get("created_ns"), int) else None
    if entry.status == "running" and _owner_gone(entry):
        entry.status = CRASHED
    finished_adapter = entry.kind == "adapt" and entry.status == "finished"
    settings_file = ADAPTER_META_FILE if finished_adapter else "config.yaml"
    try:
        if finished_adapter:
            # Its adapter.json holds the same settings as JSON, which reads ten times faster than YAML.
            meta = _read_mapping(path / settings_file, json.load)
            config = {"base": meta.get("base_run"), "classes": meta.get("classes"), "adapter": meta.get("adapter")}
        elif entry.kind != "pretrain":
            config = _read_mapping(path / settings_file, lambda handle: yaml.load(handle, Loader=_Loader))
        else:
            config = {}  # nothing in the table comes from a pretrain config
        _fill_from_config(entry, config)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        # A run killed between its status and its config has no config yet; that is not damage.
        if entry.status not in ("running", CRASHED) or isinstance(exc, _BadValue):
            entry.status, entry.problem = UNREADABLE, f"{settings_file}: {_reason(exc)}"
        return entry
    if entry.status == "finished":
        try:
            _fill_from_summary(entry, _read_mapping(path / "summary.json", json.load))
        except (OSError, ValueError) as exc:
            entry.status, entry.problem = UNREADABLE, f"summary.json: {_reason(exc)}"
    return entry


def _reason(exc: Exception) -> str:
    if isinstance(exc, FileNotFoundError):
        return "missing"
    if isinstance(exc, _BadValue):
        return str(exc)
    return "corrupted" if isinstance(exc, (ValueError, yaml.YAMLError)) else type(exc).__name__


def _fill_from_config(entry: RunEntry, config: dict[str, Any]) -> None:
    """The table's settings from a run's config (or adapter.json); a value of the wrong kind raises _BadValue
    before any is set."""
    def value(key: str, expected: tuple[str, Any]) -> Any:
        return _typed(_dig(config, key), key, expected)

    base = value("base", TEXT)
    if entry.kind not in CONFIG_SECTION:
        entry.base = base
        return
    section = CONFIG_SECTION[entry.kind]
    classes = value(f"{section}classes", TEXTS)
    if entry.kind == "compare":
        entry.base, entry.classes = base, classes
        entry.method = ",".join(value("methods", TEXTS) or []) or None
        return
    method = value(f"{section}adapter.method", TEXT)
    rank = value(f"{section}adapter.rank", RANK) if method not in ("full", "head") else None
    targets = value(f"{section}adapter.targets", TEXTS) if method not in ("full", "head") else None
    entry.base, entry.classes, entry.method, entry.rank, entry.targets = base, classes, method, rank, targets


def _fill_from_summary(entry: RunEntry, summary: dict[str, Any]) -> None:
    wall_seconds, base = _typed(summary.get("wall_seconds"), "wall_seconds", SECONDS), _typed(summary.get("base_run"),
                                                                                            "base_run", TEXT)
    key = REPORT_KEY.get(entry.kind or "", "")
    report = _typed(summary.get(key), key, ("a mapping", lambda v: isinstance(v, dict)))
    # Summaries written before tta was recorded were measured on the images alone.
    metrics = {metric: _typed(report.get(metric), f"{key}.{metric}", RATE) for metric in METRICS} if report else {}
    tta = _typed(summary.get("tta", "none"), "tta", TEXT) if report else None
    entry.wall_seconds = entry.wall_seconds if wall_seconds is None else wall_seconds
    entry.base = base or entry.base
    for metric, rate in metrics.items():
        setattr(entry, metric, rate)
    entry.tta = tta


def find_runs(root: Path) -> list[RunEntry]:
    """The runs in `root` and one level below it (an experiment's pretrain/ and adapt/), in name order.

    A top-level folder with neither a status.json nor runs inside is listed as unreadable.
    """
    if not root.is_dir():
        raise VeraError(f"{root} is not a folder: pass the folder that holds your runs with --runs-dir")
    entries = []
    for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        inner = sorted(child for child in path.iterdir() if (child / STATUS_FILE).is_file())
        if (path / STATUS_FILE).exists() or not inner:
            entries.append(read_entry(path, root))
        entries.extend(read_entry(child, root) for child in inner)
    return entries


def select(entries: list[RunEntry], kind: Optional[str] = None, status: Optional[str] = None,
           classes: Optional[list[str]] = None) -> list[RunEntry]:
    """Runs of `kind`, in `status`, trained on (at least) all of `classes`."""
    for option, value, choices in (("--kind", kind, KINDS), ("--status", status, STATES)):
        if value is not None and value not in choices:
            raise VeraError(f"{option} {value!r}: choose one of {', '.join(choices)}")
    return [e for e in entries
            if (kind is None or e.kind == kind) and (status is None or e.status == status)
            and (not classes or set(classes) <= set(e.classes or []))]


SORT_KEYS = tuple(f.name for f in fields(RunEntry) if f.name not in ("path", "pid", "problem", "created_ns"))


def sort_entries(entries: list[RunEntry], key: str, reverse: bool = False) -> list[RunEntry]:
    """Sorted by `key`; runs without a value go last either way."""
    if key not in SORT_KEYS:
        raise VeraError(f"cannot sort by {key!r}: choose one of {', '.join(SORT_KEYS)}")
    present = [e for e in entries if getattr(e, key) is not None]
    missing = [e for e in entries if getattr(e, key) is None]
    descending = (key in DESCENDING) != reverse
    order = (lambda e: (e.created, e.created_ns or 0)) if key == "created" else (lambda e: _sortable(getattr(e, key)))
    return sorted(present, key=order, reverse=descending) + missing


def _sortable(value: Any) -> Any:
    return ",".join(map(str, value)) if isinstance(value, list) else value


def _owner_gone(entry: RunEntry) -> bool:
    """Whether the process of a run marked running is known to be gone: its lock is free, or the process
    recorded as holding it (or in its status) has ended. A run that cannot tell is taken at its word:
    removing a live run is worse than asking the user to remove a dead one by hand."""
    alive = owner_alive(entry.path)
    if alive is None:
        alive = process_alive(entry.pid)
    return alive is False


def runs_to_remove(paths: list[str]) -> list[RunEntry]:
    """The runs at `paths`, checked: each is a run directory of its own (not a comparison's row or an experiment's
    part) and none is running; a run named twice is taken once. Nothing is removed."""
    entries, seen = [], set()
    for name in paths:
        path = Path(name)
        if not (path / STATUS_FILE).exists():
            raise VeraError(f"{path} is not a run directory (no {STATUS_FILE}); vera removes only runs it made")
        where = Path(os.path.abspath(path))  # `..` taken away first: runs/a/../b is not inside runs/a
        # Its comparison or experiment reads it again (vera report, --resume), and would be left damaged.
        whole = next((parent for parent in where.parents if (parent / STATUS_FILE).is_file()), None)
        if whole is not None:
            shown = whole if path.is_absolute() else os.path.relpath(whole)
            raise VeraError(f"{path} is part of the run {shown}: remove that run whole, vera runs rm {shown}")
        here = Path(os.path.abspath(os.getcwd()))
        if where == here or where in here.parents:
            # The system refuses to remove a folder a process works in with a bare 'Device or resource busy'.
            raise VeraError(f"{path} holds the current folder: change to a folder outside it, then remove it")
        if where not in seen:
            seen.add(where)
            entries.append(read_entry(path, path.parent))
    running = [str(e.path) for e in entries if e.status == "running"]
    if running:
        raise VeraError(f"refusing to remove running run(s): {', '.join(running)}; stop them first "
                        f"(a run whose process has died is listed as {CRASHED} and can be removed)")
    _refuse_used_bases(entries, seen)
    return entries


def _refuse_used_bases(entries: list[RunEntry], removed: set[Path]) -> None:
    """Refuse to remove a base that a run beside it, staying, was trained on: that run could no longer be
    evaluated, resumed or reported. Runs record their base as named from the folder they ran in (runs/base):
    it is looked for from here and from the folder that holds the runs folder, where vera usually runs."""
    for entry in entries:
        if entry.kind != "pretrain" or entry.path.is_symlink():  # a link goes alone, the base stays
            continue
        target, home = os.path.realpath(entry.path), Path(os.path.abspath(entry.path)).parent.parent
        users = [str(other.path) for other in find_runs(entry.path.parent)
                 if other.base is not None and target in {os.path.realpath(other.base), os.path.realpath(home / other.base)}
                 and not {Path(os.path.abspath(other.path)), *Path(os.path.abspath(other.path)).parents} & removed]
        if users:
            raise VeraError(f"{entry.path} is the base of {', '.join(users)}: remove them with it, "
                            f"vera runs rm {' '.join([str(entry.path), *users])}, or keep it")


def runs_in_state(root: Path, statuses: tuple[str, ...]) -> list[RunEntry]:
    """Top-level runs under `root` in one of `statuses` (an experiment's inner runs go with it).

    A folder without a status.json is not one vera made, so it is never among them.
    """
    return [e for e in find_runs(root) if e.status in statuses and len(e.path.relative_to(root).parts) == 1
            and (e.path / STATUS_FILE).exists()]


def directory_bytes(path: Path) -> int:
    """What removing `path` frees: nothing for a link, which goes without what it points to."""
    return 0 if path.is_symlink() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def remove(entries: list[RunEntry]) -> None:
    """Each run is first renamed out of sight, so an interrupted removal never leaves half a run that looks whole.
    A link to a run is removed itself, never what it points to (another run, or a folder vera did not make)."""
    for entry in entries:
        if entry.path.is_symlink():
            entry.path.unlink()
            continue
        hidden = unused_name(entry.path.parent, f".removing-{entry.path.name}-")
        os.replace(entry.path, hidden)
        shutil.rmtree(hidden)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2%}"
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


COLUMNS = ("name", "kind", "status", "created", "base", "method", "rank", "targets", "classes", *METRICS, "tta",
           "wall_seconds")
RIGHT_ALIGNED = (*METRICS, "rank", "wall_seconds")


def runs_table(entries: list[RunEntry], root: Path) -> str:
    """The table `vera runs` prints, as plain aligned text with the unreadable runs' reasons below it.

    Hand-aligned rather than a rich Table: rich measures every cell and took two thirds of a
    second for a hundred runs, longer than reading them.
    """
    rows = [["wall" if key == "wall_seconds" else key for key in COLUMNS]]
    rows += [[_cell(_shown(entry, key, root)) for key in COLUMNS] for entry in entries]
    widths = [max(len(row[index]) for row in rows) for index in range(len(COLUMNS))]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.rjust(width) if key in RIGHT_ALIGNED else cell.ljust(width)
                         for key, cell, width in zip(COLUMNS, cells, widths)).rstrip()

    lines = [f"{len(entries)} run(s) under {root}", line(rows[0]), line(["-" * width for width in widths])]
    lines += [line(row) for row in rows[1:]]
    lines += [f"unreadable: {entry.name}: {entry.problem}" for entry in entries if entry.problem]
    return "\n".join(lines)


def _shown(entry: RunEntry, key: str, root: Path) -> Any:
    value = getattr(entry, key)
    if value is None:
        return None
    # No targets means the default preset, not `all` (which adds the convolutions).
    if key == "targets" and value == []:
        return ",".join(DEFAULT_TARGETS)
    if key == "created":
        return value.replace("T", " ")[:16]
    if key == "base":
        return _relative(value, root)
    if key == "wall_seconds":
        return f"{value:.0f}s"
    return value


def _relative(path: str, root: Path) -> str:
    """A base under the listed folder by its name in the table, as the name column shows it."""
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path
