"""Mixed-adapter batches: each sample of a batch through its own adapter, in one forward pass.

    with mixed_batch(model, ["cat", "dog", None, "cat"]):      # None or "base": the base alone
        logits = model(images)
    logits = forward_mixed(model, images, [0, 1, -1, 0])      # positions in adapter_names(model); -1: none

In every adapted layer the base runs once for the whole batch. VeRA adapters that share a
projection bank then need one `A x` and one `B` product for all their samples, with `d` and `b`
gathered per sample; LoRA adapters need a pair of products per distinct adapter; a full copy of a
layer (an adapter's own head) replaces that layer's output for its samples. Each sample's output
is what it gets alone through its own adapter, to float rounding. A batch whose samples all use
one adapter computes as that adapter alone.

Adapted layers must see the batch as their first dimension (true of the ConvNet and the ViT).
"""

from __future__ import annotations

import contextlib
import numbers
from typing import Callable, Iterator, Sequence, Union

import torch
from torch import nn

from vera_cli.adapters.errors import AdapterError
from vera_cli.adapters.registry import NO_ADAPTER, adapted_layers, names_in
from vera_cli.adapters.routing import Routing

Choice = Union[str, int, None]


def sample_positions(names: Sequence[str], adapters: Sequence[Choice] | torch.Tensor) -> torch.Tensor:
    """Each sample's adapter as a position in `names`, the model's adapter names (-1: none), checked."""
    if isinstance(adapters, (str, bytes)):
        raise AdapterError(f"per-sample adapters are a list with one entry per sample, not the string {adapters!r}: "
                           f"[{adapters!r}] * batch_size puts every sample on it")
    if isinstance(adapters, torch.Tensor):
        if adapters.dim() != 1 or adapters.dtype.is_floating_point or adapters.dtype == torch.bool:
            raise AdapterError("per-sample adapters as a tensor must be one integer position per sample")
        index = adapters.to("cpu", torch.int64)
        if index.numel() and not -1 <= int(index.min()) <= int(index.max()) < len(names):
            raise AdapterError(f"adapter positions must lie in -1..{len(names) - 1} (-1: no adapter)")
        return index
    lookup = {name: position for position, name in enumerate(names)}
    positions = []
    for choice in adapters:
        if choice is None or choice == NO_ADAPTER:
            positions.append(-1)
        elif isinstance(choice, str):
            if choice not in lookup:
                raise AdapterError(f"no adapter named {choice!r}: the model has {', '.join(names) or 'none'}")
            positions.append(lookup[choice])
        # Integral: numpy's integers too (a router's argmax); a bool is no position.
        elif isinstance(choice, numbers.Integral) and not isinstance(choice, bool) and -1 <= choice < len(names):
            positions.append(int(choice))
        else:
            raise AdapterError(f"a sample's adapter is a name, a position in 0..{len(names) - 1}, -1, None or "
                               f"{NO_ADAPTER!r}; got {choice!r}")
    return torch.tensor(positions, dtype=torch.int64)


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapters: Sequence[Choice] | torch.Tensor) -> Iterator[None]:
    """Inside the block, each call of the model takes sample i through adapter `adapters[i]`: a name, a position
    in `adapter_names(model)`, or None / "base" / -1 for the base alone. Every call must hold that many samples."""
    layers = list(adapted_layers(model).values())
    merged = next((layer.merged_name for layer in layers if layer.merged_name), None)
    if merged is not None:
        raise AdapterError(f"adapter {merged!r} is merged into the base weights: unmerge it before a mixed batch")
    if any(layer.routing is not None for layer in layers):
        raise AdapterError("the model is already inside a mixed batch")
    names = tuple(names_in(layers))
    routing = Routing(names, sample_positions(names, adapters))
    if any(layer.training and any(part.dropout > 0 for part in layer.parts.values()) for layer in layers):
        raise AdapterError("a mixed batch runs without adapter dropout: call model.eval() first")
    for layer in layers:
        layer.routing = routing
    try:
        yield
    finally:
        for layer in layers:
            layer.routing = None


def forward_mixed(model: nn.Module, x: torch.Tensor, adapters: Sequence[Choice] | torch.Tensor,
                  forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """`forward(x)` (default: the model itself) with sample i through adapter `adapters[i]`."""
    # A string or a tensor that is not one position per sample is refused by sample_positions, in its own words.
    listed = adapters.dim() == 1 if isinstance(adapters, torch.Tensor) else not isinstance(adapters, (str, bytes))
    if listed and len(adapters) != len(x):
        raise AdapterError(f"{len(x)} samples but {len(adapters)} per-sample adapters: give one adapter per sample")
    with mixed_batch(model, adapters):
        return (forward or model)(x)
