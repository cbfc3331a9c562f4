"""`vera adapt`: convert a pretrained run to VeRA / LoRA (or full / head) and fine-tune on chosen classes."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from vera_cli import config as config_module
from vera_cli import fast
from vera_cli.adapter_files import ADAPTER_FILE, apply_adapter, save_adapter
from vera_cli.adapters.head import head_parameters
from vera_cli.adapters.inject import adapted_layers, inject
from vera_cli.adapters.targets import head_name
from vera_cli.bases import base_reference, fingerprint, load_pretrained, pretrain_config, resolve_base
from vera_cli.checkpoint import METRICS_FILE, EpochRecorder
from vera_cli.config import ADAPTERS, AdaptConfig
from vera_cli.costs import PeakMemory, inference_ms_per_image, per_thousand, training_seconds
from vera_cli.data import CLASSES, Cifar10, class_ids, load_cifar10, require_images
from vera_cli.distill import distillation_loss, rows_as_labels
from vera_cli.distributed import LOCAL, World
from vera_cli.lifecycle import RunLifecycle
from vera_cli.metrics import AccuracyReport, accuracy_report
from vera_cli.run_plots import PER_CLASS_FILE, write_per_class, write_training_curves
from vera_cli.errors import VeraError
from vera_cli.files import read_json, read_jsonl, write_json
from vera_cli.runs import Run, environment
from vera_cli.selection import SELECTION_FILE, Selection, select, take
from vera_cli.tensorboard_log import require_logs, training_logs
from vera_cli.train import Log, Trainer, fit, resolve_device

# Test images timed for the inference cost: enough to fill a batch, few enough to cost next to nothing.
INFERENCE_IMAGES = 64


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
    test: Optional[AccuracyReport]  # None: left for later (`evaluate_later`), as a comparison does for the rates it did not choose
    environment: dict[str, str] = field(default_factory=dict)
    world_size: int = 1  # processes that trained it (torchrun); the last part's on a resumed run
    held_out: list[str] = field(default_factory=list)  # classes the base never saw
    head_parameters: int = 0  # of trainable_parameters, those of the classifier head
    shots: Optional[int] = None
    selection_sha256: str = ""
    validation: Optional[AccuracyReport] = None  # on the validation split, when there is one
    tta: str = "none"  # the base's rule behind every report here (runs recorded before it: images alone)
    # Costs (vera_cli.costs); None in runs recorded before they were measured.
    train_seconds: Optional[float] = None
    inference_ms_per_image: Optional[float] = None
    peak_memory_bytes: Optional[int] = None

    @property
    def train_seconds_per_1k_images(self) -> Optional[float]:
        return per_thousand(self.train_seconds, self.epochs * self.train_images)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "adapt", "base_run": self.base_run, "forgetting": self.forgetting,
                "train_images": self.train_images, "method": self.method, "rank": self.rank, "classes": self.classes,
                "trainable_parameters": self.trainable_parameters, "adapter_file": ADAPTER_FILE,
                "adapter_bytes": self.adapter_bytes, "epochs": self.epochs, "seed": self.seed, "device": self.device,
                "wall_seconds": self.wall_seconds, "base": self.base.to_dict(),
                "test": self.test.to_dict() if self.test else None,
                "environment": self.environment, "world_size": self.world_size, "held_out": self.held_out, "head_parameters": self.head_parameters,
                "shots": self.shots, "selection_sha256": self.selection_sha256,
                "validation": self.validation.to_dict() if self.validation else None, "tta": self.tta,
                "train_seconds": self.train_seconds, "train_seconds_per_1k_images": self.train_seconds_per_1k_images,
                "inference_ms_per_image": self.inference_ms_per_image, "peak_memory_bytes": self.peak_memory_bytes}

    @classmethod
    def from_dict(cls, run: Run, raw: dict[str, Any]) -> "AdaptSummary":
        """The summary `run` recorded; one that does not hold one (edited, damaged) is a one-line error."""
        reports = ("base", "test", "validation")
        try:
            fields = {k: v for k, v in raw.items() if k not in ("kind", "adapter_file", "train_seconds_per_1k_images",
                                                                 *reports)}
            base, test, validation = (AccuracyReport.from_dict(raw[k]) if raw.get(k) else None for k in reports)
            summary = cls(run=run, base=base, test=test, validation=validation, **fields)
        except (AttributeError, KeyError, TypeError) as exc:
            raise VeraError(f"{run.file('summary.json')} is damaged ({type(exc).__name__}: {exc}); remove {run.path} "
                            "and run it again") from exc
        test_left = "test" in raw and raw["test"] is None
        if not (isinstance(summary.test, AccuracyReport) or test_left) or not isinstance(summary.trainable_parameters, int):
            raise VeraError(f"{run.file('summary.json')} is damaged (no test report or parameter count); remove "
                            f"{run.path} and run it again")
        return summary


def training_selection(labels: torch.Tensor, chosen: list[int], held_out: list[int], cfg: AdaptConfig,
                       names: list[str] = CLASSES) -> Selection:
    """The validation split, the chosen classes' images (all, or `shots` each) and, for replay and distill,
    replayed images of the classes the base learned and the run does not train on."""
    kept = [c for c in range(len(CLASSES)) if c not in chosen and c not in held_out]
    return select(labels, chosen, kept, cfg.shots, cfg.validation, replay_fraction(cfg), cfg.seed, names)


def masked_to(chosen: list[int], forward: fast.Forward, source: fast.BatchSource,
              device: torch.device) -> tuple[fast.Forward, fast.BatchSource]:
    """Train on the chosen classes' logits only: the other classes' logits get no gradient."""
    chosen_ids = torch.tensor(chosen, device=device)
    remap = torch.full((max(chosen) + 1,), -1, dtype=torch.long, device=device)
    remap[chosen_ids] = torch.arange(len(chosen), device=device)

    def masked_source(generator: torch.Generator):
        for inputs, labels in source(generator):
            yield inputs, remap[labels]

    return (lambda x: forward(x).index_select(1, chosen_ids)), masked_source


def epochs_for(cfg: AdaptConfig, steps_per_epoch: int) -> int:
    """`train.epochs`, or more when that many passes fall short of `min_steps` (a few-shot set)."""
    return max(cfg.train.epochs, math.ceil((cfg.min_steps or 0) / steps_per_epoch))


def held_out_by(base_run: Run) -> list[int]:
    """The classes `base_run` was pretrained without."""
    excluded = pretrain_config(base_run).exclude_classes
    return class_ids(excluded) if excluded else []


def settle_head(cfg: AdaptConfig, new: list[str], base_run: Run) -> tuple[AdaptConfig, list[str]]:
    """`adapter.train_head` null decided by the base: on when a chosen class is `new` to it (held out at its
    pretraining), as in the VeRA paper's image classification; the notes say what was chosen and why."""
    adapter = cfg.adapter
    if adapter.method not in ADAPTERS:
        return cfg, []  # head and full train the classifier layer whatever train_head says
    notes = []
    if adapter.train_head is None:
        cfg = dataclasses.replace(cfg, adapter=dataclasses.replace(adapter, train_head=bool(new)))
        if new:
            notes.append(f"{', '.join(new)} {'is' if len(new) == 1 else 'are'} new to {base_run.path} (held out at its "
                         "pretraining): the classifier layer trains fully beside the adapter (adapter.train_head: true); "
                         "--no-train-head keeps it frozen")
    if cfg.train.head_lr is not None and not cfg.adapter.train_head:
        raise VeraError("--head-lr (train.head_lr) is the classifier layer's rate when it trains beside the adapter, and "
                        "adapter.train_head is false here: add --train-head or drop --head-lr")
    return cfg, notes


