"""The adapter benchmark on the ViT (benchmarks/vit_adapters.py) in a smoke-sized run."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from vera_cli.models import build_model

from conftest import ATTENTION, TINY_VIT

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # as when the script runs: it imports the shared timing helper beside it
SPEC = importlib.util.spec_from_file_location("vit_adapters", BENCHMARKS / "vit_adapters.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def tiny_base() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(TINY_VIT).eval()


def test_the_timed_adapters_start_as_the_base_and_train_what_their_method_says():
    pytest.importorskip("peft")
    base = tiny_base()
    models = bench.adapted_models(base, [ATTENTION], vera_rank=8, lora_rank=2)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        for model in models.values():
            assert torch.allclose(model.eval()(x), base(x), atol=1e-6)
    trainable = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in models.items()}
    # Query and value of two blocks, width 16: VeRA r + out each, LoRA r * (in + out) each.
    assert trainable == {"vera": 4 * (8 + 16), "peft vera": 4 * (8 + 16), "lora": 4 * 2 * 32, "peft lora": 4 * 2 * 32}


def test_adapter_costs_reports_every_model_and_vera_s_ratios():
    result = bench.adapter_costs(tiny_base(), [ATTENTION], vera_rank=8, lora_rank=2, batch=4, rounds=2)
    others = set(result["train_ms"]) - {"vera"}
    assert {"lora"} <= others
    for name in others:
        assert result["train_ratio"][f"vera / {name}"] == pytest.approx(result["train_ms"]["vera"] / result["train_ms"][name])
    assert set(result["inference_ratio"]) == {f"{name} / base" for name in result["train_ms"]}
    assert all(ms > 0 for ms in result["inference_ms"].values())
