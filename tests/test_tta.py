"""Flip test-time augmentation: what it averages, and that every command measures a base the same way."""

import json
from pathlib import Path

import pytest
import torch

from vera_cli.adapter_files import apply_adapter
from vera_cli.adapters.inject import inject
from vera_cli.bases import WEIGHTS_FILE, fingerprint, load_pretrained
from vera_cli import fast
from vera_cli.fast import build_pipeline
from vera_cli import config
from vera_cli.config import AdaptConfig, AdapterConfig
from vera_cli.data import CLASSES, Split, load_cifar10
from vera_cli.metrics import accuracy_report, predict_logits, view_outputs
from vera_cli.models import ConvNet
from vera_cli.runs import Run
from vera_cli.files import write_tensors

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
    with pytest.raises(ValueError, match="tta must be 'none' or 'flip', got 'Flip'"):
        predict_logits(model, test, "Flip")


def test_cached_features_give_the_same_flip_averaged_logits_as_whole_images(cifar_root):
    data = load_cifar10(cifar_root, download=False)
    settings = config.load(AdaptConfig, "adapt-vera", {"base": "runs/base"})
    model = inject(ConvNet(), AdapterConfig(method="vera", rank=8)).eval()
    cached = build_pipeline(model, data.train, data.test, settings, "flip")
    assert next(iter(cached.train_batches(torch.Generator().manual_seed(0))))[0].dim() == 2  # cached, not images
    assert torch.allclose(cached.test_logits(), predict_logits(model, data.test, "flip"), atol=1e-5)
    assert not torch.allclose(cached.test_logits(), predict_logits(model, data.test), atol=1e-3)
    assert torch.allclose(build_pipeline(model, data.train, data.test, settings).test_logits(),
                          predict_logits(model, data.test), atol=1e-5)


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def eval_mode_images(monkeypatch) -> list[int]:
    """Sizes of the batches the ConvNet classifies in eval mode: test-time passes, not training steps."""
    seen: list[int] = []
    classifier = ConvNet.classifier

    def counted(self, x):
        if not self.training:
            seen.append(len(x))
        return classifier(self, x)

    monkeypatch.setattr(ConvNet, "classifier", counted)
    return seen


def reports(model: torch.nn.Module, test: Split, chosen: list[int] | None = None) -> dict[str, dict]:
    model.eval()
    return {tta: accuracy_report(predict_logits(model, test, tta), test.labels, CLASSES, chosen).to_dict()
            for tta in ("none", "flip")}


@pytest.fixture
def asymmetric_base(pretrained, cifar_root) -> Path:
    """The pretrained run with weights whose flip-averaged test report differs from the images-alone one.

    Two epochs on the synthetic set give a model that names one class for every image, on which
    both rules agree: no test could tell them apart. A random ConvNet with its mean test logit
    taken out of fc5's bias names all ten classes, and the mirror images change 42 of its 100 answers.
    """
    torch.manual_seed(0)
    model = ConvNet().eval()
    test = load_cifar10(cifar_root, download=False).test
    with torch.no_grad():
        model.fc5.bias -= predict_logits(model, test).mean(0)
    write_tensors(pretrained / WEIGHTS_FILE, model.state_dict())
    both = reports(model, test)
    assert both["flip"] != both["none"]
    return pretrained


