"""Which adapter each sample of one batch uses, and how a layer's samples group for computing.

A `Routing` holds one adapter position per sample (an index into the model's adapter names, -1 for
none). In each adapted layer the samples are grouped by what can compute together: VeRA parts that
read the same projections (one `A x` and one `B` product for the group, `d` and `b` gathered per
sample), LoRA parts of one rank, full copies of the layer. Which part belongs to which group is kept
on the layer (`layer_groups`); which rows use which part is worked out once per layer and batch, and
reused by every call in the batch's block (a test-time flip calls the model twice).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from vera_cli.adapters.layer import AdaptedLayer, LayerAdapter

# Up to this many distinct adapters of a kind that needs its own products per adapter (LoRA, full copies), a loop
# over them, each on its own rows; past it, each row's tensors gathered and one batched product per factor, which
# costs one Python step per layer rather than one per adapter.
LOOP_UP_TO = 4


@dataclass
class Group:
    """Parts of one kind that compute together, and the samples that use them.

    rows: the batch rows of the group's samples (None: every row, in order); local: for each of those
    rows, its part's position in `parts`."""

    kind: type[LayerAdapter]
    parts: list[LayerAdapter]
    rows: torch.Tensor | None
    local: torch.Tensor

    def members(self, position: int) -> torch.Tensor:
        """The batch rows that use parts[position]."""
        chosen = (self.local == position).nonzero().squeeze(1)
        return chosen if self.rows is None else self.rows.index_select(0, chosen)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The group's rows of the layer's input."""
        return x if self.rows is None else x.index_select(0, self.rows)

    def gathered(self, name: str) -> torch.Tensor:
        """Tensor `name` of each row's part, stacked: (rows, *its shape)."""
        return torch.stack([part.tensor(name) for part in self.parts]).index_select(0, self.local)

    def put(self, out: torch.Tensor, y: torch.Tensor, add: bool, rows: torch.Tensor | None = None) -> torch.Tensor:
        """`y` (the group's rows, or `rows` when given) added to `out` (a delta) or written over it (an output)."""
        rows = self.rows if rows is None else rows
        if rows is None:
            return out.add_(y) if add else out.copy_(y)
        return out.index_add_(0, rows, y) if add else out.index_copy_(0, rows, y)

    def one_by_one(self, x: torch.Tensor, out: torch.Tensor, compute: Callable[[LayerAdapter, torch.Tensor], torch.Tensor],
                   add: bool) -> torch.Tensor:
        """Each part on its own rows in turn: `compute(part, its rows of x)` put into `out`."""
        for position, part in enumerate(self.parts):
            rows = self.members(position)
            out = self.put(out, compute(part, x.index_select(0, rows)), add, rows)
        return out


class Routing:
    def __init__(self, names: tuple[str, ...], index: torch.Tensor) -> None:
        self.names = names
        self.index = index
        self.size = index.shape[0]
        present = torch.unique(index).tolist()
        # Every sample on one adapter (or none): the layers compute as for that adapter alone.
        self.uniform = len(present) <= 1
        self.single = names[present[0]] if len(present) == 1 and present[0] >= 0 else None
        self._groups: dict[int, list[Group]] = {}

    def groups(self, layer: AdaptedLayer, device: torch.device) -> list[Group]:
        cached = self._groups.get(id(layer))
        if cached is None:
            cached = self._groups[id(layer)] = self._group(layer, device)
        return cached

    def _group(self, layer: AdaptedLayer, device: torch.device) -> list[Group]:
        groups = []
        for kind, parts, lookup in layer_groups(layer, self.names):
            in_group = lookup[self.index]  # each sample's part among the group's, -1: none here
            rows = (in_group >= 0).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            every = rows.numel() == self.size
            # Only the parts the batch uses are gathered: their positions among those, per row.
            used, local = torch.unique(in_group if every else in_group.index_select(0, rows), return_inverse=True)
            groups.append(Group(kind, [parts[i] for i in used.tolist()], None if every else rows.to(device),
                                local.to(device)))
        return groups


def layer_groups(layer: AdaptedLayer, names: tuple[str, ...]) -> list[tuple[type[LayerAdapter], list[LayerAdapter], torch.Tensor]]:
    """The layer's parts grouped by what computes together, for a model whose adapters are `names`: per group its
    kind, its parts, and a lookup from adapter position (-1 at the end: none) to the part's place in the group.
    Kept on the layer until its adapters or the model's names change, so that a batch costs no walk over them."""
    cached = layer.mixed_plan
    if cached is None or cached[0] != names:
        members: dict[object, list[tuple[int, LayerAdapter]]] = {}
        for position, name in enumerate(names):
            part = layer.parts.get(name)
            if part is not None:  # samples whose adapter leaves this layer alone keep the base's output
                members.setdefault(part.group_key(), []).append((position, part))
        plan = []
        for chosen in members.values():
            lookup = torch.full((len(names) + 1,), -1, dtype=torch.int64)
            lookup[torch.tensor([position for position, _ in chosen])] = torch.arange(len(chosen))
            plan.append((type(chosen[0][1]), [part for _, part in chosen], lookup))
        cached = layer.mixed_plan = (names, plan)
    return cached[1]
