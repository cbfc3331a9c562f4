"""The CPU kernels' build: compiled once into a cache, reused, checked before loading, and stepped around where
they cannot run. A damaged or poisoned cache may cost a rebuild, never the run: each such trial runs the
ConvNet in a child of the fork server, so a library that crashes its process fails the test instead of
killing pytest."""

import contextlib
import functools
import hashlib
import json
import os
import platform
import shutil
import signal
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from forkserver import ForkServer
from test_models import _assert_same_function_and_gradients
from vera_cli import fast
from vera_cli.fast import build
from vera_cli.fast.build import SOURCES, SWITCH, Recipe, cache_dir, compute_path, forget_use, kernels, library
from vera_cli.models import ConvNet

ROOT = Path(__file__).resolve().parent.parent
COMPILED = "compiled kernels for the ConvNet's features ("
# Loaded, it kills its process as a truncated or foreign file mapped by the loader can.
TRIPWIRE = """#include <signal.h>
__attribute__((constructor)) static void tripwire(void) { raise(SIGBUS); }
"""
OTHER_PROGRAM = "int other_function(int x) { return x + 1; }\n"


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """library() from scratch, caching into a private folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(SWITCH, raising=False)
    kernels.cache_clear()
    forget_use()
    yield tmp_path
    kernels.cache_clear()


def _only_library(folder: Path) -> Path:
    (found,) = folder.glob("*.so")
    return found


def _recorded_digest(library_file: Path) -> str:
    return json.loads(library_file.with_suffix(".json").read_text())["sha256"]


@pytest.fixture
def compilable(fresh):
    """Skips where the kernels cannot be built, without building them."""
    try:
        build._recipe()
    except build.Unusable as exc:
        pytest.skip(f"the kernels cannot run here: {exc}")


def test_the_library_is_built_once_into_a_private_cache_and_the_record_names_it(compilable):
    assert compute_path() == "torch's operators (the compiled kernels do not apply to this model, device or input)"
    torch.manual_seed(0)
    _assert_same_function_and_gradients(ConvNet(), torch.randn(4, 3, 32, 32), [])
    assert compute_path() == f"{COMPILED}{kernels().how})" and kernels().how.startswith("compiler ")
    built = _only_library(cache_dir())
    assert stat.S_IMODE(cache_dir().stat().st_mode) == 0o700 and stat.S_IMODE(built.stat().st_mode) == 0o755
    assert _recorded_digest(built) == hashlib.sha256(built.read_bytes()).hexdigest()
    stamp = built.stat().st_mtime_ns
    kernels.cache_clear()
    assert library() is not None and "built for this process alone" not in kernels().how
    assert list(cache_dir().glob("*.so")) == [built] and built.stat().st_mtime_ns == stamp
    # No scratch, and no name it was loaded under, left beside it.
    assert sorted(p.name for p in cache_dir().iterdir()) == [built.with_suffix(".json").name, built.name]
    forget_use()  # what a new run does
    assert compute_path().startswith("torch's operators (")


def test_a_cache_that_cannot_be_written_still_gets_the_kernels(compilable, fresh, monkeypatch):
    blocked = fresh / "not-a-folder"
    blocked.write_text("")  # the cache would go under a file: even root cannot create it
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    assert library() is not None and "built for this process alone: the cache cannot be written" in kernels().how
    assert blocked.read_text() == "" and not cache_dir().exists()
    forget_use()
    assert torch.equal(fast.forward(ConvNet().eval())(torch.zeros(1, 3, 32, 32)).isfinite(), torch.ones(1, 10, dtype=torch.bool))
    assert compute_path().startswith(COMPILED)  # the copy this process built ran


def test_without_a_home_folder_each_process_builds_its_own(compilable, monkeypatch):
    def homeless():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr("vera_cli.fast.build.cache_dir", homeless)
    assert library() is not None and "built for this process alone" in kernels().how


def test_a_compiler_command_with_arguments_is_split_as_a_shell_would(compilable, monkeypatch):
    monkeypatch.setenv("CC", "env LC_ALL=C cc")  # as `CC="ccache gcc"` would be
    assert library() is not None and kernels().how.startswith("compiler env LC_ALL=C cc, ")
    assert len(list(cache_dir().glob("*.so"))) == 1


def test_the_cache_key_covers_the_compiler_command_its_version_its_environment_the_flags_and_the_sources(
        monkeypatch, tmp_path):
    def name(compiler=("cc",), version="cc 12.2.0"):
        return Recipe.of(list(compiler), version).name

    names = [name(), name(("cc", "-fsanitize=address")), name(("gcc",)), name(version="cc 13.1.0")]
    for variable in build.COMPILER_ENV:
        monkeypatch.setenv(variable, "-fsanitize=address")
        names.append(name())
        monkeypatch.delenv(variable)
    monkeypatch.setattr(build, "FLAGS", [*build.FLAGS, "-ffast-math"])
    names.append(name())
    monkeypatch.undo()
    edited = tmp_path / SOURCES[0].name
    edited.write_text(SOURCES[0].read_text() + "\n/* edited */\n")
    monkeypatch.setattr(build, "SOURCES", [edited, *SOURCES[1:]])
    names.append(name())
    monkeypatch.undo()
    header = tmp_path / build.HEADERS[0].name  # included by a source: an edit changes the library too
    header.write_text(build.HEADERS[0].read_text() + "\n/* edited */\n")
    monkeypatch.setattr(build, "HEADERS", [header])
    names.append(name())
    monkeypatch.undo()
    assert len(set(names)) == len(names) == 7 + len(build.COMPILER_ENV)
    assert name() == names[0]


@pytest.mark.parametrize("compiler", ["/nonexistent/cc", "false", 'cc "unbalanced'])
def test_without_a_working_compiler_the_model_runs_on_torchs_operators(fresh, monkeypatch, compiler):
    monkeypatch.setenv("CC", compiler)
    assert library() is None
    assert not cache_dir().exists() or not list(cache_dir().glob("*.so"))
    torch.manual_seed(0)
    model = ConvNet()
    x = torch.randn(2, 3, 32, 32)
    reference = model.classifier(torch.flatten(torch.relu(torch.max_pool2d(model.conv2(torch.relu(torch.max_pool2d(
        model.conv1(x), 2))), 2)), 1))
    forget_use()
    torch.testing.assert_close(fast.forward(model)(x), reference)
    assert compute_path().startswith("torch's operators (")


@pytest.mark.parametrize("value", ["off", "0", "false", "OFF"])
def test_the_switch_turns_the_kernels_off(fresh, monkeypatch, value):
    monkeypatch.setenv(SWITCH, value)
    assert library() is None and not cache_dir().exists()
    torch.manual_seed(0)
    _assert_same_function_and_gradients(ConvNet(), torch.randn(4, 3, 32, 32), [])
    assert compute_path() == f"torch's operators ({SWITCH}={value})"


@pytest.mark.parametrize("probe, reason", [("machine", "the processor is aarch64, not x86-64"),
                                           ("flags", "the processor lacks AVX2 or FMA")])
def test_another_processor_runs_on_torchs_operators_without_building(fresh, monkeypatch, probe, reason):
    if probe == "machine":
        monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    else:
        monkeypatch.setattr(build, "cpu_flags", lambda: frozenset({"sse2", "avx", "fma"}))
    torch.manual_seed(0)
    _assert_same_function_and_gradients(ConvNet(), torch.randn(4, 3, 32, 32), [])
    assert library() is None and not cache_dir().exists()
    assert compute_path() == f"torch's operators ({reason})"


# Trials in a child process, against a cache damaged or poisoned in one way each.

@pytest.fixture(scope="module")
def server():
    started = ForkServer({**{k: v for k, v in os.environ.items() if k != SWITCH}, "PYTHONPATH": str(ROOT),
                          "PYTHONUNBUFFERED": "1"}, preload="kernel_trial")
    yield started
    started.close()


def _trial(server: ForkServer, workdir: Path, cache: Path, **settings) -> dict:
    out, log = workdir / "trial.json", workdir / "trial.log"
    code = server.run([str(cache), str(out), json.dumps(settings)], workdir, log, call="kernel_trial:convnet_step")
    assert code == 0, f"the run ended with exit status {code}:\n{log.read_text()}"
    return json.loads(out.read_text())


def _compile(out: Path, sources: list[Path], flags: list[str]) -> Path:
    subprocess.run(["cc", *flags, "-shared", "-fPIC", "-o", str(out), *map(str, sources)], check=True, timeout=120)
    return out


@pytest.fixture(scope="module")
def good_cache(server, tmp_path_factory) -> Path:
    """A cache holding a library built and recorded by a trial run."""
    try:
        build._recipe()
    except build.Unusable as exc:
        pytest.skip(f"the kernels cannot run here: {exc}")
    cache = tmp_path_factory.mktemp("good")
    assert _trial(server, cache, cache)["compute"].startswith(COMPILED)
    return cache


@functools.cache
def _sanitizer() -> str | None:
    """The address sanitizer's flag where this compiler has one."""
    probe = subprocess.run(["cc", "-fsanitize=address", "-shared", "-fPIC", "-o", os.devnull, "-x", "c", "-"],
                           input=OTHER_PROGRAM, text=True, capture_output=True)
    return None if probe.returncode else "-fsanitize=address"


