"""An adapt run's adapter on disk: the trained tensors (safetensors) plus JSON metadata.

The adapters package turns an adapter into tensors and metadata and back
(`vera_cli.adapters.state`); this module adds what belongs to the application:
atomic files inside a run, a format version, and the fingerprint of the base model
the adapter was trained on.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from vera_cli import config as config_module
from vera_cli.adapters.config import AdapterConfig
from vera_cli.adapters.errors import AdapterError
from vera_cli.adapters.state import adapter_metadata, adapter_tensors, load_adapter
from vera_cli.errors import VeraError
from vera_cli.files import read_json, read_tensors, write_json, write_tensors

ADAPTER_FILE = "adapter.safetensors"
META_FILE = "adapter.json"
FORMAT_VERSION = 1


def save_adapter(folder: Path, model: nn.Module, spec: AdapterConfig, base_fingerprint: str,
                 extra: dict[str, Any]) -> int:
    """Write the adapter into `folder`; returns the tensor file's size in bytes."""
    size = write_tensors(folder / ADAPTER_FILE, adapter_tensors(model, spec))
    write_json(folder / META_FILE, {"format": FORMAT_VERSION, **adapter_metadata(model, spec),
                                    "base_fingerprint": base_fingerprint, **extra})
    return size


# What an adapter.json must hold, and of which type, before anything reads it.
META_FIELDS = {"adapter": dict, "base_fingerprint": str, "base_run": str, "classes": list}


def read_adapter_meta(folder: Path) -> dict[str, Any]:
    path = folder / META_FILE
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise VeraError(f"{path} is damaged (not a mapping); repeat the adapt run that wrote it")
    if meta.get("format") != FORMAT_VERSION:
        raise VeraError(f"{path} has format {meta.get('format')!r}; this vera-cli reads format {FORMAT_VERSION}")
    wrong = [key for key, kind in META_FIELDS.items() if not isinstance(meta.get(key), kind)]
    if wrong or not all(isinstance(name, str) for name in meta["classes"]):
        raise VeraError(f"{path} is damaged ({', '.join(wrong) or 'classes'} missing or of the wrong type); "
                        "repeat the adapt run that wrote it")
    try:
        # Every value checked as a config's are: the adapters package trusts the settings it is given.
        spec = config_module.build(AdapterConfig, meta["adapter"], "adapter.")
    except VeraError as exc:
        raise VeraError(f"{path} is damaged ({exc}); repeat the adapt run that wrote it") from exc
    return {**meta, "adapter": dataclasses.asdict(spec)}


def apply_adapter(model: nn.Module, folder: Path, base_fingerprint: str, name: str | None = None) -> dict[str, Any]:
    """Load the adapter stored in `folder` into a fresh copy of its base model, or beside the adapters the
    model carries under `name` (`base_fingerprint`: the base's, taken before any adapter was added)."""
    meta = read_adapter_meta(folder)
    if meta["base_fingerprint"] != base_fingerprint:
        raise VeraError(f"the adapter in {folder} was trained on another base model (its base run was "
                        f"{meta.get('base_run')}); apply it to that base")
    try:
        load_adapter(model, meta, read_tensors(folder / ADAPTER_FILE), name)
    except AdapterError as exc:
        raise VeraError(f"cannot apply the adapter in {folder}: {exc}") from exc
    return meta
