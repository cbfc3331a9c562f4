"""Typed configuration: YAML in, validated dataclasses out.

The dataclasses here are the schema and hold no values: every default lives in
the YAML shipped in the package (`vera_cli/configs/`, listed by `vera config
list`), so the two cannot disagree. A command reads its shipped config, or a
file given with `--config` laid over that same config (unless the file names
another with `extends:`), applies command-line overrides as dotted keys, and
validates the result once. Any section may start from another config with
`extends: NAME`, stating only what differs. Code past this module trusts the
dataclasses it receives.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import yaml

# The adapter section is the standalone adapters package's own config, re-exported here.
from vera_cli.adapters.config import METHODS, SHARING_MODES, AdapterConfig
from vera_cli.errors import VeraError
from vera_cli.files import MAX_TEXT_BYTES
from vera_cli.models import ModelConfig
from vera_cli.yamlsafe import safe_load

Device = Literal["auto", "cpu", "cuda", "mps"]
DEVICES: tuple[str, ...] = typing.get_args(Device)
Forgetting = Literal["none", "mask", "replay", "distill"]
# What compare's tuning axes (learning rates) pick on: a metric on the validation split.
SelectBy = Literal["overall", "task", "chosen", "rest"]
# compare's method axis: each method, plus VeRA under each sharing mode other than the default.
# `+head`: the adapter with the classifier layer trained fully beside it (adapter.train_head).
_ADAPTER_METHODS = ("vera", "lora") + tuple(f"vera-{mode}" for mode in SHARING_MODES[1:])
# Methods without rank or targets: they train whole modules; the adapters are the others.
RANKLESS = ("full", "head")
ADAPTERS = ("vera", "lora")
CompareMethod = Literal[METHODS + _ADAPTER_METHODS[2:] + tuple(f"{m}+head" for m in _ADAPTER_METHODS)]  # type: ignore[valid-type]
COMPARE_METHODS: tuple[str, ...] = typing.get_args(CompareMethod)
# A compared adapter may carry its own rank and targets, which its lines then keep whatever the ranks and
# targets axes say: `lora-r8` beside `vera-r256` (LoRA refuses a rank above a layer's width), `vera-r256@all-linear+head`.
_OWN_SETTINGS = re.compile(r"(?P<name>[a-z]+(?:-[a-z]+)?)(?:-r(?P<rank>[0-9]+))?(?:@(?P<targets>[^+@]+))?(?P<head>\+head)?")


@dataclass(frozen=True)
class ComparedMethod:
    """One entry of compare's methods: the method as its rows name it (`vera+head`) and what it fixes for itself."""

    method: str
    rank: Optional[int] = None
    targets: Optional[str] = None


def compared_method(entry: str, key: str = "methods") -> ComparedMethod:
    """`vera-r256@all-linear+head` -> ComparedMethod("vera+head", 256, "all-linear"); a plain name stays as it is."""
    match = _OWN_SETTINGS.fullmatch(entry)
    method = f"{match['name']}{match['head'] or ''}" if match else entry
    if match is None or method not in COMPARE_METHODS:
        close = difflib.get_close_matches(entry, COMPARE_METHODS, n=1)
        raise VeraError(f"{key} must be one of {', '.join(COMPARE_METHODS)}, an adapter with its own rank or targets "
                        f"as in lora-r8 or vera-r256@all-linear+head; got {shown(entry)}"
                        + (f" (did you mean {close[0]}?)" if close else ""))
    own = ComparedMethod(method, int(match["rank"]) if match["rank"] else None, match["targets"])
    _require(own.rank is None or own.rank >= 1, f"{key} ({entry}) has rank {own.rank}: a rank is a positive integer")
    _require(method.partition("+")[0] not in RANKLESS or (own.rank, own.targets) == (None, None),
             f"{key} ({entry}) gives a rank or targets to {method}, which trains whole modules: write {method}")
    return own


# Values renamed since runs were first written: old run configs still load.
RENAMED_VALUES = {"onecycle": "linear"}
# A comparison runs every seed of every setting: more than this is a typo, not an experiment.
MAX_COMPARE_SEEDS = 1000
# Likewise for compare's local processes (each imports torch and holds a model).
MAX_WORKERS = 1024
# Likewise for a run's length: past these it would train for months, not finish.
MAX_EPOCHS = 100_000
MAX_STEPS = 10_000_000
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 3, 6, 6, 60, 60


