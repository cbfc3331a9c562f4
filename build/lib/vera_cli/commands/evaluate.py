"""`vera eval`: load a run back (base model, adapters over it) and measure it on the test set."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from vera_cli import fast
from vera_cli.adapter_files import read_adapter_meta
from vera_cli.adapters.inject import merge, merged_plain, unmerge
from vera_cli.bases import fingerprint, load_pretrained, pretrain_config
from vera_cli.commands.served import load_adapter_runs, resolve_runs
from vera_cli.data import class_ids, load_cifar10
from vera_cli.errors import VeraError
from vera_cli.metrics import AccuracyReport, accuracy_report
from vera_cli.runs import Run
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
    """Evaluate a pretrain run (with any `adapter_paths` over it) or an adapt run against its base.

    The base is loaded once and carries every adapter by name; each is evaluated as the active one (merged into
    the weights for its evaluation with `do_merge`)."""
    base_run, adapter_runs = resolve_runs(run_path, adapter_paths)
    if do_merge and not adapter_runs:
        raise VeraError("--merge needs an adapter: evaluate an adapt run or add --adapter RUN")
    defaults = _run_defaults(base_run)
    device = resolve_device(device_name or defaults["device"])
    data = load_cifar10(data_dir or defaults["data_dir"], defaults["download"]).to(device)
    base, base_cfg = load_pretrained(base_run, device)
    tta = base_cfg.model.tta

    reports: dict[str, AccuracyReport] = {}
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    reports["base"] = accuracy_report(fast.predict_logits(fast.forward(base), data.test, tta), data.test.labels, data.classes,
                                      _first_classes(adapter_runs, data.classes))
    seconds["base"] = time.perf_counter() - started
    loaded = load_adapter_runs(base, adapter_runs, fingerprint(base))
    for adapter in adapter_runs:
        model = loaded.model_for(adapter.path)
        shared = adapter.path in loaded.names
        if do_merge and shared:
            merge(model, loaded.names[adapter.path])
        elif do_merge:
            merged_plain(model)
        model.eval()
        started = time.perf_counter()
        logits = fast.predict_logits(fast.forward(model), data.test, tta)
        seconds[str(adapter.path)] = time.perf_counter() - started
        if do_merge and shared:
            unmerge(model)
        reports[str(adapter.path)] = accuracy_report(logits, data.test.labels, data.classes,
                                                     class_ids(loaded.metas[adapter.path]["classes"], data.classes))
    return EvalResult(base_run, reports, seconds, do_merge, tta)


def _first_classes(adapter_runs: list[Run], classes: list[str]) -> list[int] | None:
    """The base's report counts the classes the first adapter was trained on as chosen, for comparison."""
    first = read_adapter_meta(adapter_runs[0].path)["classes"] if adapter_runs else []
    return class_ids(first, classes) if first else None
