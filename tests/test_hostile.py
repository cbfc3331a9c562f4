"""What the tool reads from outside can be hostile: a binary config, a stream that cannot encode a run's
name, an optional package that is installed but broken, a model too large for the machine. Each is one
line and exit 2 (or, for the stream, the name escaped), with nothing written."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import QUICK, TINY_VIT
from test_faults import one_line_error, run_names
from vera_cli.models import build_model, count_parameters, vit_parameters
from vera_cli.models.config import ViTConfig


@pytest.mark.parametrize("content, fragment", [
    (b"\xff\xfe\x00\x01", "config file bad.yaml is not text (byte 0 is not UTF-8): pass a YAML file"),
    (b"train:\n  lr: 0.1\x00\n", "config file bad.yaml is not valid YAML"),
    (b"#" * (17 * 2**20), "config file bad.yaml is 17,825,792 bytes, far more than a config: pass a YAML file"),
])
def test_a_config_file_that_is_not_yaml_text_is_one_line(vera, content, fragment):
    Path("bad.yaml").write_bytes(content)
    one_line_error(vera("pretrain", "--config", "bad.yaml", "--run-dir", "runs/never"), fragment)
    assert run_names() == []


def test_a_stream_that_cannot_encode_a_run_name_shows_it_escaped(vera, pretrained, cifar_root):
    shutil.copytree(pretrained, "runs/häld")
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}

    def vera_process(*args):
        return subprocess.run([sys.executable, "-m", "vera_cli", *args], capture_output=True, text=True, env=env,
                              encoding="ascii", errors="strict", timeout=120)

    listed = vera_process("runs")
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    assert any(line.startswith("h\\xe4ld ") for line in listed.stdout.splitlines())
    evaluated = vera_process("eval", "runs/häld", "--data-dir", str(cifar_root))
    assert evaluated.returncode == 0 and "Traceback" not in evaluated.stderr, evaluated.stderr
    assert "Test accuracy, runs/h\\xe4ld" in evaluated.stdout
    missing = vera_process("runs", "--runs-dir", "nö")
    assert missing.returncode == 2
    assert missing.stderr == "error: n\\xf6 is not a folder: pass the folder that holds your runs with --runs-dir\n"


@pytest.fixture
def broken(monkeypatch, tmp_path):
    """Make `package` importable but failing, as a damaged install is: found on sys.path, raising on import."""
    def install(package: str, *also_forget: str) -> None:
        folder = tmp_path / "site" / package
        folder.mkdir(parents=True)
        (folder / "__init__.py").write_text("raise RuntimeError('broken install')\n")
        monkeypatch.syspath_prepend(str(tmp_path / "site"))
        for name in list(sys.modules):
            if name == package or name.startswith(f"{package}.") or name in also_forget:
                monkeypatch.delitem(sys.modules, name)
    return install


def test_a_broken_tensorboard_is_refused_before_the_run_starts(vera, broken):
    broken("tensorboard", "torch.utils.tensorboard")
    one_line_error(vera("pretrain", *QUICK, "--tensorboard", "--run-dir", "runs/never"),
                   "logging.tensorboard: the tensorboard package is installed but does not import (RuntimeError: broken "
                   "install): reinstall it (pip install --force-reinstall tensorboard), or leave out --tensorboard")
    assert run_names() == []


def test_a_broken_matplotlib_is_refused_before_a_run_and_not_needed_without_pictures(vera, pretrained, broken):
    broken("matplotlib")
    fragment = "matplotlib is installed but does not import (RuntimeError: broken install): reinstall it"
    one_line_error(vera("adapt", *QUICK, "--run-dir", "runs/never"), fragment + " (pip install --force-reinstall "
                   "matplotlib), or turn the pictures off with --set logging.plots=false")
    one_line_error(vera("compare", "--methods", "head", "--epochs", "1", "--run-dir", "runs/never"), fragment)
    one_line_error(vera("eval", "runs/base", "--plot", "accuracy.png"), fragment)
    assert run_names() == ["base"] and not Path("accuracy.png").exists()
    result = vera("adapt", *QUICK, "--set", "logging.plots=false", "--run-dir", "runs/plain")
    assert result.code == 0, result.err
    assert sorted(p.name for p in Path("runs/plain").glob("*.png")) == []


def test_exporting_needs_no_peft_at_all(vera, pretrained, broken):
    assert vera("adapt", *QUICK, "--method", "lora", "--rank", "2", "--run-dir", "runs/a").code == 0
    broken("peft")
    result = vera("export", "runs/a", "--out", "exported")
    assert result.code == 0, result.err
    assert json.loads(Path("exported/adapter_config.json").read_text())["peft_type"] == "LORA"


def test_a_vit_counted_from_its_settings_has_the_parameters_built():
    for vit in (ViTConfig(), TINY_VIT.vit):
        assert vit_parameters(vit) == count_parameters(build_model(TINY_VIT.__class__("vit", vit)))


HUGE_VIT = ["--set", "model.vit.dim=65536", "--set", "model.vit.depth=64"]


def test_a_model_that_cannot_fit_in_memory_is_refused_with_its_size_before_allocating(vera, pretrained):
    # 64 blocks of width 65,536: 2.2 trillion parameters, 8,796 GB of float32 weights, four times that to train.
    one_line_error(vera("pretrain", "--config", "pretrain-vit", *HUGE_VIT, "--run-dir", "runs/never"),
                   "model.vit (dim 65,536, depth 64, mlp_ratio 2) has 2,199,077,584,906 parameters: 35,185.2 GB for "
                   "training (weights, gradients, optimizer state), more than the ")
    config = yaml.safe_load(Path("runs/base/config.yaml").read_text())
    config["model"] = {"name": "vit", "vit": {**config["model"]["vit"], "dim": 65536, "depth": 64}}
    Path("runs/base/config.yaml").write_text(yaml.safe_dump(config))
    one_line_error(vera("eval", "runs/base"), "has 2,199,077,584,906 parameters: 8,796.3 GB for its weights alone")
    assert run_names() == ["base"]
