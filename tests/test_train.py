"""The training loop: schedule, mixed precision."""

import pytest
import torch
from torch import nn

from vera_cli.config import TrainConfig
from vera_cli.train import Trainer, lr_factor


def test_one_cycle_warms_up_then_decays_to_zero():
    cfg = TrainConfig(schedule="onecycle", warmup=0.2)
    factors = [lr_factor(step, 100, cfg) for step in range(100)]
    assert factors[0] == pytest.approx(1 / 20) and factors[19] == pytest.approx(1.0)
    assert factors[20] == pytest.approx(1.0) and factors[-1] == pytest.approx(1 / 80)
    assert all(a <= b for a, b in zip(factors[:20], factors[1:20]))
    assert lr_factor(50, 100, TrainConfig(schedule="constant")) == 1.0


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_precision_sets_the_forward_dtype_and_keeps_fp32_weights(precision, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    seen = []
    trainer = Trainer(lambda x: seen.append(model(x)) or seen[-1], model,
                      TrainConfig(epochs=1, lr=0.1, precision=precision), steps_per_epoch=2)
    batches = [(torch.randn(4, 8), torch.tensor([0, 1, 2, 0])) for _ in range(2)]
    before = model[0].weight.clone()
    trainer.epoch(1, iter(batches), 8, progress=False)
    assert all(out.dtype == dtype for out in seen)
    assert model[0].weight.dtype == torch.float32 and not torch.equal(model[0].weight, before)
