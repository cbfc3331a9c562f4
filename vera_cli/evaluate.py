"""Accuracy from logits: per class, overall, over chosen classes, over the rest, and task accuracy.

Task accuracy classifies the chosen classes' images among the chosen classes
only: what an adapter trained on those classes was trained to do. The 10-way
accuracy on the chosen classes alone rewards a model that simply stops
predicting the others; the rest's accuracy shows what that cost.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from vera_cli.data import Split, batches


@torch.no_grad()
def predict_logits(forward: Callable[[torch.Tensor], torch.Tensor], split: Split, batch_size: int = 1000) -> torch.Tensor:
    return torch.cat([forward(images).float() for images, _ in batches(split, batch_size)])


@torch.no_grad()
def predict_features(forward: Callable[[torch.Tensor], torch.Tensor], features: torch.Tensor,
                     batch_size: int = 1000) -> torch.Tensor:
    """Logits from precomputed inputs (cached prefix features), in the same batches as predict_logits."""
    return torch.cat([forward(chunk).float() for chunk in features.split(batch_size)])


def _rate(correct: int, total: int) -> float:
    return correct / total if total else 0.0


def accuracy_report(logits: torch.Tensor, labels: torch.Tensor, classes: list[str],
                    chosen: list[int] | None = None) -> dict[str, Any]:
    """A JSON-ready summary. `chosen` adds the chosen/rest/task figures."""
    logits, labels = logits.cpu(), labels.cpu()
    predictions = logits.argmax(1)
    hits = predictions == labels
    per_class = []
    for index, name in enumerate(classes):
        mask = labels == index
        correct, total = int(hits[mask].sum()), int(mask.sum())
        per_class.append({"class": name, "correct": correct, "total": total, "accuracy": _rate(correct, total)})
    report: dict[str, Any] = {
        "overall": _rate(int(hits.sum()), len(labels)),
        "correct": int(hits.sum()),
        "total": len(labels),
        "per_class": per_class,
    }
    if chosen:
        chosen_ids = torch.tensor(chosen)
        in_chosen = torch.isin(labels, chosen_ids)
        rest = ~in_chosen
        task_predictions = chosen_ids[logits[in_chosen][:, chosen_ids].argmax(1)]
        report.update(
            chosen_classes=[classes[i] for i in chosen],
            chosen=_rate(int(hits[in_chosen].sum()), int(in_chosen.sum())),
            rest=_rate(int(hits[rest].sum()), int(rest.sum())),
            task=_rate(int((task_predictions == labels[in_chosen]).sum()), int(in_chosen.sum())),
        )
    return report
