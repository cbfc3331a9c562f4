"""Files written whole or not at all, and read back with a clear error for anything damaged.

Every file is written to a temporary name and renamed into place, so a reader never
sees half a file; readers refuse oversized, binary, truncated or non-finite content
with a one-line reason instead of a traceback.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from vera_cli.errors import VeraError

if TYPE_CHECKING:
    import torch

# A run's JSON and YAML files are small; anything larger is not one of them and is not read into memory.
MAX_TEXT_BYTES = 16 * 2**20


def unused_name(parent: Path, prefix: str) -> Path:
    """A name no file has under `parent`, chosen before anything is created.

    Created inside a `try` whose cleanup removes it by this name, a temporary file or folder goes
    even when Ctrl-C lands between its creation and the `try` (mkstemp and mkdtemp leave that gap).
    """
    while True:
        candidate = parent / f"{prefix}{secrets.token_hex(4)}"
        if not os.path.lexists(candidate):
            return candidate


def blocking_file(path: Path) -> Path | None:
    """The file that sits where a folder above `path` must be made, if any: creating `path` would fail there
    with the system's bare 'File exists' or 'Not a directory'."""
    return next((parent for parent in Path(path).parents if parent.exists() and not parent.is_dir()), None)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = unused_name(path.parent, f".{path.name}.{os.getpid()}-")  # the pid: no other live process picks it
    try:
        with open(tmp, "xb") as handle:  # "x": never an existing file; the umask decides who reads it
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, payload: Any) -> None:
    write_bytes_atomic(path, (json.dumps(payload, indent=2) + "\n").encode())


def yaml_bytes(payload: Any) -> bytes:
    return yaml.safe_dump(payload, sort_keys=False).encode()


def write_yaml(path: Path, payload: Any) -> None:
    write_bytes_atomic(path, yaml_bytes(payload))


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Save as safetensors (no pickle: loading runs no code); returns the file size in bytes."""
    # torch is imported where tensors are touched: `vera runs` and completion read runs without it.
    from safetensors.torch import save

    data = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=metadata)
    write_bytes_atomic(path, data)
    return len(data)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file whose every float is finite: weights with NaN or Inf would give meaningless numbers."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise VeraError(f"{path} is missing: the run is incomplete; repeat it")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise VeraError(f"{path} is truncated or corrupted ({exc}); repeat the run that wrote it") from exc
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise VeraError(f"{path} holds NaN or infinite values (in {bad}): the run that wrote it diverged "
                        "or the file was damaged; repeat that run")
    return tensors


def first_nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first float tensor holding NaN or Inf, if any."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            return name
    return None


def read_text(path: Path) -> str:
    """A small text file of a run; a missing, oversized or binary one is a clear error."""
    if not path.is_file():
        raise VeraError(f"{path} is missing: the run is incomplete; repeat it")
    if path.stat().st_size > MAX_TEXT_BYTES:
        raise VeraError(f"{path} is {path.stat().st_size:,} bytes, far more than vera writes there: it is not a "
                        "file of this run; repeat the run that wrote it")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise VeraError(f"{path} is not text (byte {exc.start} is not UTF-8); repeat the run that wrote it") from exc


def read_json(path: Path) -> Any:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise VeraError(f"{path} is corrupted (invalid JSON at line {exc.lineno}); repeat the run that wrote it") from exc
    except RecursionError as exc:
        raise VeraError(f"{path} is corrupted (nested too deeply); repeat the run that wrote it") from exc


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file. A last line cut short (the process was killed while
    appending it) is dropped: that record is written again when its step is redone."""
    if not path.is_file():
        return []
    lines = read_text(path).splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            if number == len(lines):
                break
            raise VeraError(f"{path} is corrupted (line {number} is not JSON); repeat the run that wrote it") from None
        if not isinstance(record, dict):
            raise VeraError(f"{path} is corrupted (line {number} is not a record); repeat the run that wrote it")
        records.append(record)
    return records


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one line; a torn last line left by a killed process is cut off first."""
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            write_bytes_atomic(path, data[:data.rfind(b"\n") + 1])
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
