"""Freed tensor memory is kept by the process: a training step no longer faults its activations' pages in anew."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vera_cli.allocator import keep_freed_memory

REPO = Path(__file__).resolve().parents[1]
# Five steps of pretrain-vit's model at batch 64 (activations of 2-4 MB); prints minor page faults per step.
STEPS = """
import resource, sys
if sys.argv[1] == "kept":
    from vera_cli.allocator import keep_freed_memory
    assert keep_freed_memory()
import torch
import torch.nn.functional as F
from vera_cli.models import ModelConfig, ViTConfig, build_model
torch.manual_seed(0)
model = build_model(ModelConfig("vit", ViTConfig()))
optimizer = torch.optim.AdamW(model.parameters())
x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
def step():
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
step(), step()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
start = faults()
for _ in range(5):
    step()
print((faults() - start) / 5)
"""


def faults_per_step(mode: str) -> float:
    # Nothing inherited that sets the allocator another way.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GLIBC_TUNABLES", "MALLOC_", "THP_", "LD_PRELOAD"))}
    done = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, cwd=REPO, check=True,
                          env={**env, "OMP_NUM_THREADS": "2"})
    return float(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_a_step_faults_in_far_fewer_pages_once_freed_memory_is_kept():
    default, kept = faults_per_step("default"), faults_per_step("kept")
    # glibc's defaults: 3,500-9,000 faults a step here (a step's activations are some 40 MB: 10,000 pages);
    # kept: 300-700.
    assert default > 2000
    assert kept < 0.5 * default


def test_it_is_set_once_and_says_so():
    first = keep_freed_memory()
    assert keep_freed_memory() is first
    assert first is sys.platform.startswith("linux")
