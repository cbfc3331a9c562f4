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


def test_adapter_costs_time_training_steps_and_inference_and_give_vera_s_ratios_to_each_other_model(monkeypatch):
    base = tiny_base()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    # Milliseconds chosen here (a hundred times more for a warm-up), so that each figure can be traced to its call.
    chosen = {"vera": 3.0, "lora": 2.0, "peft vera": 6.0, "peft lora": 1.5, "base": 1.0}
    timed = []

    def each_call_once(calls, rounds):
        timed.append((rounds, {name: call() for name, call in calls.items()}))
        return {name: chosen[name] * (1 if rounds == 7 else 100) for name in calls}

    monkeypatch.setattr(bench, "round_robin_ms", each_call_once)
    result = bench.adapter_costs(base, [ATTENTION], vera_rank=8, lora_rank=2, batch=4, rounds=7)
    models = set(result["trainable"])
    assert {"vera", "lora"} <= models
    # Training steps of every adapter, then inference of each and of the base: a warm-up, then the timed rounds.
    assert [(rounds, set(outputs)) for rounds, outputs in timed] == [
        (2, models), (7, models), (2, models | {"base"}), (7, models | {"base"})]
    # The timed steps trained the adapters, not the base: after them every adapter answers otherwise than
    # the base it started as (the first test), without a graph (inference under no_grad).
    inference = timed[-1][1]
    assert all(out.shape == (4, 10) and not out.requires_grad for out in inference.values())
    assert all(not torch.equal(inference[name], inference["base"]) for name in models)
    assert all(torch.equal(value, before[key]) for key, value in base.state_dict().items())
    # The timed rounds are reported, not the warm-up; VeRA over each other model, each model over the base.
    assert result["train_ms"] == {name: chosen[name] for name in models}
    assert result["inference_ms"] == {name: chosen[name] for name in models | {"base"}}
    ratios = {"vera / lora": 1.5, "vera / peft vera": 0.5, "vera / peft lora": 2.0}
    assert result["train_ratio"] == {key: ratios[key] for key in ratios if key.split(" / ")[1] in models}
    assert result["inference_ratio"] == {f"{name} / base": chosen[name] for name in models}


def test_the_precision_benchmark_times_the_same_step_three_ways(monkeypatch):
    spec = importlib.util.spec_from_file_location("vit_precision", BENCHMARKS / "vit_precision.py")
    precision = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(precision)
    losses = {name: precision.training_step(TINY_VIT, 4, context)() for name, context in precision.CONTEXTS.items()}
    # One model, one batch: the first step's loss differs only by bf16 rounding.
    assert max(losses.values()) - min(losses.values()) < 0.02
    ran = []

    def timed(calls, rounds):
        ran.extend(name for name, call in calls.items() if call() is not None)
        return {name: 50.0 * (i + 1) for i, name in enumerate(calls)}

    monkeypatch.setattr(precision, "round_robin_ms", timed)
    rates = precision.precision_rates(TINY_VIT, batch=4, rounds=2, steps=3)
    # 3 steps of 4 images in 50, 100 and 150 ms.
    assert ran == list(precision.CONTEXTS)
    assert rates == {"fp32": 240.0, "bf16 autocast": 120.0, "bf16, attention as products": 80.0}
