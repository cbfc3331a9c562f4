"""An adapter as tensors plus metadata, in memory, and back into a model.

Like PEFT's state-dict helpers this does no file IO: the caller stores the two parts
(safetensors and JSON, say). VeRA's projections are left out unless
`store_projections` is set: they regenerate from `projection_seed`, and their
checksum in the metadata catches a regeneration that differs (another torch build,
say) instead of giving wrong results.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from vera_cli.adapters.config import AdapterConfig
from vera_cli.adapters.errors import AdapterError
from vera_cli.adapters.inject import BANK_NAME, inject, load_trainable_state, projection_bank, trainable_state

PROJECTIONS_PREFIX = BANK_NAME + "."


def adapter_tensors(model: nn.Module, spec: AdapterConfig) -> dict[str, torch.Tensor]:
    tensors = dict(trainable_state(model))
    bank = projection_bank(model)
    if bank is not None and spec.store_projections:
        tensors.update({PROJECTIONS_PREFIX + name: buf for name, buf in bank.named_buffers()})
    return tensors


def adapter_metadata(model: nn.Module, spec: AdapterConfig) -> dict[str, Any]:
    """What it takes to rebuild the adapter on a fresh base: its config and the projections' checksum."""
    bank = projection_bank(model)
    return {"adapter": dataclasses.asdict(spec),
            "projection_checksum": bank.checksum() if bank is not None else None,
            "torch": torch.__version__}


def load_adapter(model: nn.Module, metadata: dict[str, Any], tensors: dict[str, torch.Tensor]) -> AdapterConfig:
    """Inject the adapter `metadata` describes into a fresh base `model` and load its tensors."""
    try:
        spec = AdapterConfig(**metadata["adapter"])
    except TypeError as exc:
        raise AdapterError(f"the adapter metadata does not describe an adapter this version knows ({exc})") from exc
    inject(model, spec)
    bank = projection_bank(model)
    stored = {name[len(PROJECTIONS_PREFIX):]: t for name, t in tensors.items() if name.startswith(PROJECTIONS_PREFIX)}
    if bank is not None:
        if stored:
            bank.load_state_dict(stored)
        if bank.checksum() != metadata["projection_checksum"]:
            source = "stored" if stored else "regenerated from the seed"
            raise AdapterError(f"the VeRA projections {source} differ from those the adapter was trained with "
                               f"(checksum mismatch; trained with torch {metadata.get('torch')}, this is "
                               f"{torch.__version__}); save it with store_projections=true to keep them with it")
    load_trainable_state(model, {n: t for n, t in tensors.items() if not n.startswith(PROJECTIONS_PREFIX)})
    return spec
