"""Convolution targets through the app: adapt without the feature cache, compare's target axis, merged export."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from vera_cli.adapter_files import apply_adapter
from vera_cli.adapters.inject import inject
from vera_cli.bases import fingerprint, load_pretrained
from vera_cli.commands import compare as compare_module
from vera_cli.fast import build_pipeline
from vera_cli.param_count import count_params
from vera_cli import config
from vera_cli.config import AdaptConfig, AdapterConfig, CompareConfig
from vera_cli.data import load_cifar10
from vera_cli.metrics import predict_logits
from vera_cli.models import ConvNet
from vera_cli.runs import Run


def test_adapting_convolutions_turns_the_feature_cache_off_trains_them_and_exports_merged(vera, pretrained, cifar_root):
    data = load_cifar10(cifar_root, download=False)
    settings = config.load(AdaptConfig, "adapt-vera", {"adapter.targets": ["all"], "train.batch_size": 16})
    assert settings.cache_features
    model = inject(ConvNet(), settings.adapter)
    pipeline = build_pipeline(model, data.train, data.test, settings)
    inputs, _ = next(iter(pipeline.train_batches(torch.Generator().manual_seed(0))))
    assert inputs.shape == (16, 3, 32, 32)  # adapted convolutions: no cached prefix
    torch.testing.assert_close(pipeline.forward(inputs), model(inputs), rtol=1e-5, atol=1e-5)
    # Through the CLI: the conv layers' vectors move (a cached prefix would leave b at its zero start).
    result = vera("adapt", "--target", "all", "--epochs", "1", "--batch-size", "32", "--run-dir", "runs/a")
    assert result.code == 0, result.err
    tensors = load_file("runs/a/adapter.safetensors")
    assert tensors["conv1.vera_b"].abs().sum() > 0 and tensors["conv2.vera_b"].abs().sum() > 0
    assert json.loads(Path("runs/a/summary.json").read_text())["trainable_parameters"] == 628
    # Exported merged: a plain ConvNet with the adapter's outputs.
    result = vera("export", "runs/a", "--merge", "--out", "merged")
    assert result.code == 0, result.err
    plain = ConvNet().eval()
    plain.load_state_dict(load_file("merged/model.safetensors"))
    adapted, _ = load_pretrained(Run(Path(pretrained)), torch.device("cpu"))
    apply_adapter(adapted, Path("runs/a"), fingerprint(adapted))
    assert (predict_logits(plain, data.test) - predict_logits(adapted, data.test)).abs().max() < 1e-5
    assert json.loads(Path("merged/preprocessing.json").read_text())["scale"] == "divide by 255"


def test_compare_grid_names_the_targets_of_vera_and_lora_only():
    points = compare_module.grid(config.load(CompareConfig, "compare", {"methods": ["vera", "head"], "ranks": [4],
                                                                      "targets": ["linear", "all", "fc[12]"]}))
    assert [p.name for p in points] == ["vera-r4-replay-s0", "vera-r4-all-replay-s0", "vera-r4-fc_12_-replay-s0",
                                        "head-replay-s0"]
    assert [p.targets for p in points] == ["linear", "all", "fc[12]", None]


def test_compare_puts_conv_targets_beside_linear_ones(vera, pretrained):
    refused = vera("compare", "--methods", "vera", "--ranks", "2", "--targets", "linear,fc9", "--run-dir", "runs/cmp")
    assert refused.code == 2
    assert refused.err.startswith("error: target 'fc9' matches no adaptable layer"), refused.err
    assert not Path("runs/cmp").exists()
    result = vera("compare", "--methods", "vera,head", "--ranks", "2", "--targets", "linear,all", "--epochs", "1",
                  "--run-dir", "runs/cmp")
    assert result.code == 0, result.err
    table = json.loads(Path("runs/cmp/table.json").read_text())
    assert [(r["method"], r["targets"], r["trainable"]) for r in table] == [
        ("base", None, 0), ("vera", "linear", 2 * 5 + 120 + 84 * 3 + 10), ("vera", "all", 2 * 7 + 6 + 16 + 120 + 84 * 3 + 10),
        ("head", None, 850)]
    assert table[2]["trainable"] == count_params(ConvNet(), AdapterConfig(rank=2, targets=["all"])).trainable
    assert Path("runs/cmp/table.csv").read_text().startswith("method,rank,forgetting,targets,")
    assert "vera-r2-all-replay-s0" in {json.loads(line)["name"] for line in Path("runs/cmp/rows.jsonl").read_text().splitlines()}
    assert " all " in result.out and " linear " in result.out
