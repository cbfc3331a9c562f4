"""Adaptation internals: the feature cache equals the plain path; the forgetting options do what they say."""

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vera_cli.commands.adapt import masked_to, run_adapt, training_selection
from vera_cli.fast import build_pipeline
from vera_cli import config
from vera_cli.config import AdaptConfig, AdapterConfig
from vera_cli.data import batch_indices, load_cifar10, normalize
from vera_cli.selection import take
from vera_cli.models import ConvNet
from vera_cli.adapters.inject import inject

from conftest import QUICK


def adapt_config(**kwargs) -> AdaptConfig:
    settings = {"base": "runs/base", "device": "cpu", "train.epochs": 2, "train.batch_size": 16, "train.lr": 0.02}
    return dataclasses.replace(config.load(AdaptConfig, "adapt-vera", settings), **kwargs)


def test_feature_cache_gives_the_same_adapter_and_accuracy_as_the_plain_path(vera, pretrained, cifar_root):
    data = load_cifar10(cifar_root, download=False)
    cached = run_adapt(adapt_config(run_dir="runs/cached"), log=lambda m: None, progress=False, data=data)
    plain = run_adapt(adapt_config(run_dir="runs/plain", cache_features=False), log=lambda m: None, progress=False, data=data)
    first, second = load_file("runs/cached/adapter.safetensors"), load_file("runs/plain/adapter.safetensors")
    for key in first:
        assert torch.allclose(first[key], second[key], atol=1e-5), key
    assert cached.test.per_class == plain.test.per_class