@dataclass
class DataConfig:
    dir: str
    download: bool


@dataclass
class TrainConfig:
    epochs: int
    batch_size: int
    lr: float
    optimizer: Literal["sgd", "adamw"]
    momentum: float
    nesterov: bool
    weight_decay: float
    schedule: Literal["constant", "linear", "cosine"]
    warmup: float
    label_smoothing: float
    crop: bool
    # Zero padding around each image before the random crop.
    crop_padding: int
    flip: bool
    # bf16: forward and loss under autocast (mixed precision); auto: bf16 where the device multiplies it
    # natively (a CUDA GPU from Ampere on, a CPU with AVX512-BF16 or AMX), else fp32.
    precision: Literal["fp32", "bf16", "auto"]
    # The classifier layer's own peak learning rate when it trains beside an adapter; None: lr.
    head_lr: Optional[float]

    def __post_init__(self) -> None:
        _require(1 <= self.epochs <= MAX_EPOCHS, f"train.epochs must be from 1 to {MAX_EPOCHS:,}, got {shown(self.epochs)}")
        _require(self.batch_size >= 1, "train.batch_size must be at least 1")
        _require(self.lr > 0, "train.lr must be positive")
        _require(0 <= self.warmup < 1, "train.warmup is a fraction of the steps: use a value in [0, 1)")
        _require(0 <= self.label_smoothing < 1, "train.label_smoothing must be in [0, 1)")
        _require(self.weight_decay >= 0, "train.weight_decay must not be negative")
        _require(self.head_lr is None or self.head_lr > 0, "train.head_lr must be positive (or null: the same as lr)")
        _require(0 <= self.momentum < 1, f"train.momentum must be in [0, 1), got {self.momentum}")
        _require(1 <= self.crop_padding <= 16, f"train.crop_padding must be 1 to 16 pixels, got {self.crop_padding}")

    @property
    def crop_pixels(self) -> int:
        """The random crop's padding; 0 when cropping is off."""
        return self.crop_padding if self.crop else 0


@dataclass
class LoggingConfig:
    """What a training run records beside metrics.jsonl."""

    # Event files under <run>/tensorboard/: per-step loss and lr, per-epoch accuracies, images/s, the config.
    tensorboard: bool
    # Pictures in the run: training curves, and per-class accuracy before and after for adapt runs.
    plots: bool
    # Test-split evaluations spread over a run, the last epoch's always among them (the curves' points).
    evaluations: int

    def __post_init__(self) -> None:
        _require(self.evaluations >= 1, f"logging.evaluations must be at least 1 (the last epoch's), got {self.evaluations}")
        _require(not self.tensorboard or importlib.util.find_spec("tensorboard") is not None,
                 "logging.tensorboard needs the tensorboard package: pip install 'vera-cli[tensorboard]', "
                 "or leave out --tensorboard")


@dataclass
class PretrainConfig:
    model: ModelConfig
    seed: int
    device: Device
    run_dir: Optional[str]
    data: DataConfig
    train: TrainConfig
    logging: LoggingConfig
    # Classes kept out of pretraining (no image of them is seen), so that adaptation can learn new classes.
    exclude_classes: list[str]

    def __post_init__(self) -> None:
        _require_seed(self.seed, "seed")


@dataclass
class FewShotConfig:
    """The step budget of a run with `shots` whose epochs and min_steps are left unset (see step_budget):
    a few images per class are a batch or two, so epochs alone would mean a handful of steps."""

    min_steps: int
    batch_size: int

    def __post_init__(self) -> None:
        _require_steps(self.min_steps, "few_shot.min_steps")
        _require(self.batch_size >= 1, "few_shot.batch_size must be at least 1")


