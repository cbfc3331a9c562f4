"""`vera eval`: load a run back (base model, adapters over it) and measure it on the test set."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

from vera_cli import fast
from vera_cli.adapter_files import apply_adapter, read_adapter_meta
from vera_cli.adapters.inject import merged_plain
from vera_cli.bases import adapter_base, fingerprint, load_pretrained, pretrain_config
from vera_cli.data import class_ids, load_cifar10
from vera_cli.errors import VeraError
from vera_cli.metrics import AccuracyReport, accuracy_report
from vera_cli.runs import Run, latest_run, open_run
from vera_cli.train import resolve_device


@dataclass
class EvalResult:
    base_run: Run
    reports: dict[str, AccuracyReport]  # "base" first, then one per adapter run
    seconds: dict[str, float]
    merged: bool
    tta: str  # the base's rule for every report: "flip" averages each test image with its mirror image

    def to_dict(self) -> dict[str, Any]:
        return {"base_run": str(self.base_run.path), "merged": self.merged, "tta": self.tta,
                "reports": {name: report.to_dict() for name, report in self.reports.items()}}


def _run_defaults(run: Run) -> dict[str, Any]:
    recorded = pretrain_config(run)
    return {"data_dir": recorded.data.dir, "download": recorded.data.download, "device": recorded.device}


def evaluate_runs(run_path: str | None, adapter_paths: list[str], do_merge: bool = False,
                  data_dir: str | None = None, device_name: str | None = None) -> EvalResult:
    """Evaluate a pretrain run (with any `adapter_paths` over it) or an adapt run against its base."""
    run = open_run(run_path, ("pretrain", "adapt")) if run_path else latest_run(("pretrain", "adapt"))
    adapter_runs = [open_run(path, ("adapt",)) for path in adapter_paths]
    base_run = run
    if run.kind == "adapt":
        adapter_runs.insert(0, run)
        base_run = adapter_base(run.path, read_adapter_meta(run.path))
    if do_merge and not adapter_runs:
        raise VeraError("--merge needs an adapter: evaluate an adapt run or add --adapter RUN")
    defaults = _run_defaults(base_run)
    device = resolve_device(device_name or defaults["device"])
    data = load_cifar10(data_dir or defaults["data_dir"], defaults["download"]).to(device)
    base, base_cfg = load_pretrained(base_run, device)
    base_fingerprint = fingerprint(base)
    metas = {adapter.path: read_adapter_meta(adapter.path) for adapter in adapter_runs}
    first_classes = next(iter(metas.values()))["classes"] if metas else None
    chosen = class_ids(first_classes, data.classes) if first_classes else None

    reports: dict[str, AccuracyReport] = {}
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    reports["base"] = accuracy_report(fast.predict_logits(fast.forward(base), data.test, base_cfg.model.tta), data.test.labels, data.classes, chosen)
    seconds["base"] = time.perf_counter() - started
    for adapter in adapter_runs:
        model = copy.deepcopy(base)
        meta = apply_adapter(model, adapter.path, base_fingerprint)
        if do_merge:
            merged_plain(model)
        model.eval()
        started = time.perf_counter()
        logits = fast.predict_logits(fast.forward(model), data.test, base_cfg.model.tta)
        seconds[str(adapter.path)] = time.perf_counter() - started
        reports[str(adapter.path)] = accuracy_report(logits, data.test.labels, data.classes,
                                                     class_ids(meta["classes"], data.classes))
    return EvalResult(base_run, reports, seconds, do_merge, base_cfg.model.tta)
