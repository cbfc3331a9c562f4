"""Which adapter each sample of one batch uses, and how a layer's samples group for computing.

A `Routing` holds one adapter position per sample (an index into the model's adapter names, -1 for
none). In each adapted layer the samples are grouped by what can compute together: VeRA parts that
read the same projections (one `A x` and one `B` product for the group, `d` and `b` gathered per
sample), LoRA parts of one rank, full copies of the layer. Which part belongs to which group is kept
on the layer (`layer_groups`); which rows use which part is worked out once per layer and batch, and
reused by every call in the batch's block (a test-time flip calls the model twice).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from vera_cli.adapters.layer import Registrations

if TYPE_CHECKING:
    from vera_cli.adapters.layer import AdaptedLayer, LayerAdapter

# Up to this many distinct adapters of a kind that needs its own products per adapter (LoRA, full copies), a loop
# over them, each on its own rows; past it, each row's tensors gathered and one batched product per factor, which
# costs one Python step per layer rather than one per adapter.
LOOP_UP_TO = 4
# ... unless each adapter has at least this many positions (tokens, pixels) to compute: then its own products are
# large enough that the loop's Python steps cost less than the batched products' small per-sample matrices.
LOOP_FROM_POSITIONS = 256


class Tables:
    """The tensors of a group's parts stacked, one table per tensor name, and each part's tensor made a view of its
    row: whatever changes a part's values in place (an optimizer step, load_state_dict, copy_) changes the table, so a
    batch gathers each row's values with one index and no check per part (at 512 adapters, reading each tensor's
    version counter cost more than the layer's products). Rebuilt when a parameter was registered since (a part's
    tensor replaced) or the first tensor is no longer the table's first row (`.to()` and `.double()` give every
    tensor new data). Only outside autograd: a table that took part in a graph would tie every later call to it."""

    def __init__(self, holders: list[dict[str, torch.nn.Parameter]]) -> None:
        self.holders = holders
        self.cache: dict[str, tuple[int, torch.Tensor]] = {}

    def table(self, name: str) -> torch.Tensor:
        if torch.is_grad_enabled():
            current = [holder[name] for holder in self.holders]
            if any(tensor.requires_grad for tensor in current):
                return torch.stack(current)
        cached = self.cache.get(name)
        if cached is None or cached[0] != Registrations.count \
                or self.holders[0][name].data_ptr() != cached[1].data_ptr():
            cached = self.cache[name] = (Registrations.count, self._stacked(name))
        return cached[1]

    def _stacked(self, name: str) -> torch.Tensor:
        current = [holder[name] for holder in self.holders]
        # The table outlives the call: never an inference tensor, which training could not use afterwards.
        with torch.inference_mode(False), torch.no_grad():
            table = torch.stack(current)
            for tensor, row in zip(current, table):
                tensor.data = row
        return table


@dataclass
class PlanGroup:
    """A layer's parts of one kind that compute together, for the model's adapter names: `lookup` maps an adapter's
    position in the names (-1 at the end: none) to its part's place in `parts`."""

    kind: type[LayerAdapter]
    parts: list[LayerAdapter]
    lookup: torch.Tensor
    tables: Tables
    positions: tuple[int, ...]  # the adapter positions its parts serve: layers alike in these group a batch alike


