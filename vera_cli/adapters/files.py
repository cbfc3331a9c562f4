"""Adapter files: only the trained tensors (safetensors) plus JSON metadata.

VeRA's projections are not stored by default: they are regenerated from
`projection_seed`, and a checksum of them is kept so that a regeneration that
differs (another torch build, say) is caught instead of giving wrong results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vera_cli import config as config_module
from vera_cli.adapters.inject import BANK_NAME, inject, load_trainable_state, projection_bank, trainable_state
from vera_cli.config import AdapterConfig
from vera_cli.errors import VeraError
from vera_cli.runs import read_json, read_tensors, write_json, write_tensors

ADAPTER_FILE = "adapter.safetensors"
META_FILE = "adapter.json"
FORMAT_VERSION = 1


def adapter_tensors(model: nn.Module, spec: AdapterConfig) -> dict[str, torch.Tensor]:
    tensors = dict(trainable_state(model))
    bank = projection_bank(model)
    if bank is not None and spec.store_projections:
        tensors.update({f"{BANK_NAME}.{name}": buf for name, buf in bank.named_buffers()})
    return tensors


def save_adapter(folder: Path, model: nn.Module, spec: AdapterConfig, base_fingerprint: str,
                 extra: dict[str, Any]) -> int:
    """Write the adapter into `folder`; returns the tensor file's size in bytes."""
    bank = projection_bank(model)
    size = write_tensors(folder / ADAPTER_FILE, adapter_tensors(model, spec))
    write_json(folder / META_FILE, {
        "format": FORMAT_VERSION,
        "adapter": config_module.to_dict(spec),
        "base_fingerprint": base_fingerprint,
        "projection_checksum": bank.checksum() if bank is not None else None,
        "torch": torch.__version__,
        **extra,
    })
    return size


def read_adapter_meta(folder: Path) -> dict[str, Any]:
    meta = read_json(folder / META_FILE)
    if meta.get("format") != FORMAT_VERSION:
        raise VeraError(f"{folder / META_FILE} has format {meta.get('format')}; this vera-cli reads format {FORMAT_VERSION}")
    return meta


def apply_adapter(model: nn.Module, folder: Path, base_fingerprint: str) -> dict[str, Any]:
    """Inject and load the adapter stored in `folder` into a fresh copy of its base model."""
    meta = read_adapter_meta(folder)
    if meta["base_fingerprint"] != base_fingerprint:
        raise VeraError(f"the adapter in {folder} was trained on another base model (its base run was "
                        f"{meta.get('base_run')}); apply it to that base")
    spec = config_module.build(AdapterConfig, meta["adapter"])
    inject(model, spec)
    tensors = read_tensors(folder / ADAPTER_FILE)
    bank = projection_bank(model)
    stored = {name[len(BANK_NAME) + 1:]: t for name, t in tensors.items() if name.startswith(BANK_NAME + ".")}
    if bank is not None:
        if stored:
            bank.load_state_dict(stored)
        if bank.checksum() != meta["projection_checksum"]:
            source = "stored" if stored else "regenerated from the seed"
            raise VeraError(f"the VeRA projections {source} differ from those the adapter in {folder} was trained with "
                            f"(checksum mismatch; trained with torch {meta.get('torch')}, this is {torch.__version__}); "
                            "re-run adapt with --set adapter.store_projections=true to keep them in the file")
    load_trainable_state(model, {n: t for n, t in tensors.items() if not n.startswith(BANK_NAME + ".")})
    return meta
