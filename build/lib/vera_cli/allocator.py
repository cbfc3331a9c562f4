"""Freed tensor memory kept for the next tensor instead of handed back to the system (glibc's malloc).

A training step allocates and frees activations of several MB each. By default glibc serves blocks that
large with fresh mmap()s and returns freed heap above 128 KB, so the next step's tensors land on pages the
kernel must fault in and zero again: the pretrain-vit step in fp32 took 12,000-23,000 minor page faults a
step, and ran 1.02-1.18x faster without them (the more, the dearer the system made a fault;
docs/performance.md). PyTorch's CPU tuning guide reaches the same end by preloading jemalloc or tcmalloc, which
a pip install cannot do; glibc's own mallopt() can, from inside the process, for allocations up to its 32 MB
ceiling. The CLI sets it for every command (and compare's workers for themselves) before torch starts a
thread or makes a tensor; the benchmarks do as the CLI does.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping

# mallopt()'s parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# glibc's largest mmap threshold on 64-bit systems (HEAP_MAX_SIZE / 2): a batch-256 ViT's largest activation
# (16 MB) fits below it.
_MMAP_THRESHOLD = 32 << 20
# Freed memory at the heap's top is returned only beyond this much: a step's working set stays with the process.
_TRIM_THRESHOLD = 1 << 30

_kept = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); whether they are in force. Elsewhere
    (macOS, Windows, musl), and where the user has chosen the allocator's settings or another allocator, it is
    left as it is."""
    global _kept
    if not _kept and sys.platform.startswith("linux") and not _chosen_by_user(os.environ):
        # The process's own symbols: libc is among them on Linux.
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
        # glibc's mallopt returns 1 on success; musl's is a stub that returns 0 and changes nothing.
        # One arena for every thread: torch's worker threads otherwise allocate from arenas of their own, which
        # hand freed memory back whatever the trim threshold (the ViT step at batch 64: 800-1,400 page faults a
        # step left with them, 300-700 without; 3,500-9,000 with glibc's defaults).
        settings = ((_M_MMAP_THRESHOLD, _MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD), (_M_ARENA_MAX, 1))
        _kept = mallopt is not None and all(mallopt(name, value) == 1 for name, value in settings)
    return _kept


def _chosen_by_user(environ: Mapping[str, str]) -> bool:
    """glibc's malloc settings in the environment (MALLOC_ARENA_MAX, GLIBC_TUNABLES=glibc.malloc...), or jemalloc,
    tcmalloc or mimalloc preloaded: the user's choice, which mallopt() would silently override or not reach."""
    preloaded = environ.get("LD_PRELOAD", "")
    return (any(name.startswith("MALLOC_") for name in environ) or "glibc.malloc." in environ.get("GLIBC_TUNABLES", "")
            or any(allocator in preloaded for allocator in ("jemalloc", "tcmalloc", "mimalloc")))
