"""Per-epoch checkpoints of a run, so that an interrupted run resumes bit for bit.

A checkpoint holds the model and optimiser state, the schedule position and both
random generators. It is written with torch.save and read back with
`weights_only=True`, whose unpickler admits only tensors and plain containers.
"""

from __future__ import annotations

import io
import json
from typing import Callable, Sequence

import torch
from torch import nn

from vera_cli.errors import VeraError
from vera_cli.metrics import AccuracyReport, percent
from vera_cli.runs import CHECKPOINT_FILE, Run
from vera_cli.files import append_jsonl, first_nonfinite, read_jsonl, write_bytes_atomic
from vera_cli.train import EpochStats, Trainer

METRICS_FILE = "metrics.jsonl"
EpochListener = Callable[[EpochStats, AccuracyReport], None]


def epoch_line(stats: EpochStats, report: AccuracyReport | None) -> str:
    line = (f"epoch {stats.epoch}: loss {stats.loss:.4f}, "
            + (f"test accuracy {report.overall:.2%}, " if report is not None else "")
            + f"{stats.seconds:.1f}s ({stats.images_per_second:,.0f} img/s)")
    if report is not None and report.chosen_classes:
        line += "; " + ", ".join(f"{name} {percent(report.metric(name))}" for name in ("chosen", "task", "rest"))
    return line


class EpochRecorder:
    """After each epoch: a metrics line, then the checkpoint, then a log line, then the `listeners`
    (TensorBoard and the like).

    In that order a resumed run drops metrics lines past its checkpoint and writes them again.
    """

    def __init__(self, run: Run, model: nn.Module, trainer: Trainer, generator: torch.Generator,
                 log: Callable[[str], None], listeners: Sequence[EpochListener] = ()) -> None:
        self.run, self.model, self.trainer, self.generator, self.log = run, model, trainer, generator, log
        self.listeners = listeners

    def __call__(self, stats: EpochStats, report: AccuracyReport | None) -> None:
        """`report` is None after an epoch that was not evaluated."""
        record = {"epoch": stats.epoch, "loss": stats.loss, "test_accuracy": report.overall if report else None,
                  "seconds": stats.seconds, "images_per_second": stats.images_per_second}
        if report is not None and report.chosen_classes:
            record.update({k: report.metric(k) for k in ("chosen", "task", "rest")})
        append_jsonl(self.run.file(METRICS_FILE), record)
        state = {
            "epoch": stats.epoch,
            "model": self.model.state_dict(),
            "trainer": self.trainer.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_bytes_atomic(self.run.file(CHECKPOINT_FILE), buffer.getvalue())
        self.log(epoch_line(stats, report))
        for listener in self.listeners:
            listener(stats, report)


def load_checkpoint(run: Run, model: nn.Module, trainer: Trainer, generator: torch.Generator) -> int:
    """Load the last checkpoint into the fresh objects, reading only; returns its epoch (0: none yet)."""
    path = run.file(CHECKPOINT_FILE)
    if not path.is_file():
        return 0
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        bad = first_nonfinite(state["model"])
        if bad is not None:
            raise VeraError(f"{path} holds NaN or infinite values (in {bad}); the run cannot resume, repeat it")
        model.load_state_dict(state["model"])
        trainer.load_state_dict(state["trainer"])
        generator.set_state(state["generator"].to(generator.get_state().device))
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        epoch = int(state["epoch"])
    except VeraError:
        raise
    except Exception as exc:  # torch raises several types for a damaged or edited file
        raise VeraError(f"{path} is truncated or corrupted ({type(exc).__name__}); the run cannot resume, repeat it") from exc
    return epoch


def restore(run: Run, model: nn.Module, trainer: Trainer, generator: torch.Generator) -> int:
    """Load the last checkpoint and drop metrics past it; returns the epoch to continue from."""
    epoch = load_checkpoint(run, model, trainer, generator)
    if epoch == 0:
        run.file(METRICS_FILE).unlink(missing_ok=True)
        return 1
    # Lines past the checkpoint belong to an epoch that runs again.
    kept = [record for record in read_jsonl(run.file(METRICS_FILE))
            if isinstance(record.get("epoch"), int) and record["epoch"] <= epoch]
    write_bytes_atomic(run.file(METRICS_FILE), "".join(json.dumps(record) + "\n" for record in kept).encode())
    return epoch + 1
