"""`vera adapt`: convert a pretrained run to VeRA / LoRA (or full / head) and fine-tune on chosen classes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from vera_cli import config as config_module
from vera_cli.adapter_files import ADAPTER_FILE, save_adapter
from vera_cli.adapters.inject import inject
from vera_cli.bases import base_reference, fingerprint, load_pretrained, resolve_base
from vera_cli.checkpoint import METRICS_FILE, EpochRecorder
from vera_cli.commands.pretrain import Log
from vera_cli.config import AdaptConfig
from vera_cli.data import Cifar10, Split, batch_indices, batches, class_ids, load_cifar10, require_images
from vera_cli.lifecycle import RunLifecycle
from vera_cli.metrics import AccuracyReport, accuracy_report, predict_features, predict_logits
from vera_cli.run_plots import PER_CLASS_FILE, write_per_class, write_training_curves
from vera_cli.runs import Run, environment
from vera_cli.tensorboard_log import training_logs
from vera_cli.train import Trainer, fit, resolve_device

Forward = Callable[[torch.Tensor], torch.Tensor]
BatchSource = Callable[[torch.Generator], Iterator[tuple[torch.Tensor, torch.Tensor]]]


@dataclass
class AdaptSummary:
    run: Run
    base_run: str
    forgetting: str
    train_images: int
    method: str
    rank: int
    classes: list[str]
    trainable_parameters: int
    adapter_bytes: int
    epochs: int
    seed: int
    device: str
    wall_seconds: float
    base: AccuracyReport
    test: AccuracyReport
    environment: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "adapt", "base_run": self.base_run, "forgetting": self.forgetting,
                "train_images": self.train_images, "method": self.method, "rank": self.rank, "classes": self.classes,
                "trainable_parameters": self.trainable_parameters, "adapter_file": ADAPTER_FILE,
                "adapter_bytes": self.adapter_bytes, "epochs": self.epochs, "seed": self.seed, "device": self.device,
                "wall_seconds": self.wall_seconds, "base": self.base.to_dict(), "test": self.test.to_dict(),
                "environment": self.environment}

    @classmethod
    def from_dict(cls, run: Run, raw: dict[str, Any]) -> "AdaptSummary":
        fields = {k: v for k, v in raw.items() if k not in ("kind", "adapter_file", "base", "test")}
        return cls(run=run, base=AccuracyReport.from_dict(raw["base"]), test=AccuracyReport.from_dict(raw["test"]), **fields)


def prefix_is_frozen(model: nn.Module) -> bool:
    modules = getattr(model, "feature_modules", None)
    return modules is not None and not any(p.requires_grad for m in modules() for p in m.parameters())


@torch.no_grad()
def cached_features(model: nn.Module, split: Split, batch_size: int = 1000) -> torch.Tensor:
    """The frozen convolutional prefix's output for every image, computed once."""
    return torch.cat([model.features(images) for images, _ in batches(split, batch_size)])


@dataclass
class Pipeline:
    """How adaptation feeds the model: whole images, or cached features of a frozen prefix."""

    forward: Forward
    train_batches: BatchSource
    test_logits: Callable[[], torch.Tensor]


def build_pipeline(model: nn.Module, train_split: Split, test_split: Split, cfg: AdaptConfig) -> Pipeline:
    """Cache the frozen conv prefix's output once when nothing before the adapters can change.

    The test images' features never change then; the training images' features
    do not either unless augmentation is on.
    """
    train = cfg.train
    image_batches = lambda generator: batches(train_split, train.batch_size, generator, train.crop, train.flip)  # noqa: E731
    if not (cfg.cache_features and prefix_is_frozen(model)):
        return Pipeline(model, image_batches, lambda: predict_logits(model, test_split))
    test_features = cached_features(model, test_split)
    test_logits = lambda: predict_features(model.classifier, test_features)  # noqa: E731
    if train.crop or train.flip:
        return Pipeline(model, image_batches, test_logits)
    features = cached_features(model, train_split)

    def feature_batches(generator: torch.Generator):
        for index in batch_indices(len(train_split), train.batch_size, generator, train_split.labels.device):
            yield features[index], train_split.labels[index]

    return Pipeline(model.classifier, feature_batches, test_logits)


