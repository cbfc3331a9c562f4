"""How cost grows: pretrain wall time against the data's size, compare's against its rows, adapt's against shots.

    python benchmarks/growth.py --data-dir DIR --base RUN

Each group times the product as a user runs it (run_pretrain on a random subset of the training
split; `vera compare` in a child process, as the CLI starts it; run_adapt with `shots`) and fits
time = fixed + per unit x size by least squares: the growth is "linear" where the cost of each
step up in size stays within 30 % of the others, else faster or slower than linear, and the fit's
fixed part says what a run costs before its first unit (loading, building, the test evaluation).
`benchmarks/run.py` calls `growth` as one of its measurements.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from vera_cli import config
from vera_cli.allocator import keep_freed_memory
from vera_cli.commands.adapt import run_adapt
from vera_cli.commands.pretrain import run_pretrain
from vera_cli.config import AdaptConfig, PretrainConfig
from vera_cli.data import Cifar10, load_cifar10

# Why a group's growth is not simply linear, where the product knows it: what the report says beside the law.
REASONS = {
    "pretrain": "each run also builds the model and evaluates the 10,000 test images",
    "compare": "each row is a whole adapt run (its base loaded, its test split evaluated)",
    "adapt": "with shots a run takes at least few_shot.min_steps optimizer steps (150), so small shot counts "
             "cost the same; the feature cache and the test evaluation are paid once per run",
}


def law(points: list[tuple[float, float]]) -> dict:
    """The least-squares line through (size, seconds) and what kind of growth the points show."""
    sizes, seconds = zip(*points)
    mean_size, mean_seconds = sum(sizes) / len(sizes), sum(seconds) / len(seconds)
    slope = (sum((s - mean_size) * (t - mean_seconds) for s, t in points)
             / sum((s - mean_size) ** 2 for s in sizes))
    steps = [(t2 - t1) / (s2 - s1) for (s1, t1), (s2, t2) in zip(points, points[1:])]
    # How time grew against size from the first point to the last: 1 for time proportional to size.
    elasticity = math.log(seconds[-1] / seconds[0]) / math.log(sizes[-1] / sizes[0])
    if min(steps) > 0 and max(steps) <= 1.3 * min(steps):
        kind = "linear"
    else:
        kind = "slower than linear" if elasticity < 1 else "faster than linear"
    return {"kind": kind, "per_unit_seconds": slope, "fixed_seconds": mean_seconds - slope * mean_size,
            "step_costs": steps, "elasticity": elasticity}


def _timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def pretrain_growth(data: Cifar10, workdir: Path, sizes: tuple[int, ...], epochs: int) -> list[tuple[float, float]]:
    points = []
    for size in (sizes[0], *sizes):  # the first run untimed: it pays for what a process does once
        subset = Cifar10(data.train.sample(size, torch.Generator().manual_seed(0)), data.test, data.classes)
        cfg = config.load(PretrainConfig, "pretrain", {"train.epochs": epochs, "device": "cpu",
                                                       "run_dir": str(workdir / f"growth-pretrain-{len(points)}")})
        points.append((size, _timed(lambda: run_pretrain(cfg, log=lambda _: None, progress=False, data=subset))))
    return points[1:]


def compare_growth(base_run: str, data_dir: str, workdir: Path, seeds: tuple[int, ...],
                   epochs: int) -> list[tuple[float, float]]:
    """4 rows per seed: vera and lora at ranks 4 and 32."""
    points = []
    for count in seeds:
        command = [sys.executable, "-m", "vera_cli", "compare", "--base", base_run, "--data-dir", data_dir, "--device",
                   "cpu", "--methods", "vera,lora", "--ranks", "4,32", "--seeds", str(count), "--epochs", str(epochs),
                   "--no-progress", "--run-dir", str(workdir / f"growth-compare-{count}")]
        points.append((4 * count, _timed(lambda: subprocess.run(command, check=True, cwd=workdir,
                                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))))
    return points


def adapt_growth(base_run: str, data: Cifar10, workdir: Path, shots: tuple[int, ...]) -> list[tuple[float, float]]:
    points = []
    for count in (shots[0], *shots):  # as above
        cfg = config.load(AdaptConfig, "adapt-vera", {"base": base_run, "shots": count, "device": "cpu",
                                                      "run_dir": str(workdir / f"growth-adapt-{len(points)}")})
        points.append((count, _timed(lambda: run_adapt(cfg, log=lambda _: None, progress=False, data=data))))
    return points[1:]


def growth(base_run: str, data_dir: str, workdir: Path, pretrain_sizes: tuple[int, ...], pretrain_epochs: int,
           compare_seeds: tuple[int, ...], compare_epochs: int, shots: tuple[int, ...]) -> dict:
    data = load_cifar10(data_dir, download=False)
    groups = {
        "pretrain": ("training images", pretrain_growth(data, workdir, pretrain_sizes, pretrain_epochs)),
        "compare": ("rows", compare_growth(base_run, data_dir, workdir, compare_seeds, compare_epochs)),
        "adapt": ("shots per class", adapt_growth(base_run, data, workdir, shots)),
    }
    return {name: {"unit": unit, "points": points, **law(points), "reason": REASONS[name]}
            for name, (unit, points) in groups.items()}


def main() -> None:
    keep_freed_memory()  # as the CLI does for every command
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--base", required=True, help="a pretrain run of the ConvNet")
    parser.add_argument("--workdir", default=".")
    args = parser.parse_args()
    print(json.dumps(growth(args.base, args.data_dir, Path(args.workdir), (6_250, 12_500, 25_000), 3, (1, 2, 4), 1,
                            (10, 100, 1000, 5000)), indent=2))


if __name__ == "__main__":
    main()