def test_pretrain_classifies_each_test_image_and_its_mirror_image_only_with_flip(vera, cifar_root, monkeypatch):
    seen = eval_mode_images(monkeypatch)
    shown = []

    def mirror_views_that_disagree(model, split, tta):
        # The two-epoch model names one class whatever it is shown; noise in the mirror view's logits
        # makes the flip average name others, so that the recorded report shows which views it used.
        views = view_outputs(model, split, tta)
        views[1:] = 100 * torch.randn(views[1:].shape, generator=torch.Generator().manual_seed(0))
        shown.append(views)
        return views

    monkeypatch.setattr(fast, "view_outputs", mirror_views_that_disagree)
    assert vera("pretrain", *QUICK, "--run-dir", "runs/flip").code == 0
    # Two epochs, each evaluated: 100 test images and their 100 mirror images each time; images_alone
    # comes from the same pass.
    assert sum(seen) == 2 * 2 * 100
    recorded = summary(Path("runs/flip"))
    test = load_cifar10(cifar_root, download=False).test
    flip, alone = (accuracy_report(logits, test.labels, CLASSES) for logits in (shown[-1].mean(0), shown[-1][0]))
    assert flip.to_dict() != alone.to_dict()
    assert recorded["tta"] == "flip" and recorded["test"] == flip.to_dict() and recorded["images_alone"] == alone.overall
    seen.clear()
    assert vera("pretrain", *QUICK, "--set", "model.tta=none", "--run-dir", "runs/plain").code == 0
    assert sum(seen) == 2 * 100
    recorded = summary(Path("runs/plain"))
    assert recorded["tta"] == "none" and recorded["images_alone"] is None
    seen.clear()
    plain = vera("eval", "runs/plain", "--json").json()
    assert plain["reports"]["base"] == recorded["test"] and plain["tta"] == "none"
    assert sum(seen) == 100
    seen.clear()
    assert vera("eval", "runs/flip", "--json").json()["tta"] == "flip"
    assert sum(seen) == 2 * 100
    assert "each image with its mirror image" in " ".join(vera("eval", "runs/flip").out.split())
    assert "mirror" not in vera("eval", "runs/plain").out


def test_eval_and_adapt_measure_the_base_and_its_adapters_by_the_bases_rule(vera, asymmetric_base, cifar_root):
    test = load_cifar10(cifar_root, download=False).test
    base, _ = load_pretrained(Run(asymmetric_base), torch.device("cpu"))
    assert vera("eval", str(asymmetric_base), "--json").json()["reports"]["base"] == reports(base, test)["flip"]
    chosen = [CLASSES.index(c) for c in ("cat", "dog")]
    # The feature cache (adapters on fc layers) and whole images (LoRA on the convolutions too).
    for run, args in (("runs/cached", ["--method", "vera", "--rank", "4"]),
                      ("runs/convs", ["--method", "lora", "--rank", "2", "--set", "adapter.targets=[all]"])):
        result = vera("adapt", "--classes", "cat", "dog", *QUICK, *args, "--run-dir", run)
        assert result.code == 0, result.err
        recorded = summary(Path(run))
        assert recorded["base"] == reports(base, test, chosen)["flip"]
        adapted, _ = load_pretrained(Run(asymmetric_base), torch.device("cpu"))
        apply_adapter(adapted, Path(run), fingerprint(adapted))
        assert recorded["test"] == reports(adapted, test, chosen)["flip"]
        assert vera("eval", run, "--json").json()["reports"][run] == recorded["test"]


def test_compare_measures_each_base_by_its_rule(vera, asymmetric_base, cifar_root):
    test = load_cifar10(cifar_root, download=False).test
    base, _ = load_pretrained(Run(asymmetric_base), torch.device("cpu"))
    result = vera("compare", "--classes", "cat", "dog", "--methods", "head", "--seeds", "1", "--epochs", "1",
                  "--run-dir", "runs/cmp")
    assert result.code == 0, result.err
    line = next(line for line in json.loads(Path("runs/cmp/table.json").read_text()) if line["method"] == "base")
    flip = reports(base, test, [CLASSES.index("cat"), CLASSES.index("dog")])["flip"]
    assert {m: line[m] for m in ("chosen", "task", "rest", "overall")} == {m: flip[m] for m in ("chosen", "task", "rest", "overall")}


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


def test_a_hand_edited_base_config_with_a_bad_tta_is_named_in_the_error(vera, pretrained):
    config_file = pretrained / "config.yaml"
    config_file.write_text(config_file.read_text().replace("tta: flip", "tta: Flip"))
    for argv in (["eval", str(pretrained)], ["adapt", "--classes", "cat", "dog", *QUICK, "--run-dir", "runs/a"]):
        result = vera(*argv)
        assert result.code == 2 and result.err.strip() == (
            f"error: {config_file}: model.tta must be one of none, flip; got 'Flip' (did you mean flip?); "
            "correct it there or repeat the run")
    assert not Path("runs/a").exists()
