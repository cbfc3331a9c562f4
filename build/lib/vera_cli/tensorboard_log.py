"""TensorBoard event files in a run directory (`logging.tensorboard: true` or `--tensorboard`).

Open them with `tensorboard --logdir <run>/tensorboard` (or `--logdir runs` for every run).
Every scalar is indexed by the optimiser steps done since the run started, so that
per-step and per-epoch curves share an axis, and a resumed run continues its curves.
Events are written after the epoch's checkpoint, so they never hold a step that a
resumed run does again.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import yaml

from vera_cli.checkpoint import EpochListener
from vera_cli.config import LoggingConfig
from vera_cli.errors import VeraError
from vera_cli.metrics import AccuracyReport
from vera_cli.plot import require_matplotlib
from vera_cli.runs import Run
from vera_cli.train import EpochStats, Trainer

TENSORBOARD_DIR = "tensorboard"


class TensorBoardLog:
    """Buffers the per-step losses as tensors and writes them once per epoch: one device sync per epoch."""

    def __init__(self, run: Run, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run.file(TENSORBOARD_DIR)))
        # Four-space indentation makes TensorBoard's markdown show the YAML as a code block.
        text = yaml.safe_dump(config, sort_keys=False)
        self.writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()))
        self.steps: list[tuple[int, torch.Tensor, float]] = []

    def on_step(self, step: int, loss: torch.Tensor, lr: float) -> None:
        self.steps.append((step, loss, lr))

    def __call__(self, stats: EpochStats, report: AccuracyReport | None) -> None:
        if not self.steps:
            return
        losses = torch.stack([loss for _, loss, _ in self.steps]).tolist()
        for (step, _, lr), loss in zip(self.steps, losses):
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)
        step = self.steps[-1][0]
        self.steps.clear()
        scalars = {"epoch/epoch": stats.epoch, "epoch/loss": stats.loss, "epoch/images_per_second": stats.images_per_second}
        if report is not None:  # None: an epoch that was not evaluated
            scalars["test/accuracy"] = report.overall
            scalars.update({f"test/{name}": report.metric(name) for name in ("chosen", "task", "rest")
                            if report.metric(name) is not None})
            scalars.update({f"test_class/{row.name}": row.accuracy for row in report.per_class})
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        # Flushed every epoch: an interrupted run keeps its curves up to its checkpoint.
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def require_logs(cfg: LoggingConfig) -> None:
    """Refuse, before a run starts, the logs `cfg` asks for that cannot be written: a tensorboard or matplotlib
    that is installed but does not import would otherwise fail the run after its training."""
    if cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except Exception as exc:  # a broken install raises anything on import
            raise VeraError(f"logging.tensorboard: the tensorboard package is installed but does not import "
                            f"({type(exc).__name__}: {exc}): reinstall it (pip install --force-reinstall tensorboard), "
                            "or leave out --tensorboard") from exc
    if cfg.plots:
        require_matplotlib(", or turn the pictures off with --set logging.plots=false")


@contextlib.contextmanager
def training_logs(cfg: LoggingConfig, run: Run, trainer: Trainer, config: dict[str, Any]) -> Iterator[list[EpochListener]]:
    """The epoch listeners `cfg` asks for, hooked into `trainer`'s steps; closed when the block ends."""
    if not cfg.tensorboard:
        yield []
        return
    log = TensorBoardLog(run, config)
    trainer.step_hooks.append(log.on_step)
    try:
        yield [log]
    finally:
        trainer.step_hooks.remove(log.on_step)
        log.close()
