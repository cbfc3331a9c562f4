"""VeRA's cost on the Vision Transformer against LoRA's and PEFT's VeRA, measured in one run.

A training step (forward, backward, AdamW step over the adapter's tensors) and unmerged
inference, batch by batch over the same inputs. Each model runs once in turn, many
times over, so drift of a shared machine hits every model alike; the medians and
their ratios are reported. The VeRA paper reports VeRA's training step at about
1.8 % above LoRA's.

    python benchmarks/vit_adapters.py [--base RUN] [--rounds 30] [--batch 64] [--target attention]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
from pathlib import Path

import torch
from torch import nn

from timing import product_forward, round_robin_ms
from vera_cli.adapters.inject import inject
from vera_cli.adapters.targets import select_targets
from vera_cli.allocator import keep_freed_memory
from vera_cli.bases import load_pretrained
from vera_cli import config
from vera_cli.config import AdaptConfig, AdapterConfig
from vera_cli.models import ModelConfig, build_model
from vera_cli.runs import Run
from vera_cli.train import Trainer


def adapted_models(base: nn.Module, targets: list[str], vera_rank: int, lora_rank: int) -> dict[str, nn.Module]:
    """The base, our VeRA (sliced, as PEFT's) and LoRA, and PEFT's VeRA and LoRA when PEFT is installed."""
    models = {
        "vera": inject(copy.deepcopy(base), AdapterConfig(method="vera", rank=vera_rank, sharing="sliced", targets=targets)),
        "lora": inject(copy.deepcopy(base), AdapterConfig(method="lora", rank=lora_rank, targets=targets)),
    }
    try:
        import peft
    except ImportError:
        return models
    names = select_targets(base, targets)
    models["peft vera"] = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(r=vera_rank, target_modules=names))
    models["peft lora"] = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=lora_rank, target_modules=names))
    return models


def adapter_costs(base: nn.Module, targets: list[str], vera_rank: int = 256, lora_rank: int = 8, batch: int = 64,
                  rounds: int = 30) -> dict:
    """Milliseconds per training step (the product's Trainer) and per unmerged inference batch, with VeRA's
    ratios to the others."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    models = adapted_models(base, targets, vera_rank, lora_rank)
    train = config.load(AdaptConfig, "adapt-vera", {"train.epochs": 1, "train.lr": 1e-4, "train.schedule": "constant"}).train
    trainers = {name: Trainer(product_forward(model.train()), model, train, steps_per_epoch=1) for name, model in models.items()}

    def step(name: str) -> None:
        trainers[name].epoch(1, iter([(images, labels)]), batch, progress=False)

    steps = {name: functools.partial(step, name) for name in models}
    round_robin_ms(steps, 2)  # warm-up: lazy allocations, kernel choice
    train_ms = round_robin_ms(steps, rounds)
    with torch.no_grad():
        calls = {name: functools.partial(product_forward(model.eval()), images) for name, model in {"base": base.eval(), **models}.items()}
        round_robin_ms(calls, 2)
        infer_ms = round_robin_ms(calls, rounds)
    return {
        "targets": targets, "vera_rank": vera_rank, "lora_rank": lora_rank, "batch": batch, "rounds": rounds,
        "trainable": {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in models.items()},
        "train_ms": train_ms,
        "inference_ms": infer_ms,
        "train_ratio": {f"vera / {name}": train_ms["vera"] / ms for name, ms in train_ms.items() if name != "vera"},
        "inference_ratio": {f"{name} / base": ms / infer_ms["base"] for name, ms in infer_ms.items() if name != "base"},
    }


def main() -> None:
    keep_freed_memory()  # as the CLI does for every command
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", help="a ViT pretrain run (default: a fresh ViT with the default settings)")
    parser.add_argument("--target", action="append", help="presets or regexes to adapt (default: attention)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = (load_pretrained(Run(Path(args.base)), torch.device("cpu"))[0] if args.base
            else build_model(ModelConfig("vit")))
    print(json.dumps(adapter_costs(base, args.target or ["attention"], batch=args.batch, rounds=args.rounds), indent=2))


if __name__ == "__main__":
    main()
