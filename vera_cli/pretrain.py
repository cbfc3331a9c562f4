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
from vera_cli.runs import Run, create_run, ensure_new, environment, read_tensors, write_json, write_tensors, write_yaml
from vera_cli.checkpoint import EpochRecorder, restore
from vera_cli.train import Trainer, fit, make_generator, resolve_device

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


def run_pretrain(cfg: PretrainConfig, log: Log = print, progress: bool = True, data: Cifar10 | None = None,
                 resume: Run | None = None) -> PretrainResult:
    """Train from scratch into a new run directory, or continue the unfinished run `resume`."""
    device = resolve_device(cfg.device)
    build_model(cfg.model)
    if resume is None:
        ensure_new(cfg.run_dir)
    # Everything that can fail on bad input is checked before the run directory exists.
    data = (data or load_cifar10(cfg.data.dir, cfg.data.download)).to(device)
    run = resume or create_run("pretrain", cfg.run_dir)
    with run.recording():
        run.set_status("running")
        write_yaml(run.file("config.yaml"), config_module.to_dict(cfg))
        started = time.perf_counter()
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model).to(device)
        generator = make_generator(cfg.seed, device)
        train = cfg.train
        trainer = Trainer(model, model, train, steps_per_epoch=math.ceil(len(data.train) / train.batch_size))
        start = restore(run, model, trainer, generator) if resume else 1
        log(f"pretraining {cfg.model} ({count_parameters(model):,} parameters) on {len(data.train):,} images, "
            f"{device}, run {run.path}" + (f", resuming at epoch {start}" if resume else ""))
        recorder = EpochRecorder(run, model, trainer, generator, log)
        report = fit(trainer, model, lambda g: batches(data.train, train.batch_size, g, train.crop, train.flip), len(data.train),
            generator, lambda: accuracy_report(predict_logits(model, data.test), data.test.labels, data.classes),
            recorder, start, progress)
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
        run.finish()
        return PretrainResult(run, summary)
