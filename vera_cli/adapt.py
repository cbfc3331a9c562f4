"""`vera adapt`: convert a pretrained run to VeRA / LoRA (or full / head) and fine-tune on chosen classes."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from vera_cli import config as config_module
from vera_cli.adapters.files import ADAPTER_FILE, save_adapter
from vera_cli.adapters.inject import inject
from vera_cli.config import AdaptConfig
from vera_cli.data import Cifar10, Split, batch_indices, batches, class_ids, load_cifar10, normalize
from vera_cli.evaluate import accuracy_report, predict_logits
from vera_cli.pretrain import Log, epoch_line, fingerprint, load_pretrained
from vera_cli.runs import ensure_new, Run, append_jsonl, create_run, environment, latest_run, open_run, write_json, write_yaml
from vera_cli.train import Trainer, make_generator, resolve_device

Forward = Callable[[torch.Tensor], torch.Tensor]
BatchSource = Callable[[torch.Generator], Iterator[tuple[torch.Tensor, torch.Tensor]]]


@dataclass
class AdaptResult:
    run: Run
    summary: dict[str, Any]


def resolve_base(base: str | None) -> Run:
    return open_run(base, ("pretrain",)) if base else latest_run(("pretrain",))


def prefix_is_frozen(model: nn.Module) -> bool:
    modules = getattr(model, "feature_modules", None)
    return modules is not None and not any(p.requires_grad for m in modules() for p in m.parameters())


@torch.no_grad()
def cached_features(model: nn.Module, split: Split, batch_size: int = 1000) -> torch.Tensor:
    """The frozen convolutional prefix's output for every image, computed once."""
    return torch.cat([model.features(images) for images, _ in batches(split, batch_size)])


def training_source(model: nn.Module, split: Split, cfg: AdaptConfig) -> tuple[Forward, BatchSource]:
    """What the training loop feeds: cached prefix features when nothing before the adapters can change."""
    train = cfg.train
    if cfg.cache_features and not (train.crop or train.flip) and prefix_is_frozen(model):
        features = cached_features(model, split)

        def feature_batches(generator: torch.Generator):
            for index in batch_indices(len(split), train.batch_size, generator, split.labels.device):
                yield features[index], split.labels[index]

        return model.classifier, feature_batches
    return model, lambda generator: batches(split, train.batch_size, generator, train.crop, train.flip)


def run_adapt(cfg: AdaptConfig, log: Log = print, progress: bool = True, data: Cifar10 | None = None) -> AdaptResult:
    device = resolve_device(cfg.device)
    chosen = class_ids(cfg.classes)
    ensure_new(cfg.run_dir)
    base_run = resolve_base(cfg.base)
    data = (data or load_cifar10(cfg.data.dir, cfg.data.download)).to(device)
    model, _ = load_pretrained(base_run, device)
    base_fingerprint = fingerprint(model)
    base_report = accuracy_report(predict_logits(model, data.test), data.test.labels, data.classes, chosen)
    torch.manual_seed(cfg.seed)
    inject(model, cfg.adapter)
    run = create_run("adapt", cfg.run_dir)
    with run.recording():
        write_yaml(run.file("config.yaml"), {**config_module.to_dict(cfg), "base": str(base_run.path)})
        started = time.perf_counter()
        train_split = data.train.subset(chosen)
        forward, source = training_source(model, train_split, cfg)
        trainer = Trainer(forward, model, cfg.train, steps_per_epoch=math.ceil(len(train_split) / cfg.train.batch_size))
        trainable = sum(p.numel() for p in trainer.params)
        log(f"adapting {base_run.path} with {cfg.adapter.method} (rank {cfg.adapter.rank}, {trainable:,} trainable) on "
            f"{', '.join(data.classes[i] for i in chosen)}: {len(train_split):,} images, {device}, run {run.path}")
        generator = make_generator(cfg.seed, device)
        report = base_report
        for epoch in range(1, cfg.train.epochs + 1):
            model.train()
            stats = trainer.epoch(epoch, source(generator), len(train_split), progress)
            model.eval()
            report = accuracy_report(predict_logits(model, data.test), data.test.labels, data.classes, chosen)
            append_jsonl(run.file("metrics.jsonl"), {
                "epoch": epoch, "loss": stats.loss, "test_accuracy": report["overall"], "chosen": report["chosen"],
                "task": report["task"], "rest": report["rest"], "seconds": stats.seconds})
            log(epoch_line(stats, report["overall"]) + f"; chosen {report['chosen']:.2%}, rest {report['rest']:.2%}")
        adapter_bytes = save_adapter(run.path, model, cfg.adapter, base_fingerprint, {
            "base_run": str(base_run.path), "classes": [data.classes[i] for i in chosen]})
        summary = {
            "kind": "adapt",
            "base_run": str(base_run.path),
            "method": cfg.adapter.method,
            "rank": cfg.adapter.rank,
            "classes": [data.classes[i] for i in chosen],
            "trainable_parameters": trainable,
            "adapter_file": ADAPTER_FILE,
            "adapter_bytes": adapter_bytes,
            "epochs": cfg.train.epochs,
            "seed": cfg.seed,
            "device": str(device),
            "wall_seconds": time.perf_counter() - started,
            "base": base_report,
            "test": report,
            "environment": environment(),
        }
        write_json(run.file("summary.json"), summary)
        run.set_status("finished")
        return AdaptResult(run, summary)
