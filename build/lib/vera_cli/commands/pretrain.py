"""`vera pretrain`: train the base model from scratch and record the run."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from vera_cli import fast
from vera_cli.bases import WEIGHTS_FILE, fingerprint
from vera_cli.checkpoint import METRICS_FILE, EpochRecorder
from vera_cli.config import PretrainConfig
from vera_cli.data import CLASSES, Cifar10, batches, class_ids, load_cifar10
from vera_cli.errors import VeraError
from vera_cli.distributed import LOCAL, World
from vera_cli.lifecycle import RunLifecycle
from vera_cli.metrics import AccuracyReport, accuracy_report
from vera_cli.models import TRAINING_BYTES, build_model, count_parameters, require_memory
from vera_cli.run_plots import write_training_curves
from vera_cli.runs import Run, environment
from vera_cli.files import write_tensors
from vera_cli.selection import without_classes
from vera_cli.tensorboard_log import require_logs, training_logs
from vera_cli.train import Log, Trainer, device_memory, fit, resolve_device



@dataclass
class PretrainSummary:
    run: Run
    model: str
    parameters: int
    fingerprint: str
    epochs: int
    seed: int
    device: str
    wall_seconds: float
    test: AccuracyReport
    environment: dict[str, str] = field(default_factory=dict)
    world_size: int = 1  # processes that trained it (torchrun); the last part's on a resumed run
    excluded_classes: list[str] = field(default_factory=list)  # never seen in training: 0 % until adapted
    tta: str = "none"  # how `test` classified an image (ModelConfig.tta)
    images_alone: float | None = None  # the overall test accuracy without the mirror image, when tta is flip
    precision: str = "fp32"  # what training ran in: bf16 (autocast) or fp32, train.precision's `auto` resolved

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "pretrain", "model": self.model, "parameters": self.parameters,
                "fingerprint": self.fingerprint, "epochs": self.epochs, "seed": self.seed, "device": self.device,
                "wall_seconds": self.wall_seconds, "test": self.test.to_dict(), "environment": self.environment,
                "world_size": self.world_size, "excluded_classes": self.excluded_classes, "tta": self.tta,
                "images_alone": self.images_alone, "precision": self.precision}


def run_pretrain(cfg: PretrainConfig, log: Log = print, progress: bool = True, data: Cifar10 | None = None,
                 resume: Run | None = None, world: World = LOCAL) -> PretrainSummary:
    """Train from scratch into a new run directory, or continue the unfinished run `resume`.

    In a `world` of several processes (torchrun) they train one model data-parallel.
    """
    device = world.place(resolve_device(cfg.device))
    require_memory(cfg.model, device_memory(device), TRAINING_BYTES, "training (weights, gradients, optimizer state)")
    build_model(cfg.model)
    excluded = class_ids(cfg.exclude_classes) if cfg.exclude_classes else []
    if len(excluded) == len(CLASSES):
        raise VeraError("exclude_classes names every class: leave at least one to pretrain on")
    # Everything that can fail on bad input is checked before the run directory exists.
    require_logs(cfg.logging)
    life = RunLifecycle("pretrain", cfg, resume, shared=world.shared())
    data = (data or load_cifar10(cfg.data.dir, cfg.data.download)).to(device)
    with world.joined(device), life.open() as run:
        generator = life.seed(cfg.seed, device)
        model = build_model(cfg.model).to(device)
        train = cfg.train
        images = without_classes(data.train, excluded)
        forward = fast.forward(model)
        steps_per_epoch = math.ceil(len(images) / train.batch_size)
        trainer = Trainer(forward, model, train, steps_per_epoch, parallel=world.data_parallel())
        notes: list[str] = []  # what a resume rebuilt, said after the plan line, which comes first
        start = life.restore(model, trainer, generator, notes.append)
        held_out = [data.classes[i] for i in excluded]
        log(f"pretraining {cfg.model.name} ({count_parameters(model):,} parameters) on {len(images):,} images, "
            + (f"holding out {', '.join(held_out)}, " if held_out else "")
            + f"{train.epochs} epochs, {train.epochs * steps_per_epoch:,} optimizer steps (batch {train.batch_size}), "
            + f"{device}{', bf16 autocast' if trainer.bf16 else ''}{world.note()}, run {run.path}"
            + (f", resuming at epoch {start}" if resume else ""))
        for note in notes:
            log(note)
        tta = cfg.model.tta
        alone = []  # the last evaluation's accuracy on the images without their mirrors

        def evaluate() -> AccuracyReport:
            views = fast.view_outputs(forward, data.test, tta)
            alone[:] = [accuracy_report(views[0], data.test.labels, data.classes).overall]
            return accuracy_report(views.mean(0), data.test.labels, data.classes)

        with training_logs(life.logging(cfg.logging), run, trainer, life.recorded) as listeners:
            recorder = EpochRecorder(run, model, trainer, generator, log, listeners)
            source = lambda g: batches(images, train.batch_size, g, train.crop_pixels, train.flip, fast.augmented)  # noqa: E731
            report = fit(trainer, model, source, len(images), generator, evaluate,
                         lambda stats, report: life.by_writer(lambda: recorder(stats, report)), start, progress,
                         cfg.logging.evaluations)

        def save() -> None:
            write_tensors(run.file(WEIGHTS_FILE), model.state_dict())
            if cfg.logging.plots:
                write_training_curves(run.file(METRICS_FILE), f"Pretraining {cfg.model.name}: {run.path}")

        life.by_writer(save)
        if tta != "none":
            log(f"test accuracy {report.overall:.2%} with each image's logits averaged with its mirror image's "
                f"(model.tta: {tta}); {alone[0]:.2%} on the images alone")
        return life.finish(PretrainSummary(run, cfg.model.name, count_parameters(model), fingerprint(model), train.epochs,
                                           cfg.seed, str(device), life.elapsed(), report, environment(), world.size,
                                           held_out, tta, alone[0] if tta != "none" else None,
                                           "bf16" if trainer.bf16 else "fp32"))
