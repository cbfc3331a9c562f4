"""Distillation on the classes not trained on: keep their logits where the base model had them.

Learning without Forgetting (Li & Hoiem, 2016) in its simplest form: besides cross-entropy on the
labels, every training image pays the KL divergence between the base model's softened distribution
over the kept classes and the adapted model's. The base's logits are computed once, before the
adapter is injected; the batches carry row numbers into the training set, and the loss looks up
each row's label and base logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vera_cli.data import Split
from vera_cli.train import Loss


def rows_as_labels(split: Split) -> Split:
    """The same images, labelled with their row numbers, for a loss that looks targets up by row."""
    return Split(split.images, torch.arange(len(split), device=split.labels.device))


def distillation_loss(labels: torch.Tensor, base_logits: torch.Tensor, kept: list[int], weight: float,
                      temperature: float, label_smoothing: float = 0.0) -> Loss:
    """cross-entropy(labels) + weight * T^2 * KL(base || model) over the `kept` classes' logits, by row."""
    # An empty list would make a float tensor, which index_select refuses.
    kept_ids = torch.tensor(kept, dtype=torch.long, device=base_logits.device)
    base_log_probs = F.log_softmax(base_logits.index_select(1, kept_ids) / temperature, dim=1)

    def loss(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        hard = F.cross_entropy(logits, labels[rows], label_smoothing=label_smoothing)
        if not kept:
            return hard
        model_log_probs = F.log_softmax(logits.index_select(1, kept_ids) / temperature, dim=1)
        # T^2 keeps the soft term's gradient on the scale of the hard term's (Hinton et al., 2015).
        soft = F.kl_div(model_log_probs, base_log_probs[rows], log_target=True, reduction="batchmean")
        return hard + weight * temperature ** 2 * soft

    return loss
