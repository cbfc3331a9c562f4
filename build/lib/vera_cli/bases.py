"""Pretrained bases: find one, load its weights, identify it by content."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from vera_cli import config as config_module
from vera_cli.config import PretrainConfig
from vera_cli.errors import VeraError
from vera_cli.models import ModelConfig, build_model
from vera_cli.runs import STATUS_FILE, Run, latest_run, open_run
from vera_cli.files import read_tensors, read_text
from vera_cli.yamlsafe import safe_load

WEIGHTS_FILE = "model.safetensors"


def resolve_base(base: str | None) -> Run:
    """The named finished pretrain run, or the latest one."""
    return open_run(base, ("pretrain",)) if base else latest_run(("pretrain",))


def base_reference(base_run: Run, adapt_dir: Path) -> dict[str, str]:
    """How an adapt run names its base: as given, absolute, and relative to the adapt run itself,
    so that it is found again from another working directory or after the runs folder moved."""
    return {"base_run": str(base_run.path), "base_run_absolute": str(base_run.path.resolve()),
            "base_run_relative": os.path.relpath(base_run.path.resolve(), adapt_dir.resolve())}


def adapter_base(adapt_dir: Path, meta: dict[str, Any]) -> Run:
    """The finished pretrain run an adapter was trained on (see base_reference), first match wins."""
    names = [meta.get(key) for key in ("base_run_relative", "base_run_absolute", "base_run")]
    candidates = [adapt_dir / names[0] if isinstance(names[0], str) else None] + [
        Path(name) for name in names[1:] if isinstance(name, str)]
    for candidate in candidates:
        if candidate is not None and (candidate / STATUS_FILE).is_file():
            return open_run(candidate, ("pretrain",))
    raise VeraError(f"the base run of {adapt_dir} ({meta.get('base_run')}) is not found, neither relative to the "
                    "adapt run nor where it was: put the base run back or re-run adapt")


def run_config(run: Run) -> dict[str, Any]:
    """A run's recorded config as a mapping (for the few keys a reader needs before building the dataclass)."""
    path = run.file("config.yaml")
    try:
        raw = safe_load(read_text(path), str(path))
    except yaml.YAMLError as exc:
        raise VeraError(f"{path} is not valid YAML: repeat the run that wrote it") from exc
    if not isinstance(raw, dict):
        raise VeraError(f"{path} does not hold a config mapping: repeat the run that wrote it")
    return raw


def fingerprint(model: nn.Module) -> str:
    """sha256 over the parameter names and bytes: identifies a base model independently of file layout."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def pretrain_config(run: Run) -> PretrainConfig:
    return config_module.load_recorded(PretrainConfig, run_config(run), str(run.file("config.yaml")))


def model_config(run: Run) -> ModelConfig:
    """The model a pretrain run trained (its architecture, without loading the weights)."""
    return pretrain_config(run).model


def load_pretrained(run: Run, device: torch.device) -> tuple[nn.Module, PretrainConfig]:
    cfg = pretrain_config(run)
    model = build_model(cfg.model)
    state = read_tensors(run.file(WEIGHTS_FILE))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise VeraError(f"{run.file(WEIGHTS_FILE)} does not fit model {cfg.model.name} ({str(exc).splitlines()[-1].strip()}); "
                        "repeat the run that wrote it") from exc
    if missing or unexpected:
        raise VeraError(f"{run.file(WEIGHTS_FILE)} does not fit model {cfg.model.name} (missing {missing}, unexpected {unexpected})")
    return model.to(device).eval(), cfg
