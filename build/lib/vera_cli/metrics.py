"""Accuracy from logits: per class, overall, over chosen classes, over the rest, and task accuracy.

Task accuracy classifies the chosen classes' images among the chosen classes
only: what an adapter trained on those classes was trained to do. The 10-way
accuracy on the chosen classes alone rewards a model that simply stops
predicting the others; the rest's accuracy shows what that cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from vera_cli.data import Augment, Split, augmented, batches


def test_views(images: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """A batch as the model is shown it at test time: alone, or also mirrored (tta "flip")."""
    if tta not in ("none", "flip"):
        # Configs are validated at the edge; this catches a caller that passed something else here.
        raise ValueError(f"tta must be 'none' or 'flip', got {tta!r}")
    return [images, images.flip(-1)] if tta == "flip" else [images]


@torch.no_grad()
def view_outputs(forward: Callable[[torch.Tensor], torch.Tensor], split: Split, tta: str = "none", *,
                 batch_size: int = 1000, augment: Augment = augmented) -> torch.Tensor:
    """`forward`'s output for every test view of every image: (views, images, ...); view 0 is the image alone.
    `augment` makes the batches (here it only gathers and normalises)."""
    return torch.cat([torch.stack([forward(view).float() for view in test_views(images, tta)])
                      for images, _ in batches(split, batch_size, augment=augment)], dim=1)


def predict_logits(forward: Callable[[torch.Tensor], torch.Tensor], split: Split, tta: str = "none", *,
                   batch_size: int = 1000, augment: Augment = augmented) -> torch.Tensor:
    """The logits the model predicts: with tta "flip", the mean over each image and its mirror image."""
    return view_outputs(forward, split, tta, batch_size=batch_size, augment=augment).mean(0)


@torch.no_grad()
def predict_features(forward: Callable[[torch.Tensor], torch.Tensor], features: torch.Tensor,
                     batch_size: int = 1000) -> torch.Tensor:
    """Logits from precomputed inputs (cached prefix features, (views, images, ...)), averaged over the views
    in the same batches as predict_logits."""
    return torch.cat([torch.stack([forward(view).float() for view in chunk]).mean(0)
                      for chunk in features.split(batch_size, dim=1)])


def _rate(correct: int, total: int) -> Optional[float]:
    """None when there is nothing to count: a rate of 0 would read as a model that gets all of it wrong."""
    return correct / total if total else None


def percent(value: Optional[float]) -> str:
    """A rate as text; n/a where there was nothing to count."""
    return "n/a" if value is None else f"{value:.2%}"


@dataclass(frozen=True)
class ClassAccuracy:
    name: str
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"class": self.name, "correct": self.correct, "total": self.total, "accuracy": self.accuracy}


@dataclass(frozen=True)
class AccuracyReport:
    """Test accuracy of one model. `chosen`, `task` and `rest` exist when classes were chosen;
    `rest` is None when the chosen classes are all there are."""

    per_class: list[ClassAccuracy]
    chosen_classes: list[str] = field(default_factory=list)
    chosen: Optional[float] = None
    task: Optional[float] = None
    rest: Optional[float] = None

    @property
    def correct(self) -> int:
        return sum(c.correct for c in self.per_class)

    @property
    def total(self) -> int:
        return sum(c.total for c in self.per_class)

    @property
    def overall(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def accuracy_of(self, names: list[str]) -> Optional[float]:
        """10-way accuracy over the images of the named classes; None when there are none."""
        members = [c for c in self.per_class if c.name in names]
        return _rate(sum(c.correct for c in members), sum(c.total for c in members))

    def metric(self, name: str) -> Optional[float]:
        """`overall`, `chosen`, `task` or `rest` by name, for tables and plots that list metrics as data."""
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {"overall": self.overall, "correct": self.correct, "total": self.total,
                                  "per_class": [c.to_dict() for c in self.per_class]}
        if self.chosen_classes:
            result.update(chosen_classes=self.chosen_classes, chosen=self.chosen, rest=self.rest, task=self.task)
        return result

    @classmethod
    def pooled(cls, reports: list["AccuracyReport"]) -> "AccuracyReport":
        """Several runs' reports on one test set as one: counts summed, so each class's accuracy is the mean
        over the runs; chosen, task and rest are their means."""
        first = reports[0]
        per_class = [ClassAccuracy(row.name, sum(r.per_class[i].correct for r in reports),
                                   sum(r.per_class[i].total for r in reports)) for i, row in enumerate(first.per_class)]

        def mean(metric: str) -> Optional[float]:
            values = [r.metric(metric) for r in reports]
            return None if any(v is None for v in values) else sum(values) / len(values)

        return cls(per_class, first.chosen_classes, mean("chosen"), mean("task"), mean("rest"))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "AccuracyReport":
        return cls([ClassAccuracy(c["class"], c["correct"], c["total"]) for c in raw["per_class"]],
                   raw.get("chosen_classes", []), raw.get("chosen"), raw.get("task"), raw.get("rest"))


def accuracy_report(logits: torch.Tensor, labels: torch.Tensor, classes: list[str],
                    chosen: list[int] | None = None) -> AccuracyReport:
    """Per-class counts; `chosen` adds the chosen/rest/task figures."""
    logits, labels = logits.cpu(), labels.cpu()
    hits = logits.argmax(1) == labels
    per_class = [ClassAccuracy(name, int(hits[labels == index].sum()), int((labels == index).sum()))
                 for index, name in enumerate(classes)]
    if not chosen:
        return AccuracyReport(per_class)
    chosen_ids = torch.tensor(chosen)
    in_chosen = torch.isin(labels, chosen_ids)
    task_predictions = chosen_ids[logits[in_chosen][:, chosen_ids].argmax(1)]
    return AccuracyReport(
        per_class, [classes[i] for i in chosen],
        chosen=_rate(int(hits[in_chosen].sum()), int(in_chosen.sum())),
        task=_rate(int((task_predictions == labels[in_chosen]).sum()), int(in_chosen.sum())),
        rest=_rate(int(hits[~in_chosen].sum()), int((~in_chosen).sum())),
    )
