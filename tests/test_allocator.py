"""Freed tensor memory is kept by the process: a training step no longer faults its activations' pages in anew."""

import sys
from pathlib import Path

import pytest

from vera_cli.allocator import keep_freed_memory

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import allocator  # noqa: E402


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_a_step_faults_in_far_fewer_pages_once_freed_memory_is_kept():
    # pretrain-vit's model at batch 64, each way in a fresh process (benchmarks/allocator.py).
    (_, default), (_, kept) = (allocator.step_in_process(kept, batch=64, steps=5) for kept in (False, True))
    # glibc's defaults: 3,500-9,000 faults a step here (the step's activations span some 10,000 pages);
    # kept: 300-700.
    assert default > 2000
    assert kept < 0.5 * default


def test_it_is_set_once_and_says_so():
    first = keep_freed_memory()
    assert keep_freed_memory() is first
    assert first is sys.platform.startswith("linux")
