"""Compile the hand-written CPU kernels once per machine and load them.

The C sources ship in the package and are compiled on first use with the system's C compiler (a second or
two), into a cache keyed by the sources, the flags and the compiler; the next process loads the cached
library. Where the cache cannot be written, each process builds its own copy. No compiler, another processor family, or a processor without AVX2 and FMA: `library()` returns
None and the callers keep torch's own operators. VERA_CLI_KERNELS=off does the same on purpose (for A/B
timing, or to rule the kernels out when something looks wrong).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported by every caller; this module itself needs none of it
    import torch

SOURCES = [Path(__file__).with_name(name) for name in ("convnet_features.c", "augment.c")]
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]
SWITCH = "VERA_CLI_KERNELS"


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "vera-cli" / "kernels"


def _compiler() -> list[str] | None:
    """The compiler's command: $CC as the shell would split it (`ccache gcc`), else cc or gcc."""
    found = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    try:
        return shlex.split(found) or None if found else None
    except ValueError:  # unbalanced quotes in $CC
        return None


def _build(compiler: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compiled beside the target and renamed into place: two processes building at once never load half a file.
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        subprocess.run([*compiler, *FLAGS, "-o", str(built), *map(str, SOURCES)], check=True, capture_output=True,
                       timeout=120)
        os.replace(built, target)


def address(t: torch.Tensor | None) -> ctypes.c_void_p | None:
    """A tensor's data as a C pointer (None as NULL); the caller keeps the tensor alive until the call returns."""
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _signatures(lib: ctypes.CDLL) -> ctypes.CDLL:
    i, p = ctypes.c_int, ctypes.c_void_p
    lib.vc_cpu_supported.argtypes, lib.vc_cpu_supported.restype = [], i
    lib.vc_forward.argtypes, lib.vc_forward.restype = [i] * 2 + [p] * 9, i
    lib.vc_backward.argtypes, lib.vc_backward.restype = [i] * 2 + [p] * 10, i
    lib.vc_augment.argtypes, lib.vc_augment.restype = [i] * 6 + [p] * 8, i
    return lib


def _load(compiler: list[str], name: str) -> ctypes.CDLL:
    try:
        target = cache_dir() / name
        if not target.exists():
            _build(compiler, target)
        try:
            return _signatures(ctypes.CDLL(str(target)))
        except OSError:  # a damaged file in the cache: replace it
            _build(compiler, target)
            return _signatures(ctypes.CDLL(str(target)))
    except (OSError, RuntimeError):
        # No home folder (RuntimeError), or a read-only or full cache: build for this process alone (the
        # loaded library outlives its file).
        with tempfile.TemporaryDirectory() as scratch:
            private = Path(scratch) / name
            _build(compiler, private)
            return _signatures(ctypes.CDLL(str(private)))


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot run here (see the module's docstring)."""
    if os.environ.get(SWITCH, "on").lower() in ("off", "0", "false", "no"):
        return None
    compiler = _compiler()
    if platform.machine().lower() not in ("x86_64", "amd64") or compiler is None:
        return None
    try:
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\0".join([*(s.read_text() for s in SOURCES), *FLAGS, version]).encode()).hexdigest()[:16]
        lib = _load(compiler, f"kernels-{key}.so")
    except (OSError, subprocess.SubprocessError):
        return None
    return lib if lib.vc_cpu_supported() else None
