"""A base run with adapt runs over it, as named adapters of one model (`vera eval`, `vera predict`).

The base is loaded once and every adapter joins it by name: VeRA adapters trained with one
projection seed read one projection bank, and no adapter costs a copy of the base. A full
fine-tune is a model of its own, so such a run gets one (a copy of the base, with its weights).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from vera_cli import config as config_module
from vera_cli.adapter_files import apply_adapter, read_adapter_meta
from vera_cli.adapters.config import AdapterConfig
from vera_cli.adapters.inject import named_refusal
from vera_cli.adapters.named import set_adapter
from vera_cli.bases import adapter_base
from vera_cli.runs import Run, latest_run, open_run


def resolve_runs(run_path: str | None, adapter_paths: list[str]) -> tuple[Run, list[Run]]:
    """The base run and the adapt runs over it: `run_path` is a pretrain run (default: the latest run) with
    `adapter_paths` over it, or an adapt run, whose adapter comes first and whose base is the base."""
    run = open_run(run_path, ("pretrain", "adapt")) if run_path else latest_run(("pretrain", "adapt"))
    adapter_runs = [open_run(path, ("adapt",)) for path in adapter_paths]
    if run.kind == "adapt":
        return adapter_base(run.path, read_adapter_meta(run.path)), [run, *adapter_runs]
    return run, adapter_runs


@dataclass
class AdapterRuns:
    """Adapt runs loaded over one base model."""

    model: nn.Module  # the base, carrying every adapter that can share it
    names: dict[Path, str] = field(default_factory=dict)  # adapt run -> its adapter's name on `model`
    alone: dict[Path, nn.Module] = field(default_factory=dict)  # runs that cannot share the base: a model each
    metas: dict[Path, dict[str, Any]] = field(default_factory=dict)

    def model_for(self, path: Path) -> nn.Module:
        """The model that computes adapt run `path`: the shared one with its adapter active, or its own."""
        if path in self.alone:
            return self.alone[path]
        set_adapter(self.model, self.names[path])
        return self.model


def load_adapter_runs(model: nn.Module, runs: list[Run], base_fingerprint: str) -> AdapterRuns:
    """Add each adapt run's adapter to `model` (a base that carries none yet) by name."""
    metas = {run.path: read_adapter_meta(run.path) for run in runs}
    specs = {path: config_module.build(AdapterConfig, meta["adapter"]) for path, meta in metas.items()}
    own = [path for path, spec in specs.items() if named_refusal(model, spec) is not None]
    pristine = copy.deepcopy(model) if own else None
    loaded = AdapterRuns(model, metas=metas)
    for path in metas:
        if path in own:
            loaded.alone[path] = copy.deepcopy(pristine)
            apply_adapter(loaded.alone[path], path, base_fingerprint)
        elif path not in loaded.names:
            loaded.names[path] = f"run{len(loaded.names)}"
            apply_adapter(model, path, base_fingerprint, name=loaded.names[path])
    return loaded