@pytest.fixture(scope="module")
def bad_libraries(tmp_path_factory, good_cache) -> dict[str, Path]:
    """Shared libraries that are not the kernels: another program's, with a tripwire or without; and one with
    the kernels' function names built with other flags (a sanitizer, where the compiler has one), with the tripwire."""
    folder = tmp_path_factory.mktemp("bad")
    tripwire, other, same_names = folder / "tripwire.c", folder / "other.c", folder / "same-names.c"
    tripwire.write_text(TRIPWIRE + OTHER_PROGRAM)
    other.write_text(OTHER_PROGRAM)
    same_names.write_text(TRIPWIRE + "".join(f"int {name}(void) {{ return 0; }}\n" for name in build.SYMBOLS))
    return {"foreign": _compile(folder / "foreign.so", [tripwire], []),
            "harmless": _compile(folder / "harmless.so", [other], []),
            "other flags": _compile(folder / "other-flags.so", [same_names], ["-O0", _sanitizer() or "-g"])}


@pytest.fixture
def cache(good_cache, tmp_path) -> Path:
    """A private copy of the good cache, for a test to damage."""
    shutil.copytree(good_cache / "vera-cli", tmp_path / "cache" / "vera-cli")
    return tmp_path / "cache"


def _kernels_folder(cache: Path) -> Path:
    return cache / "vera-cli" / "kernels"


