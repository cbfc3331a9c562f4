"""One training loop for pretraining and adaptation: optimiser, schedule, progress, divergence check."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from vera_cli.adapters.head import head_parameters
from vera_cli.adapters.targets import has_head
from vera_cli.config import DEVICES, TrainConfig, shown
from vera_cli.errors import VeraError
from vera_cli.fast.mixed_precision import bf16_autocast, uses_bf16
from vera_cli.models import physical_memory

# Where a command's progress lines go (print, or the CLI's stderr console).
Log = Callable[[str], None]


class DataParallel(Protocol):
    """How this process takes part in training one global batch with others (vera_cli.distributed)."""

    def wrap(self, forward: Callable[[torch.Tensor], torch.Tensor], model: nn.Module) -> nn.Module: ...

    def local(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]: ...

    def average(self, values: torch.Tensor) -> torch.Tensor: ...


def resolve_device(name: str) -> torch.device:
    if name not in DEVICES:
        raise VeraError(f"--device must be one of {', '.join(DEVICES)}, got {shown(name)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise VeraError("--device cuda was asked for but CUDA is not available here: use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise VeraError("--device mps was asked for but MPS (Apple silicon) is not available here: use --device cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
    return torch.device(name)


def device_memory(device: torch.device) -> int | None:
    """The memory a model on `device` has: the GPU's own, or this machine's (cpu, and mps which shares it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return physical_memory()


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def param_groups(params: list[nn.Parameter], head: list[nn.Parameter], cfg: TrainConfig) -> list[dict]:
    """One group at `lr`; with `head_lr`, the head's parameters in a group of their own at that rate."""
    head_ids = {id(p) for p in head} if cfg.head_lr is not None else set()
    groups = [{"params": [p for p in params if id(p) not in head_ids], "lr": cfg.lr},
              {"params": [p for p in params if id(p) in head_ids], "lr": cfg.head_lr}]
    return [group for group in groups if group["params"]]


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig, head: list[nn.Parameter] = ()) -> torch.optim.Optimizer:
    # fused: one kernel for all parameters instead of a Python loop over them; on CPU torch only fuses when
    # asked. Measured per step, 1 thread: AdamW on VeRA's 10 vectors 1,048 -> 184 us, SGD on the ConvNet
    # 1,416 -> 148 us (a sixth of a VeRA adaptation step on cached features).
    groups = param_groups(params, list(head), cfg)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=cfg.weight_decay, fused=True)


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
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
    """Trains the parameters of `model` that require grad, through `forward` (the model or a part of it).

    With `parallel` (under torchrun) each step trains on this process's part of the
    global batch and DDP averages the gradients over the processes. `criterion(logits, targets)`
    replaces cross-entropy on labels (a batch mean); the classifier head trains at
    `cfg.head_lr` when that is set.
    """

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, cfg: TrainConfig,
                 steps_per_epoch: int, parallel: DataParallel | None = None, criterion: Loss | None = None) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise VeraError("nothing to train: no parameter requires grad (check adapter.targets and adapter.method)")
        if cfg.head_lr is not None and not has_head(model):
            raise VeraError(f"train.head_lr is set, but {type(model).__name__} names no classifier head (its classifier_name "
                            "attribute): name the head, or leave train.head_lr null")
        device = self.params[0].device
        if cfg.precision == "bf16" and device.type == "mps":
            # Autocast on mps: none before torch 2.5, then bf16 only in some versions and from macOS 14, else
            # silently fp32.
            raise VeraError("train.precision bf16 runs on cuda or cpu, not on mps: use --set train.precision=fp32 (or auto)")
        # Resolved once: `auto` is bf16 only where the device multiplies it natively.
        self.bf16 = uses_bf16(cfg.precision, device)
        self.forward = parallel.wrap(forward, model) if parallel else forward
        self.parallel = parallel
        self.cfg = cfg
        self.criterion = criterion
        self.optimizer = make_optimizer(self.params, cfg, head_parameters(model))
        self.steps_per_epoch = steps_per_epoch
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
            count = len(labels)
            weight = None
            if self.parallel:
                inputs, labels, weight = self.parallel.local(inputs, labels)
            # Only made for bf16: torch before 2.5 refuses an autocast on mps even when it is disabled.
            with bf16_autocast(device_type) if self.bf16 else contextlib.nullcontext():
                logits = self.forward(inputs)
            loss = self.loss(logits.float(), labels, weight)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            lr = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            self.scheduler.step()
            # Kept as tensors: reading a value every step would stall a GPU.
            losses.append(loss.detach())
            for hook in self.step_hooks:
                hook(self.scheduler.last_epoch, losses[-1], lr)
            seen += count
            if bar.n == 0 or len(losses) % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{seen / (time.perf_counter() - start):.0f}")
            bar.update(count)
        bar.close()
        stacked = torch.stack(losses)
        if self.parallel:
            # Every process then sees the global losses and stops on divergence together.
            stacked = self.parallel.average(stacked)
        finite = torch.isfinite(stacked)
        if not finite.all():
            step = int((~finite).nonzero()[0]) + 1
            raise VeraError(f"the loss became non-finite at epoch {epoch}, step {step}: the learning rate "
                            f"({self.cfg.lr}) is probably too high; lower it with --lr")
        return EpochStats(epoch, float(stacked.mean()), seen, time.perf_counter() - start)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, weight: float | None) -> torch.Tensor:
        """The batch's mean loss; with a `weight`, this process's summed loss times it (see DataParallel.local)."""
        if self.criterion is not None:
            mean = self.criterion(logits, labels)
            return mean if weight is None else mean * len(labels) * weight
        if weight is None:
            return F.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing)
        return F.cross_entropy(logits, labels, reduction="sum", label_smoothing=self.cfg.label_smoothing) * weight

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "bf16": self.bf16}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # A resumed run keeps the precision it started in: `auto` may resolve otherwise on this machine.
        if self.cfg.precision == "auto" and "bf16" in state and self.params[0].device.type != "mps":
            self.bf16 = state["bf16"]


def fit(trainer: Trainer, model: nn.Module, source: Callable[[torch.Generator], Iterator[tuple[torch.Tensor, torch.Tensor]]],
        num_images: int, generator: torch.Generator, evaluate: Callable[[], dict],
        on_epoch: Callable[[EpochStats, dict | None], None], start_epoch: int = 1, progress: bool = True,
        evaluations: int = 5) -> dict:
    """Train from `start_epoch` to the configured last epoch, evaluating after every k-th epoch (k spreads
    `evaluations` over the run) and the last; `on_epoch` gets None after the others. Returns the last evaluation.

    Classifying the 10,000 test images costs about a tenth of a ConvNet pretraining epoch and more than a whole
    few-shot epoch (on the ViT, most of a few-shot row): hence a few evaluations, not one per epoch."""
    report = None
    last = trainer.cfg.epochs
    evaluate_every = math.ceil(last / evaluations)
    for epoch in range(start_epoch, last + 1):
        model.train()
        stats = trainer.epoch(epoch, source(generator), num_images, progress)
        model.eval()
        report = evaluate() if epoch % evaluate_every == 0 or epoch == last else None
        on_epoch(stats, report)
    return report if report is not None else evaluate()
