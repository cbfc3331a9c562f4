"""Every command on the Vision Transformer, as on the ConvNet: a tiny ViT on the synthetic CIFAR-10."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vera_cli import config as config_module
from vera_cli.adapters.inject import inject
from vera_cli.fast import build_pipeline
from vera_cli.fast.mixed_precision import native_bf16
from vera_cli.config import AdaptConfig, AdapterConfig, PretrainConfig
from vera_cli.data import batch_indices, load_cifar10, normalize
from vera_cli.metrics import predict_logits
from vera_cli.models import ModelConfig, build_model, count_parameters

from conftest import ATTENTION, TINY_VIT, TINY_VIT_SETTINGS

ONE_EPOCH = ["--epochs", "1", "--batch-size", "32"]


def test_pretrain_records_the_vit_section_and_eval_rebuilds_it(vera, vit_base):
    recorded = config_module.build(PretrainConfig, config_module.read_yaml("", (vit_base / "config.yaml").read_text()))
    assert recorded.model == TINY_VIT
    summary = json.loads((vit_base / "summary.json").read_text())
    assert summary["model"] == "vit" and summary["parameters"] == count_parameters(build_model(TINY_VIT))
    assert vera("eval", str(vit_base), "--json").json()["reports"]["base"] == summary["test"]
    # pretrain-vit's precision is auto: the summary says what it resolved to on this processor.
    assert recorded.train.precision == "auto"
    assert summary["precision"] == ("bf16" if native_bf16(torch.device("cpu")) else "fp32")


def test_a_config_that_names_the_model_as_a_string_still_loads():
    assert config_module.load_recorded(PretrainConfig, {"model": "vit"}, "config.yaml").model == ModelConfig("vit")
    assert config_module.load_recorded(PretrainConfig, {}, "config.yaml").model == ModelConfig("convnet")


def test_vera_on_query_value_stores_only_those_vectors_and_merges_to_the_same_predictions(vera, vit_base):
    # The paper's targets as a regex, as a user without the preset would write them.
    result = vera("adapt", "--target", r"blocks\..*\.(query|value)", "--rank", "8", *ONE_EPOCH, "--run-dir", "runs/qv")
    assert result.code == 0, result.err
    keys = sorted(load_file("runs/qv/adapter.safetensors"))
    assert keys == sorted(f"blocks.{i}.attn.{p}.vera_{v}" for i in (0, 1) for p in ("query", "value") for v in "bd")
    unmerged = vera("eval", "runs/qv", "--json").json()["reports"]["runs/qv"]
    merged = vera("eval", "runs/qv", "--merge", "--json").json()["reports"]["runs/qv"]
    assert merged["per_class"] == unmerged["per_class"]


@pytest.mark.parametrize("method", ["lora", "full", "head"])
def test_every_other_method_adapts_the_vit(vera, vit_base, method):
    # Rank 16: the widest any of this ViT's layers can use (min(in, out) of a 16-wide layer); full and head have none.
    rank = ["--rank", "16"] if method == "lora" else []
    result = vera("adapt", "--method", method, *rank, *ONE_EPOCH, "--run-dir", f"runs/{method}")
    assert result.code == 0, result.err
    trainable = json.loads(Path(f"runs/{method}/summary.json").read_text())["trainable_parameters"]
    # lora rank 16 on all 13 Linear layers: per block 4 of 16->16 and 16->32, 32->16; the head 16->10.
    expected = {"lora": 16 * (2 * (4 * (16 + 16) + 2 * (16 + 32)) + (16 + 10)),
                "full": count_parameters(build_model(TINY_VIT)), "head": 16 * 10 + 10}
    assert trainable == expected[method]


def test_head_training_caches_the_frozen_body_and_adapters_in_blocks_do_not(cifar_root):
    data = load_cifar10(cifar_root, download=False)
    cfg = config_module.load(AdaptConfig, "adapt-vera", {"train.epochs": 1, "train.batch_size": 16})
    torch.manual_seed(0)
    model = inject(build_model(TINY_VIT).eval(), AdapterConfig(method="head"))
    pipeline = build_pipeline(model, data.train, data.test, cfg)
    assert pipeline.forward == model.classifier
    assert torch.allclose(pipeline.test_logits(), predict_logits(model, data.test), atol=1e-5)


@pytest.mark.parametrize("targets, first", [([ATTENTION], 0), ([r"blocks\.1\.attn\.(query|value)"], 1)])
def test_adapters_in_blocks_cache_the_tokens_through_the_blocks_before_them(cifar_root, targets, first):
    data = load_cifar10(cifar_root, download=False)
    cfg = config_module.load(AdaptConfig, "adapt-vera", {"train.epochs": 1, "train.batch_size": 16})
    torch.manual_seed(0)
    model = inject(build_model(TINY_VIT).eval(), AdapterConfig(targets=targets))
    with torch.no_grad():
        for tensor in model.parameters():
            if tensor.requires_grad:
                tensor.add_(torch.randn_like(tensor) * 0.1)
    pipeline = build_pipeline(model, data.train, data.test, cfg)
    tokens, labels = next(iter(pipeline.train_batches(torch.Generator().manual_seed(0))))
    index = next(iter(batch_indices(len(data.train), 16, torch.Generator().manual_seed(0), labels.device)))
    images = normalize(data.train.images[index])
    expected = model.tokens(images)
    for block in model.blocks[:first]:
        expected = block(expected)
    torch.testing.assert_close(tokens, expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pipeline.forward(tokens), model(images), rtol=1e-5, atol=1e-5)
    trained = [tensor for tensor in model.parameters() if tensor.requires_grad]
    torch.testing.assert_close(torch.autograd.grad(pipeline.forward(tokens).square().sum(), trained),
                               torch.autograd.grad(model(images).square().sum(), trained), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pipeline.test_logits(), predict_logits(model, data.test), rtol=1e-5, atol=1e-5)


def test_a_vit_with_dropout_or_augmentation_trains_on_whole_images(cifar_root):
    data = load_cifar10(cifar_root, download=False)
    cfg = config_module.load(AdaptConfig, "adapt-vera", {"train.epochs": 1, "train.batch_size": 16})
    dropout = ModelConfig("vit", dataclasses.replace(TINY_VIT.vit, dropout=0.1))
    model = inject(build_model(dropout), AdapterConfig(targets=[ATTENTION]))
    assert build_pipeline(model, data.train, data.test, cfg).forward is model
    model = inject(build_model(TINY_VIT), AdapterConfig(targets=[ATTENTION]))
    augmenting = config_module.load(AdaptConfig, "adapt-vera", {"train.flip": True, "train.batch_size": 16})
    images, _ = next(iter(build_pipeline(model, data.train, data.test, augmenting).train_batches(torch.Generator())))
    assert images.shape == (16, 3, 32, 32)


@pytest.mark.parametrize("adapter", [AdapterConfig(method="head"), AdapterConfig(targets=["head"])])
def test_a_vit_with_dropout_and_a_frozen_body_trains_on_whole_images(cifar_root, adapter):
    # Only the head trains: the body's features drop out in every training step, so they cannot be cached (they were:
    # trained without dropout, unlike cache_features=false).
    data = load_cifar10(cifar_root, download=False)
    cfg = config_module.load(AdaptConfig, "adapt-vera", {"train.epochs": 1, "train.batch_size": 16})
    dropout = ModelConfig("vit", dataclasses.replace(TINY_VIT.vit, dropout=0.1))
    model = inject(build_model(dropout), adapter)
    assert build_pipeline(model, data.train, data.test, cfg).forward is model


def test_count_params_sets_vera_beside_lora_and_the_paper(vera):
    result = vera("count-params", "--model", "vit", "--rank", "256", "--target", ATTENTION, "--versus-lora", "8", "--json")
    counts = result.json()
    # Default ViT: depth 4, width 128; query and value of every block read one 128x128 pair.
    assert counts["trainable"] == 4 * 2 * (256 + 128)
    assert [pair["layers"] for pair in counts["pairs"]] == [
        [f"blocks.{i}.attn.{p}" for i in range(4) for p in ("query", "value")]]
    assert counts["pairs"][0]["one_tensor"]
    versus = counts["versus_lora"]
    assert versus["lora"] == 4 * 2 * 8 * (128 + 128) and versus["ratio"] == pytest.approx(16_384 / 3_072)
    assert versus["paper_ratio"] == pytest.approx(294_900 / 24_600)
    sliced = vera("count-params", "--model", "vit", "--sharing", "sliced", "--json").json()
    assert len(sliced["pairs"]) == 1 and len(sliced["pairs"][0]["layers"]) == 4 * 6 + 1


def test_count_params_refuses_versus_lora_for_another_method(vera):
    result = vera("count-params", "--method", "lora", "--versus-lora", "8")
    assert result.code == 2 and "--versus-lora sets VeRA beside LoRA: use it with --method vera" in result.err


def test_compare_adapts_the_targets_it_is_given(vera, vit_base):
    result = vera("compare", "--methods", "vera,lora,head", "--ranks", "4", "--targets", "attention,all-linear",
                  *ONE_EPOCH[:2], "--run-dir", "runs/cmp")
    assert result.code == 0, result.err
    rows = {(row["method"], row["targets"]): row for row in json.loads(Path("runs/cmp/table.json").read_text())}
    # attention: query and value of 2 blocks (16 -> 16); all-linear: every Linear but the head.
    assert rows["vera", "attention"]["trainable"] == 2 * 2 * (4 + 16)
    assert rows["lora", "attention"]["trainable"] == 2 * 2 * 4 * (16 + 16)
    assert rows["vera", "all-linear"]["trainable"] == 2 * (4 * (4 + 16) + (4 + 32) + (4 + 16))
    assert rows["lora", "all-linear"]["trainable"] == 2 * 4 * (4 * (16 + 16) + 2 * (16 + 32))
    assert rows["head", None]["trainable"] == 16 * 10 + 10


def test_interrupted_vit_pretrain_resumes_to_identical_weights(vera, interrupt_after_epoch):
    args = ["--config", "pretrain-vit", "--set", TINY_VIT_SETTINGS, "--epochs", "2", "--batch-size", "64"]
    assert vera("pretrain", *args, "--run-dir", "runs/straight").code == 0
    interrupt_after_epoch(1)
    assert vera("pretrain", *args, "--run-dir", "runs/cut").code == 130
    assert vera("pretrain", "--resume", "runs/cut").code == 0
    straight, cut = load_file("runs/straight/model.safetensors"), load_file("runs/cut/model.safetensors")
    assert straight.keys() == cut.keys() and all(torch.equal(straight[k], cut[k]) for k in straight)


@pytest.mark.slow
def test_experiment_vit_runs_the_write_up_on_the_vit_with_the_paper_s_adapter(vera):
    quick = ["--set", f"pretrain.{TINY_VIT_SETTINGS}", "--set", "pretrain.train.epochs=1", "--set",
             "pretrain.train.batch_size=32", "--set", "adapt.train.epochs=1"]
    result = vera("experiment", "--config", "experiment-vit", *quick, "--run-dir", "runs/exp")
    assert result.code == 0, result.err
    summary = json.loads(Path("runs/exp/summary.json").read_text())
    # Rank 256 on query and value of both blocks (16 -> 16): d and b per layer.
    assert summary["counts"]["trainable"] == 2 * 2 * (256 + 16)
    assert summary["adapted"] == json.loads(Path("runs/exp/adapt/summary.json").read_text())["test"]