def _inodes(result: dict) -> list[int]:
    return [inode for inode, _ in result["libraries"]]


def _assert_used_the_rebuilt_library(result: dict, folder: Path, bad_inode: int) -> None:
    """The cache holds a library built again and recorded, and it is the only kernel library the run mapped."""
    rebuilt = _only_library(folder)
    assert result["compute"].startswith(COMPILED) and "built for this process alone" not in result["compute"]
    assert _inodes(result) == [rebuilt.stat().st_ino] and rebuilt.stat().st_ino != bad_inode
    assert _recorded_digest(rebuilt) == hashlib.sha256(rebuilt.read_bytes()).hexdigest()
    assert b"vc_forward" in rebuilt.read_bytes() and stat.S_IMODE(rebuilt.stat().st_mode) == 0o755


def _truncate(library_file: Path, bad: dict) -> None:
    with library_file.open("r+b") as handle:
        handle.truncate(library_file.stat().st_size // 2)


def _flip_bytes(library_file: Path, bad: dict) -> None:
    data = bytearray(library_file.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    library_file.write_bytes(bytes(data))  # in place: the same file, damaged


def _drop_record(library_file: Path, bad: dict) -> None:
    library_file.with_suffix(".json").unlink()


def _garble_record(library_file: Path, bad: dict) -> None:
    library_file.with_suffix(".json").write_text('{"sha256": ')


def _replacement(kind: str):
    def replace(library_file: Path, bad: dict) -> None:
        library_file.write_bytes(bad[kind].read_bytes())
    return replace


# The truncated library (a SIGBUS when loaded) stays in `pytest -q`; each other damage costs a rebuild: slow tier.
SLOW = pytest.mark.slow


@pytest.mark.parametrize("damage", [
    pytest.param(_truncate, id="truncated"),
    pytest.param(_flip_bytes, id="bytes flipped", marks=SLOW),
    pytest.param(_replacement("foreign"), id="another program's library", marks=SLOW),
    pytest.param(_replacement("other flags"), id="the kernels built with other flags", marks=SLOW),
    pytest.param(_drop_record, id="no digest recorded", marks=SLOW),
    pytest.param(_garble_record, id="a garbled record", marks=SLOW),
])
def test_a_damaged_or_replaced_library_is_never_loaded_and_is_built_again(server, cache, bad_libraries, damage):
    library_file = _only_library(_kernels_folder(cache))
    damage(library_file, bad_libraries)
    bad_inode = library_file.stat().st_ino
    _assert_used_the_rebuilt_library(_trial(server, cache, cache), _kernels_folder(cache), bad_inode)


def _fifo_for_library(library_file: Path, elsewhere: Path) -> None:
    library_file.unlink()
    os.mkfifo(library_file)


def _fifo_for_record(library_file: Path, elsewhere: Path) -> None:
    library_file.with_suffix(".json").unlink()
    os.mkfifo(library_file.with_suffix(".json"))


def _record_linked_to_a_fifo(library_file: Path, elsewhere: Path) -> None:
    # As a link to /dev/zero would be read until memory ran out: this one would be waited on for ever.
    os.mkfifo(elsewhere / "fifo")
    library_file.with_suffix(".json").unlink()
    library_file.with_suffix(".json").symlink_to(elsewhere / "fifo")


@contextlib.contextmanager
def _no_longer_than(seconds: int):
    def waited(signum, frame):
        pytest.fail(f"still waiting after {seconds} s")  # not an OSError, which the build would catch
    before = signal.signal(signal.SIGALRM, waited)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


@pytest.mark.parametrize("damage", [
    pytest.param(_fifo_for_library, id="the library a FIFO"),
    pytest.param(_fifo_for_record, id="the record a FIFO", marks=SLOW),
    pytest.param(_record_linked_to_a_fifo, id="the record a link to a FIFO elsewhere", marks=SLOW),
])
def test_a_cache_entry_that_is_no_regular_file_is_never_read_and_is_built_again(cache, monkeypatch, tmp_path, damage):
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    kernels.cache_clear()
    folder = _kernels_folder(cache)
    damage(_only_library(folder), tmp_path)
    try:
        with _no_longer_than(30):
            assert library() is not None and "built for this process alone" not in kernels().how
    finally:
        kernels.cache_clear()
    rebuilt = _only_library(folder)
    assert stat.S_ISREG(rebuilt.lstat().st_mode) and stat.S_ISREG(rebuilt.with_suffix(".json").lstat().st_mode)
    assert _recorded_digest(rebuilt) == hashlib.sha256(rebuilt.read_bytes()).hexdigest()


def _plant(library_file: Path, replacement: Path) -> None:
    """A library that passes the digest check: only its owner or the folder's owner tells it apart."""
    library_file.write_bytes(replacement.read_bytes())
    library_file.with_suffix(".json").write_text(json.dumps({"sha256": hashlib.sha256(library_file.read_bytes()).hexdigest()}))


@SLOW
def test_a_library_whose_record_was_rewritten_to_match_is_refused_for_its_missing_functions(server, cache,
                                                                                             bad_libraries):
    _plant(_only_library(_kernels_folder(cache)), bad_libraries["harmless"])
    result = _trial(server, cache, cache)
    rebuilt = _only_library(_kernels_folder(cache))
    assert result["compute"].startswith(COMPILED) and b"vc_forward" in rebuilt.read_bytes()
    assert rebuilt.stat().st_ino in _inodes(result)


def test_a_cache_folder_that_others_can_write_is_made_private_and_its_library_kept(server, cache):
    folder = _kernels_folder(cache)
    library_file = _only_library(folder)
    folder.chmod(0o777)
    result = _trial(server, cache, cache)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert result["compute"].startswith(COMPILED)
    assert _inodes(result) == [library_file.stat().st_ino]  # the same file: no rebuild


def test_a_library_that_others_can_write_is_not_loaded_and_is_built_again(server, cache, bad_libraries):
    library_file = _only_library(_kernels_folder(cache))
    _plant(library_file, bad_libraries["foreign"])
    library_file.chmod(0o666)
    bad_inode = library_file.stat().st_ino
    _assert_used_the_rebuilt_library(_trial(server, cache, cache), _kernels_folder(cache), bad_inode)


@SLOW
def test_a_library_owned_by_another_user_is_not_loaded_and_is_built_again(server, cache, bad_libraries):
    library_file = _only_library(_kernels_folder(cache))
    _plant(library_file, bad_libraries["foreign"])
    bad_inode = library_file.stat().st_ino
    result = _trial(server, cache, cache, foreign=bad_inode)
    _assert_used_the_rebuilt_library(result, _kernels_folder(cache), bad_inode)


@SLOW
def test_a_cache_of_another_user_is_left_alone_and_a_private_copy_runs(server, cache, bad_libraries, tmp_path):
    folder = _kernels_folder(cache)
    _plant(_only_library(folder), bad_libraries["foreign"])
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    result = _trial(server, tmp_path, cache, foreign=folder.stat().st_ino)
    assert result["compute"].startswith(COMPILED)
    assert "built for this process alone: " in result["compute"] and "is not a folder of this user's" in result["compute"]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    ((_, mapped),) = result["libraries"]
    assert not mapped.startswith(str(cache)) and mapped.endswith(" (deleted)")  # its temporary folder is gone


@SLOW
def test_a_compiler_whose_library_cannot_be_loaded_leaves_torchs_operators(server, good_cache, tmp_path):
    if _sanitizer() is None:
        pytest.skip("this compiler has no address sanitizer")
    # An ASan library aborts any process whose first library is not the sanitizer's runtime.
    result = _trial(server, tmp_path, tmp_path, env={"CC": f"cc {_sanitizer()}"})
    assert result["compute"].startswith("torch's operators (compiler cc -fsanitize=address, ")
    assert "the library built does not load (exit status 1: " in result["compute"]
    assert result["libraries"] == []
    assert not list(_kernels_folder(tmp_path).glob("*.so"))
