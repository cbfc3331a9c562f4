"""`vera pretrain`: train the base model from scratch and record the run."""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import yaml
from torch import nn

from vera_cli import config as config_module
from vera_cli.config import PretrainConfig
from vera_cli.data import Cifar10, batches, load_cifar10
from vera_cli.errors import VeraError
from vera_cli.evaluate import accuracy_report, predict_logits
from vera_cli.models import build_model, count_parameters
from vera_cli.runs import ensure_new, Run, append_jsonl, create_run, environment, read_tensors, write_json, write_tensors, write_yaml
from vera_cli.train import EpochStats, Trainer, make_generator, resolve_device

WEIGHTS_FILE = "model.safetensors"
Log = Callable[[str], None]


@dataclass
class PretrainResult:
    run: Run
    summary: dict[str, Any]


def fingerprint(model: nn.Module) -> str:
    """sha256 over the parameter names and bytes: identifies a base model independently of file layout."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_pretrained(run: Run, device: torch.device) -> tuple[nn.Module, PretrainConfig]:
    cfg = config_module.build(PretrainConfig, yaml.safe_load(run.file("config.yaml").read_text()))
    model = build_model(cfg.model)
    state = read_tensors(run.file(WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise VeraError(f"{run.file(WEIGHTS_FILE)} does not fit model {cfg.model} (missing {missing}, unexpected {unexpected})")
    return model.to(device).eval(), cfg


def epoch_line(stats: EpochStats, accuracy: float, prefix: str = "") -> str:
    return (f"{prefix}epoch {stats.epoch}: loss {stats.loss:.4f}, test accuracy {accuracy:.2%}, "
            f"{stats.seconds:.1f}s ({stats.images_per_second:,.0f} img/s)")


def run_pretrain(cfg: PretrainConfig, log: Log = print, progress: bool = True, data: Cifar10 | None = None) -> PretrainResult:
    device = resolve_device(cfg.device)
    build_model(cfg.model)
    ensure_new(cfg.run_dir)
    # Everything that can fail on bad input is checked before the run directory exists.
    data = (data or load_cifar10(cfg.data.dir, cfg.data.download)).to(device)
    run = create_run("pretrain", cfg.run_dir)
    with run.recording():
        write_yaml(run.file("config.yaml"), config_module.to_dict(cfg))
        started = time.perf_counter()
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model).to(device)
        generator = make_generator(cfg.seed, device)
        train = cfg.train
        trainer = Trainer(model, model, train, steps_per_epoch=math.ceil(len(data.train) / train.batch_size))
        log(f"pretraining {cfg.model} ({count_parameters(model):,} parameters) on {len(data.train):,} images, "
            f"{device}, run {run.path}")
        report: dict[str, Any] = {}
        for epoch in range(1, train.epochs + 1):
            model.train()
            stats = trainer.epoch(epoch, batches(data.train, train.batch_size, generator, train.crop, train.flip),
                                  len(data.train), progress)
            model.eval()
            report = accuracy_report(predict_logits(model, data.test), data.test.labels, data.classes)
            append_jsonl(run.file("metrics.jsonl"), {"epoch": epoch, "loss": stats.loss, "test_accuracy": report["overall"],
                                                     "seconds": stats.seconds, "images_per_second": stats.images_per_second})
            log(epoch_line(stats, report["overall"]))
        write_tensors(run.file(WEIGHTS_FILE), model.state_dict())
        summary = {
            "kind": "pretrain",
            "model": cfg.model,
            "parameters": count_parameters(model),
            "fingerprint": fingerprint(model),
            "epochs": train.epochs,
            "seed": cfg.seed,
            "device": str(device),
            "wall_seconds": time.perf_counter() - started,
            "test": report,
            "environment": environment(),
        }
        write_json(run.file("summary.json"), summary)
        run.set_status("finished")
        return PretrainResult(run, summary)
