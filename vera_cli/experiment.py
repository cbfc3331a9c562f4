"""`vera experiment`: the write-up end to end in one run directory."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from vera_cli.adapt import AdaptResult, run_adapt
from vera_cli.config import ExperimentConfig
from vera_cli.counting import ParamCount, count_params
from vera_cli.data import class_ids, load_cifar10
from vera_cli.models import build_model
from vera_cli.pretrain import Log, run_pretrain
from vera_cli.runs import ensure_new, create_run, write_json


@dataclass
class ExperimentResult:
    path: Path
    counts: ParamCount
    adapt: AdaptResult
    seconds: float


def run_experiment(cfg: ExperimentConfig, log: Log = print, progress: bool = True) -> ExperimentResult:
    class_ids(cfg.classes)
    ensure_new(cfg.run_dir)
    data = load_cifar10(cfg.data.dir, cfg.data.download)
    run = create_run("experiment", cfg.run_dir)
    with run.recording(resumable=False):
        started = time.perf_counter()
        base = cfg.base
        if base is None:
            base = str(run_pretrain(cfg.pretrain_config(str(run.file("pretrain"))), log, progress, data).run.path)
        counts = count_params(build_model(cfg.model), cfg.adapter)
        log(f"{cfg.adapter.method} rank {cfg.adapter.rank}: {counts.trainable:,} trainable, "
            f"{counts.frozen_projections:,} frozen projection values in {len(counts.pairs)} pair(s)")
        adapted = run_adapt(cfg.adapt_config(base, str(run.file("adapt"))), log, progress, data)
        seconds = time.perf_counter() - started
        write_json(run.file("summary.json"), {
            "kind": "experiment", "base_run": base, "adapt_run": str(adapted.run.path), "counts": counts.to_dict(),
            "base": adapted.summary["base"], "adapted": adapted.summary["test"], "wall_seconds": seconds})
        run.set_status("finished")
        return ExperimentResult(run.path, counts, adapted, seconds)