class SharedDown:
    """One batch's last down-projection, for the next layer that projects the same input through the same matrix:
    a ViT's query and value read one normalised input and, under VeRA, one A. A single entry, so that nothing of
    the batch outlives the next layer that projects; the input's version counter tells an input changed in place."""

    def __init__(self) -> None:
        self._entry: tuple | None = None

    def get(self, x: torch.Tensor, a: torch.Tensor, rows: torch.Tensor | None, geometry: tuple,
            compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """`compute()`, the down-projection of `x`'s `rows` through `a` in a layer of `geometry`, or the last one's."""
        if x.is_inference():
            # torch.inference_mode keeps no version counter, so an in-place change could not be told: no sharing.
            return compute()
        entry = self._entry
        # Identity, not ids: the entry holds x, a and rows, so none of them is freed and replaced under the same id.
        if (entry is not None and entry[0] is x and entry[1] == x._version and entry[2] is a and entry[3] is rows
                and entry[4] == geometry):
            return entry[5]
        down = compute()
        self._entry = (x, x._version, a, rows, geometry, down)
        return down


@dataclass
class Group:
    """A plan group's parts and the samples of one batch that use them.

    rows: the batch rows of the group's samples (None: every row, in order); local: for each of those
    rows, its part's position in `parts`; shared: the batch's down-projection kept for the next layer."""

    plan: PlanGroup
    rows: torch.Tensor | None
    local: torch.Tensor
    shared: SharedDown

    @property
    def kind(self) -> type[LayerAdapter]:
        return self.plan.kind

    @property
    def parts(self) -> list[LayerAdapter]:
        return self.plan.parts

    @functools.cached_property
    def used(self) -> list[int]:
        """The positions in `parts` that the batch uses."""
        return torch.unique(self.local).tolist()

    def loops(self, layer: AdaptedLayer, x: torch.Tensor) -> bool:
        """Whether the parts of a kind with products per adapter should run one by one (else gathered per row)."""
        positions = layer.positions(x) // x.shape[0] * self.local.shape[0]
        return len(self.used) <= LOOP_UP_TO or positions >= LOOP_FROM_POSITIONS * len(self.used)

    def members(self, position: int) -> torch.Tensor:
        """The batch rows that use parts[position]."""
        chosen = (self.local == position).nonzero().squeeze(1)
        return chosen if self.rows is None else self.rows.index_select(0, chosen)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The group's rows of the layer's input."""
        return x if self.rows is None else x.index_select(0, self.rows)

    def gathered(self, name: str) -> torch.Tensor:
        """Tensor `name` of each row's part, stacked: (rows, *its shape)."""
        return self.plan.tables.table(name).index_select(0, self.local)

    def put(self, out: torch.Tensor, y: torch.Tensor, add: bool, rows: torch.Tensor | None = None) -> torch.Tensor:
        """`y` (the group's rows, or `rows` when given) added to `out` (a delta) or written over it (an output)."""
        rows = self.rows if rows is None else rows
        if rows is None:
            return out.add_(y) if add else out.copy_(y)
        return out.index_add_(0, rows, y) if add else out.index_copy_(0, rows, y)

    def one_by_one(self, x: torch.Tensor, out: torch.Tensor | None,
                   compute: Callable[[LayerAdapter, torch.Tensor], torch.Tensor], add: bool) -> torch.Tensor:
        """Each part the batch uses on its own rows in turn: `compute(part, its rows of x)` put into `out` (None: a
        new tensor, for outputs that fill every row)."""
        for position in self.used:
            rows = self.members(position)
            y = compute(self.parts[position], x.index_select(0, rows))
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out = self.put(out, y, add, rows)
        return out


class Routing:
    def __init__(self, names: tuple[str, ...], index: torch.Tensor) -> None:
        self.names = names
        self.index = index
        self.size = index.shape[0]
        first = int(index[0]) if self.size else -1
        # Every sample on one adapter (or none): the layers compute as for that adapter alone.
        self.uniform = bool((index == first).all())
        self.single = names[first] if self.uniform and first >= 0 else None
        self._groups: dict[int, list[Group]] = {}
        # Which rows use which part depends on the plan's adapter positions only: worked out once for all the
        # layers that carry the same adapters (at 512 adapters, a fifth of a ConvNet classifier's extra cost).
        self._rows: dict[tuple, tuple[torch.Tensor | None, torch.Tensor] | None] = {}
        self._shared = SharedDown()

    def groups(self, layer: AdaptedLayer, device: torch.device) -> list[Group]:
        cached = self._groups.get(id(layer))
        if cached is None:
            cached = self._groups[id(layer)] = self._group(layer, device)
        return cached

    def _group(self, layer: AdaptedLayer, device: torch.device) -> list[Group]:
        groups = []
        for plan in layer_groups(layer, self.names):
            key = (plan.positions, device)
            if key not in self._rows:
                self._rows[key] = self._rows_of(plan, device)
            found = self._rows[key]
            if found is not None:
                groups.append(Group(plan, *found, self._shared))
        return groups

    def _rows_of(self, plan: PlanGroup, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        """The batch rows whose adapter is among the plan's (None: every row) and each one's part; None: no row."""
        in_group = plan.lookup[self.index]  # each sample's part among the group's, -1: none here
        rows = (in_group >= 0).nonzero().squeeze(1)
        if rows.numel() == 0:
            return None
        every = rows.numel() == self.size
        return None if every else rows.to(device), (in_group if every else in_group.index_select(0, rows)).to(device)


def layer_groups(layer: AdaptedLayer, names: tuple[str, ...]) -> list[PlanGroup]:
    """The layer's parts grouped by what computes together, for a model whose adapters are `names`. Kept on the
    layer until its adapters or the model's names change, so that a batch costs no walk over them."""
    cached = layer.mixed_plan
    if cached is None or cached[0] != names:
        members: dict[object, list[tuple[int, LayerAdapter]]] = {}
        for position, name in enumerate(names):
            part = layer.parts.get(name)
            if part is not None:  # samples whose adapter leaves this layer alone keep the base's output
                members.setdefault(part.group_key(), []).append((position, part))
        plan = []
        for chosen in members.values():
            positions = tuple(position for position, _ in chosen)
            lookup = torch.full((len(names) + 1,), -1, dtype=torch.int64)
            lookup[torch.tensor(positions)] = torch.arange(len(chosen))
            parts = [part for _, part in chosen]
            plan.append(PlanGroup(type(parts[0]), parts, lookup, Tables([part.holder._parameters for part in parts]),
                                  positions))
        cached = layer.mixed_plan = (names, plan)
    return cached[1]
