#!/usr/bin/env python3
"""Adapters on every conv and linear layer: VeRA against LoRA, training step and unmerged inference.

    python benchmarks/conv_adapters.py [--rounds 30]

One process, one model after another in every round, in a shuffled order (see timing.round_robin_ms), medians.
A training step is the product's Trainer on whole images at batch 256 (adapted convs leave
no frozen prefix to cache); inference is batch 64 in eval mode, adapters unmerged. Weights
do not change the timing, so the base is a fresh ConvNet. `benchmarks/run.py` calls
`conv_adapter_timing` as one of its measurements.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json

import torch

from timing import product_forward, round_robin_ms
from vera_cli.adapters.config import AdapterConfig
from vera_cli.adapters.inject import inject
from vera_cli import config
from vera_cli.allocator import keep_freed_memory
from vera_cli.config import AdaptConfig
from vera_cli.models import ConvNet
from vera_cli.train import Trainer

ADAPTERS = {
    "vera r32": AdapterConfig(method="vera", rank=32, targets=["all"]),
    "lora r8": AdapterConfig(method="lora", rank=8, targets=["all"]),
    "lora r32": AdapterConfig(method="lora", rank=32, targets=["all"]),
}
BATCH = 256


def conv_adapter_timing(rounds: int) -> dict:
    torch.manual_seed(0)
    base = ConvNet()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (BATCH,), generator=generator)
    train = config.load(AdaptConfig, "adapt-vera", {"train.epochs": 1, "train.lr": 1e-4, "train.schedule": "constant"}).train
    models = {name: inject(copy.deepcopy(base), spec).train() for name, spec in ADAPTERS.items()}
    trainers = {name: Trainer(product_forward(model), model, train, steps_per_epoch=1) for name, model in models.items()}

    def step(name: str) -> None:
        trainers[name].epoch(1, iter([(images, labels)]), BATCH, progress=False)

    steps = {name: functools.partial(step, name) for name in models}
    round_robin_ms(steps, 2)  # warm-up: lazy allocations, kernel choice
    train_ms = round_robin_ms(steps, rounds)
    x = images[:64]
    with torch.no_grad():
        calls = {name: functools.partial(product_forward(model.eval()), x) for name, model in {"base": base.eval(), **models}.items()}
        round_robin_ms(calls, 2)
        infer_ms = round_robin_ms(calls, 10 * rounds)
    return {"train_step_ms": train_ms, "inference_ms": infer_ms,
            "vera_over_lora_r8": {"train_step": train_ms["vera r32"] / train_ms["lora r8"],
                                  "inference": infer_ms["vera r32"] / infer_ms["lora r8"]}}


def main() -> None:
    keep_freed_memory()  # as the CLI does for every command
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    print(json.dumps({"torch_threads": torch.get_num_threads(), **conv_adapter_timing(args.rounds)}, indent=2))


if __name__ == "__main__":
    main()
