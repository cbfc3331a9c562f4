"""The frozen random projections VeRA shares between layers.

A (r x fan_in) and B (out x r) come from one CPU generator seeded with
`projection_seed`, filled in a fixed order (A then B, pairs in order of first
use), so the same seed gives the same bits on any machine. The bank is one
module registered once on the model: `.to(device)` moves it, the state dict
holds each pair once, and every layer reads the very same tensors.

A layer's shape is (fan_in, out): in and out features for nn.Linear, in * kh * kw
and out channels for nn.Conv2d, so that a conv and a linear layer of the same
(fan_in, out) share one pair, and a sliced pair covers both kinds.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from vera_cli.adapters.config import SHARING_MODES
from vera_cli.adapters.errors import AdapterError


def kaiming_uniform(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """U(-b, b) with b = sqrt(6 / fan_in), fan_in being the number of columns (the input side)."""
    bound = math.sqrt(6.0 / cols)
    return torch.empty(rows, cols).uniform_(-bound, bound, generator=generator)


class ProjectionBank(nn.Module):
    """Owns the A/B pairs. `shapes` are the (fan_in, out) of the adapted layers in model order."""

    def __init__(self, shapes: list[tuple[int, int]], rank: int, sharing: str, seed: int) -> None:
        super().__init__()
        if sharing not in SHARING_MODES:
            raise AdapterError(f"sharing must be one of {', '.join(SHARING_MODES)}, got {sharing!r}")
        self.rank = rank
        self.sharing = sharing
        self.seed = seed
        self.pair_shapes = pair_shapes = self.pairs_for(shapes, sharing)
        # Slices are views: cached per layer shape, rebuilt only when .to() has replaced the buffers.
        self._slices: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        generator = torch.Generator(device="cpu").manual_seed(seed)
        for key, (fan_in, fan_out) in pair_shapes.items():
            self.register_buffer(f"A_{key}", kaiming_uniform(rank, fan_in, generator))
            self.register_buffer(f"B_{key}", kaiming_uniform(fan_out, rank, generator))
        # What the seed gives: a bank whose values still hold it can serve any adapter with the same settings.
        self.seed_checksum = self.checksum()

    @classmethod
    def pairs_for(cls, shapes: list[tuple[int, int]], sharing: str) -> dict[str, tuple[int, int]]:
        """The pairs a bank holds for layers of these (fan_in, out) shapes, by key, in order of first use."""
        if sharing == "sliced":
            return {"shared": (max(i for i, _ in shapes), max(o for _, o in shapes))}
        return {cls._shape_key(i, o): (i, o) for i, o in shapes}

    def serves(self, rank: int, sharing: str, seed: int, pair_shapes: dict[str, tuple[int, int]], checksum: str | None) -> bool:
        """Whether an adapter with these settings reads exactly this bank's values: the same pairs from the same
        seed, and the values it was trained with (`checksum`; None: what the seed gives)."""
        return ((self.rank, self.sharing, self.seed) == (rank, sharing, seed)
                and list(self.pair_shapes.items()) == list(pair_shapes.items())
                and self.checksum() == (checksum if checksum is not None else self.seed_checksum))

    @staticmethod
    def _shape_key(fan_in: int, fan_out: int) -> str:
        return f"{fan_in}x{fan_out}"

    def key_for(self, fan_in: int, fan_out: int) -> str:
        return "shared" if self.sharing == "sliced" else self._shape_key(fan_in, fan_out)

    def pair(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"A_{key}"), getattr(self, f"B_{key}")

    def projections(self, fan_in: int, fan_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A (r x fan_in) and B (out x r) for a layer: the pair itself, or its top-left slice."""
        a, b = self.pair(self.key_for(fan_in, fan_out))
        cached = self._slices.get((fan_in, fan_out))
        if cached is None or cached[0] is not a or cached[1] is not b:
            cached = (a, b, a[:, :fan_in], b[:fan_out, :])
            self._slices[(fan_in, fan_out)] = cached
        return cached[2], cached[3]

    def num_values(self) -> int:
        return sum(buf.numel() for buf in self.buffers())

    def checksum(self) -> str:
        digest = hashlib.sha256()
        for name, buf in sorted(self.named_buffers()):
            digest.update(name.encode())
            digest.update(buf.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()

    def saved_checksum(self) -> str:
        """The checksum an adapter file records: of the values held, or, where they are held at a lower precision
        (a model converted with .half() for inference) and are the seed's rounded, of the seed's float32 values,
        which a float32 base regenerates; the rounded ones it never could."""
        if all(buf.dtype == torch.float32 for buf in self.buffers()):
            return self.checksum()
        fresh = ProjectionBank(list(self.pair_shapes.values()), self.rank, self.sharing, self.seed)
        held = dict(self.named_buffers())
        rounded = all(torch.equal(buf.to(held[key].dtype), held[key].cpu()) for key, buf in fresh.named_buffers())
        return fresh.seed_checksum if rounded else self.checksum()


@dataclass
class RecordedProjections:
    """What an adapter file says of the projections it was trained with: their checksum, the torch that made
    them, and the tensors themselves when it stores them (A_<key>, B_<key>)."""

    checksum: str | None
    torch_version: str | None = None
    stored: dict[str, torch.Tensor] = field(default_factory=dict)

    def mismatch(self) -> AdapterError:
        source = "stored" if self.stored else "regenerated from the seed"
        return AdapterError(f"the VeRA projections {source} differ from those the adapter was trained with "
                            f"(checksum mismatch; trained with torch {self.torch_version}, this is "
                            f"{torch.__version__}); save it with store_projections=true to keep them with it")
