"""Which training images a run sees: held-out classes, a validation split, K shots per class, replay.

Every selection is a set of indices into the training split, drawn from a CPU generator of its
own seeded by the run's seed. The same seed therefore picks the same images whatever the method,
learning rate or device, so runs that differ only in those see the same data; and since the
validation split is drawn first and the shots are a prefix of each class's permutation, 10 shots
are a subset of 100. A run records the indices (selection.json) and their sha256 (the summary).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Optional

import torch

from vera_cli.cifar_classes import CLASSES
from vera_cli.data import Split
from vera_cli.errors import VeraError

SELECTION_FILE = "selection.json"


def without_classes(split: Split, excluded: list[int]) -> Split:
    """The split with every image of the `excluded` classes removed."""
    if not excluded:
        return split
    keep = ~torch.isin(split.labels, torch.tensor(excluded, device=split.labels.device))
    return Split(split.images[keep], split.labels[keep])


def per_class(labels: torch.Tensor, classes: list[int], count: Optional[int], available: torch.Tensor,
              generator: torch.Generator) -> torch.Tensor:
    """Up to `count` random indices of each class among the available ones (all of them when count is None)."""
    picked = []
    for label in classes:
        candidates = ((labels == label) & available).nonzero().flatten()
        order = torch.randperm(len(candidates), generator=generator)
        picked.append(candidates[order[:count] if count is not None else order])
    return torch.cat(picked) if picked else torch.empty(0, dtype=torch.long)


@dataclass
class Selection:
    train: torch.Tensor        # indices trained on: the chosen classes' images, then the replayed ones
    validation: torch.Tensor   # indices held out for choosing settings; never trained on
    replayed: int              # how many of `train` are replayed images of other classes

    def digest(self) -> str:
        digest = hashlib.sha256()
        for part in (self.train, self.validation):
            digest.update(part.to(torch.int64).numpy().tobytes())
            digest.update(b"|")
        return digest.hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.digest(), "train": self.train.tolist(), "validation": self.validation.tolist(),
                "replayed": self.replayed}


def require_counts(labels: torch.Tensor, chosen: list[int], shots: Optional[int], validation_per_class: int,
                   names: list[str] = CLASSES) -> None:
    """Refuse, with the numbers, a validation split or shots that a class has too few training images for:
    drawn anyway they would be fewer than the run records."""
    counts = torch.bincount(labels.cpu(), minlength=len(names)).tolist()
    present = [label for label, count in enumerate(counts) if count]
    for label in present:
        if validation_per_class > counts[label]:
            raise VeraError(f"validation {validation_per_class} images per class: {names[label]} has {counts[label]} "
                            f"training images; choose validation of at most {min(counts[c] for c in present)}")
    for label in chosen:
        left = counts[label] - validation_per_class
        held = (f" outside the validation split ({counts[label]} in all, {validation_per_class} held out)"
                if validation_per_class else "")
        if shots is not None and shots > left:
            raise VeraError(f"shots {shots}: {names[label]} has {left} training images{held}; ask for at most {left} "
                            "shots" + (" or a smaller validation split" if validation_per_class else ""))
        if left < 1:
            raise VeraError(f"validation {validation_per_class} takes every training image of {names[label]}{held}: "
                            "choose a smaller validation split")


def select(labels: torch.Tensor, chosen: list[int], replay_classes: list[int], shots: Optional[int],
           validation_per_class: int, replay_fraction: float, seed: int, names: list[str] = CLASSES) -> Selection:
    """Draw validation (every class), then the chosen classes' shots, then replay images of `replay_classes`.

    `replay_fraction` times as many replay images as chosen-class images are drawn at random from the
    replay classes' images left after the validation split (all of them, when they are fewer).
    """
    require_counts(labels, chosen, shots, validation_per_class, names)
    labels = labels.cpu()
    generator = torch.Generator().manual_seed(seed)
    available = torch.ones(len(labels), dtype=torch.bool)
    classes = sorted(set(labels.tolist()))
    validation = per_class(labels, classes, validation_per_class, available, generator) \
        if validation_per_class else torch.empty(0, dtype=torch.long)
    available[validation] = False
    train = per_class(labels, chosen, shots, available, generator)
    replay = torch.empty(0, dtype=torch.long)
    if replay_fraction > 0 and replay_classes:
        pool = (torch.isin(labels, torch.tensor(replay_classes)) & available).nonzero().flatten()
        count = min(len(pool), round(replay_fraction * len(train)))
        replay = pool[torch.randperm(len(pool), generator=generator)[:count]]
    return Selection(torch.cat([train, replay]), validation, len(replay))


def take(split: Split, indices: torch.Tensor) -> Split:
    index = indices.to(split.labels.device)
    return Split(split.images[index], split.labels[index])
