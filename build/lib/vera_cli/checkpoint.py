"""Per-epoch checkpoints of a run, so that an interrupted run resumes bit for bit.

A checkpoint holds the model and optimiser state, the schedule position and both
random generators. It is written with torch.save and read back with
`weights_only=True`, whose unpickler admits only tensors and plain containers.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from vera_cli.config import shown
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
    """Load the last checkpoint into the fresh objects, reading only; returns its epoch (0: none yet).

    Its epoch must lie within the epochs `trainer` is configured for, and its step count must be that epoch's
    under the run's step plan: a checkpoint that is not this run's (or data that changed) is refused.
    """
    path = run.file(CHECKPOINT_FILE)
    if not path.is_file():
        return 0
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        epoch = state.get("epoch") if isinstance(state, dict) else None
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
            raise VeraError(f"{path} is damaged (its epoch is {shown(epoch)}, not a count of epochs); the run cannot "
                            "resume, repeat it")
        if epoch > trainer.cfg.epochs:
            raise VeraError(f"{path} is at epoch {epoch}, past the {trainer.cfg.epochs} epochs the run's config trains "
                            "(train.epochs, min_steps): it is not this run's checkpoint; repeat the run")
        bad = first_nonfinite(state["model"])
        if bad is not None:
            raise VeraError(f"{path} holds NaN or infinite values (in {bad}); the run cannot resume, repeat it")
        model.load_state_dict(state["model"])
        trainer.load_state_dict(state["trainer"])
        steps = trainer.scheduler.last_epoch
        if steps != epoch * trainer.steps_per_epoch:
            raise VeraError(f"{path} has taken {steps} optimizer steps by epoch {epoch}, but the run makes "
                            f"{trainer.steps_per_epoch} a pass: its training images changed (another --data-dir?) or the "
                            "file is not this run's; resume with the data it started with, or repeat it")
        generator.set_state(state["generator"].to(generator.get_state().device))
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
    except VeraError:
        raise
    except Exception as exc:  # torch raises several types for a damaged or edited file
        raise VeraError(f"{path} is truncated or corrupted ({type(exc).__name__}); the run cannot resume, repeat it") from exc
    return epoch


# What each metrics line holds: a finite number, or a rate (0..1) or null for the accuracies of an epoch that
# was not evaluated. images_per_second may be infinite (an epoch too quick to time).
_NUMBERS = ("loss", "seconds")
_RATES = ("test_accuracy", "chosen", "task", "rest")


def _record_problem(record: dict[str, Any]) -> str | None:
    """What is wrong with one metrics line's values, if anything."""
    for key in (*_NUMBERS, "images_per_second"):
        value = record.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value) or \
                (key in _NUMBERS and math.isinf(value)):
            return f"{key} is {shown(value)}"
    for key in _RATES:
        value = record.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1):
            return f"{key} is {shown(value)}"
    return None


def checked_metrics(path: Path, records: list[dict[str, Any]], epoch: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The metrics lines of epochs 1..`epoch` (the checkpoint's), one each, in order, each well formed.

    Lines past the checkpoint are dropped with a note (those epochs run again); lines out of order or repeated
    word for word are put right with a note; a missing, conflicting or malformed epoch up to the checkpoint
    is refused, since nothing could rebuild it.
    """
    for number, record in enumerate(records, 1):
        value = record.get("epoch")
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise VeraError(f"{path} is damaged (line {number}: epoch is {shown(value)}); the run cannot resume, repeat it")
    past = sorted({r["epoch"] for r in records if r["epoch"] > epoch})
    if past:
        log(f"note: {path} held epoch(s) {', '.join(map(str, past))} past the checkpoint's {epoch}: dropped, they run again")
    kept: dict[int, dict[str, Any]] = {}
    for number, record in enumerate(records, 1):
        if record["epoch"] > epoch:
            continue
        problem = _record_problem(record)
        if problem is not None:
            raise VeraError(f"{path} is damaged (line {number}: {problem}); the run cannot resume, repeat it")
        if record["epoch"] in kept and kept[record["epoch"]] != record:
            raise VeraError(f"{path} records epoch {record['epoch']} twice, with different values; the run cannot "
                            "resume, repeat it")
        kept[record["epoch"]] = record
    missing = [e for e in range(1, epoch + 1) if e not in kept]
    if missing:
        raise VeraError(f"{path} lacks epoch(s) {', '.join(map(str, missing))} of the {epoch} the checkpoint has "
                        "trained; the record cannot be rebuilt: repeat the run")
    if [r["epoch"] for r in records if r["epoch"] <= epoch] != list(range(1, epoch + 1)):
        log(f"note: {path} held epochs repeated or out of order: rewritten once each, in order")
    return [kept[e] for e in range(1, epoch + 1)]


def restore(run: Run, model: nn.Module, trainer: Trainer, generator: torch.Generator,
            log: Callable[[str], None], writes: bool = True) -> int:
    """Load the last checkpoint and check the metrics record against it; returns the epoch to continue from.
    The process that `writes` the run also brings the record to the checkpoint; the others (torchrun) only
    check it, so that every process refuses a record that cannot be rebuilt, together."""
    epoch = load_checkpoint(run, model, trainer, generator)
    path = run.file(METRICS_FILE)
    records = read_jsonl(path)
    if epoch == 0:
        if records:
            log(f"note: {path} held {len(records)} line(s) but there is no checkpoint yet: removed, the run starts over")
        if writes:
            path.unlink(missing_ok=True)
        return 1
    kept = checked_metrics(path, records, epoch, log)
    if kept != records and writes:
        write_bytes_atomic(path, "".join(json.dumps(record) + "\n" for record in kept).encode())
    return epoch + 1
