"""`vera experiment`: the write-up end to end in one run directory."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from vera_cli.bases import model_config, resolve_base
from vera_cli.commands.adapt import AdaptSummary, run_adapt
from vera_cli.param_count import ParamCount, count_params
from vera_cli.commands.pretrain import run_pretrain
from vera_cli.train import Log
from vera_cli.config import ExperimentConfig
from vera_cli.data import class_ids, load_cifar10
from vera_cli.lifecycle import RunLifecycle
from vera_cli.models import build_model
from vera_cli.runs import Run
from vera_cli.tensorboard_log import require_logs


@dataclass
class ExperimentSummary:
    run: Run
    counts: ParamCount
    adapt: AdaptSummary
    wall_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "experiment", "base_run": self.adapt.base_run, "adapt_run": str(self.adapt.run.path),
                "counts": self.counts.to_dict(), "base": self.adapt.base.to_dict(), "adapted": self.adapt.test.to_dict(),
                "tta": self.adapt.tta, "wall_seconds": self.wall_seconds}


def run_experiment(cfg: ExperimentConfig, log: Log = print, progress: bool = True) -> ExperimentSummary:
    class_ids(cfg.adapt.classes)
    model = model_config(resolve_base(cfg.base)) if cfg.base else cfg.pretrain.model
    for logging in (cfg.pretrain.logging, cfg.adapt.logging):
        require_logs(logging)
    life = RunLifecycle("experiment", cfg, resumable=False)
    data = load_cifar10(cfg.adapt.data.dir, cfg.adapt.data.download)
    with life.open() as run:
        base = cfg.base
        if base is None:
            pretrained = run_pretrain(dataclasses.replace(cfg.pretrain, run_dir=str(run.file("pretrain"))), log, progress, data)
            base = str(pretrained.run.path)
        counts = count_params(build_model(model), cfg.adapt.adapter)
        log(f"{cfg.adapt.adapter.method} rank {cfg.adapt.adapter.rank}: {counts.trainable:,} trainable, "
            f"{counts.frozen_projections:,} frozen projection values in {len(counts.pairs)} pair(s)")
        adapted = run_adapt(dataclasses.replace(cfg.adapt, base=base, run_dir=str(run.file("adapt"))), log, progress, data)
        return life.finish(ExperimentSummary(run, counts, adapted, life.elapsed()))