@dataclass
class AdaptConfig:
    base: Optional[str]
    classes: list[str]
    seed: int
    device: Device
    run_dir: Optional[str]
    data: DataConfig
    adapter: AdapterConfig
    train: TrainConfig
    logging: LoggingConfig
    # Without augmentation the frozen conv prefix gives the same output every epoch: compute it once.
    cache_features: bool
    # How to keep the classes not trained on: none; mask (the loss sees only the chosen
    # classes' logits); replay (add images of the other classes, replay_fraction times
    # as many as the chosen classes have, with their own labels).
    # distill: replay, plus a term that keeps the classes not trained on close to the base model's
    # logits for them (softened by distill_temperature, weighted by distill_weight) on every training image.
    forgetting: Forgetting
    replay_fraction: float
    distill_weight: float
    distill_temperature: float
    # Training images per chosen class (null: all of them); drawn with the run's seed and recorded.
    shots: Optional[int]
    # Images per class carved from the training images before anything else is drawn, never trained on:
    # where settings are chosen (compare's learning-rate axes), so that the test set is not.
    validation: int
    # At least this many optimizer steps: a tiny (few-shot) set gets more passes than `train.epochs`.
    # Null until loaded: `load` settles it (step_budget), so a run records the number it trained with.
    min_steps: Optional[int]
    few_shot: FewShotConfig

    def __post_init__(self) -> None:
        _require(self.replay_fraction >= 0, "replay_fraction must not be negative")
        _require(self.distill_weight >= 0, "distill_weight must not be negative")
        _require(self.distill_temperature > 0, "distill_temperature must be positive")
        _require(self.shots is None or self.shots >= 1, "shots must be at least 1 (or null: every image)")
        _require(self.validation >= 0, "validation (images per class) must not be negative")
        _require_steps(self.min_steps, "min_steps")
        _require_seed(self.seed, "seed")
        _require(len(self.classes) > 0, "classes is empty: name at least one class, e.g. --classes cat bird dog")


@dataclass
class CompareConfig:
    """A grid over methods, ranks, targets, forgetting options and seeds; each method keeps its own adapt config."""

    base: Optional[str]
    classes: list[str]
    methods: list[str]  # each a CompareMethod, with its own rank and targets if it fixes them (compared_method)
    ranks: list[int]
    # For vera and lora: each entry one adapter.targets setting (a preset such as all, or a regex).
    targets: list[str]
    forgetting: list[Forgetting]
    seeds: int
    epochs: Optional[int]  # None: each method's own config decides
    device: Device
    run_dir: Optional[str]
    data: DataConfig
    # Axes a protocol adds; an empty list leaves the setting to each method's own config.
    lrs: list[float]
    head_lrs: list[float]
    shots: list[Union[int, Literal["all"]]]
    bases: list[str]
    validation: int  # images per class; needed to choose among lrs / head_lrs
    select_by: SelectBy
    min_steps: Optional[int]  # None: each row's own (a row with shots takes its method's few_shot budget)
    batch_size: Optional[int]  # None: each method's config decides; few-shot sets want small batches
    replay_fraction: Optional[float]  # None: each method's config decides
    # The line every other is judged against, paired by seed (a setting's name or its start up to a dash,
    # e.g. lora-r8); None: the best line on validation, else on the test set.
    reference: Optional[str]
    budget: Optional[str]  # a duration (90s, 30m, 2h, 1h30m): the grid is cut to fit it, highest seeds first
    # Local processes that share the rows (vera_cli.workers); auto decides by device, cores and model size.
    workers: Union[int, Literal["auto"]]

    def __post_init__(self) -> None:
        if self.budget is not None:
            parse_duration(self.budget, "budget")
        _require(len(self.classes) > 0, "classes is empty: name at least one class, e.g. --classes cat bird dog")
        _require(len(self.methods) > 0, "methods is empty: name at least one, e.g. --methods vera,lora")
        for index, entry in enumerate(self.methods):
            compared_method(entry, f"methods[{index}]")
        _require(all(rank >= 1 for rank in self.ranks), f"ranks must be positive integers, got {self.ranks}")
        _require(len(self.ranks) > 0 or not _uses_ranks(self),
                 "ranks is empty: vera and lora need at least one, e.g. --ranks 4,32, or their own, e.g. --methods lora-r8")
        _require(len(self.targets) > 0, "targets is empty: name at least one, e.g. --targets linear,all")
        _require(len(self.forgetting) > 0, "forgetting is empty: name at least one, e.g. --set forgetting=[replay]")
        _require_steps(self.min_steps, "min_steps")
        _require(1 <= self.seeds <= MAX_COMPARE_SEEDS, f"seeds must be from 1 to {MAX_COMPARE_SEEDS}, got {shown(self.seeds)}")
        _require(self.epochs is None or 1 <= self.epochs <= MAX_EPOCHS,
                 f"epochs must be from 1 to {MAX_EPOCHS:,} (or null: each method's own), got {shown(self.epochs)}")
        _require(self.batch_size is None or self.batch_size >= 1, "batch_size must be at least 1")
        _require(all(lr > 0 for lr in self.lrs + self.head_lrs), "lrs and head_lrs must be positive")
        _require(all(k == "all" or k >= 1 for k in self.shots), f"shots must be positive integers or all, got {self.shots}")
        _require(self.validation >= 0, "validation (images per class) must not be negative")
        _require(self.workers == "auto" or 1 <= self.workers <= MAX_WORKERS,
                 f"workers must be auto or a number of processes from 1 to {MAX_WORKERS:,}, got {shown(self.workers)}")
        _require(self.validation > 0 or (len(self.lrs) <= 1 and len(self.head_lrs) <= 1),
                 "several lrs or head_lrs need a validation split to choose on: set validation, e.g. --set validation=50")


