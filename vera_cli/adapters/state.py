"""An adapter as tensors plus metadata, in memory, and back into a model.

Like PEFT's state-dict helpers this does no file IO: the caller stores the two parts
(safetensors and JSON, say). VeRA's projections are left out unless
`store_projections` is set: they regenerate from `projection_seed`, and their
checksum in the metadata catches a regeneration that differs (another torch build,
say) instead of giving wrong results.

`name` picks an adapter added by name (vera_cli.adapters.named); without it, the adapter `inject`
added, whose file also holds whatever it trained in place. The tensors are named the same either
way (`<layer>.vera_d`, `fc5.weight`), so a file loads as the default adapter or under any name.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from vera_cli.adapters.config import AdapterConfig
from vera_cli.adapters.errors import AdapterError
from vera_cli.adapters.inject import attach, inject, load_into, load_trainable_state, trainable_state
from vera_cli.adapters.layer import DEFAULT
from vera_cli.adapters.named import delete_adapter
from vera_cli.adapters.projections import RecordedProjections
from vera_cli.adapters.registry import BANK_NAME, active_adapter, named_tensors, projection_bank, require

PROJECTIONS_PREFIX = BANK_NAME + "."


def _alone(tensor: torch.Tensor) -> torch.Tensor:
    # After a mixed batch an adapter's vectors are rows of one table per layer, and torch.save writes a view's
    # whole storage: every adapter's values in each one's file.
    tensor = tensor.detach()
    return tensor if tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size() else tensor.clone()


def adapter_tensors(model: nn.Module, spec: AdapterConfig, name: str | None = None) -> dict[str, torch.Tensor]:
    active = active_adapter(model)
    if name is not None:
        require(model, name)
    elif active not in (None, DEFAULT):
        # What trains is that adapter, under the names it has inside this model, which no fresh base takes.
        raise AdapterError(f"the active adapter {active!r} was added by name: pass name={active!r} to save it")
    state = trainable_state(model) if name is None else named_tensors(model, name)
    tensors = {key: _alone(tensor) for key, tensor in state.items()}
    bank = projection_bank(model, name)
    if bank is not None and spec.store_projections:
        tensors.update({PROJECTIONS_PREFIX + key: buf for key, buf in bank.named_buffers()})
    return tensors


def adapter_metadata(model: nn.Module, spec: AdapterConfig, name: str | None = None) -> dict[str, Any]:
    """What it takes to rebuild the adapter on a fresh base: its config and the projections' checksum."""
    bank = projection_bank(model, name)
    return {"adapter": dataclasses.asdict(spec),
            "projection_checksum": (bank.checksum() if spec.store_projections else bank.saved_checksum())
                                   if bank is not None else None,
            "torch": torch.__version__}


def load_adapter(model: nn.Module, metadata: dict[str, Any], tensors: dict[str, torch.Tensor],
                 name: str | None = None) -> AdapterConfig:
    """Rebuild the adapter `metadata` describes and load its tensors: into a fresh base `model` (as `inject`
    does), or beside the model's other adapters under `name` (nothing is left of it when a tensor does not fit)."""
    try:
        spec = AdapterConfig(**metadata["adapter"])
    except TypeError as exc:
        raise AdapterError(f"the adapter metadata does not describe an adapter this version knows ({exc})") from exc
    stored = {key[len(PROJECTIONS_PREFIX):]: t for key, t in tensors.items() if key.startswith(PROJECTIONS_PREFIX)}
    own = {key: t for key, t in tensors.items() if not key.startswith(PROJECTIONS_PREFIX)}
    recorded = RecordedProjections(metadata.get("projection_checksum"), metadata.get("torch"), stored)
    if name is None:
        inject(model, spec, recorded if spec.method == "vera" else None)
        load_trainable_state(model, own)
        return spec
    attach(model, name, spec, recorded=recorded if spec.method == "vera" else None)
    try:
        load_into(named_tensors(model, name), own)
    except AdapterError:
        delete_adapter(model, name)
        raise
    return spec
