"""Parameter-efficient adapters for nn.Linear and nn.Conv2d layers: VeRA and LoRA.

Stands alone like a PEFT tuner: it imports nothing else from vera_cli, works on any
nn.Module, and raises AdapterError (a ValueError) on bad input. Kept free of torch
imports here so that reading the config stays cheap; the layers live in the submodules
(`inject`, `state`, `vera`, `lora`, `full`, `projections`, `targets`), several adapters on one
model by name in `named`, and batches that mix them in `mixed`.
"""

from vera_cli.adapters.config import AdapterConfig
from vera_cli.adapters.errors import AdapterError

__all__ = ["AdapterConfig", "AdapterError"]