@dataclass
class ExperimentConfig:
    """The write-up in one run: pretrain (unless `base` is given), count, adapt. Each section is a whole
    command config, so anything `vera pretrain` or `vera adapt` accepts can be set here."""

    base: Optional[str]
    run_dir: Optional[str]
    pretrain: PretrainConfig
    adapt: AdaptConfig


# The shipped config each command reads when given none (adapt: adapt-<method>, chosen by the command line).
COMMAND_CONFIGS = {"PretrainConfig": "pretrain", "AdaptConfig": "adapt-vera", "CompareConfig": "compare",
                   "ExperimentConfig": "experiment"}
# Keys a run recorded before they existed, whose behaviour then differs from today's shipped value: runs
# pretrained before test-time flip existed were measured on the images alone, and cropped with 4 pixels;
# runs from before min_steps trained their epochs alone.
RECORDED_BEFORE_KEYS = {"PretrainConfig": {"model": {"tta": "none"}, "train": {"crop_padding": 4}},
                        "AdaptConfig": {"min_steps": 0}, "CompareConfig": {"min_steps": 0}}


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str, key: str) -> float:
    """`90s`, `30m`, `2h` or `1h30m` in seconds; anything else is a one-line error naming `key`."""
    compact = text.replace(" ", "")
    parts = re.findall(r"(\d+(?:\.\d+)?)([smh])", compact)
    if not re.fullmatch(r"(?:\d+(?:\.\d+)?[smh])+", compact):
        raise VeraError(f"{key} must be a duration such as 90s, 30m, 2h or 1h30m; got {shown(text)}")
    seconds = sum(float(number) * DURATION_UNITS[unit] for number, unit in parts)
    _require(seconds > 0, f"{key} must be longer than no time at all; got {shown(text)}")
    return seconds


def _require_steps(value: Optional[int], key: str) -> None:
    _require(value is None or 0 <= value <= MAX_STEPS,
             f"{key} must be from 0 to {MAX_STEPS:,} optimizer steps, got {shown(value)}")


