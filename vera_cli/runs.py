"""Run directories: created without overwriting, written atomically, found again.

A run directory holds `status.json` (kind, status, created), `config.yaml`,
its weights or adapter, `metrics.jsonl` and, once finished, `summary.json`.
Every file is written to a temporary name and renamed into place, so a reader
never sees half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import yaml

from vera_cli.errors import RunInterrupted, VeraError

if TYPE_CHECKING:
    import torch

RUNS_ROOT = Path("runs")
STATUS_FILE = "status.json"
CHECKPOINT_FILE = "checkpoint.pt"
_UMASK = os.umask(0)
os.umask(_UMASK)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        # mkstemp makes the file private; results are meant to be shared like any other file.
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, payload: Any) -> None:
    write_bytes_atomic(path, (json.dumps(payload, indent=2) + "\n").encode())


def write_yaml(path: Path, payload: Any) -> None:
    write_bytes_atomic(path, yaml.safe_dump(payload, sort_keys=False).encode())


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Save as safetensors (no pickle: loading runs no code); returns the file size in bytes."""
    # torch is imported where tensors are touched: `vera runs` and completion read runs without it.
    from safetensors.torch import save

    data = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=metadata)
    write_bytes_atomic(path, data)
    return len(data)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise VeraError(f"{path} is missing: the run is incomplete; repeat it")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise VeraError(f"{path} is truncated or corrupted ({exc}); repeat the run that wrote it") from exc


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise VeraError(f"{path} is missing: the run is incomplete; repeat it")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise VeraError(f"{path} is corrupted (invalid JSON at line {exc.lineno}); repeat the run that wrote it") from exc


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


@dataclass
class Run:
    path: Path

    @property
    def status(self) -> dict[str, Any]:
        return read_json(self.path / STATUS_FILE)

    @property
    def kind(self) -> str:
        return self.status["kind"]

    def set_status(self, state: str, **extra: Any) -> None:
        status = self.status
        status.update(status=state, updated=time.strftime("%Y-%m-%dT%H:%M:%S"), **extra)
        write_json(self.path / STATUS_FILE, status)

    def finish(self) -> None:
        """Mark the run finished; the resume checkpoint has served its purpose and is removed."""
        self.set_status("finished")
        self.file(CHECKPOINT_FILE).unlink(missing_ok=True)

    def file(self, name: str) -> Path:
        return self.path / name

    @contextlib.contextmanager
    def recording(self, resumable: bool = True) -> Iterator[None]:
        """Mark the run interrupted or failed if the body does not finish; the caller marks success.

        An interruption names the command that continues the run; a run that cannot
        resume passes on the message of the inner run that can.
        """
        try:
            yield
        except (KeyboardInterrupt, RunInterrupted) as exc:
            self.set_status("interrupted")
            if not resumable and isinstance(exc, RunInterrupted):
                raise
            kind = self.status.get("kind")
            hint = f"continue it with: vera {kind} --resume {self.path}" if resumable else "start it again"
            raise RunInterrupted(f"interrupted: {self.path} keeps what it completed; {hint}") from None
        except BaseException as exc:
            self.set_status("failed", error=str(exc))
            raise


def ensure_new(run_dir: str | None) -> None:
    """Refuse an explicit run directory that exists; called before any slow work starts."""
    if run_dir is not None and Path(run_dir).exists():
        raise VeraError(f"run directory {run_dir} already exists: choose another --run-dir or remove it")


def create_run(kind: str, run_dir: str | None) -> Run:
    """Make a fresh run directory; an explicit one that exists is refused, a default one gets a suffix."""
    ensure_new(run_dir)
    if run_dir is not None:
        path = Path(run_dir)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = RUNS_ROOT / f"{kind}-{stamp}"
        suffix = 2
        while path.exists():
            path = RUNS_ROOT / f"{kind}-{stamp}-{suffix}"
            suffix += 1
    try:
        path.mkdir(parents=True)
    except FileExistsError as exc:
        raise VeraError(f"run directory {path} already exists: choose another --run-dir or remove it") from exc
    run = Run(path)
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json(path / STATUS_FILE, {"kind": kind, "status": "running", "created": now, "created_ns": time.time_ns()})
    return run


def open_run(path: str | Path, kinds: tuple[str, ...] | None = None) -> Run:
    """A finished run of one of `kinds`; anything else is a clear error."""
    path = Path(path)
    if not (path / STATUS_FILE).is_file():
        raise VeraError(f"{path} is not a run directory (no {STATUS_FILE}); pass a directory made by vera, e.g. under {RUNS_ROOT}/")
    run = Run(path)
    status = run.status
    if kinds is not None and status.get("kind") not in kinds:
        kind = status.get("kind")
        article = "an" if str(kind)[:1] in "aeiou" else "a"
        raise VeraError(f"{path} is {article} {kind} run; this needs a {' or '.join(kinds)} run")
    if status.get("status") != "finished":
        raise VeraError(f"{path} is {status.get('status')}, not finished: resume or repeat it before using it")
    return run


def open_resumable(path: str | Path, kind: str) -> Run:
    """An unfinished run of `kind` that `--resume` can continue."""
    path = Path(path)
    if not (path / STATUS_FILE).is_file():
        raise VeraError(f"{path} is not a run directory (no {STATUS_FILE}): pass the run to resume")
    run = Run(path)
    status = run.status
    if status.get("kind") != kind:
        raise VeraError(f"{path} is a {status.get('kind')} run; resume it with vera {status.get('kind')} --resume")
    if status.get("status") == "finished":
        raise VeraError(f"{path} is already finished; there is nothing to resume")
    return run


def latest_run(kinds: tuple[str, ...] | None = None, root: Path = RUNS_ROOT) -> Run:
    """The most recently created finished run under `root` (searched two levels deep)."""
    found = []
    for status_path in list(root.glob(f"*/{STATUS_FILE}")) + list(root.glob(f"*/*/{STATUS_FILE}")):
        try:
            status = json.loads(status_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if status.get("status") == "finished" and (kinds is None or status.get("kind") in kinds):
            found.append((status.get("created_ns", 0), status_path.parent))
    if not found:
        wanted = " or ".join(kinds) if kinds else "finished"
        raise VeraError(f"no finished {wanted} run under {root}/: run `vera pretrain` first or name a run directory")
    return Run(max(found)[1])


def environment() -> dict[str, str]:
    """Versions and machine facts recorded with every run, so a figure can be traced to its setup."""
    import platform
    from importlib.metadata import version

    import torch

    from vera_cli import __version__

    return {
        "vera_cli": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        # Read from the package metadata: importing torchvision costs about 160 MB of memory.
        "torchvision": version("torchvision"),
        "platform": platform.platform(),
        "cpu_threads": str(torch.get_num_threads()),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
