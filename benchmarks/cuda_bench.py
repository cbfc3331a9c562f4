#!/usr/bin/env python3
"""Time pretrain and adapt on CUDA through the same code path as the CPU runs.

    python benchmarks/cuda_bench.py --data-dir DIR

Checks first that the whole dataset sits on the GPU and that batches are drawn there
(no host-device copy per batch), then runs `configs/pretrain.yaml` and
`configs/adapt-vera.yaml` with device cuda (pretrain also in bf16 mixed precision, to
see whether it costs accuracy) and prints wall times and accuracies.
Meant for one short session on a lent GPU; about a minute of GPU time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from vera_cli import config as config_module
from vera_cli.commands.adapt import run_adapt
from vera_cli.config import AdaptConfig, PretrainConfig
from vera_cli.data import batches, load_cifar10
from vera_cli.commands.pretrain import run_pretrain
from vera_cli.train import make_generator

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device here")
    device = torch.device("cuda")
    data = load_cifar10(args.data_dir, download=False).to(device)
    images, labels = next(batches(data.train, 256, make_generator(0, device), crop=True, flip=True))
    assert images.is_cuda and labels.is_cuda and data.train.images.is_cuda
    print(f"device {torch.cuda.get_device_name(0)}; dataset resident: {data.train.images.numel() / 1e6:.0f} MB uint8")
    with tempfile.TemporaryDirectory() as tmp:
        for name, cls, path, extra in [
            ("pretrain", PretrainConfig, "pretrain", {}),
            ("pretrain bf16", PretrainConfig, "pretrain", {"train.precision": "bf16"}),
            ("pretrain-fast", PretrainConfig, "pretrain-fast", {}),
            ("adapt vera", AdaptConfig, "adapt-vera", {"base": f"{tmp}/pretrain"}),
            ("adapt lora", AdaptConfig, "adapt-lora", {"base": f"{tmp}/pretrain"}),
        ]:
            cfg = config_module.load(cls, path, {"device": "cuda", "run_dir": f"{tmp}/{name.replace(' ', '-')}",
                                                         **extra})
            runner = run_pretrain if cls is PretrainConfig else run_adapt
            torch.cuda.synchronize()
            started = time.perf_counter()
            result = runner(cfg, log=lambda m: None, progress=False, data=data)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            test = result.test
            extra_text = (f", chosen {test.chosen:.2%}, task {test.task:.2%}, rest {test.rest:.2%}"
                          if test.chosen_classes else "")
            print(f"{name}: {seconds:.1f} s, {cfg.train.epochs} epochs, test {test.overall:.2%}{extra_text}")
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
