"""adapt's feature cache: what a frozen part of the network computes, computed once.

Without augmentation the frozen convolutional prefix gives the same output every epoch, so its
output is cached; the cache reaches into the first adapted layer where that layer's frozen base
(and VeRA's frozen down-projection) of the cached features never change either. On a ViT whose
blocks carry adapters, the cached part is the patch tokens through the blocks in which nothing trains. The plain path is
the whole model on images, which `build_pipeline` falls back to wherever the cache would not hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from vera_cli.adapters.layer import AdaptedLayer
from vera_cli.config import AdaptConfig
from vera_cli.data import Split, batch_indices, batches
from vera_cli.fast.augment import augmented
from vera_cli.fast.convnet_classifier import cached_classifier
from vera_cli.fast.forward import Forward, features as prefix_of, forward as forward_of, predict_logits, view_outputs
from vera_cli.metrics import predict_features
from vera_cli.models.convnet import ConvNet

BatchSource = Callable[[torch.Generator], Iterator[tuple[torch.Tensor, torch.Tensor]]]


def prefix_is_frozen(model: nn.Module) -> bool:
    modules = getattr(model, "feature_modules", None)
    return modules is not None and not any(p.requires_grad for m in modules() for p in m.parameters())


@dataclass
class SharedViews:
    """The frozen features' outputs shared by the runs over one base and one data set (a comparison's rows, each
    of which would compute them again), kept in `store` by `base` (the base's fingerprint and test-time rule): on
    the test images, and on the training images of the last `training` selection (of the data set's training
    split) asked for, one at a time: each seed replays other images, and processes claim a grid's rows seed by
    seed. A ViT's tokens part way through its blocks are not kept: 0.3 GB for the test images."""

    store: dict[tuple, Any]
    base: tuple[str, str]
    training: torch.Tensor

    def test(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        key = (*self.base, "test")
        if key not in self.store:
            self.store[key] = compute()
        return self.store[key]

    def train(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        key = (*self.base, "training")
        if key not in self.store or not torch.equal(self.store[key][0], self.training):
            # Let go of the last selection's features first: both at once would double the peak of a row.
            self.store.pop(key, None)
            self.store[key] = (self.training, compute())
        return self.store[key][1]


@dataclass
class Pipeline:
    """How adaptation feeds the model: whole images, or cached features of a frozen prefix.

    `logits_of(split)` prepares a split once (its features, when cached) and returns what computes its logits.
    """

    forward: Forward
    train_batches: BatchSource
    logits_of: Callable[[Split], Callable[[], torch.Tensor]]
    test_logits: Callable[[], torch.Tensor]


def build_pipeline(model: nn.Module, train_split: Split, test_split: Split, cfg: AdaptConfig,
                   tta: str = "none", shared: SharedViews | None = None) -> Pipeline:
    """Cache the frozen conv prefix's output once when nothing before the adapters can change.

    The test images' features never change then; the training images' features do not either unless
    augmentation is on (`shared` keeps both for other runs over the same base and images). Test logits follow the
    base's `tta`.
    """
    train = cfg.train
    image_batches = lambda generator: batches(train_split, train.batch_size, generator, train.crop_pixels, train.flip,  # noqa: E731
                                              augmented)
    whole = forward_of(model)
    split = frozen_split(model) if cfg.cache_features else None
    if split is None:
        image_logits = lambda split: lambda: predict_logits(whole, split, tta)  # noqa: E731
        return Pipeline(whole, image_batches, image_logits, image_logits(test_split))
    prefix, rest = split
    kept = shared if shared is not None and prefix_is_frozen(model) else None

    def cached_logits(split: Split) -> Callable[[], torch.Tensor]:
        compute = lambda: view_outputs(prefix, split, tta)  # noqa: E731
        features = kept.test(compute) if kept is not None and split is test_split else compute()
        return lambda: predict_features(rest, features)

    test_logits = cached_logits(test_split)
    if train.crop or train.flip:
        return Pipeline(whole, image_batches, cached_logits, test_logits)
    compute = lambda: view_outputs(prefix, train_split)[0]  # noqa: E731
    features = kept.train(compute) if kept is not None else compute()
    forward = rest
    first = model.first_classifier_layer() if prefix_is_frozen(model) and hasattr(model, "first_classifier_layer") else None
    if isinstance(first, AdaptedLayer) and _caches_frozen_part(first):
        # The cache reaches into the first adapted layer: its frozen base and (VeRA) down-projection of the
        # cached features never change either.
        with torch.no_grad():
            features = _frozen_part(first, features)
        forward = lambda part: model.after_first_classifier_layer(_from_frozen_part(first, part))  # noqa: E731
        if isinstance(model, ConvNet):
            forward = cached_classifier(model, forward)

    def feature_batches(generator: torch.Generator):
        for index in batch_indices(len(train_split), train.batch_size, generator, train_split.labels.device):
            # index_select, not features[index]: 5x faster on the CPU (22 against 107 us for 256 x 400 floats).
            yield features.index_select(0, index), train_split.labels.index_select(0, index)

    return Pipeline(forward, feature_batches, cached_logits, test_logits)


def frozen_split(model: nn.Module) -> tuple[Forward, Forward] | None:
    """The model as a frozen prefix, whose output can be cached, and the rest that trains: the features and the
    classifier when every feature module is frozen; for a ViT, the tokens through the leading blocks in which nothing
    trains, and the remaining blocks with the head. None where nothing before the first trained weight is fixed."""
    if prefix_is_frozen(model):
        # A ViT's frozen body drops out in training as its blocks below do (its tokens' `drop` is no feature module).
        if _drops([*model.feature_modules(), *([model.drop] if hasattr(model, "tokens") else [])]):
            return None
        return prefix_of(model), model.classifier
    if not hasattr(model, "through_blocks"):
        return None
    trains = lambda module: any(p.requires_grad for p in module.parameters())  # noqa: E731
    first = next((i for i, block in enumerate(model.blocks) if trains(block)), len(model.blocks))
    frozen = [model.embed, model.drop, *model.blocks[:first]]
    if any(trains(module) for module in frozen) or _drops(frozen):
        return None

    def prefix(x: torch.Tensor) -> torch.Tensor:
        x = model.tokens(x)
        for block in model.blocks[:first]:
            x = block(x)
        return x

    return prefix, lambda tokens: model.classifier(model.through_blocks(tokens, first))


def _drops(modules: list[nn.Module]) -> bool:
    """Whether any of `modules` holds a dropout that acts in training: its output is not the same every epoch."""
    return any(isinstance(m, nn.Dropout) and m.p > 0 for module in modules for m in module.modules())


def _caches_frozen_part(layer: AdaptedLayer) -> bool:
    """Whether the frozen part holds for training: a Linear with one unmerged adapter, its base frozen, without dropout."""
    return (isinstance(layer.base, nn.Linear) and layer.plain_delta()
            and not any(p.requires_grad for p in layer.base.parameters()))


def _frozen_part(layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor:
    """Everything the layer computes from x with frozen weights, as one (..., out + k) tensor: the base's
    output beside the delta's frozen input."""
    return torch.cat([layer.base(x), layer.frozen_delta_input(x)], dim=-1)


def _from_frozen_part(layer: AdaptedLayer, part: torch.Tensor) -> torch.Tensor:
    """The layer's output from `_frozen_part(layer, x)`: the same as its forward(x) on the factored path."""
    output, frozen = part.split([layer.out_features, part.shape[-1] - layer.out_features], dim=-1)
    return output + layer.delta_from_frozen(frozen)
