#!/usr/bin/env python3
"""Time pretrain, adapt and inference on CUDA through the same code path as the CPU runs.

    python benchmarks/cuda_bench.py --data-dir DIR [--vit-epochs 10] [--out DIR]
    python benchmarks/cuda_bench.py --data-dir DIR --dry-run   # on CPU, one epoch each: checks the script

Checks first that the whole dataset sits on the GPU, that batches are drawn there, and
that a training epoch makes no host-to-device copy (counted by torch.profiler). Then runs,
with device cuda:
  - the default ConvNet pretrain (the `pretrain` config), also in bf16, and the same for 30 epochs;
  - pretrain-fast; the ViT of pretrain-vit-gpu for --vit-epochs epochs (images/s);
  - VeRA and LoRA adapt on the ConvNet, VeRA (attention, r256) and LoRA (attention, r8) on that ViT;
  - inference over the test split at batch 1024: base, merged and unmerged VeRA, ViT too;
  - serving N = 1, 8, 64, 512 adapters over one base, ConvNet and ViT (serving.py, on the GPU).
Prints one row per measurement and, with --out, writes them as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from serving import serving

from vera_cli import config as config_module
from vera_cli import fast
from vera_cli.adapters.inject import inject, merged_plain
from vera_cli.bases import load_pretrained
from vera_cli.commands.adapt import run_adapt
from vera_cli.commands.pretrain import run_pretrain
from vera_cli.config import AdaptConfig, AdapterConfig, PretrainConfig
from vera_cli.data import Cifar10, batches, load_cifar10
from vera_cli.models import build_model
from vera_cli.runs import Run
from vera_cli.train import Trainer, make_generator


def host_to_device_copies(data: Cifar10, device: torch.device) -> int:
    """Host-to-device copies the profiler sees during ten augmented ConvNet training steps."""
    cfg = config_module.load(PretrainConfig, "pretrain", {"device": "cuda"})
    model = build_model(cfg.model).to(device)
    trainer = Trainer(fast.forward(model), model, cfg.train, steps_per_epoch=10)
    generator = make_generator(0, device)
    steps = iter(batches(data.train, cfg.train.batch_size, generator, cfg.train.crop_pixels, flip=True))
    trainer.epoch(0, (next(steps) for _ in range(2)), 2 * cfg.train.batch_size, progress=False)  # warm-up
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        trainer.epoch(1, (next(steps) for _ in range(10)), 10 * cfg.train.batch_size, progress=False)
        torch.cuda.synchronize()
    return sum(event.count for event in prof.key_averages() if "HtoD" in event.key)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    synchronize()
    started = time.perf_counter()
    result = fn()
    synchronize()
    return result, time.perf_counter() - started


def inference_ms(model: torch.nn.Module, data: Cifar10, repeats: int = 5) -> float:
    """Milliseconds to predict the whole test split at batch 1000 (best of `repeats`)."""
    model.eval()
    with torch.no_grad():
        forward = fast.forward(model)
        fast.predict_logits(forward, data.test)
        return 1000 * min(timed(lambda: fast.predict_logits(forward, data.test))[1] for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--vit-epochs", type=int, default=10)
    parser.add_argument("--out", help="folder for cuda-<time>.json")
    parser.add_argument("--dry-run", action="store_true", help="run every step on the CPU for one epoch")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here")
    device = torch.device("cpu" if args.dry_run else "cuda")
    data = load_cifar10(args.data_dir, download=False).to(device)
    images, labels = next(batches(data.train, 256, make_generator(0, device), crop_padding=2, flip=True))
    assert images.device == labels.device == data.train.images.device == device
    # No GPU, no copy to count: the dry run checks the rest of the script.
    copies = 0 if args.dry_run else host_to_device_copies(data, device)
    limit = {"train.epochs": 1} if args.dry_run else {}
    rows: list[dict] = []
    gpu = torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu (dry run)'
    print(f"device {gpu}; dataset resident: {data.train.images.numel() / 1e6:.0f} MB uint8; "
          f"host-to-device copies in 10 training steps: {copies}")
    with tempfile.TemporaryDirectory() as tmp:
        runs = [
            ("pretrain", PretrainConfig, "pretrain", {}),
            ("pretrain bf16", PretrainConfig, "pretrain", {"train.precision": "bf16"}),
            ("pretrain 30 epochs", PretrainConfig, "pretrain", {"train.epochs": 30}),
            ("pretrain-fast", PretrainConfig, "pretrain-fast", {}),
            # The dry run trains the CPU-sized ViT: the GPU one would take minutes on a CPU.
            ("pretrain vit", PretrainConfig, "pretrain-vit" if args.dry_run else "pretrain-vit-gpu",
             {"train.epochs": args.vit_epochs}),
            ("adapt vera", AdaptConfig, "adapt-vera", {"base": f"{tmp}/pretrain"}),
            ("adapt lora", AdaptConfig, "adapt-lora", {"base": f"{tmp}/pretrain"}),
            ("adapt vera vit", AdaptConfig, "adapt-vera",
             {"base": f"{tmp}/pretrain-vit", "adapter.rank": 256, "adapter.targets": ["attention"]}),
            ("adapt lora vit", AdaptConfig, "adapt-lora",
             {"base": f"{tmp}/pretrain-vit", "adapter.rank": 8, "adapter.targets": ["attention"]}),
        ]
        for name, cls, path, extra in runs:
            cfg = config_module.load(cls, path, {"device": device.type, "run_dir": f"{tmp}/{name.replace(' ', '-')}",
                                                 **extra, **limit})
            runner = run_pretrain if cls is PretrainConfig else run_adapt
            result, seconds = timed(lambda: runner(cfg, log=lambda m: None, progress=False, data=data))
            test = result.test
            row = {"name": name, "seconds": round(seconds, 2), "epochs": cfg.train.epochs, "test": test.overall}
            if cls is PretrainConfig:
                row["images_per_second"] = round(cfg.train.epochs * len(data.train) / seconds)
            if test.chosen_classes:
                row.update(chosen=test.chosen, task=test.task, rest=test.rest)
            rows.append(row)
            print(json.dumps(row))
        for name, base_dir in (("convnet", "pretrain"), ("vit", "pretrain-vit")):
            base = load_pretrained(Run(Path(tmp) / base_dir), device)[0]
            targets = ["attention"] if name == "vit" else []
            unmerged = inject(copy.deepcopy(base), AdapterConfig(method="vera", rank=256, targets=targets)).to(device)
            merged = merged_plain(copy.deepcopy(unmerged))
            for label, model in (("base", base), ("vera unmerged", unmerged), ("vera merged", merged)):
                row = {"name": f"inference {name} {label}", "ms_per_test_split": round(inference_ms(model, data), 2)}
                rows.append(row)
                print(json.dumps(row))
    # Many adapters over one base, as benchmarks/run.py measures them on the CPU (the dry run: a small grid).
    counts, calls, batch = ((1, 3), 1, 8) if args.dry_run else ((1, 8, 64, 512), 10, 256)
    for model_name, entry in serving(counts, calls, batch, device=device)["models"].items():
        for count, measured in entry["rows"].items():
            row = {"name": f"serving {model_name} {count}", **measured}
            rows.append(row)
            print(json.dumps(row))
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0
    print(f"peak GPU memory {peak:.0f} MiB")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"cuda-{time.strftime('%Y%m%d-%H%M')}.json"
        path.write_text(json.dumps({"device": str(device), "host_to_device_copies": copies,
                                    "rows": rows, "peak_gpu_mib": round(peak)}, indent=2))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