@pytest.mark.parametrize("method, cached_width", [("vera", 120 + 32), ("lora", 120 + 400)])
def test_the_feature_cache_reaches_into_the_first_adapted_layers_frozen_part(cifar_root, method, cached_width):
    data = load_cifar10(cifar_root, download=False)
    torch.manual_seed(0)
    model = inject(ConvNet(), AdapterConfig(method=method, rank=32))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # a delta that is not zero
    pipeline = build_pipeline(model, data.train, data.test, adapt_config())
    inputs, labels = next(iter(pipeline.train_batches(torch.Generator().manual_seed(0))))
    index = next(iter(batch_indices(len(data.train), 16, torch.Generator().manual_seed(0), labels.device)))
    assert inputs.shape == (16, cached_width) and torch.equal(labels, data.train.labels[index])
    # The base's output and VeRA's down-projection were computed once; the step computes the rest.
    expected = model.classifier(model.features(normalize(data.train.images[index])))
    torch.testing.assert_close(pipeline.forward(inputs), expected, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(pipeline.forward(inputs).square().sum(), [model.fc1.vera_b if method == "vera" else model.fc1.lora_B])
    want = torch.autograd.grad(expected.square().sum(), [model.fc1.vera_b if method == "vera" else model.fc1.lora_B])
    torch.testing.assert_close(grads, want, rtol=1e-4, atol=1e-5)


def test_runs_over_one_base_share_its_features_of_the_images_and_get_the_same_logits(cifar_root, monkeypatch):
    from vera_cli.fast import SharedViews, feature_cache

    data = load_cifar10(cifar_root, download=False)
    computed = []
    original = feature_cache.view_outputs
    monkeypatch.setattr(feature_cache, "view_outputs",
                        lambda prefix, split, *args: computed.append(len(split)) or original(prefix, split, *args))
    torch.manual_seed(0)
    base = ConvNet()
    store = {}
    everything, some = torch.arange(len(data.train)), torch.arange(0, len(data.train), 2)
    for adapter, training in ((AdapterConfig(method="vera", rank=8), everything),
                              (AdapterConfig(method="lora", rank=4), everything),
                              (AdapterConfig(method="head"), some), (AdapterConfig(method="vera", rank=4), some)):
        model = inject(copy.deepcopy(base), adapter)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
        train = take(data.train, training)
        shared = build_pipeline(model, train, data.test, adapt_config(), "flip", SharedViews(store, ("base", "flip"), training))
        alone = build_pipeline(model, train, data.test, adapt_config(), "flip")
        torch.testing.assert_close(shared.test_logits(), alone.test_logits(), rtol=0, atol=0)
        generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        for (a, _), (b, _) in zip(shared.train_batches(generator()), alone.train_batches(generator())):
            torch.testing.assert_close(shared.forward(a), alone.forward(b), rtol=0, atol=0)
    # Through the frozen features for the shared pipelines: the test images once, each training selection once
    # (it changed once); for each pipeline alone, both every time.
    test, train, half = len(data.test), len(data.train), len(some)
    assert computed == [test, train, test, train, test, train, half, test, half, test, half]


def test_shared_views_let_go_of_a_selections_features_before_computing_the_next():
    import weakref

    from vera_cli.fast import SharedViews

    store = {}
    first = torch.zeros(3, 4)
    SharedViews(store, ("base", "none"), torch.arange(3)).train(lambda: first)
    gone = weakref.ref(first)
    del first
    held = []
    SharedViews(store, ("base", "none"), torch.arange(2)).train(lambda: held.append(gone() is not None) or torch.zeros(2, 4))
    assert held == [False]


def test_the_feature_cache_stops_before_a_layer_with_dropout_or_a_trainable_base(cifar_root):
    data = load_cifar10(cifar_root, download=False)
    for adapter in (AdapterConfig(method="vera", dropout=0.1), AdapterConfig(method="vera", trainable=["fc1"])):
        model = inject(ConvNet(), adapter)
        pipeline = build_pipeline(model, data.train, data.test, adapt_config())
        assert pipeline.forward == model.classifier
        inputs, _ = next(iter(pipeline.train_batches(torch.Generator().manual_seed(0))))
        assert inputs.shape == (16, 400)
    full = inject(ConvNet(), AdapterConfig(method="full"))
    pipeline = build_pipeline(full, data.train, data.test, adapt_config())
    images, _ = next(iter(pipeline.train_batches(torch.Generator().manual_seed(0))))
    assert images.shape == (16, 3, 32, 32)  # a trainable prefix: whole images every step
    torch.testing.assert_close(pipeline.forward(images), full(images), rtol=1e-5, atol=1e-5)


def test_replay_adds_the_asked_share_of_other_class_images(cifar_root):
    labels = load_cifar10(cifar_root, download=False).train.labels
    chosen = [3, 2, 5]
    only = labels[training_selection(labels, chosen, [], adapt_config(forgetting="none")).train]
    assert set(only.tolist()) == set(chosen) and len(only) == int(torch.isin(labels, torch.tensor(chosen)).sum())
    mixed = training_selection(labels, chosen, [], adapt_config(forgetting="replay", replay_fraction=0.5))
    others = [label for label in labels[mixed.train].tolist() if label not in chosen]
    assert len(mixed.train) == len(only) + len(others) and mixed.replayed == len(others)
    assert len(others) == round(0.5 * len(only))
    assert len(set(others)) > 1


def test_mask_gives_gradient_to_the_chosen_logits_only():
    logits_seen = {}

    def forward(x):
        out = x @ torch.ones(4, 10)
        out.retain_grad()
        logits_seen["out"] = out
        return out

    def source(generator):
        yield torch.randn(6, 4, requires_grad=True), torch.tensor([3, 2, 5, 3, 2, 5])

    masked_forward, masked_source = masked_to([3, 2, 5], forward, source, torch.device("cpu"))
    inputs, labels = next(masked_source(None))
    assert labels.tolist() == [0, 1, 2, 0, 1, 2]
    loss = torch.nn.functional.cross_entropy(masked_forward(inputs), labels)
    loss.backward()
    grad = logits_seen["out"].grad
    assert grad[:, [2, 3, 5]].abs().sum() > 0
    assert grad[:, [0, 1, 4, 6, 7, 8, 9]].abs().sum() == 0


@pytest.mark.parametrize("forgetting", ["mask", "replay"])
def test_forgetting_options_reach_the_summary(vera, pretrained, cifar_root, forgetting):
    result = vera("adapt", *QUICK, "--set", f"forgetting={forgetting}", "--run-dir", f"runs/{forgetting}")
    assert result.code == 0, result.err
    summary = json.loads(Path(f"runs/{forgetting}/summary.json").read_text())
    assert summary["forgetting"] == forgetting
    chosen = sum(1 for label in load_cifar10(cifar_root, download=False).train.labels.tolist() if label in (2, 3, 5))
    assert summary["train_images"] == (chosen if forgetting == "mask" else chosen + round(0.5 * chosen))
