"""Freed tensor memory is kept by the process: large blocks come from the heap and stay with it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vera_cli.allocator import _chosen_by_user, keep_freed_memory

REPO = Path(__file__).resolve().parents[1]
# glibc's own account of the heap (mallinfo2, glibc 2.33 on): how many of four 16 MB blocks were mmapped,
# whether the heap still holds 64 MB after they are freed, and whether allocating them again maps anything.
HEAP = """
import ctypes, sys
fields = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in fields]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype, libc.malloc.restype = Info, ctypes.c_void_p
libc.malloc.argtypes, libc.free.argtypes = [ctypes.c_size_t], [ctypes.c_void_p]
from vera_cli.allocator import keep_freed_memory
print(keep_freed_memory() if sys.argv[1] == "kept" else "-")
def round_trip():
    mapped = libc.mallinfo2().hblks
    blocks = [libc.malloc(16 << 20) for _ in range(4)]
    mapped = libc.mallinfo2().hblks - mapped
    for block in blocks:
        libc.free(block)
    return mapped, libc.mallinfo2().arena >= 64 << 20
print(*round_trip(), *round_trip())
"""


def heap(mode: str, **environ: str) -> list[str]:
    # Nothing inherited that sets the allocator another way, unless the test sets it.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GLIBC_TUNABLES", "MALLOC_", "LD_PRELOAD"))}
    done = subprocess.run([sys.executable, "-c", HEAP, mode], capture_output=True, text=True, check=True, cwd=REPO,
                          env={**env, **environ})
    return done.stdout.split()


glibc = pytest.mark.skipif(not (sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION")),
                           reason="glibc's malloc only")


@glibc
def test_large_blocks_come_from_the_heap_and_stay_with_the_process_once_kept():
    # glibc's defaults: each 16 MB block is mmapped and handed back when freed; that raises glibc's threshold,
    # so the next round comes from the heap, which is trimmed back to the system as soon as they are freed.
    assert heap("default") == ["-", "4", "False", "0", "False"]
    # Kept: none is mmapped, the heap keeps them when freed, and the next round reuses them.
    assert heap("kept") == ["True", "0", "True", "0", "True"]


@glibc
@pytest.mark.parametrize("environ", [{"MALLOC_ARENA_MAX": "2"}, {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}])
def test_the_users_own_malloc_settings_are_left_alone(environ):
    kept, first_mapped, *_ = heap("kept", **environ)
    assert kept == "False"
    assert first_mapped == "4"


def test_a_preloaded_allocator_or_glibc_malloc_settings_count_as_the_users_choice():
    assert _chosen_by_user({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"})
    assert _chosen_by_user({"LD_PRELOAD": "libtcmalloc_minimal.so.4"})
    assert _chosen_by_user({"MALLOC_ARENA_MAX": "4"})
    assert _chosen_by_user({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"})
    assert not _chosen_by_user({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F", "LD_PRELOAD": "libfaketime.so.1",
                                "PATH": "/usr/bin"})


def test_it_is_set_once_and_says_so():
    first = keep_freed_memory()
    assert keep_freed_memory() is first
    assert first is (sys.platform.startswith("linux") and not _chosen_by_user(os.environ))