def require_learnable_head(model: torch.nn.Module, name: str, cfg: AdaptConfig, new: list[str], base_run: Run) -> list[str]:
    """Refuse new classes that nothing trained could make the adapted `model` predict: their rows of a frozen,
    unadapted classifier layer (`name`) were trained never to win. Notes when only an adapter on it reaches them."""
    if not new or cfg.adapter.method not in ADAPTERS or cfg.adapter.train_head:
        return []
    reached = name in adapted_layers(model) or any(p.requires_grad for p in model.get_submodule(name).parameters())
    if not reached:
        raise VeraError(f"{', '.join(new)} {'is' if len(new) == 1 else 'are'} new to {base_run.path} (held out at its "
                        f"pretraining) and nothing here trains its classifier layer {name} (adapter.train_head is false and "
                        f"{name} is not among the adapter's targets): their logits could not be learned; train the "
                        f"head (drop --no-train-head; in vera compare, a method with +head), or add {name} to the targets")
    return [f"note: {', '.join(new)} {'is' if len(new) == 1 else 'are'} new to {base_run.path} and adapter.train_head "
            f"is false: only the adapter on {name} can move their logits"]


def budget_notes(cfg: AdaptConfig, selection: Selection, steps_per_epoch: int, epochs: int) -> list[str]:
    """What the step budget and the replayed images came to, where they differ from what the config alone says."""
    notes = []
    batch, chosen_images = cfg.train.batch_size, len(selection.train) - selection.replayed
    if cfg.shots is not None and epochs > cfg.train.epochs:
        notes.append(f"{cfg.shots} shots a class: trained by steps: {len(selection.train):,} images make "
                     f"{steps_per_epoch} batch(es) of {batch} a pass, so {epochs} passes reach min_steps {cfg.min_steps} "
                     f"(train.epochs {cfg.train.epochs} would be {cfg.train.epochs * steps_per_epoch} steps)")
    elif cfg.shots is not None and epochs * steps_per_epoch < cfg.few_shot.min_steps:
        notes.append(f"note: {cfg.shots} shots a class at batch {batch} make {epochs * steps_per_epoch} optimizer steps in "
                     f"{epochs} epochs, fewer than the few-shot budget of {cfg.few_shot.min_steps} (few_shot.min_steps): "
                     "new classes may not be learned; leave train.epochs unset or raise --epochs")
    asked = round(replay_fraction(cfg) * chosen_images)
    if selection.replayed < asked:
        notes.append(f"note: replay_fraction {cfg.replay_fraction:g} asks for {asked:,} replayed images; the classes it "
                     f"draws from hold {selection.replayed:,} outside the validation split: all of them are replayed")
    return notes


