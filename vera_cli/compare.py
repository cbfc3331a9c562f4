"""`vera compare`: every method on one base, same data, epochs and evaluation; one row per setting.

Each grid point (method, rank, forgetting option, seed) is an ordinary adapt run
in `<run>/rows/<name>/`, each with its method's own tuned config
(`configs/adapt-<method>.yaml`). A row is appended to `rows.jsonl` as soon as its
run finishes, and the aggregated table (CSV, JSON) is rewritten, so an
interrupted comparison keeps every finished row and `--resume` runs only the rest.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vera_cli import config as config_module
from vera_cli.adapt import resolve_base, run_adapt
from vera_cli.config import AdaptConfig, CompareConfig
from vera_cli.data import class_ids, load_cifar10
from vera_cli.evaluate import accuracy_report, predict_logits
from vera_cli.plot import plot_comparison
from vera_cli.pretrain import Log, load_pretrained
from vera_cli.runs import Run, append_jsonl, create_run, ensure_new, read_json, write_bytes_atomic, write_json, write_yaml
from vera_cli.train import resolve_device

ROWS_FILE = "rows.jsonl"
METRICS = ("chosen", "task", "rest", "overall")
RANKLESS = ("full", "head")


@dataclass
class GridPoint:
    method: str
    rank: int | None
    forgetting: str
    seed: int

    @property
    def name(self) -> str:
        rank = f"-r{self.rank}" if self.rank is not None else ""
        return f"{self.method}{rank}-{self.forgetting}-s{self.seed}"


@dataclass
class CompareResult:
    run: Run
    rows: list[dict[str, Any]]  # aggregated over seeds, base first
    plot: Path
    seconds: float


def grid(cfg: CompareConfig) -> list[GridPoint]:
    points = []
    for method in cfg.methods:
        for rank in ([None] if method in RANKLESS else cfg.ranks):
            for forgetting in cfg.forgetting:
                points.extend(GridPoint(method, rank, forgetting, seed) for seed in range(cfg.seeds))
    return points


def adapt_config(cfg: CompareConfig, point: GridPoint, base: str, run_dir: Path) -> AdaptConfig:
    method = "vera" if point.method == "vera-sliced" else point.method
    overrides = {"base": base, "classes": cfg.classes, "seed": point.seed, "device": cfg.device,
                 "data.dir": cfg.data.dir, "data.download": cfg.data.download, "run_dir": str(run_dir),
                 "forgetting": point.forgetting, "train.epochs": cfg.epochs, "adapter.rank": point.rank,
                 "adapter.sharing": "sliced" if point.method == "vera-sliced" else None}
    return config_module.load(AdaptConfig, config_module.default_config_path(f"adapt-{method}"), overrides)


def row_from_summary(point: GridPoint, summary: dict[str, Any]) -> dict[str, Any]:
    test = summary["test"]
    return {"name": point.name, "method": point.method, "rank": point.rank, "forgetting": point.forgetting,
            "seed": point.seed, "trainable": summary["trainable_parameters"], "adapter_bytes": summary["adapter_bytes"],
            **{metric: test[metric] for metric in METRICS}, "seconds": summary["wall_seconds"]}


def aggregate(base_row: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread (population standard deviation) over seeds, one line per setting, base first."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["rank"], row["forgetting"]), []).append(row)
    table = [base_row]
    for (method, rank, forgetting), members in groups.items():
        line = {"method": method, "rank": rank, "forgetting": forgetting, "seeds": len(members),
                "trainable": members[0]["trainable"], "adapter_bytes": members[0]["adapter_bytes"]}
        for metric in (*METRICS, "seconds"):
            values = [m[metric] for m in members]
            line[metric] = statistics.fmean(values)
            line[f"{metric}_std"] = statistics.pstdev(values)
        table.append(line)
    return table


def write_tables(run: Run, table: list[dict[str, Any]]) -> None:
    write_json(run.file("table.json"), table)
    columns = list(dict.fromkeys(key for line in table for key in line))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(table)
    write_bytes_atomic(run.file("table.csv"), buffer.getvalue().encode())


def finished_rows(run: Run) -> list[dict[str, Any]]:
    path = run.file(ROWS_FILE)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_compare(cfg: CompareConfig, log: Log = print, progress: bool = True, resume: Run | None = None) -> CompareResult:
    device = resolve_device(cfg.device)
    chosen = class_ids(cfg.classes)
    if resume is None:
        ensure_new(cfg.run_dir)
    base_run = resolve_base(cfg.base)
    points = grid(cfg)
    for point in points:  # every row's config is validated before anything runs
        adapt_config(cfg, point, str(base_run.path), Path("unused"))
    data = load_cifar10(cfg.data.dir, cfg.data.download).to(device)
    run = resume or create_run("compare", cfg.run_dir)
    with run.recording():
        run.set_status("running")
        write_yaml(run.file("config.yaml"), {**config_module.to_dict(cfg), "base": str(base_run.path)})
        started = time.perf_counter()
        model, _ = load_pretrained(base_run, device)
        base_report = accuracy_report(predict_logits(model, data.test), data.test.labels, data.classes, chosen)
        base_row = {"method": "base", "rank": None, "forgetting": "-", "seeds": 1, "trainable": 0, "adapter_bytes": 0,
                    **{metric: base_report[metric] for metric in METRICS}, "seconds": 0.0}
        rows = finished_rows(run)
        done = {row["name"] for row in rows}
        for index, point in enumerate(points, 1):
            if point.name in done:
                continue
            row_dir = run.file("rows") / point.name
            row_run = Run(row_dir) if (row_dir / "status.json").is_file() else None
            if row_run is not None and row_run.status.get("status") == "finished":
                # Finished just before an interruption could record it.
                summary = read_json(row_dir / "summary.json")
            else:
                log(f"[{index}/{len(points)}] {point.name}" + (" (resuming)" if row_run else ""))
                summary = run_adapt(adapt_config(cfg, point, str(base_run.path), row_dir), lambda message: None,
                                    progress, data, resume=row_run).summary
            row = row_from_summary(point, summary)
            rows.append(row)
            append_jsonl(run.file(ROWS_FILE), row)
            write_tables(run, aggregate(base_row, rows))
            log(f"    {row['trainable']:,} trainable, chosen {row['chosen']:.2%}, task {row['task']:.2%}, "
                f"rest {row['rest']:.2%}, {row['seconds']:.1f}s")
        table = aggregate(base_row, rows)
        write_tables(run, table)
        plot = plot_comparison(table, [data.classes[i] for i in chosen], run.file("accuracy-vs-parameters.png"))
        seconds = time.perf_counter() - started
        write_json(run.file("summary.json"), {"kind": "compare", "base_run": str(base_run.path), "rows": table,
                                              "plot": str(plot), "wall_seconds": seconds})
        run.finish()
        return CompareResult(run, table, plot, seconds)
