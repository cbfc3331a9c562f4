"""bf16 mixed precision: `auto` follows the hardware; attention under bf16 on the CPU as explicit products."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vera_cli.fast import mixed_precision
from vera_cli.fast.mixed_precision import bf16_autocast, explicit_attention, products, uses_bf16
from vera_cli.models import build_model
from vera_cli.train import Trainer

from conftest import TINY_VIT, train_config


@pytest.mark.parametrize("native", [True, False])
def test_auto_trains_in_bf16_only_where_the_device_multiplies_it_natively(monkeypatch, native):
    monkeypatch.setattr(mixed_precision, "native_bf16", lambda device: native)
    model = nn.Linear(8, 3)
    seen = []
    trainer = Trainer(lambda x: seen.append(model(x)) or seen[-1], model, train_config(precision="auto"), steps_per_epoch=1)
    trainer.epoch(1, iter([(torch.randn(4, 8), torch.tensor([0, 1, 2, 0]))]), 4, progress=False)
    assert trainer.bf16 is native and seen[0].dtype == (torch.bfloat16 if native else torch.float32)
    cpu = torch.device("cpu")
    assert uses_bf16("bf16", cpu) and not uses_bf16("fp32", cpu) and uses_bf16("auto", cpu) is native


@pytest.mark.parametrize("scale", [None, 0.3])
def test_the_explicit_products_are_torchs_attention(scale):
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 5, 8) for _ in range(3))
    torch.testing.assert_close(products(q, k, v, scale=scale), F.scaled_dot_product_attention(q, k, v, scale=scale),
                               rtol=1e-5, atol=1e-6)


def test_only_plain_bf16_attention_on_the_cpu_takes_the_explicit_products(monkeypatch):
    calls = []
    monkeypatch.setattr(mixed_precision, "products", lambda *args, **kwargs: calls.append(args[0].dtype) or args[2])
    q, k, v = (torch.randn(2, 2, 4, 8) for _ in range(3))
    with explicit_attention():
        F.scaled_dot_product_attention(q, k, v)  # fp32: torch's fused kernel is the fast one
        F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), is_causal=True)  # not plain
        out = F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert calls == [torch.bfloat16] and torch.equal(out, v.bfloat16())


def test_a_vit_under_bf16_autocast_computes_its_fp32_loss_and_gradients_to_bf16_rounding():
    torch.manual_seed(0)
    model = build_model(TINY_VIT)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))

    def loss_and_grads(context):
        model.zero_grad()
        with context:
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    loss32, grads32 = loss_and_grads(contextlib.nullcontext())
    loss16, grads16 = loss_and_grads(bf16_autocast("cpu"))
    assert abs(loss16 - loss32) < 0.02
    assert F.cosine_similarity(grads16, grads32, dim=0) > 0.99
