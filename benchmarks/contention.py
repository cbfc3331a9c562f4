#!/usr/bin/env python3
"""Training steps on a busy machine: torch's threads alone and beside a process that keeps a core busy.

    python benchmarks/contention.py [--model convnet|vit] [--steps 50]

Three ways to run the same steps: torch's default (a thread per core, OpenMP's default wait), with
OMP_WAIT_POLICY=PASSIVE (a thread that waits for the others sleeps instead of spinning), and with
OMP_NUM_THREADS=1. Each runs in a process of its own (OpenMP reads its environment once), alone and
beside a Python loop that keeps one core busy. The ConvNet's step is the pretrain recipe's (batch 256);
the ViT's is pretrain-vit's model under the recipe's bf16 path, at batch 64.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

SETTINGS = {
    "torch's default": {},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"},
}
# The busy neighbour: one core's worth of pure Python, nothing shared with the steps.
BUSY = [sys.executable, "-c", "while True: pass"]


def _step(model_name: str):
    import torch
    import torch.nn.functional as F

    from vera_cli import config, fast
    from vera_cli.allocator import keep_freed_memory
    from vera_cli.config import PretrainConfig
    from vera_cli.models import ConvNet, build_model

    keep_freed_memory()  # as the CLI does for every command
    torch.manual_seed(0)
    vit = model_name == "vit"
    model = build_model(config.load(PretrainConfig, "pretrain-vit", {}).model) if vit else ConvNet()
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    x, y = torch.randn(64 if vit else 256, 3, 32, 32), torch.randint(0, 10, (64 if vit else 256,))
    forward = model if vit else fast.forward(model)

    def step() -> None:
        with fast.bf16_autocast("cpu") if vit else torch.autocast("cpu", enabled=False):
            logits = forward(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _child(model_name: str, steps: int) -> None:
    step = _step(model_name)
    step(), step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    print(time.perf_counter() - start)


def steps_seconds(model_name: str, steps: int, environment: dict[str, str]) -> float:
    """Seconds for `steps` training steps in a fresh process with `environment` added to this one's."""
    done = subprocess.run([sys.executable, __file__, "--child", "--model", model_name, "--steps", str(steps)], check=True,
                          capture_output=True, text=True, env={**os.environ, **environment})
    return float(done.stdout.strip().splitlines()[-1])


def contention(model_name: str = "convnet", steps: int = 50) -> dict[str, dict[str, float]]:
    """For each setting, the seconds of the steps alone and beside the busy process."""
    result = {name: {"alone": steps_seconds(model_name, steps, env)} for name, env in SETTINGS.items()}
    busy = subprocess.Popen(BUSY)
    try:
        for name, env in SETTINGS.items():
            result[name]["busy"] = steps_seconds(model_name, steps, env)
    finally:
        busy.kill()
        busy.wait()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["convnet", "vit"], default="convnet")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.model, args.steps)
        return
    result = contention(args.model, args.steps)
    reference = result["torch's default"]["alone"]
    print(f"{args.steps} training steps of the {args.model}, seconds (and against torch's default alone):")
    print("| setting | alone | beside a busy process |\n|---|---|---|")
    for name, seconds in result.items():
        print(f"| {name} | {seconds['alone']:.2f} ({seconds['alone'] / reference:.2f}) | "
              f"{seconds['busy']:.2f} ({seconds['busy'] / reference:.2f}) |")


if __name__ == "__main__":
    main()