def _require_seed(value: int, key: str) -> None:
    # torch seeds its generators with an unsigned 64-bit integer.
    _require(0 <= value < 2**64, f"{key} must be an integer from 0 to 2**64 - 1, got {shown(value)}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise VeraError(message)


def config_names() -> list[str]:
    """The configs shipped in the package, by the name `--config` accepts."""
    return sorted(entry.name[:-5] for entry in resources.files("vera_cli.configs").iterdir() if entry.name.endswith(".yaml"))


def config_source(name_or_path: str | Path) -> tuple[str, str]:
    """(where, text) of a config: an existing file, or a shipped config by name (`adapt-lora`)."""
    path = Path(name_or_path)
    if path.is_file():
        size = path.stat().st_size
        if size > MAX_TEXT_BYTES:
            raise VeraError(f"config file {path} is {size:,} bytes, far more than a config: pass a YAML file")
        try:
            return str(path), path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise VeraError(f"config file {path} is not text (byte {exc.start} is not UTF-8): pass a YAML file") from None
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if str(path) == path.name and name in config_names():
        return f"{name} (shipped)", resources.files("vera_cli.configs").joinpath(f"{name}.yaml").read_text()
    raise VeraError(f"config file {name_or_path} does not exist: pass an existing file with --config, "
                   f"or a shipped config by name ({', '.join(config_names())})")


def read_yaml(where: str, text: str) -> dict[str, Any]:
    try:
        raw = safe_load(text, f"config file {where}")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        opened = f" ({context} that starts at line {start.line + 1})" if context and start is not None else ""
        raise VeraError(f"config file {where} is not valid YAML{at}: {problem}{opened}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise VeraError(f"config file {where} must hold a mapping of keys to values, got {type(raw).__name__}")
    return raw


def read_config(name_or_path: str | Path, chain: tuple[str, ...] = (), default: str | None = None) -> dict[str, Any]:
    """A config as one mapping, every `extends:` (at the top or in any section) resolved; a file that
    extends nothing extends `default` when one is given."""
    where, text = config_source(name_or_path)
    if where in chain:
        raise VeraError(f"config {where} extends itself (through {' -> '.join(chain)}): remove one extends")
    folder = Path(name_or_path).parent if Path(name_or_path).is_file() else None
    raw = read_yaml(where, text)
    if folder is not None and default is not None and "extends" not in raw:
        raw["extends"] = default
    return _resolve_extends(raw, folder, (*chain, where), default)


def _resolve_extends(raw: dict[str, Any], folder: Path | None, chain: tuple[str, ...],
                     default: str | None = None) -> dict[str, Any]:
    """`raw` with its `extends` resolved; a file it extends that extends nothing itself starts from `default`
    (the root of a chain of the user's files starts from the command's config)."""
    raw = {key: _resolve_extends(value, folder, chain) if isinstance(value, dict) else value for key, value in raw.items()}
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise VeraError(f"extends must name one config, got {shown(parent)} in {chain[-1]}")
    # A file beside the config that extends wins; otherwise a shipped config by that name.
    source = folder / parent if folder is not None and (folder / parent).is_file() else parent
    return merge_mappings(read_config(source, chain, default), raw)


def merge_mappings(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`changes` over `base`, section by section; lists and values are replaced whole."""
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_mappings(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (`train.lr`) in a copy of `raw`, null too: `--set train.head_lr=null` means null
    (the command line leaves out the options it was not given)."""
    result = _deep_copy(raw)
    for dotted, value in overrides.items():
        node = result
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise VeraError(f"cannot set {dotted}: {part} is not a section")
            node = child
        node[leaf] = value
    return result


def parse_set_options(items: list[str]) -> dict[str, Any]:
    """`--set key=value` pairs; values are read as YAML so that numbers and lists keep their type."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise VeraError(f"--set {item!r} is not key=value: write e.g. --set train.label_smoothing=0.1")
        if not text.strip():
            # An empty value would read as null, which silently means "the default" for some keys.
            raise VeraError(f"--set {item!r} gives no value: write the value after '=' (null only if you mean it)")
        try:
            parsed[key.strip()] = safe_load(text, f"--set {key.strip()}")
        except yaml.YAMLError as exc:
            raise VeraError(f"--set {item!r}: the value is not valid YAML") from exc
    return parsed


T = typing.TypeVar("T")


def build(cls: type[T], raw: dict[str, Any], where: str = "") -> T:
    """Turn a mapping into the dataclass `cls`, naming any unknown key or wrong type."""
    if not isinstance(raw, dict):
        raise VeraError(f"{where.rstrip('.') or 'config'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {where}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            raise VeraError(f"unknown config key {where}{key}{hint}")
        kwargs[key] = _convert(value, hints[key], f"{where}{key}")
    missing = _missing_keys(cls, raw, where)
    if missing:
        raise VeraError(f"config key {missing[0]} is missing{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: "
                        "set it, or start the file from a shipped config (extends: NAME, see vera config list)")
    try:
        return cls(**kwargs)
    except ValueError as exc:
        # The adapters package validates with ValueError, its messages starting with the field's name.
        raise VeraError(f"{where}{exc}") from exc


def _missing_keys(cls: Any, raw: dict[str, Any], where: str) -> list[str]:
    """Every key the schema needs that `raw` lacks, in its sections too (which hold no defaults either)."""
    hints = typing.get_type_hints(cls)
    missing = []
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                missing.append(f"{where}{f.name}")
        elif dataclasses.is_dataclass(hints[f.name]) and isinstance(raw[f.name], dict):
            missing += _missing_keys(hints[f.name], raw[f.name], f"{where}{f.name}.")
    return missing


def load(cls: type[T], name_or_path: str | Path, overrides: dict[str, Any], default: str | None = None) -> T:
    """The config `name_or_path` (a shipped name or a file) with `overrides` applied.

    A file that extends nothing starts from the shipped config `default` (the command's own, what
    `--print-config` prints without `--config`), so every key it leaves out has the command's value.
    """
    default = default or COMMAND_CONFIGS[cls.__name__]
    raw = _sections_in_full(cls, read_config(name_or_path, default=default))
    expanded = expand_shorthands(cls, overrides)
    # What the user stated: options and --set (refused where they mean nothing), and with them the keys
    # their file changes from the command's shipped config (which settle the few-shot step budget).
    options = set(flatten(apply_overrides({}, expanded)))
    shipped = flatten(_sections_in_full(cls, read_config(default)))
    stated = options | {key for key, value in flatten(raw).items() if shipped.get(key, _UNSET) != value}
    return settle(build(cls, apply_overrides(raw, expanded)), options, stated)


_UNSET = object()


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"train": {"lr": 0.1}}` -> `{"train.lr": 0.1}`."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# (key, whether it means something in a config, what it needs, what the config has instead): a key given
# on the command line (an option or --set) where it means nothing is refused rather than ignored.
Rule = tuple[str, Callable[[Any], bool], str, Callable[[Any], str]]
_SGD = lambda c: c.train.optimizer == "sgd"  # noqa: E731
_OPTIMIZER = lambda c: f"train.optimizer {c.train.optimizer}"  # noqa: E731
_METHOD = lambda c: f"method {c.adapter.method}"  # noqa: E731
_FORGETTING = lambda c: f"forgetting {c.forgetting}"  # noqa: E731
TRAIN_RULES: list[Rule] = [
    ("train.momentum", _SGD, "train.optimizer sgd", _OPTIMIZER),
    ("train.nesterov", _SGD, "train.optimizer sgd", _OPTIMIZER),
    ("train.crop_padding", lambda c: c.train.crop, "train.crop true", lambda c: "train.crop false"),
]
PRETRAIN_RULES: list[Rule] = TRAIN_RULES + [
    ("train.head_lr", lambda c: False, "an adapt run whose classifier layer trains beside an adapter", lambda c: "a pretrain run"),
]
ADAPT_RULES: list[Rule] = TRAIN_RULES + [
    *((key, lambda c: c.adapter.method in ADAPTERS, "method vera or lora", _METHOD)
      for key in ("adapter.rank", "adapter.targets", "adapter.dropout", "adapter.train_head")),
    *((key, lambda c: c.adapter.method == "vera", "method vera", _METHOD)
      for key in ("adapter.sharing", "adapter.d_init", "adapter.projection_seed", "adapter.store_projections")),
    ("adapter.alpha", lambda c: c.adapter.method == "lora", "method lora", _METHOD),
    ("adapter.trainable", lambda c: c.adapter.method != "full", "method vera, lora or head (full trains every module)", _METHOD),
    # The head method's one rate is lr; beside an adapter the head needs train_head (null: decided by the base).
    ("train.head_lr", lambda c: c.adapter.method == "full" or (c.adapter.method in ADAPTERS and c.adapter.train_head is not False),
     "the classifier layer training beside an adapter (--train-head) or method full",
     lambda c: _METHOD(c) + (" with train_head false" if c.adapter.method in ADAPTERS else "")),
    ("replay_fraction", lambda c: c.forgetting in ("replay", "distill"), "forgetting replay or distill", _FORGETTING),
    ("distill_weight", lambda c: c.forgetting == "distill", "forgetting distill", _FORGETTING),
    ("distill_temperature", lambda c: c.forgetting == "distill", "forgetting distill", _FORGETTING),
]

# An experiment places its own steps: it adapts its base (or what it pretrains) and writes both inside its run.
_EXPERIMENT = lambda c: "an experiment, which writes its steps inside its own run_dir (--run-dir)"  # noqa: E731
EXPERIMENT_RULES: list[Rule] = [
    ("adapt.base", lambda c: False, "vera adapt",
     lambda c: "an experiment, which adapts the run its base names (--base), else its own pretraining"),
    ("pretrain.run_dir", lambda c: False, "vera pretrain", _EXPERIMENT),
    ("adapt.run_dir", lambda c: False, "vera adapt", _EXPERIMENT),
]


def _ranked(methods: list[str]) -> list[ComparedMethod]:
    return [own for own in map(compared_method, methods) if own.method.partition("+")[0] not in RANKLESS]


def _uses_ranks(c: CompareConfig) -> bool:
    return any(own.rank is None for own in _ranked(c.methods))


def _uses_targets(c: CompareConfig) -> bool:
    return any(own.targets is None for own in _ranked(c.methods))


_METHODS = lambda c: f"--methods {','.join(c.methods)}"  # noqa: E731
COMPARE_RULES: list[Rule] = [
    ("ranks", _uses_ranks, "a method with a rank not its own (vera, lora; lora-r8 keeps 8)", _METHODS),
    ("targets", _uses_targets, "a method with targets not its own (vera, lora; vera@attention keeps attention)", _METHODS),
    ("head_lrs", lambda c: any("+" in m for m in c.methods), "a +head method (vera+head, lora+head)", _METHODS),
    ("replay_fraction", lambda c: any(f in ("replay", "distill") for f in c.forgetting), "forgetting replay or distill",
     lambda c: f"forgetting {','.join(c.forgetting)}"),
]
# The command-line option that sets a key, to name it as the user typed it.
OPTION_NAMES = {"adapter.rank": "--rank", "adapter.targets": "--target", "adapter.sharing": "--sharing",
                "adapter.train_head": "--train-head/--no-train-head", "train.head_lr": "--head-lr", "ranks": "--ranks",
                "targets": "--targets", "head_lrs": "--head-lrs"}


def refuse_inapplicable(settings: Any, rules: list[Rule], options: set[str], prefix: str = "",
                        names: dict[str, str] | None = None) -> None:
    """The first key of `rules` in `options` that means nothing in `settings` (a section at `prefix`), refused;
    `names` maps keys to the command-line options that set them."""
    for key, applies, needs, instead in rules:
        if f"{prefix}{key}" in options and not applies(settings):
            option = (names or {}).get(key)
            named = f"{option} ({prefix}{key})" if option else f"{prefix}{key}"
            raise VeraError(f"{named} means nothing here: it applies with {needs}, and this run has {instead(settings)}; "
                            "drop it")


def step_budget(cfg: AdaptConfig, epochs_stated: bool, batch_stated: bool) -> AdaptConfig:
    """`min_steps` null settled: a run with `shots` whose train.epochs was not stated trains by the few-shot
    budget (few_shot.min_steps steps at few_shot.batch_size, unless train.batch_size was stated); else 0."""
    if cfg.min_steps is not None:
        return cfg
    if cfg.shots is None or epochs_stated:
        return dataclasses.replace(cfg, min_steps=0)
    train = cfg.train if batch_stated else dataclasses.replace(cfg.train, batch_size=cfg.few_shot.batch_size)
    return dataclasses.replace(cfg, min_steps=cfg.few_shot.min_steps, train=train)


def settle(settings: T, options: set[str], stated: set[str]) -> T:
    """Refuse `options` that mean nothing in `settings` and settle what the schema leaves open (min_steps)."""
    if isinstance(settings, AdaptConfig):
        return _settle_adapt(settings, options, stated)
    if isinstance(settings, ExperimentConfig):
        refuse_inapplicable(settings, EXPERIMENT_RULES, options)
        refuse_inapplicable(settings.pretrain, PRETRAIN_RULES, options, "pretrain.")
        return dataclasses.replace(settings, adapt=_settle_adapt(settings.adapt, options, stated, "adapt."))
    if isinstance(settings, CompareConfig):
        refuse_inapplicable(settings, COMPARE_RULES, options, names=OPTION_NAMES)
    if isinstance(settings, PretrainConfig):
        refuse_inapplicable(settings, PRETRAIN_RULES, options)
    return settings


def _settle_adapt(cfg: AdaptConfig, options: set[str], stated: set[str], prefix: str = "") -> AdaptConfig:
    # Experiment's adapt section has no options of its own: there the key is named as --set takes it.
    refuse_inapplicable(cfg, ADAPT_RULES, options, prefix, None if prefix else OPTION_NAMES)
    return step_budget(cfg, f"{prefix}train.epochs" in stated, f"{prefix}train.batch_size" in stated)


def load_recorded(cls: type[T], recorded: dict[str, Any], where: str) -> T:
    """A run's own config.yaml (already read): keys added since the run was written take the command's
    shipped values, except those whose older behaviour differs (RECORDED_BEFORE_KEYS)."""
    shipped = read_config(COMMAND_CONFIGS[cls.__name__])
    older = RECORDED_BEFORE_KEYS.get(cls.__name__, {})
    raw = merge_mappings(merge_mappings(shipped, older), _sections_in_full(cls, recorded))
    try:
        return build(cls, raw)
    except VeraError as exc:
        # A hand-edited file: the message must say which one.
        raise VeraError(f"{where}: {exc}; correct it there or repeat the run") from exc


def expand_shorthands(cls: type, overrides: dict[str, Any]) -> dict[str, Any]:
    """`--set model=vit` as `model.name=vit`: it changes the model, not every other key the file gives it.

    Taken whole, the shorthand would put the section's other keys (the file's `model.tta: flip`) back
    to their defaults without a word.
    """
    expanded = {}
    for dotted, value in overrides.items():
        shorthand = _shorthand(_hint_at(cls, dotted.split(".")), value)
        expanded[f"{dotted}.{shorthand}" if shorthand else dotted] = value
    return expanded


def _sections_in_full(cls: Any, raw: Any) -> Any:
    """A file's `model: vit` (the older form) as `model: {name: vit}`, so that overrides can set keys in it."""
    if not dataclasses.is_dataclass(cls) or not isinstance(raw, dict):
        return raw
    hints = typing.get_type_hints(cls)
    full = {}
    for key, value in raw.items():
        shorthand = _shorthand(hints.get(key), value)
        full[key] = {shorthand: value} if shorthand else _sections_in_full(hints.get(key), value)
    return full


def _shorthand(hint: Any, value: Any) -> str | None:
    """The key a string given for a whole section stands for (ModelConfig.SHORTHAND), if it does."""
    return getattr(hint, "SHORTHAND", None) if isinstance(value, str) else None


def _hint_at(cls: Any, parts: list[str]) -> Any:
    for part in parts:
        if not dataclasses.is_dataclass(cls):
            return None
        cls = typing.get_type_hints(cls).get(part)
    return cls


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _convert(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        shorthand = _shorthand(hint, value)
        return build(hint, {shorthand: value} if shorthand else value if value is not None else {}, f"{key}.")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for alternative in inner[:-1]:
            try:
                return _convert(value, alternative, key)
            except VeraError:
                pass
        return _convert(value, inner[-1], key)
    if origin is Literal:
        value = RENAMED_VALUES.get(value, value) if isinstance(value, str) else value
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint_text = f" (did you mean {close[0]}?)" if close else ""
            raise VeraError(f"{key} must be one of {', '.join(map(str, args))}; got {shown(value)}{hint_text}")
        return value
    if origin is list:
        if isinstance(value, str):
            # "4,16,64" or "cat bird" from the command line: each item read as YAML keeps its type.
            value = [safe_load(v, key) for v in value.replace(",", " ").split()]
        if not isinstance(value, list):
            raise VeraError(f"{key} must be a list of {args[0].__name__}, got {shown(value)}")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        # YAML reads "1e-3" (no dot) as a string; accept it as the number it plainly is.
        try:
            value = float(value)
        except (ValueError, OverflowError):
            pass
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise VeraError(f"{key} must be {_type_name(hint)}, got {shown(value)} ({type(value).__name__})")
    if hint is float and not math.isfinite(value):
        raise VeraError(f"{key} must be a finite number, got {value}")
    if hint is str:
        _require_utf8(value, key)
        # An empty name, path or class would silently mean the current folder, or nothing at all.
        _require(bool(value.strip()), f"{key} is empty ({value!r}): give a value, or leave the key out for its default")
    return value


def _require_utf8(value: str, key: str) -> None:
    # Bytes that are not UTF-8 (in a file name) arrive as surrogates, which no run file could record.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise VeraError(f"{key} is not valid UTF-8 ({shown(value)}): use a name made of UTF-8 characters") from None


def shown(value: Any) -> str:
    """A value for an error message: short however large or deeply shared the value is."""
    return _SHORT.repr(value)


def _type_name(hint: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def _deep_copy(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in raw.items()}
