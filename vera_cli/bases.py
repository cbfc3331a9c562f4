"""Pretrained bases: find one, load its weights, identify it by content."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import yaml
from torch import nn

from vera_cli import config as config_module
from vera_cli.config import PretrainConfig
from vera_cli.errors import VeraError
from vera_cli.models import ModelConfig, build_model
from vera_cli.runs import Run, latest_run, open_run, read_tensors

WEIGHTS_FILE = "model.safetensors"


def resolve_base(base: str | None) -> Run:
    """The named finished pretrain run, or the latest one."""
    return open_run(base, ("pretrain",)) if base else latest_run(("pretrain",))


def run_config(run: Run) -> dict[str, Any]:
    """A run's recorded config as a mapping (for the few keys a reader needs before building the dataclass)."""
    path = run.file("config.yaml")
    if not path.is_file():
        raise VeraError(f"{path} is missing: the run is incomplete; repeat it")
    try:
        raw = yaml.safe_load(path.read_text())
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
    return config_module.build(PretrainConfig, run_config(run))


def model_config(run: Run) -> ModelConfig:
    """The model a pretrain run trained (its architecture, without loading the weights)."""
    return pretrain_config(run).model


def load_pretrained(run: Run, device: torch.device) -> tuple[nn.Module, PretrainConfig]:
    cfg = pretrain_config(run)
    model = build_model(cfg.model)
    state = read_tensors(run.file(WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise VeraError(f"{run.file(WEIGHTS_FILE)} does not fit model {cfg.model.name} (missing {missing}, unexpected {unexpected})")
    return model.to(device).eval(), cfg
