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


@pytest.mark.parametrize("capability, native", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_a_gpu_counts_as_native_bf16_from_ampere_on(monkeypatch, capability, native):
    # torch.cuda.is_bf16_supported() says yes on a T4 (7.5), which only emulates bf16.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    assert mixed_precision.native_bf16(torch.device("cuda")) is native
    assert uses_bf16("auto", torch.device("cuda")) is native
    assert not mixed_precision.native_bf16(torch.device("mps"))


@pytest.mark.parametrize("scale", [None, 0.3, 0.0])
def test_the_explicit_products_are_torchs_attention(scale):
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 5, 8) for _ in range(3))
    torch.testing.assert_close(products(q, k, v, scale=scale), F.scaled_dot_product_attention(q, k, v, scale=scale),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tokens", [1, 4, 16, 64, 256, 1024])  # a ViT's, at each patch size that divides 32
def test_in_bf16_the_explicit_products_weigh_by_an_fp32_softmax_rounded_once(tokens):
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, tokens, 32).bfloat16() for _ in range(3))
    scores = q @ k.transpose(-2, -1) * 32 ** -0.5
    rounded_once = scores.float().softmax(-1).bfloat16()
    assert torch.equal(products(q, k, v), rounded_once @ v)
    assert not torch.equal(products(q, k, v), (scores.float().softmax(-1) * 1.01).bfloat16() @ v)


def test_the_explicit_products_drop_attention_weights_as_torchs_dropout_does():
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 5, 8) for _ in range(3))
    torch.manual_seed(1)
    dropped = products(q, k, v, dropout_p=0.5)
    torch.manual_seed(1)
    expected = F.dropout((q @ k.transpose(-2, -1) / 8 ** 0.5).softmax(-1), 0.5) @ v
    torch.testing.assert_close(dropped, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(dropped, products(q, k, v))


def test_only_plain_bf16_attention_on_the_cpu_takes_the_explicit_products(monkeypatch):
    calls = []
    monkeypatch.setattr(mixed_precision, "products", lambda *args, **kwargs: calls.append(args[0].dtype) or args[2])
    q, k, v = (torch.randn(2, 2, 4, 8) for _ in range(3))
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    with explicit_attention():
        F.scaled_dot_product_attention(q, k, v)  # fp32: torch's fused kernel is the fast one
        F.scaled_dot_product_attention(qb, kb, vb, is_causal=True)
        F.scaled_dot_product_attention(qb, kb, vb, torch.ones(4, 4, dtype=torch.bool))  # a mask, positionally
        F.scaled_dot_product_attention(qb, kb, vb, enable_gqa=True)
        F.scaled_dot_product_attention(qb[0], kb[0], vb[0])  # not batched by heads
        assert calls == []
        out = F.scaled_dot_product_attention(qb, kb, vb)
    assert calls == [torch.bfloat16] and torch.equal(out, vb)


def test_every_way_of_passing_attentions_arguments_reaches_the_products_alike():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 4, 8, dtype=torch.bfloat16) for _ in range(3))
    expected = products(q, k, v, scale=0.5)
    with explicit_attention():
        calls = [F.scaled_dot_product_attention(q, k, v, None, 0.0, False, scale=0.5),
                 F.scaled_dot_product_attention(q, k, v, None, scale=0.5),
                 F.scaled_dot_product_attention(query=q, key=k, value=v, scale=0.5)]
    for out in calls:
        assert torch.equal(out, expected)


def test_a_vits_bf16_step_on_the_cpu_computes_each_blocks_attention_as_the_products(monkeypatch):
    seen = []
    real = mixed_precision.products
    monkeypatch.setattr(mixed_precision, "products", lambda *args, **kwargs: seen.append(1) or real(*args, **kwargs))
    model = build_model(TINY_VIT)
    with bf16_autocast("cpu"):
        model(torch.randn(2, 3, 32, 32))
    assert len(seen) == TINY_VIT.vit.depth
    model(torch.randn(2, 3, 32, 32))  # outside: torch's kernel
    assert len(seen) == TINY_VIT.vit.depth


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


def test_a_resumed_auto_run_keeps_the_precision_it_started_in(monkeypatch):
    model = nn.Linear(8, 3)
    monkeypatch.setattr(mixed_precision, "native_bf16", lambda device: True)
    started = Trainer(model, model, train_config(precision="auto"), steps_per_epoch=1)
    monkeypatch.setattr(mixed_precision, "native_bf16", lambda device: False)
    resumed = Trainer(model, model, train_config(precision="auto"), steps_per_epoch=1)
    assert started.bf16 and not resumed.bf16
    resumed.load_state_dict(started.state_dict())
    assert resumed.bf16
    # A precision the config names is the config's, not the checkpoint's.
    fixed = Trainer(model, model, train_config(precision="fp32"), steps_per_epoch=1)
    fixed.load_state_dict(started.state_dict())
    assert not fixed.bf16
