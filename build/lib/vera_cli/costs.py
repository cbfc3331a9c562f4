"""What a run cost beside its accuracy: training time, inference time per image, peak memory.

Each is measured where it is cheap: training seconds are the epochs' own (metrics.jsonl), inference
is a few passes over a small batch, and memory is the high-water mark the system or CUDA keeps anyway.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

PROC_STATUS = Path("/proc/self/status")
# Writing 5 to clear_refs resets the process's resident-set high-water mark (Linux 4.0 and later).
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def training_seconds(records: list[dict[str, Any]]) -> Optional[float]:
    """The seconds of every epoch metrics.jsonl records (those of earlier, interrupted parts included)."""
    seconds = [record.get("seconds") for record in records]
    if not seconds or not all(isinstance(s, (int, float)) and math.isfinite(s) and s >= 0 for s in seconds):
        return None
    return float(sum(seconds))


def per_thousand(seconds: Optional[float], images: int) -> Optional[float]:
    """Seconds per 1,000 images; None when either is unknown."""
    return None if seconds is None or images <= 0 else 1000 * seconds / images


def inference_ms_per_image(classify: Callable[[], Any], images: int, device: torch.device, repeats: int = 3,
                           clock: Callable[[], float] = time.perf_counter) -> float:
    """Milliseconds per image of `classify` (which classifies `images` images): the fastest of `repeats`
    timed passes after one untimed one, which pays for lazy set-up (kernels, caches)."""
    classify()
    fastest = math.inf
    for _ in range(repeats):
        _synchronize(device)
        start = clock()
        classify()
        _synchronize(device)
        fastest = min(fastest, clock() - start)
    return 1000 * fastest / images


def _synchronize(device: torch.device) -> None:
    # CUDA returns before its kernels finish: without a wait the clock would time only the launch.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def vm_hwm_bytes(status: str) -> Optional[int]:
    """The resident-set high-water mark from the text of /proc/<pid>/status."""
    match = re.search(r"^VmHWM:\s*(\d+)\s*kB", status, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


class PeakMemory:
    """The peak memory of the work that follows its creation: CUDA's peak allocation on a CUDA device,
    else the process's resident-set high-water mark (Linux). `bytes()` is None where neither can be had,
    or where the high-water mark could not be reset (it would be the whole process's)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.available = True
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            return
        try:
            PROC_CLEAR_REFS.write_text("5")
        except OSError:
            self.available = False

    def bytes(self) -> Optional[int]:
        if not self.available:
            return None
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        try:
            return vm_hwm_bytes(PROC_STATUS.read_text())
        except OSError:
            return None
