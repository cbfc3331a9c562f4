"""The training loop: schedule, mixed precision."""

import pytest
import torch
from torch import nn

from vera_cli.train import Trainer, fit, lr_factor, make_optimizer

from conftest import train_config


def test_linear_schedule_warms_up_then_decays_to_zero_at_every_step():
    cfg = train_config(schedule="linear", warmup=0.2)
    factors = [lr_factor(step, 100, cfg) for step in range(100)]
    # 20 warm-up steps rise by 1/20 each; 80 decay steps fall by 1/80 each from the peak.
    expected = [(step + 1) / 20 for step in range(20)] + [1 - (step - 20) / 80 for step in range(20, 100)]
    assert factors == pytest.approx(expected)
    assert lr_factor(100, 100, cfg) == 0.0


def test_cosine_and_constant_schedules():
    cosine = train_config(schedule="cosine", warmup=0.0)
    assert [lr_factor(s, 4, cosine) for s in range(5)] == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466, 0.0])
    assert {lr_factor(s, 100, train_config(schedule="constant")) for s in range(100)} == {1.0}


@pytest.mark.parametrize("optimizer, reference", [
    ("sgd", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, foreach=False)),
    ("adamw", lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=5e-4, foreach=False))])
def test_the_fused_optimizer_takes_the_same_steps_as_the_per_parameter_loop(optimizer, reference):
    torch.manual_seed(0)
    ours = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    fused = make_optimizer(ours, train_config(lr=0.1, optimizer=optimizer, weight_decay=5e-4))
    plain = reference(theirs)
    assert fused.param_groups[0]["fused"] is True
    for _ in range(5):
        grads = [torch.randn_like(p) for p in ours]
        for params, opt in ((ours, fused), (theirs, plain)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(ours, theirs):
        assert not torch.equal(a, torch.zeros_like(a))
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_precision_sets_the_forward_dtype_and_keeps_fp32_weights(precision, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    seen = []
    trainer = Trainer(lambda x: seen.append(model(x)) or seen[-1], model,
                      train_config(epochs=1, lr=0.1, precision=precision), steps_per_epoch=2)
    batches = [(torch.randn(4, 8), torch.tensor([0, 1, 2, 0])) for _ in range(2)]
    before = model[0].weight.clone()
    trainer.epoch(1, iter(batches), 8, progress=False)
    assert all(out.dtype == dtype for out in seen)
    assert model[0].weight.dtype == torch.float32 and not torch.equal(model[0].weight, before)


def test_fit_spreads_at_most_five_test_evaluations_over_a_long_run_and_always_evaluates_the_last_epoch():
    model = torch.nn.Linear(4, 3)
    cfg = train_config(epochs=25, batch_size=2, lr=0.1)
    trainer = Trainer(model, model, cfg, steps_per_epoch=1)
    batch = (torch.randn(2, 4), torch.tensor([0, 2]))
    reports = []
    final = fit(trainer, model, lambda generator: iter([batch]), 2, torch.Generator(),
                lambda: {"epoch": len(reports) + 1}, lambda stats, report: reports.append((stats.epoch, report)))
    evaluated = [epoch for epoch, report in reports if report is not None]
    assert [epoch for epoch, _ in reports] == list(range(1, 26))
    assert evaluated == [5, 10, 15, 20, 25] and final == reports[-1][1]
    # A comparison's rows ask for one: the last epoch's.
    once = []
    fit(trainer, model, lambda generator: iter([batch]), 2, torch.Generator(), lambda: {"evaluated": True},
        lambda stats, report: once.append(report), evaluations=1)
    assert once == [None] * 24 + [{"evaluated": True}]
