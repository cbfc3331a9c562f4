"""Compile the hand-written CPU kernels once per machine and load them; the cache can slow a run, never break it.

The C sources ship in the package and are compiled on first use with the system's C compiler (a second or
two) into a per-user cache, keyed by everything that changes the binary: the sources, the flags, the
compiler's whole command and version output, and the environment variables a compiler (or a wrapper script
in $CC) reads. The next process loads the cached library, but only once it has passed every check:

- a fresh build is loaded first in a child process: a library that kills its loader (a sanitizer runtime
  that must come first, say) kills only that child, and torch's operators run instead;
- its sha256 is recorded beside it (`kernels-KEY.json`), and a cached library is loaded only when its bytes
  match: loading a truncated or foreign file can crash the process (SIGBUS), so it is never tried; it and its
  record are read only as regular files, never through a link;
- the cache folder is made private (0700; a looser mode is tightened), and a library is loaded only from a
  folder and file that this user owns and nobody else can write;
- once loaded, every function the wrappers call must be there.

A library that fails a check is built again in its place; a cache folder that is someone else's, or cannot be
written, gets a private copy built in a temporary folder of the process. No compiler, another processor
family, or a processor without AVX2 and FMA: `library()` returns None and the callers keep torch's own
operators. VERA_CLI_KERNELS=off does the same on purpose (for A/B timing, or to rule the kernels out when
something looks wrong). `compute_path()` says which of the two ran, for each run's record.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import os
import platform
import secrets
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # torch is imported by every caller; this module itself needs none of it
    import torch

SOURCES = [Path(__file__).with_name(name) for name in ("convnet_features.c", "augment.c", "linear_chain.c")]
# Included by the sources: part of what the library is built from.
HEADERS = [Path(__file__).with_name("linear_chain_tiles.h")]
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]
SWITCH = "VERA_CLI_KERNELS"
# The functions the wrappers call, and what each computes (for a run's record).
KERNELS = {"vc_forward": "the ConvNet's features", "vc_backward": "the ConvNet's features",
           "vc_augment": "batch augmentation", "vc_chain_forward": "the classifier on cached features",
           "vc_chain_backward": "the classifier on cached features",
           "vc_vera_weights": "the classifier on cached features",
           "vc_vera_vector_grads": "the classifier on cached features"}
SYMBOLS = ("vc_cpu_supported", "vc_vector_width", *KERNELS)
# What a compiler reads from the environment that changes what it builds (its search paths), and the flags a
# wrapper script in $CC may add: part of the cache key.
COMPILER_ENV = ("CFLAGS", "CPPFLAGS", "LDFLAGS", "CPATH", "C_INCLUDE_PATH", "LIBRARY_PATH", "COMPILER_PATH",
                "GCC_EXEC_PREFIX", "LD_RUN_PATH")
# A library's record (its digest and the compiler's name) is read up to this much: a larger file is not one.
RECORD_BYTES = 1 << 20
# Run in a child process on every fresh build before any process loads it.
TRIAL = "import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]); [getattr(lib, name) for name in sys.argv[2:]]"


class Kernels(NamedTuple):
    lib: ctypes.CDLL | None
    how: str  # the compiler that built the library, or why torch's operators run instead


class Unusable(Exception):
    """Why the kernels cannot run here: torch's operators run instead."""


class Untrusted(Exception):
    """Why the shared cache is not used: the process builds a private copy."""


def _command(compiler: list[str], target: Path) -> list[str]:
    return [*compiler, *FLAGS, "-o", str(target), *map(str, SOURCES)]


class Recipe(NamedTuple):
    compiler: list[str]
    version: str
    name: str  # kernels-KEY, KEY a digest of everything that changes the library built

    @classmethod
    def of(cls, compiler: list[str], version: str) -> Recipe:
        inputs = [_command(compiler, Path("OUT")), shutil.which(compiler[0]) or compiler[0], version,
                  {name: os.environ[name] for name in COMPILER_ENV if name in os.environ},
                  [source.read_text() for source in SOURCES + HEADERS]]
        return cls(compiler, version, f"kernels-{hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]}")

    def describe(self) -> str:
        return f"compiler {shlex.join(self.compiler)}, {(self.version.strip().splitlines() or ['version unknown'])[0]}"


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "vera-cli" / "kernels"