def replay_fraction(cfg: AdaptConfig) -> float:
    """The share of replayed images the run draws: none unless it forgets by replay or distill."""
    return cfg.replay_fraction if cfg.forgetting in ("replay", "distill") else 0.0


def check_selection_record(run: Run, selection: Selection, log: Log) -> None:
    """A resumed run must train on the images it started with: the record of them must match the draw again."""
    path = run.file(SELECTION_FILE)
    try:
        recorded = read_json(path) if path.is_file() else None
    except VeraError:
        recorded = None
    digest = recorded.get("sha256") if isinstance(recorded, dict) else None
    if not isinstance(digest, str):
        log(f"note: {path} is missing or damaged (no sha256 of the images): written again from the run's seed and data")
    elif digest != selection.digest():
        raise VeraError(f"{path} records other training images than the run draws now (sha256 {digest[:12]}... against "
                        f"{selection.digest()[:12]}...): the data changed since the run started; resume it with the "
                        "--data-dir it started with, or repeat it")


def run_adapt(cfg: AdaptConfig, log: Log = print, progress: bool = True, data: Cifar10 | None = None,
              resume: Run | None = None, world: World = LOCAL, epoch_log: Log | None = None,
              shared: dict[tuple, Any] | None = None, test: bool = True) -> AdaptSummary:
    """Adapt into a new run directory, or continue the unfinished run `resume`.

    In a `world` of several processes (torchrun) they train one adapter data-parallel. `epoch_log` hears
    the per-epoch lines (default: `log`). `shared` keeps what the runs that share one `data` (a comparison's rows)
    compute alike, by the base's fingerprint and test-time rule: the base's logits on the test images (on the ViT,
    a third of a 10-shot row), and its frozen features' outputs on them and on the training images. Without `test`
    the test split is left for `evaluate_later` (the summary's test report is None): a comparison tests only the
    learning rates it chose.
    """
    device = world.place(resolve_device(cfg.device))
    memory = PeakMemory(device)
    chosen = class_ids(cfg.classes)
    base_run = resolve_base(cfg.base)
    held_out = held_out_by(base_run)
    new = [CLASSES[c] for c in chosen if c in held_out]
    cfg, notes = settle_head(cfg, new, base_run)
    require_logs(cfg.logging)
    life = RunLifecycle("adapt", cfg, resume, recorded={**config_module.to_dict(cfg), "base": str(base_run.path)},
                        shared=world.shared())
    data = (data or load_cifar10(cfg.data.dir, cfg.data.download)).to(device)
    require_images(data.train, chosen, data.classes, "training")
    model, base_cfg = load_pretrained(base_run, device)
    base_fingerprint = fingerprint(model)
    tta = base_cfg.model.tta
    selection = training_selection(data.train.labels, chosen, held_out, cfg, data.classes)
    if resume is not None:
        # Every process checks (it only reads), so that all refuse together.
        check_selection_record(resume, selection, notes.append)
    key = (base_fingerprint, tta)
    test_logits = shared.get(key) if shared is not None else None
    if test_logits is None:
        test_logits = fast.predict_logits(fast.forward(model), data.test, tta)
        if shared is not None:
            shared[key] = test_logits
    base_report = accuracy_report(test_logits, data.test.labels, data.classes, chosen)
    train_split, validation_split = take(data.train, selection.train), take(data.train, selection.validation)
    kept = [c for c in range(len(data.classes)) if c not in chosen and c not in held_out]
    loss = None
    if cfg.forgetting == "distill":
        loss = distillation_loss(train_split.labels, fast.predict_logits(fast.forward(model), train_split), kept, cfg.distill_weight,
                                 cfg.distill_temperature, cfg.train.label_smoothing)
    generator = life.seed(cfg.seed, device)
    classifier = head_name(model) if new else ""
    inject(model, cfg.adapter)
    notes += require_learnable_head(model, classifier, cfg, new, base_run)
    steps_per_epoch = math.ceil(len(train_split) / cfg.train.batch_size)
    train_cfg = dataclasses.replace(cfg.train, epochs=epochs_for(cfg, steps_per_epoch))
    notes += budget_notes(cfg, selection, steps_per_epoch, train_cfg.epochs)
    with world.joined(device), life.open() as run:
        life.by_writer(lambda: write_json(run.file(SELECTION_FILE), selection.to_dict()))
        pipeline = fast.build_pipeline(model, rows_as_labels(train_split) if loss else train_split, data.test, cfg, tta,
                                       fast.SharedViews(shared, key, selection.train) if shared is not None else None)
        forward, source = pipeline.forward, pipeline.train_batches
        if cfg.forgetting == "mask":
            forward, source = masked_to(chosen, forward, source, device)
        trainer = Trainer(forward, model, train_cfg, steps_per_epoch, parallel=world.data_parallel(), criterion=loss)
        trainable = sum(p.numel() for p in trainer.params)
        # What a resume rebuilt is said after the plan line, which comes first.
        start = life.restore(model, trainer, generator, notes.append)
        rank = f"rank {cfg.adapter.rank}, " if cfg.adapter.method in ADAPTERS else ""
        log(f"adapting {base_run.path} with {cfg.adapter.method} ({rank}{trainable:,} trainable) on "
            f"{', '.join(data.classes[i] for i in chosen)} (forgetting: {cfg.forgetting}): {len(train_split):,} images "
            f"({selection.replayed:,} replayed), {train_cfg.epochs} epochs, "
            f"{train_cfg.epochs * steps_per_epoch:,} optimizer steps (batch {train_cfg.batch_size}), {device}{world.note()}, "
            f"run {run.path}" + (f", resuming at epoch {start}" if resume else ""))
        for note in notes:
            log(note)
        with training_logs(life.logging(cfg.logging), run, trainer, life.recorded) as listeners:
            recorder = EpochRecorder(run, model, trainer, generator, epoch_log or log, listeners)
            evaluate = lambda: accuracy_report(pipeline.test_logits(), data.test.labels, data.classes, chosen)  # noqa: E731
            report = fit(trainer, model, source, len(train_split), generator, evaluate if test else lambda: None,
                         lambda stats, report: life.by_writer(lambda: recorder(stats, report)), start, progress,
                         cfg.logging.evaluations)
        validation = accuracy_report(pipeline.logits_of(validation_split)(), validation_split.labels, data.classes,
                                     chosen) if len(validation_split) else None
        classes = [data.classes[i] for i in chosen]
        # Served as `vera eval` serves it: the adapter beside the frozen weights, the base's test-time rule.
        sample, serve = take(data.test, torch.arange(min(INFERENCE_IMAGES, len(data.test)))), fast.forward(model)
        inference_ms = inference_ms_per_image(lambda: fast.predict_logits(serve, sample, tta), len(sample), device)
        train_seconds = life.by_writer(lambda: training_seconds(read_jsonl(run.file(METRICS_FILE))))

        def save() -> int:
            size = save_adapter(run.path, model, cfg.adapter, base_fingerprint,
                                {**base_reference(base_run, run.path), "classes": classes})
            if cfg.logging.plots:
                title = f"{cfg.adapter.method} on {', '.join(classes)}: {run.path}"
                write_training_curves(run.file(METRICS_FILE), title)
                if report is not None:
                    write_per_class({"base": base_report, cfg.adapter.method: report}, title, run.file(PER_CLASS_FILE))
            return size

        adapter_bytes = life.by_writer(save)
        return life.finish(AdaptSummary(run, str(base_run.path), cfg.forgetting, len(train_split), cfg.adapter.method,
                                        cfg.adapter.rank, classes, trainable, adapter_bytes, train_cfg.epochs, cfg.seed,
                                        str(device), life.elapsed(), base_report, report, environment(), world.size,
                                        [data.classes[i] for i in held_out], sum(p.numel() for p in head_parameters(model)),
                                        cfg.shots, selection.digest(), validation, tta, train_seconds, inference_ms,
                                        memory.bytes()))


def evaluate_later(run: Run, data: Cifar10) -> AdaptSummary:
    """The test report of a finished run that left it for later (`run_adapt(test=False)`), measured now and added
    to its summary: the adapter loaded over its base, as `vera eval` measures it, under the base's test-time rule."""
    raw = read_json(run.file("summary.json"))
    summary = AdaptSummary.from_dict(run, raw)
    if summary.test is not None:
        return summary
    model, _ = load_pretrained(Run(Path(summary.base_run)), data.test.images.device)
    apply_adapter(model, run.path, fingerprint(model))
    logits = fast.predict_logits(fast.forward(model.eval()), data.test, summary.tta)
    summary.test = accuracy_report(logits, data.test.labels, data.classes, class_ids(summary.classes, data.classes))
    write_json(run.file("summary.json"), {**raw, "test": summary.test.to_dict()})
    return summary

