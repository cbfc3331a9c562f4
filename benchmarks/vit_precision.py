"""The ViT's training step in fp32, under plain bf16 autocast, and as `train.precision: bf16` runs it.

`bf16 autocast` uses torch's fused attention kernel; `bf16, attention as products` is vera_cli.fast's
bf16_autocast, what the trainer runs for bf16 (and for `auto` where bf16 is native). Steps of the same
model and AdamW on the same random batch, timed in turn (round robin) so that drift hits them alike.

    python benchmarks/vit_precision.py [--config pretrain-vit] [--rounds 5] [--batch 256]
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Callable

import torch
import torch.nn.functional as F

from timing import round_robin_ms
from vera_cli import config
from vera_cli.allocator import keep_freed_memory
from vera_cli.config import PretrainConfig
from vera_cli.fast import bf16_autocast
from vera_cli.models import ModelConfig, build_model

CONTEXTS: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "fp32": contextlib.nullcontext,
    "bf16 autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    "bf16, attention as products": lambda: bf16_autocast("cpu"),
}


def training_step(model_cfg: ModelConfig, batch: int, context: Callable[[], contextlib.AbstractContextManager]):
    """A step of a fresh model (seed 0) on one random batch, under `context`; returns the loss."""
    torch.manual_seed(0)
    model = build_model(model_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    def step() -> float:
        with context():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def precision_rates(model_cfg: ModelConfig, batch: int, rounds: int, steps: int = 5) -> dict[str, float]:
    """Images per second of each way to run the step."""
    calls = {name: training_step(model_cfg, batch, context) for name, context in CONTEXTS.items()}
    for call in calls.values():
        call()  # warm-up
    ms = round_robin_ms({name: lambda call=call: [call() for _ in range(steps)] for name, call in calls.items()}, rounds)
    return {name: steps * batch / (value / 1000) for name, value in ms.items()}


def main() -> None:
    keep_freed_memory()  # as the CLI does for every command
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="pretrain-vit")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    model_cfg = config.load(PretrainConfig, args.config, {}).model
    for name, rate in precision_rates(model_cfg, args.batch, args.rounds).items():
        print(f"{name}: {rate:,.0f} images/s")


if __name__ == "__main__":
    main()
