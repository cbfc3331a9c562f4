"""The ViT's training step with glibc's allocator as it comes and with freed memory kept (vera_cli.allocator).

Each way runs in a fresh process (the setting is process-wide and cannot be undone), the two in turn, so that
drift hits them alike: steps per second and minor page faults per step (activations faulted in anew).

    python benchmarks/allocator.py [--precision fp32] [--batch 256] [--steps 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

WAYS = ("glibc's defaults", "freed memory kept")


def _child(kept: bool, precision: str, batch: int, steps: int) -> None:
    if kept:
        from vera_cli.allocator import keep_freed_memory

        assert keep_freed_memory()
    # Imported only now: torch must not have allocated anything before the setting.
    from vera_cli import config
    from vera_cli.config import PretrainConfig
    from vit_precision import CONTEXTS, training_step

    step = training_step(config.load(PretrainConfig, "pretrain-vit", {}).model, batch,
                         CONTEXTS["bf16, attention as products" if precision == "bf16" else "fp32"])
    step(), step()  # warm-up
    faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    print(seconds / steps, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps)


def step_in_process(kept: bool, precision: str = "fp32", batch: int = 256, steps: int = 10) -> tuple[float, float]:
    """Seconds and minor page faults per step, in a fresh process with or without freed memory kept."""
    # Nothing inherited that sets the allocator another way.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GLIBC_TUNABLES", "MALLOC_", "LD_PRELOAD"))}
    command = [sys.executable, __file__, "--child", "--precision", precision, "--batch", str(batch),
               "--steps", str(steps), *(["--kept"] if kept else [])]
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    seconds, faults = done.stdout.split()[-2:]
    return float(seconds), float(faults)


def compare(precision: str = "fp32", batch: int = 256, steps: int = 10, rounds: int = 3) -> dict[str, dict[str, float]]:
    """Per way: the median step's images per second and page faults per step over `rounds` processes each."""
    runs: dict[str, list[tuple[float, float]]] = {way: [] for way in WAYS}
    for _ in range(rounds):
        for way in WAYS:
            runs[way].append(step_in_process(way == WAYS[1], precision, batch, steps))
    return {way: {"images_per_second": batch / statistics.median(s for s, _ in values),
                  "faults_per_step": statistics.median(f for _, f in values)} for way, values in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kept", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.kept, args.precision, args.batch, args.steps)
        return
    result = compare(args.precision, args.batch, args.steps, args.rounds)
    for way, row in result.items():
        print(f"{way}: {row['images_per_second']:,.0f} images/s, {row['faults_per_step']:,.0f} page faults a step")
    print(f"ratio: {result[WAYS[1]]['images_per_second'] / result[WAYS[0]]['images_per_second']:.2f}")


if __name__ == "__main__":
    main()
