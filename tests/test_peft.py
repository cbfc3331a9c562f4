"""Our VeRA and LoRA against Hugging Face PEFT: same logits, and exports PEFT loads."""

import json
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

from vera_cli.adapter_files import apply_adapter
from vera_cli.adapters.inject import adapted_layers, inject, projection_bank
from vera_cli.bases import fingerprint
from vera_cli.config import AdapterConfig
from vera_cli.data import load_cifar10
from vera_cli.metrics import accuracy_report, predict_logits
from vera_cli.models import ConvNet, ViT, ViTConfig

peft = pytest.importorskip("peft", reason="peft is not installed: pip install -e '.[peft]' to run these")

TARGETS = ["fc1", "fc2", "fc3", "fc4", "fc5"]
INPUT = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def base_model() -> ConvNet:
    torch.manual_seed(0)
    return ConvNet().eval()


def trained(model) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.2)


def test_vera_projections_and_logits_equal_peft():
    ours = inject(base_model(), AdapterConfig(method="vera", rank=16, sharing="sliced", projection_seed=3))
    theirs = peft.get_peft_model(base_model(), peft.VeraConfig(r=16, target_modules=TARGETS, projection_prng_key=3))
    # Same seed, same generator order: the initial projections agree bit for bit.
    a, b = projection_bank(ours).pair("shared")
    assert torch.equal(a, theirs.base_model.vera_A["default"])
    assert torch.equal(b, theirs.base_model.vera_B["default"])
    trained(ours)
    with torch.no_grad():
        for name, layer in adapted_layers(ours).items():
            peft_layer = theirs.base_model.model.get_submodule(name)
            peft_layer.vera_lambda_d["default"].copy_(layer.vera_d)
            peft_layer.vera_lambda_b["default"].copy_(layer.vera_b)
    difference = (ours(INPUT) - theirs(INPUT)).abs().max()
    assert difference < 1e-5


@pytest.mark.parametrize("targets, peft_targets", [([], TARGETS), (["all"], ["conv1", "conv2", *TARGETS])])
def test_lora_logits_equal_peft(targets, peft_targets):
    ours = inject(base_model(), AdapterConfig(method="lora", rank=8, alpha=16, targets=targets))
    theirs = peft.get_peft_model(base_model(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=peft_targets))
    trained(ours)
    with torch.no_grad():
        for name, layer in adapted_layers(ours).items():
            peft_layer = theirs.base_model.model.get_submodule(name)
            # Conv layers too: our factors have PEFT's shapes, A (r, in, kh, kw) and B (out, r, 1, 1).
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
    assert sorted(adapted_layers(ours)) == sorted(peft_targets)
    # Logits up to about 200: float32 sums in another order than PEFT's, so the agreement is measured
    # against the logits' scale.
    logits, reference = ours(INPUT), theirs(INPUT)
    assert (logits - reference).abs().max() < 1e-5 * reference.abs().max()


EXPORTABLE = [["--sharing", "sliced"], ["--method", "lora", "--rank", "4"]]


def adapt_and_export(vera, *adapt_args: str) -> list[dict]:
    """Adapt the base in the working folder, export to exported/ and base/; `vera eval`'s per-class rows."""
    assert vera("adapt", "--epochs", "1", "--batch-size", "32", *adapt_args, "--run-dir", "runs/a").code == 0
    result = vera("export", "runs/a", "--format", "peft", "--out", "exported", "--base-out", "base")
    assert result.code == 0, result.err
    return vera("eval", "runs/a", "--json").json()["reports"]["runs/a"]["per_class"]


def peft_per_class(build: Callable[[], torch.nn.Module], cifar_root: Path) -> list[dict]:
    """The exported base and adapter loaded with torch and PEFT alone (same logits as ours), evaluated
    like `vera eval`."""
    rebuilt, ours = build(), build().eval()
    rebuilt.load_state_dict(load_file("base/model.safetensors"))
    ours.load_state_dict(load_file("base/model.safetensors"))
    apply_adapter(ours, Path("runs/a"), fingerprint(ours))
    model = peft.PeftModel.from_pretrained(rebuilt, "exported").eval()
    data = load_cifar10(cifar_root, download=False)
    assert (predict_logits(model, data.test) - predict_logits(ours, data.test)).abs().max() < 1e-5
    tta = json.loads(Path("base/model.json").read_text())["tta"]
    test_time = json.loads(Path("base/preprocessing.json").read_text())["test_time"]
    assert ("mirror" in test_time) == (tta == "flip")
    return [c.to_dict() for c in accuracy_report(predict_logits(model, data.test, tta), data.test.labels, data.classes,
                                                 [3, 2, 5]).per_class]


@pytest.mark.parametrize("method_args", [*EXPORTABLE, ["--method", "lora", "--rank", "4", "--set", "adapter.targets=[all]"]])
def test_exported_adapter_loads_in_peft_and_matches_vera_eval(vera, pretrained, cifar_root, method_args):
    ours = adapt_and_export(vera, *method_args)
    assert sorted(p.name for p in Path("exported").iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                                  "preprocessing.json"]
    preprocessing = json.loads(Path("base/preprocessing.json").read_text())
    assert len(preprocessing["mean"]) == 3
    # The adapter folder alone says the same: a user without --base-out still learns how it was measured.
    assert json.loads(Path("exported/preprocessing.json").read_text()) == preprocessing
    assert "mirror" in preprocessing["test_time"]  # the shipped pretrain's flip
    assert json.loads(Path("base/model.json").read_text()) == {"name": "convnet", "tta": "flip"}
    assert peft_per_class(ConvNet, cifar_root) == ours


@pytest.mark.parametrize("method_args", EXPORTABLE)
def test_exported_vit_adapter_on_query_value_matches_vera_eval(vera, vit_base, cifar_root, method_args):
    ours = adapt_and_export(vera, "--target", "attention", *method_args)
    architecture = json.loads(Path("base/model.json").read_text())
    assert architecture["name"] == "vit"
    assert peft_per_class(lambda: ViT(ViTConfig(**architecture["vit"])), cifar_root) == ours


def test_per_shape_vera_is_refused_with_the_option_to_use(vera, pretrained):
    assert vera("adapt", "--epochs", "1", "--run-dir", "runs/p").code == 0
    result = vera("export", "runs/p", "--out", "exported")
    assert result.code == 2
    assert "re-run adapt with --sharing sliced to export it" in result.err
    assert not Path("exported").exists()


def test_vera_on_convolutions_is_refused_with_the_reason(vera, pretrained):
    assert vera("adapt", "--epochs", "1", "--sharing", "sliced", "--set", "adapter.targets=[conv, fc5]",
                "--run-dir", "runs/c").code == 0
    result = vera("export", "runs/c", "--out", "exported")
    assert result.code == 2
    assert result.err.startswith("error: PEFT's VeRA adapts Linear layers only and this adapter also adapts conv1, conv2")
    assert not Path("exported").exists()