def cpu_flags() -> frozenset[str] | None:
    """The processor's features as Linux lists them; None elsewhere (the library then asks the processor)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return None


def _compiler() -> list[str] | None:
    """The compiler's command: $CC as the shell would split it (`ccache gcc`), else cc or gcc."""
    found = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    try:
        return shlex.split(found) or None if found else None
    except ValueError:  # unbalanced quotes in $CC
        return None


def _recipe() -> Recipe:
    switch = os.environ.get(SWITCH, "on")
    if switch.lower() in ("off", "0", "false", "no"):
        raise Unusable(f"{SWITCH}={switch}")
    machine = platform.machine()
    if machine.lower() not in ("x86_64", "amd64"):
        raise Unusable(f"the processor is {machine or 'unknown'}, not x86-64")
    flags = cpu_flags()
    if flags is not None and not {"avx2", "fma"} <= flags:
        raise Unusable("the processor lacks AVX2 or FMA")
    compiler = _compiler()
    if compiler is None:
        raise Unusable("no C compiler: none in $CC, and no cc or gcc")
    try:
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        raise Unusable(f"the C compiler {shlex.join(compiler)} does not run") from None
    return Recipe.of(compiler, version)


def _sha256(path: Path | int) -> str:
    with open(path, "rb", closefd=not isinstance(path, int)) as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _own_folder(folder: Path) -> Path:
    """`folder`, created private to this user or made so; Untrusted when it is not this user's folder."""
    if not hasattr(os, "getuid"):
        raise Untrusted("this system has no file owners to check")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise Untrusted(f"{folder} is not a folder of this user's")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(folder, 0o700)
    return folder


def _trustworthy(info: os.stat_result) -> bool:
    """Owned by this user and writable by nobody else. A system without file owners gets private copies
    only (see `_own_folder`), in folders that only this process knows."""
    if not hasattr(os, "getuid"):
        return True
    return info.st_uid == os.getuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _regular_file(path: Path) -> int:
    """`path` opened for reading when it is a regular file, else OSError. Never through a link, and never waiting:
    opening a FIFO waits for a writer, and a link to /dev/zero reads without end."""
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise OSError(f"{path} is not a regular file")
    return descriptor


def _verified(folder: Path, name: str) -> ctypes.CDLL | None:
    """The library `name` in `folder` when it passes every check, else None; one that fails is never loaded.

    It is checked and loaded under a name of its own (a hard link): the loader hands back whatever it loaded
    earlier under the same name, and a file renamed into the library's place meanwhile is not the one loaded.
    """
    alias = folder / f".{name}-{secrets.token_hex(8)}.so"
    try:
        with open(_regular_file(folder / f"{name}.json"), "rb") as record:
            recorded = json.loads(record.read(RECORD_BYTES))["sha256"]
        os.link(folder / f"{name}.so", alias, follow_symlinks=False)
        descriptor = _regular_file(alias)
        try:
            sound = (_trustworthy(os.fstat(descriptor)) and _trustworthy(os.stat(folder))
                     and _sha256(descriptor) == recorded)
        finally:
            os.close(descriptor)
        lib = ctypes.CDLL(str(alias)) if sound else None
    except (OSError, ValueError, KeyError, TypeError, NotImplementedError):
        return None
    finally:
        alias.unlink(missing_ok=True)
    return _signatures(lib) if lib is not None and all(hasattr(lib, symbol) for symbol in SYMBOLS) else None


def _build(recipe: Recipe, folder: Path) -> None:
    """Compile into `folder`, try the library in a child process, then rename it and its digest into place.

    Processes building at once never load half a file, and a library that fails its trial never reaches the
    folder. Its digest lands after it: a reader in between finds them apart and builds its own.
    """
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        built, record = Path(scratch) / f"{recipe.name}.so", Path(scratch) / f"{recipe.name}.json"
        try:
            subprocess.run(_command(recipe.compiler, built), check=True, capture_output=True, timeout=120)
            tried = subprocess.run([sys.executable or "python3", "-I", "-c", TRIAL, str(built), *SYMBOLS],
                                   capture_output=True, text=True, timeout=60)
        except subprocess.SubprocessError:
            raise Unusable(f"{recipe.describe()}: the kernels did not build") from None
        if tried.returncode:
            said = (tried.stderr.strip().splitlines() or ["no message"])[-1][:200]
            raise Unusable(f"{recipe.describe()}: the library built does not load (exit status {tried.returncode}: {said})")
        os.chmod(built, 0o755)  # whatever the umask: the checks refuse a library that others can write
        record.write_text(json.dumps({"sha256": _sha256(built), "built_by": recipe.describe()}))
        os.replace(built, folder / built.name)
        os.replace(record, folder / record.name)


