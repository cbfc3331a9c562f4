"""The CPU kernels' build: compiled once into a cache, reused, and stepped around where they cannot run."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vera_cli.fast.build import cache_dir, library
from vera_cli.models import ConvNet


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """library() from scratch, caching into a private folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("VERA_CLI_KERNELS", raising=False)
    library.cache_clear()
    yield tmp_path
    library.cache_clear()


@pytest.fixture(scope="session")
def built_once(tmp_path_factory) -> Path:
    """A kernel cache that library() filled once for the session (empty where it cannot build here)."""
    root = tmp_path_factory.mktemp("kernel-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(root))
        patch.delenv("VERA_CLI_KERNELS", raising=False)
        library.cache_clear()
        library()
    library.cache_clear()
    return root


@pytest.fixture
def prebuilt(fresh, built_once):
    """`fresh`, with the session's compiled library already in its cache: for the tests whose subject is
    a second build or a later load, not the first build (that one has its own test)."""
    if (built_once / "vera-cli").exists():
        shutil.copytree(built_once / "vera-cli", fresh / "vera-cli")
    return fresh


def test_the_library_is_built_once_and_then_loaded_from_the_cache(fresh):
    if library() is None:
        pytest.skip("no C compiler or no AVX2 here")
    built = list(cache_dir().glob("*.so"))
    assert cache_dir().is_relative_to(fresh) and len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    library.cache_clear()
    assert library() is not None
    assert list(cache_dir().glob("*.so")) == built and built[0].stat().st_mtime_ns == stamp
    assert [p.name for p in cache_dir().iterdir()] == [built[0].name]  # no scratch left beside it


def test_a_cache_that_cannot_be_written_still_gets_the_kernels(prebuilt, monkeypatch):
    if library() is None:
        pytest.skip("no C compiler or no AVX2 here")
    library.cache_clear()
    blocked = prebuilt / "not-a-folder"
    blocked.write_text("")  # the cache would go under a file: even root cannot create it
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    assert library() is not None
    assert blocked.read_text() == "" and not cache_dir().exists()
    assert torch.equal(ConvNet().eval()(torch.zeros(1, 3, 32, 32)).isfinite(), torch.ones(1, 10, dtype=torch.bool))


def test_a_damaged_cached_library_is_built_again(prebuilt):
    if library() is None:
        pytest.skip("no C compiler or no AVX2 here")
    (built,) = cache_dir().glob("*.so")
    # A new file in its place, not the mapped one overwritten: this process has the library loaded.
    junk = built.with_suffix(".junk")
    junk.write_bytes(b"not a shared library")
    os.replace(junk, built)
    # In a new process: this one would get its loaded library back for the same path.
    check = "from vera_cli.fast.build import library; assert library() is not None"
    subprocess.run([sys.executable, "-c", check], check=True, env={**os.environ, "XDG_CACHE_HOME": str(prebuilt)})
    assert built.read_bytes()[:4] == b"\x7fELF"


def test_without_a_home_folder_each_process_builds_its_own(prebuilt, monkeypatch):
    if library() is None:
        pytest.skip("no C compiler or no AVX2 here")
    library.cache_clear()

    def homeless():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr("vera_cli.fast.build.cache_dir", homeless)
    assert library() is not None


def test_a_compiler_command_with_arguments_is_split_as_a_shell_would(prebuilt, monkeypatch):
    if library() is None:
        pytest.skip("no C compiler or no AVX2 here")
    (built,) = cache_dir().glob("*.so")
    built.unlink()  # a loaded library outlives its file
    library.cache_clear()
    monkeypatch.setenv("CC", "env LC_ALL=C cc")  # as `CC="ccache gcc"` would be
    assert library() is not None and built.exists()


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
    torch.testing.assert_close(model(x), reference)


@pytest.mark.parametrize("value", ["off", "0", "false", "OFF"])
def test_the_switch_turns_the_kernels_off(fresh, monkeypatch, value):
    monkeypatch.setenv("VERA_CLI_KERNELS", value)
    assert library() is None and not cache_dir().exists()
