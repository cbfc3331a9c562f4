"""Flip test-time augmentation: what it averages, and that every command measures a base the same way."""

import json
from pathlib import Path

import torch

from vera_cli.adapters.inject import inject
from vera_cli.bases import load_pretrained
from vera_cli.commands.adapt import build_pipeline
from vera_cli.config import AdaptConfig, AdapterConfig, TrainConfig
from vera_cli.data import CLASSES, Split, load_cifar10
from vera_cli.metrics import accuracy_report, predict_logits, view_outputs
from vera_cli.models import ConvNet
from vera_cli.runs import Run

from conftest import QUICK


def mirrored(split: Split) -> Split:
    return Split(split.images.flip(-1), split.labels)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return int((logits.argmax(1) == labels).sum()) / len(labels)


def test_flip_averages_the_logits_of_each_image_and_of_its_mirror_image(cifar_root):
    test = load_cifar10(cifar_root, download=False).test
    model = ConvNet().eval()
    alone, mirror = predict_logits(model, test), predict_logits(model, mirrored(test))
    assert (alone - mirror).abs().max() > 1e-3  # the ConvNet is not mirror-symmetric: the average is news
    assert torch.allclose(predict_logits(model, test, "flip", batch_size=7), (alone + mirror) / 2, atol=1e-6)
    views = view_outputs(model, test, "flip")
    assert views.shape == (2, len(test), 10) and torch.allclose(views[0], alone, atol=1e-6)
    assert torch.equal(view_outputs(model, test, "none")[0], alone)


def test_cached_features_give_the_same_flip_averaged_logits_as_whole_images(cifar_root):
    data = load_cifar10(cifar_root, download=False)
    settings = AdaptConfig(base="runs/base", train=TrainConfig(crop=False, flip=False))
    model = inject(ConvNet(), AdapterConfig(method="vera", rank=8)).eval()
    cached = build_pipeline(model, data.train, data.test, settings, "flip")
    assert cached.forward == model.classifier
    assert torch.allclose(cached.test_logits(), predict_logits(model, data.test, "flip"), atol=1e-5)
    assert not torch.allclose(cached.test_logits(), predict_logits(model, data.test), atol=1e-3)
    assert torch.allclose(build_pipeline(model, data.train, data.test, settings).test_logits(),
                          predict_logits(model, data.test), atol=1e-5)


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def images_through_the_model(monkeypatch) -> list[int]:
    seen: list[int] = []
    features = ConvNet.features

    def counted(self, x):
        seen.append(len(x))
        return features(self, x)

    monkeypatch.setattr(ConvNet, "features", counted)
    return seen


def test_pretrain_reports_both_accuracies_and_later_commands_measure_the_base_its_way(vera, pretrained, cifar_root,
                                                                                       monkeypatch):
    recorded = summary(pretrained)
    assert recorded["tta"] == "flip"  # the shipped pretrain config's
    model, _ = load_pretrained(Run(pretrained), torch.device("cpu"))
    test = load_cifar10(cifar_root, download=False).test
    assert recorded["images_alone"] == accuracy(predict_logits(model, test), test.labels)
    assert recorded["test"] == accuracy_report(predict_logits(model, test, "flip"), test.labels, CLASSES).to_dict()
    seen = images_through_the_model(monkeypatch)
    assert vera("eval", str(pretrained), "--json").json()["reports"]["base"] == recorded["test"]
    assert sum(seen) == 2 * len(test)  # each test image and its mirror image
    adapted = vera("adapt", "--classes", "cat", "dog", *QUICK, "--run-dir", "runs/a")
    assert adapted.code == 0, adapted.err
    assert summary(Path("runs/a"))["base"]["per_class"] == recorded["test"]["per_class"]


def test_a_base_pretrained_without_tta_is_measured_on_images_alone(vera, cifar_root, monkeypatch):
    result = vera("pretrain", *QUICK, "--set", "model.tta=none", "--run-dir", "runs/plain")
    assert result.code == 0, result.err
    recorded = summary(Path("runs/plain"))
    assert recorded["tta"] == "none" and recorded["images_alone"] is None
    model, _ = load_pretrained(Run(Path("runs/plain")), torch.device("cpu"))
    test = load_cifar10(cifar_root, download=False).test
    assert recorded["test"] == accuracy_report(predict_logits(model, test), test.labels, CLASSES).to_dict()
    seen = images_through_the_model(monkeypatch)
    assert vera("eval", "runs/plain", "--json").json()["reports"]["base"] == recorded["test"]
    assert sum(seen) == len(test)


def test_compare_says_when_its_bases_classify_test_images_differently(vera, pretrained):
    plain = vera("pretrain", *QUICK, "--set", "model.tta=none", "--run-dir", "runs/plain")
    assert plain.code == 0, plain.err
    result = vera("compare", "--bases", f"{pretrained},runs/plain", "--methods", "head", "--seeds", "1", "--epochs", "1",
                  "--run-dir", "runs/cmp")
    assert result.code == 0, result.err
    assert (f"the bases classify test images differently ({pretrained}: model.tta flip, runs/plain: model.tta none)"
            in " ".join(result.err.split()))
    same = vera("compare", "--bases", f"{pretrained},{pretrained}", "--methods", "head", "--seeds", "1", "--epochs", "1",
                "--run-dir", "runs/cmp2")
    assert same.code == 0, same.err
    assert "classify test images differently" not in same.err