def training_split(train: Split, chosen: list[int], cfg: AdaptConfig, generator: torch.Generator) -> Split:
    """The chosen classes' images, plus replayed images of the other classes when asked."""
    split = train.subset(chosen)
    if cfg.forgetting != "replay" or cfg.replay_fraction == 0:
        return split
    others = train.subset([c for c in range(int(train.labels.max()) + 1) if c not in chosen])
    return split + others.sample(min(len(others), round(cfg.replay_fraction * len(split))), generator)


def masked_to(chosen: list[int], forward: Forward, source: BatchSource,
              device: torch.device) -> tuple[Forward, BatchSource]:
    """Train on the chosen classes' logits only: the other classes' logits get no gradient."""
    chosen_ids = torch.tensor(chosen, device=device)
    remap = torch.full((max(chosen) + 1,), -1, dtype=torch.long, device=device)
    remap[chosen_ids] = torch.arange(len(chosen), device=device)

    def masked_source(generator: torch.Generator):
        for inputs, labels in source(generator):
            yield inputs, remap[labels]

    return (lambda x: forward(x).index_select(1, chosen_ids)), masked_source


def run_adapt(cfg: AdaptConfig, log: Log = print, progress: bool = True, data: Cifar10 | None = None,
              resume: Run | None = None) -> AdaptSummary:
    """Adapt into a new run directory, or continue the unfinished run `resume`."""
    device = resolve_device(cfg.device)
    chosen = class_ids(cfg.classes)
    base_run = resolve_base(cfg.base)
    life = RunLifecycle("adapt", cfg, resume, recorded={**config_module.to_dict(cfg), "base": str(base_run.path)})
    data = (data or load_cifar10(cfg.data.dir, cfg.data.download)).to(device)
    require_images(data.train, chosen, data.classes, "training")
    model, _ = load_pretrained(base_run, device)
    base_fingerprint = fingerprint(model)
    base_report = accuracy_report(predict_logits(model, data.test), data.test.labels, data.classes, chosen)
    generator = life.seed(cfg.seed, device)
    inject(model, cfg.adapter)
    with life.open() as run:
        train_split = training_split(data.train, chosen, cfg, generator)
        pipeline = build_pipeline(model, train_split, data.test, cfg)
        forward, source = pipeline.forward, pipeline.train_batches
        if cfg.forgetting == "mask":
            forward, source = masked_to(chosen, forward, source, device)
        trainer = Trainer(forward, model, cfg.train, steps_per_epoch=math.ceil(len(train_split) / cfg.train.batch_size))
        trainable = sum(p.numel() for p in trainer.params)
        start = life.restore(model, trainer, generator)
        log(f"adapting {base_run.path} with {cfg.adapter.method} (rank {cfg.adapter.rank}, {trainable:,} trainable) on "
            f"{', '.join(data.classes[i] for i in chosen)} (forgetting: {cfg.forgetting}): {len(train_split):,} images, "
            f"{device}, run {run.path}" + (f", resuming at epoch {start}" if resume else ""))
        with training_logs(cfg.logging, run, trainer, life.recorded) as listeners:
            report = fit(trainer, model, source, len(train_split), generator,
                         lambda: accuracy_report(pipeline.test_logits(), data.test.labels, data.classes, chosen),
                         EpochRecorder(run, model, trainer, generator, log, listeners), start, progress)
        classes = [data.classes[i] for i in chosen]
        adapter_bytes = save_adapter(run.path, model, cfg.adapter, base_fingerprint,
                                     {**base_reference(base_run, run.path), "classes": classes})
        if cfg.logging.plots:
            title = f"{cfg.adapter.method} on {', '.join(classes)}: {run.path}"
            write_training_curves(run.file(METRICS_FILE), title)
            write_per_class({"base": base_report, cfg.adapter.method: report}, title, run.file(PER_CLASS_FILE))
        return life.finish(AdaptSummary(run, str(base_run.path), cfg.forgetting, len(train_split), cfg.adapter.method,
                                        cfg.adapter.rank, classes, trainable, adapter_bytes, cfg.train.epochs, cfg.seed,
                                        str(device), life.elapsed(), base_report, report, environment()))
