"""The CUDA benchmark (benchmarks/cuda_bench.py) in its CPU dry run: every step runs here first, so that
the first GPU to run it does not find a broken step."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # as when the script runs: it imports the serving benchmark beside it
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
    serving = {f"serving convnet {count}" for count in ("1", "3", "single")} | {
        f"serving vit {count}" for count in ("1", "3", "single", "low rank")}
    assert set(rows) == {"pretrain", "pretrain bf16", "pretrain 30 epochs", "pretrain-fast", "pretrain vit", "adapt vera",
                         "adapt lora", "adapt vera vit", "adapt lora vit"} | {
        f"inference {model} {kind}" for model in ("convnet", "vit") for kind in ("base", "vera unmerged", "vera merged")
    } | serving
    assert rows["adapt lora vit"]["chosen"] is not None
    assert rows["serving vit 3"]["vera mixed"]["images_per_second"] > 0
    assert rows["serving convnet 3"]["peft lora mixed"]["max_difference"] < 1e-4
    assert all(rows[name]["epochs"] == 1 for name in rows if not name.startswith(("inference", "serving")))
    assert all(0 <= rows[name]["test"] <= 1 and rows[name]["seconds"] > 0 for name in rows if "epochs" in rows[name])
    assert all("epochs" in rows[name] for name in rows if not name.startswith(("inference", "serving")))
    assert rows["adapt vera vit"]["chosen"] is not None and "images_per_second" in rows["pretrain vit"]
    assert all(rows[name]["ms_per_test_split"] > 0 for name in rows if name.startswith("inference"))
    assert result["device"] == "cpu"
