"""The CUDA benchmark (benchmarks/cuda_bench.py) in its CPU dry run: every step runs here first, so that
the first GPU to run it does not find a broken step."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
SPEC = importlib.util.spec_from_file_location("cuda_bench", BENCHMARKS / "cuda_bench.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


@pytest.mark.slow
def test_the_dry_run_times_every_step_and_writes_the_table(cifar_root, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["cuda_bench.py", "--data-dir", str(cifar_root), "--dry-run", "--out", str(out)])
    bench.main()
    [written] = out.glob("cuda-*.json")
    result = json.loads(written.read_text())
    rows = {row["name"]: row for row in result["rows"]}
    assert set(rows) == {"pretrain", "pretrain bf16", "pretrain 30 epochs", "pretrain-fast", "pretrain vit", "adapt vera",
                         "adapt lora", "adapt vera vit"} | {f"inference {model} {kind}" for model in ("convnet", "vit")
                                               for kind in ("base", "vera unmerged", "vera merged")}
    assert all(rows[name]["epochs"] == 1 for name in rows if not name.startswith("inference"))
    assert all(0 <= rows[name]["test"] <= 1 and rows[name]["seconds"] > 0 for name in rows if "epochs" in rows[name])
    assert rows["adapt vera vit"]["chosen"] is not None and "images_per_second" in rows["pretrain vit"]
    assert all(rows[name]["ms_per_test_split"] > 0 for name in rows if name.startswith("inference"))
    assert result["device"] == "cpu"
