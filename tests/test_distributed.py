"""torchrun: data-parallel pretrain and adapt, and compare grids spread over processes.

The launches start 2 local CPU processes (gloo) through `python -m torch.distributed.run
--standalone`, which picks a free port; each launch has a timeout and is killed (with its
workers, one process group) whatever happens.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import vera_cli
from conftest import untimed
from vera_cli.distributed import DataParallel, World

# Two processes sum the same products in another order than one process does: after a few
# steps of SGD on this tiny model the weights differ by about 1e-8, far below this bound.
WEIGHT_TOLERANCE = 1e-6
LAUNCH_TIMEOUT = 180


def torchrun(*args: str, cwd: Path, processes: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m vera_cli ARGS` in `cwd`, one CPU thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(vera_cli.__file__).parents[1])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               "-m", "vera_cli", *args, "--device", "cpu", "--no-progress"]
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=LAUNCH_TIMEOUT)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def largest_difference(first: Path, second: Path) -> float:
    a, b = load_file(first), load_file(second)
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("count, size", [(33, 2), (19, 2), (1, 2), (10, 4), (7, 3)])
def test_rank_parts_cover_the_global_batch_and_weights_give_its_mean_loss(count, size):
    torch.manual_seed(0)
    logits, labels = torch.randn(count, 10), torch.randint(0, 10, (count,))
    parts = [DataParallel(World(rank, size)).local(logits, labels) for rank in range(size)]
    assert torch.equal(torch.cat([part[0] for part in parts]), logits)
    lengths = [len(part[1]) for part in parts]
    assert max(lengths) - min(lengths) <= 1
    # DDP averages over ranks what each rank's weighted summed loss gives.
    averaged = sum(F.cross_entropy(x, y, reduction="sum") * w for x, y, w in parts) / size
    assert averaged.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)


@pytest.mark.slow
def test_ddp_pretrain_on_two_processes_matches_one_process(vera, tmp_path):
    # Batch 33 splits 17/16 and the last batch of 250 images (19) 10/9: uneven parts every step.
    args = ["pretrain", "--epochs", "2", "--batch-size", "33", "--lr", "0.05", "--data-dir", str(vera.data_dir)]
    assert vera(*args, "--run-dir", "runs/one").code == 0
    result = torchrun(*args, "--run-dir", "runs/two", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    two = tmp_path / "runs/two"
    assert largest_difference(two / "model.safetensors", tmp_path / "runs/one/model.safetensors") < WEIGHT_TOLERANCE
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and json.loads((tmp_path / "runs/one/summary.json").read_text())["world_size"] == 1
    one_metrics = [json.loads(line) for line in (tmp_path / "runs/one/metrics.jsonl").read_text().splitlines()]
    two_metrics = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    # Rank 0 alone writes: one line per epoch, holding the global batch's loss.
    assert [m["epoch"] for m in two_metrics] == [1, 2]
    assert [m["loss"] for m in two_metrics] == pytest.approx([m["loss"] for m in one_metrics], rel=1e-5)
    # The same files as one process writes, nothing else (no checkpoint left, nothing from rank 1).
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in (tmp_path / "runs/one").iterdir())
    assert result.stdout.count("Test accuracy, runs/two") == 1
    assert "cpu x 2 processes, run runs/two" in result.stderr


@pytest.mark.slow
def test_ddp_adapt_resumes_under_torchrun_to_the_one_process_adapter(vera, pretrained, interrupt_after_epoch, tmp_path):
    args = ["--method", "lora", "--rank", "4", "--epochs", "3", "--batch-size", "25", "--set", "forgetting=mask"]
    assert vera("adapt", *args, "--run-dir", "runs/straight").code == 0
    interrupt_after_epoch(1)
    assert vera("adapt", *args, "--run-dir", "runs/cut").code == 130
    result = torchrun("adapt", "--resume", "runs/cut", "--data-dir", str(vera.data_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "resuming at epoch 2" in result.stderr
    cut = tmp_path / "runs/cut"
    assert largest_difference(cut / "adapter.safetensors", tmp_path / "runs/straight/adapter.safetensors") < WEIGHT_TOLERANCE
    assert json.loads((cut / "summary.json").read_text())["world_size"] == 2
    assert [json.loads(line)["epoch"] for line in (cut / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


@pytest.fixture
def one_thread():
    """Each rank runs its rows on one thread (its share of the cores); so does the one-process run
    then, so that rows compare bit for bit whatever thread count the machine defaults to."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_interrupted_compare_resumes_on_two_processes_to_the_one_process_table(vera, pretrained, monkeypatch, tmp_path,
                                                                              one_thread):
    from vera_cli.commands import compare as compare_module

    grid = ["--methods", "vera,lora,head", "--ranks", "2", "--seeds", "2", "--epochs", "1"]
    assert vera("compare", *grid, "--run-dir", "runs/one").code == 0
    original, calls = compare_module.run_adapt, []

    def stop_at_third_row(cfg, *args, **kwargs):
        calls.append(cfg.run_dir)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(cfg, *args, **kwargs)

    monkeypatch.setattr(compare_module, "run_adapt", stop_at_third_row)
    assert vera("compare", *grid, "--run-dir", "runs/two").code == 130
    result = torchrun("compare", "--resume", "runs/two", "--data-dir", str(vera.data_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    def table(run: str) -> list[dict]:
        return [untimed(line) for line in json.loads((tmp_path / run / "table.json").read_text())]

    assert table("runs/two") == table("runs/one") and len(table("runs/one")) == 4
    names = [json.loads(line)["name"] for line in (tmp_path / "runs/two/rows.jsonl").read_text().splitlines()]
    assert sorted(names) == sorted(p.name for p in (tmp_path / "runs/one/rows").iterdir()) and len(names) == 6
    # The finished row was not run again; the other five were each run once, by one of the ranks.
    assert "[1/6]" not in result.stderr
    for name in names:
        assert largest_difference(tmp_path / "runs/two/rows" / name / "adapter.safetensors",
                                  tmp_path / "runs/one/rows" / name / "adapter.safetensors") == 0
    assert not (tmp_path / "runs/two/claims").exists()
    assert json.loads((tmp_path / "runs/two/summary.json").read_text())["world_size"] == 2
    assert result.stdout.count("Comparison runs/two") == 1
