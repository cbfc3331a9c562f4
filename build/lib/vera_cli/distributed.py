"""torchrun's environment: which process this is, the process group, and what each rank does.

Nothing else in the package knows about ranks. One process (no torchrun) is a
world of size 1 for which every function here is a no-op or the identity, so
single-process behaviour is exactly what it was.

Data parallelism (pretrain, adapt): every rank draws the same seeded shuffle and
augmentation of the global batch, trains on its contiguous part of it through
DistributedDataParallel, and the loss is weighted so that DDP's gradient average
over ranks is the mean over the global batch even when the parts are unequal.
Rank 0 alone writes the run (Ranks, the hook vera_cli.lifecycle is given).

Grid spreading (compare): each rank runs whole rows; a row goes to the first rank
that creates its claim file, so a fast rank takes more rows and a shared runs
folder makes this work across nodes. `vera compare --workers` (vera_cli.workers)
claims rows the same way with local processes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vera_cli.errors import VeraError

T = TypeVar("T")


def _broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cores() -> int:
    """The cores this process may run on (its affinity, which taskset and container limits narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def fresh_claims(claims: Path) -> None:
    """An empty claims folder, made before any process claims: a resumed grid starts with no stale claims."""
    shutil.rmtree(claims, ignore_errors=True)
    claims.mkdir(parents=True)


def claimed(names: list[str], claims: Path) -> Iterator[str]:
    """The names this process runs, in order: each goes to the first process that creates its file in `claims`
    (torchrun's ranks and `vera compare --workers` processes alike)."""
    for name in names:
        try:
            os.close(os.open(claims / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        yield name


@dataclass(frozen=True)
class World:
    """This process's place among the processes torchrun started (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def note(self) -> str:
        """For log lines: how many processes share the work, when more than one."""
        return f" x {self.size} processes" if self.size > 1 else ""

    def place(self, device: torch.device) -> torch.device:
        """Each rank on a node takes its own GPU; CPU ranks share the CPU."""
        if device.type != "cuda" or self.size == 1:
            return device
        if self.local_rank >= torch.cuda.device_count():
            raise VeraError(f"process {self.local_rank} on this node has no GPU of its own ({torch.cuda.device_count()} "
                            f"here): start at most that many processes per node (--nproc-per-node)")
        torch.cuda.set_device(self.local_rank)
        return torch.device("cuda", self.local_rank)

    def cpu_threads(self) -> int:
        """This rank's share of the node's cores: ranks on one node must not fight over them."""
        return max(1, cores() // self.local_size)

    @contextlib.contextmanager
    def joined(self, device: torch.device) -> Iterator[None]:
        """Inside the process group for the body: gloo on CPU, NCCL on CUDA. One process joins nothing."""
        if self.size == 1:
            yield
            return
        if device.type == "cpu":
            torch.set_num_threads(self.cpu_threads())
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=self.rank, world_size=self.size)
        try:
            yield
        finally:
            dist.destroy_process_group()

    def shared(self) -> "Ranks | None":
        """How this process takes part in a run: None alone; under torchrun rank 0 writes it."""
        return Ranks(self) if self.size > 1 else None

    def data_parallel(self) -> "DataParallel | None":
        return DataParallel(self) if self.size > 1 else None

    def take_turns(self, names: list[str], claims: Path) -> Iterator[str]:
        """The names this rank runs, in order: every name goes to exactly one rank (the first to claim it).

        `claims` is emptied by rank 0 first, so a resumed run (with any world size) starts with no
        stale claims; the barrier keeps anyone from claiming before that.
        """
        if self.size == 1:
            yield from names
            return
        if self.is_main:
            fresh_claims(claims)
        dist.barrier()
        yield from claimed(names, claims)

    def from_others(self, items: list[T]) -> list[T]:
        """The `items` every other rank passed, in rank order (every rank calls this)."""
        if self.size == 1:
            return []
        everyone: list[Any] = [None] * self.size
        dist.all_gather_object(everyone, items)
        return [item for rank, theirs in enumerate(everyone) if rank != self.rank for item in theirs]


LOCAL = World()


def from_environment() -> World:
    """The world torchrun describes in RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE (absent: one process)."""
    env = os.environ
    return World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)),
                 int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", 1))))


class _Forward(nn.Module):
    """A forward function (the model, its classifier, a masked view) as a module DDP can wrap.

    `model` is registered so that DDP finds and synchronises its trainable parameters.
    """

    def __init__(self, model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.__dict__["run"] = forward  # not a submodule: the model is registered once, above

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.run(inputs)


class DataParallel:
    """How this rank takes part in data-parallel training of one global batch per step."""

    def __init__(self, world: World) -> None:
        self.world = world

    def wrap(self, forward: Callable[[torch.Tensor], torch.Tensor], model: nn.Module) -> nn.Module:
        device = next(model.parameters()).device
        return DistributedDataParallel(_Forward(model, forward), device_ids=[device] if device.type == "cuda" else None)

    def local(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """This rank's contiguous part of the global batch, and the weight of its summed loss.

        Parts differ by at most one item. Summing the part's losses and multiplying by
        world / global count makes DDP's average over ranks the global batch's mean loss.
        """
        count, size, rank = len(labels), self.world.size, self.world.rank
        share, extra = divmod(count, size)
        start = rank * share + min(rank, extra)
        part = slice(start, start + share + (rank < extra))
        return inputs[part], labels[part], size / count

    def average(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over ranks (of per-step losses: the global batches' mean losses)."""
        total = values.clone()
        dist.all_reduce(total)
        return total / self.world.size


class Ranks:
    """A run shared by every rank (vera_cli.lifecycle.Shared): rank 0 writes it, the others take part."""

    def __init__(self, world: World) -> None:
        self.writes = world.is_main

    def barrier(self) -> None:
        dist.barrier()

    def share(self, value: T) -> T:
        return _broadcast(value)
