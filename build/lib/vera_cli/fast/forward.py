"""A model's forward pass, and its predictions over a split, with every speed-up that applies."""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from vera_cli.fast.convnet import features as convnet_features
from vera_cli import metrics
from vera_cli.data import Split
from vera_cli.fast.augment import augmented
from vera_cli.fast.weight_path import choose_per_call
from vera_cli.models.convnet import ConvNet

Forward = Callable[[torch.Tensor], torch.Tensor]


def features(model: nn.Module) -> Forward:
    """The model's `features` (its prefix before the classifier), fast where this package knows how."""
    return functools.partial(convnet_features, model) if isinstance(model, ConvNet) else model.features


def forward(model: nn.Module) -> Forward:
    """The model's forward, fast: its adapted layers choose the cheaper weight path per call (call this again
    after adding adapters), and the ConvNet's prefix runs as `features` above."""
    choose_per_call(model)
    if isinstance(model, ConvNet):
        prefix = features(model)
        return lambda x: model.classifier(prefix(x))
    return model


def view_outputs(forward: Forward, split: Split, tta: str = "none") -> torch.Tensor:
    """`vera_cli.metrics.view_outputs` on batches gathered and normalised in one compiled pass."""
    return metrics.view_outputs(forward, split, tta, augment=augmented)


def predict_logits(forward: Forward, split: Split, tta: str = "none") -> torch.Tensor:
    """`vera_cli.metrics.predict_logits` on batches gathered and normalised in one compiled pass."""
    return metrics.predict_logits(forward, split, tta, augment=augmented)