def _load(recipe: Recipe) -> tuple[ctypes.CDLL, str]:
    """The library from the cache (built again there if it fails a check), else a private copy; and a note
    that says why the copy is private."""
    try:
        folder = _own_folder(cache_dir())
        lib = _verified(folder, recipe.name)
        if lib is None:
            _build(recipe, folder)
            lib = _verified(folder, recipe.name)
        if lib is not None:
            return lib, ""
        why = f"the library rebuilt in {folder} failed its checks"
    except Untrusted as exc:
        why = str(exc)
    except (OSError, RuntimeError) as exc:
        # No home folder (RuntimeError), or a read-only or full cache.
        why = f"the cache cannot be written ({exc})"
    # The loaded library outlives its file and folder.
    with tempfile.TemporaryDirectory() as scratch:
        _build(recipe, Path(scratch))
        lib = _verified(Path(scratch), recipe.name)
    if lib is None:
        raise Unusable(f"{recipe.describe()}: the library built for this process failed its checks")
    return lib, f"; built for this process alone: {why}"


@functools.cache
def kernels() -> Kernels:
    """The compiled kernels and the compiler that built them, or None and why (see the module's docstring)."""
    try:
        recipe = _recipe()
        lib, note = _load(recipe)
    except Unusable as exc:
        return Kernels(None, str(exc))
    except OSError as exc:
        return Kernels(None, f"the kernels could not be built: {exc}")
    if not lib.vc_cpu_supported():
        return Kernels(None, "the processor lacks AVX2 or FMA")
    return Kernels(lib, recipe.describe() + note)


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot run here."""
    return kernels().lib


_ran: set[str] = set()  # what the kernels computed since `forget_use`


def call(kernel: str, *args: object) -> int:
    """Run one of KERNELS (check `library()` first), noting it for the run's record."""
    _ran.add(KERNELS[kernel])
    return getattr(library(), kernel)(*args)


def call_with_scratch(kernel: str, *args: object) -> None:
    """`call` for a kernel that returns 1 when a thread could not allocate its scratch memory."""
    if call(kernel, *args):
        raise MemoryError(f"the CPU kernel for {KERNELS[kernel]} could not allocate its scratch memory")


def forget_use() -> None:
    """Start a new record: a run's environment names what ran for it, not for a run before it in this process."""
    _ran.clear()


def compute_path() -> str:
    """What computed this process's work since `forget_use`: the compiled kernels (with the compiler that
    built them) or torch's operators (with the reason)."""
    if _ran:
        return f"compiled kernels for {' and '.join(sorted(_ran))} ({kernels().how})"
    if kernels.cache_info().currsize and library() is None:
        return f"torch's operators ({kernels().how})"
    return "torch's operators (the compiled kernels do not apply to this model, device or input)"


@functools.cache
def vector_width() -> int:
    """The floats per vector the kernels run with here: 16 with AVX-512, else 8 (AVX2); call with a library."""
    return library().vc_vector_width()


def address(t: torch.Tensor | None) -> ctypes.c_void_p | None:
    """A tensor's data as a C pointer (None as NULL); the caller keeps the tensor alive until the call returns."""
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _signatures(lib: ctypes.CDLL) -> ctypes.CDLL:
    i, p = ctypes.c_int, ctypes.c_void_p
    lib.vc_cpu_supported.argtypes, lib.vc_cpu_supported.restype = [], i
    lib.vc_forward.argtypes, lib.vc_forward.restype = [i] * 3 + [p] * 9, i
    lib.vc_backward.argtypes, lib.vc_backward.restype = [i] * 3 + [p] * 10, i
    lib.vc_augment.argtypes, lib.vc_augment.restype = [i] * 6 + [p] * 8, i
    lib.vc_vector_width.argtypes, lib.vc_vector_width.restype = [], i
    lib.vc_chain_forward.argtypes, lib.vc_chain_forward.restype = [i] * 4 + [p, p, i, p, i] + [p] * 4, i
    lib.vc_chain_backward.argtypes, lib.vc_chain_backward.restype = [i] * 4 + [p] * 6, i
    lib.vc_vera_weights.argtypes, lib.vc_vera_weights.restype = [i] * 2 + [p] * 8, i
    lib.vc_vera_vector_grads.argtypes, lib.vc_vera_vector_grads.restype = [i] * 2 + [p] * 8, i
    return lib
