from pathlib import Path

import pytest

from vera_cli import config
from vera_cli.config import AdaptConfig, ExperimentConfig, PretrainConfig
from vera_cli.errors import VeraError


def test_every_shipped_config_parses():
    assert config.load(PretrainConfig, config.default_config_path("pretrain"), {}).train.crop is True
    for method in ("vera", "lora", "full", "head"):
        parsed = config.load(AdaptConfig, config.default_config_path(f"adapt-{method}"), {})
        assert parsed.adapter.method == method
        assert parsed.classes == ["cat", "bird", "dog"]
    for name in ("experiment", "seed-replica"):
        assert isinstance(config.load(ExperimentConfig, config.default_config_path(name), {}), ExperimentConfig)


def test_unknown_key_names_the_nearest_valid_key():
    with pytest.raises(VeraError, match=r"unknown config key train\.epoch; did you mean train\.epochs\?"):
        config.build(PretrainConfig, {"train": {"epoch": 3}})


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(VeraError, match=r"train\.epochs must be an integer, got 'many' \(str\)"):
        config.build(PretrainConfig, {"train": {"epochs": "many"}})
    with pytest.raises(VeraError, match=r"train\.crop must be true or false"):
        config.build(PretrainConfig, {"train": {"crop": 1}})


def test_choice_fields_suggest_the_nearest_value():
    with pytest.raises(VeraError, match=r"adapter\.sharing must be one of per-shape, sliced; got 'slice' \(did you mean sliced\?\)"):
        config.build(AdaptConfig, {"adapter": {"sharing": "slice"}})


def test_numbers_in_yaml_exponent_form_are_numbers():
    assert config.build(PretrainConfig, {"train": {"lr": "1e-3"}}).train.lr == 0.001
    assert config.build(PretrainConfig, {"train": {"lr": 1}}).train.lr == 1.0


def test_invalid_values_are_refused():
    with pytest.raises(VeraError, match="rank must be a positive integer, got 0"):
        config.build(AdaptConfig, {"adapter": {"rank": 0}})
    with pytest.raises(VeraError, match="classes is empty"):
        config.build(AdaptConfig, {"classes": []})


def test_overrides_set_dotted_keys_and_ignore_missing_values():
    raw = {"train": {"epochs": 3, "lr": 0.1}, "seed": 1}
    merged = config.apply_overrides(raw, {"train.epochs": 5, "train.lr": None, "data.dir": "/d"})
    assert merged == {"train": {"epochs": 5, "lr": 0.1}, "seed": 1, "data": {"dir": "/d"}}
    assert raw["train"]["epochs"] == 3


def test_set_options_keep_yaml_types():
    assert config.parse_set_options(["train.label_smoothing=0.1", "adapter.targets=[fc1, fc2]", "x=true"]) == {
        "train.label_smoothing": 0.1, "adapter.targets": ["fc1", "fc2"], "x": True}
    with pytest.raises(VeraError, match="is not key=value"):
        config.parse_set_options(["train.lr"])


def test_yaml_syntax_error_reports_the_line(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: 3\n  lr: [0.1\n")
    with pytest.raises(VeraError, match=r"bad.yaml is not valid YAML at line \d+"):
        config.read_yaml(path)


def test_missing_config_file(tmp_path: Path):
    with pytest.raises(VeraError, match="does not exist"):
        config.read_yaml(tmp_path / "nope.yaml")


def test_config_round_trips_through_its_dict():
    original = config.build(AdaptConfig, {"adapter": {"rank": 7, "targets": ["fc[12]"]}, "classes": ["cat"]})
    assert config.build(AdaptConfig, config.to_dict(original)) == original
