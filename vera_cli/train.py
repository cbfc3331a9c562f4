"""One training loop for pretraining and adaptation: optimiser, schedule, progress, divergence check."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from vera_cli.config import DEVICES, TrainConfig, shown
from vera_cli.errors import VeraError


def resolve_device(name: str) -> torch.device:
    if name not in DEVICES:
        raise VeraError(f"--device must be one of {', '.join(DEVICES)}, got {shown(name)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise VeraError("--device cuda was asked for but CUDA is not available here: use --device cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=cfg.weight_decay)


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Multiplier of the base learning rate at `step` of `total` (linear warm-up, then the schedule)."""
    if cfg.schedule == "constant":
        return 1.0
    warm = int(cfg.warmup * total)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)


StepHook = Callable[[int, torch.Tensor, float], None]


@dataclass
class EpochStats:
    epoch: int
    loss: float
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("inf")


class Trainer:
    """Trains the parameters of `model` that require grad, through `forward` (the model or a part of it)."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, cfg: TrainConfig,
                 steps_per_epoch: int) -> None:
        self.forward = forward
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise VeraError("nothing to train: no parameter requires grad (check adapter.targets and adapter.method)")
        self.cfg = cfg
        self.optimizer = make_optimizer(self.params, cfg)
        total = cfg.epochs * steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(step, total, cfg))
        # Called after every optimiser step with (steps done in the whole run, loss tensor, lr of the step).
        self.step_hooks: list[StepHook] = []

    def epoch(self, epoch: int, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], num_images: int,
              progress: bool = True) -> EpochStats:
        start = time.perf_counter()
        losses = []
        seen = 0
        bar = tqdm(total=num_images, desc=f"epoch {epoch}", unit="img", leave=False, disable=not progress)
        device_type = self.params[0].device.type
        for inputs, labels in batches:
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16"):
                logits = self.forward(inputs)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            lr = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            self.scheduler.step()
            # Kept as tensors: reading a value every step would stall a GPU.
            losses.append(loss.detach())
            for hook in self.step_hooks:
                hook(self.scheduler.last_epoch, losses[-1], lr)
            seen += len(labels)
            if bar.n == 0 or len(losses) % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{seen / (time.perf_counter() - start):.0f}")
            bar.update(len(labels))
        bar.close()
        stacked = torch.stack(losses)
        finite = torch.isfinite(stacked)
        if not finite.all():
            step = int((~finite).nonzero()[0]) + 1
            raise VeraError(f"the loss became non-finite at epoch {epoch}, step {step}: the learning rate "
                            f"({self.cfg.lr}) is probably too high; lower it with --lr")
        return EpochStats(epoch, float(stacked.mean()), seen, time.perf_counter() - start)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def fit(trainer: Trainer, model: nn.Module, source: Callable[[torch.Generator], Iterator[tuple[torch.Tensor, torch.Tensor]]],
        num_images: int, generator: torch.Generator, evaluate: Callable[[], dict],
        on_epoch: Callable[[EpochStats, dict], None], start_epoch: int = 1, progress: bool = True) -> dict:
    """Train from `start_epoch` to the configured last epoch, evaluating after each one; returns the last evaluation."""
    report = None
    for epoch in range(start_epoch, trainer.cfg.epochs + 1):
        model.train()
        stats = trainer.epoch(epoch, source(generator), num_images, progress)
        model.eval()
        report = evaluate()
        on_epoch(stats, report)
    return report if report is not None else evaluate()
