"""`vera export --format peft`: an adapter directory that Hugging Face PEFT loads as it is.

What maps to what (PEFT 0.13+ key layout):
- VeRA: `<layer>.vera_d` -> `base_model.model.<layer>.vera_lambda_d`, `vera_b` -> `vera_lambda_b`;
  the one sliced projection pair -> `base_model.vera_A` / `base_model.vera_B`, always stored
  (`save_projection: true`) so that loading never depends on regenerating them.
- LoRA: `<layer>.lora_A` -> `base_model.model.<layer>.lora_A.weight`, `lora_B` -> `lora_B.weight`,
  for nn.Linear and nn.Conv2d alike (our conv factors have PEFT's shapes: A (r, in, kh, kw),
  B (out, r, 1, 1)).
PEFT's VeRA takes nn.Linear layers only, so a VeRA adapter on convolutions is refused;
`export_merged` writes any adapter folded into a plain model instead.
This module writes plain JSON and safetensors; it does not need peft installed.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from vera_cli import config as config_module
from vera_cli.adapter_files import apply_adapter, read_adapter_meta
from vera_cli.adapters.inject import adapted_layers, merged_plain, projection_bank
from vera_cli.adapters.layer import AdaptedLayer
from vera_cli.bases import adapter_base, fingerprint, load_pretrained
from vera_cli.config import AdapterConfig
from vera_cli.data import MEAN, STD
from vera_cli.errors import VeraError
from vera_cli.models import ModelConfig
from vera_cli.runs import open_run, publish, staged_dir
from vera_cli.files import blocking_file, write_bytes_atomic, write_tensors

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PLAIN_WEIGHTS = "model.safetensors"
PREPROCESSING = "preprocessing.json"


@dataclass
class Exported:
    files: dict[str, int]  # path -> bytes


def _check_representable(spec: AdapterConfig) -> None:
    if spec.method not in ("vera", "lora"):
        raise VeraError(f"a {spec.method} run is not an adapter PEFT can load; export a vera or lora adapt run")
    if spec.method == "vera" and spec.sharing != "sliced":
        raise VeraError("PEFT's VeRA shares one sliced projection pair; this adapter uses per-shape pairs: "
                        "re-run adapt with --sharing sliced to export it")
    if spec.trainable:
        raise VeraError(f"adapter.trainable ({', '.join(spec.trainable)}) has no PEFT export here; "
                        "re-run adapt without it to export")
    if spec.train_head:
        raise VeraError("adapter.train_head (the head as modules_to_save) has no PEFT export here; "
                        "re-run adapt without it to export")


def _check_layers(spec: AdapterConfig, layers: dict[str, AdaptedLayer]) -> None:
    convs = {name: layer.base for name, layer in layers.items() if isinstance(layer.base, nn.Conv2d)}
    if spec.method == "vera" and convs:
        raise VeraError(f"PEFT's VeRA adapts Linear layers only and this adapter also adapts {', '.join(convs)}: "
                        "export it folded into the plain model with --merge instead")
    dilated = [name for name, conv in convs.items() if conv.dilation != (1, 1)]
    if dilated:
        raise VeraError(f"PEFT's LoRA ignores the dilation of {', '.join(dilated)}, so it would compute another "
                        "function: export it folded into the plain model with --merge instead")


def peft_config(spec: AdapterConfig, targets: list[str]) -> dict:
    common = {"base_model_name_or_path": None, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
              "layers_pattern": None, "layers_to_transform": None, "modules_to_save": None, "revision": None,
              "target_modules": targets, "task_type": None, "r": spec.rank}
    if spec.method == "vera":
        return {**common, "peft_type": "VERA", "projection_prng_key": spec.projection_seed, "save_projection": True,
                "vera_dropout": spec.dropout, "d_initial": spec.d_init, "init_weights": True}
    return {**common, "peft_type": "LORA", "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
            "init_lora_weights": True, "use_rslora": False, "use_dora": False}


def _check_destinations(out: str, base_out: str | None = None) -> None:
    for folder in filter(None, (out, base_out)):
        path = Path(folder)
        if path.exists() and not path.is_dir():
            raise VeraError(f"{path} is a file: --out and --base-out name folders to create")
        if path.exists() and any(path.iterdir()):
            raise VeraError(f"{path} already exists and is not empty: choose another folder")
        blocking = blocking_file(path)
        if blocking is not None:
            raise VeraError(f"{path} cannot be made: {blocking} is a file; choose another folder")
    if base_out:
        # Each folder is written whole under a temporary name and renamed into place: the outer one would no
        # longer be new once the inner one is in it.
        outer, inner = sorted((Path(out).resolve(), Path(base_out).resolve()), key=lambda path: len(path.parts))
        if outer in inner.parents:
            raise VeraError(f"--out {out} and --base-out {base_out} lie one inside the other: name two separate "
                            "folders, or the same one for all the files")


@dataclass
class Adapted:
    """An adapt run on the CPU: its adapter config, its base's architecture and weights, and the base
    with the adapter applied."""

    spec: AdapterConfig
    architecture: ModelConfig
    base_state: dict[str, torch.Tensor]
    model: nn.Module


def _adapted_model(run_path: str) -> Adapted:
    run = open_run(run_path, ("adapt",))
    meta = read_adapter_meta(run.path)
    spec = config_module.build(AdapterConfig, meta["adapter"])
    model, base_cfg = load_pretrained(adapter_base(run.path, meta), torch.device("cpu"))
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_adapter(model, run.path, fingerprint(model))
    return Adapted(spec, base_cfg.model, base_state, model)


@contextlib.contextmanager
def _all_or_nothing(*folders: str | None) -> Iterator[dict[Path, Path]]:
    """Temporary folders to write each destination into, renamed into place only once all are written."""
    named = [Path(folder) for folder in folders if folder]
    # One folder named two ways (x, ./x/, its absolute path) is one destination.
    places: dict[Path, Path] = {}
    for folder in named:
        places.setdefault(folder.resolve(), folder)
    with contextlib.ExitStack() as stack:
        staged = {place: stack.enter_context(staged_dir(folder)) for place, folder in places.items()}
        yield {folder: staged[folder.resolve()] for folder in named}
        published: list[tuple[Path, Path]] = []
        try:
            for place, staging in staged.items():
                folder = places[place]
                if not publish(staging, folder):
                    raise VeraError(f"{folder} appeared while exporting: choose another folder")
                published.append((folder, staging))
        except BaseException:
            # A later folder taken meanwhile, or Ctrl-C between the renames: the earlier ones go back to
            # their temporary names, which the staging removes.
            for folder, staging in published:
                os.rename(folder, staging)
            raise


def _write_preprocessing(folder: Path, architecture: ModelConfig) -> dict[str, int]:
    """How to prepare an input and read the logits as vera measured them: without it, a user's numbers
    (from the plain model or through PEFT) would differ from `vera eval`'s."""
    preprocessing = json.dumps({
        "input": "RGB images as uint8 (N, 3, 32, 32), channel-major like the CIFAR-10 python release",
        "scale": "divide by 255", "mean": list(MEAN), "std": list(STD),
        "normalised": "(x / 255 - mean[c]) / std[c] per channel c",
        "test_time": {"none": "the logits of the image alone",
                      "flip": "the mean of the logits of the image and of its mirror image x.flip(-1)"}[architecture.tta]},
        indent=2).encode()
    write_bytes_atomic(folder / PREPROCESSING, preprocessing)
    return {PREPROCESSING: len(preprocessing)}


def _write_plain(folder: Path, state: dict[str, torch.Tensor], architecture: ModelConfig) -> dict[str, int]:
    """A plain model anyone can load with torch alone: its weights, its architecture
    (`ViT(ViTConfig(**vit))` or `ConvNet()`) and how to prepare its input."""
    files = {PLAIN_WEIGHTS: write_tensors(folder / PLAIN_WEIGHTS, state), **_write_preprocessing(folder, architecture)}
    described = config_module.to_dict(architecture)
    if architecture.name != "vit":
        # The ViT's settings would read as part of a ConvNet that has none.
        del described["vit"]
    model_json = json.dumps(described, indent=2).encode()
    write_bytes_atomic(folder / "model.json", model_json)
    files["model.json"] = len(model_json)
    return files


def export_peft(run_path: str, out: str, base_out: str | None = None) -> Exported:
    _check_destinations(out, base_out)
    adapted = _adapted_model(run_path)
    spec, model = adapted.spec, adapted.model
    _check_representable(spec)
    layers = adapted_layers(model)
    _check_layers(spec, layers)

    tensors = {}
    for name, layer in layers.items():
        prefix = f"base_model.model.{name}"
        if spec.method == "vera":
            tensors[f"{prefix}.vera_lambda_d"] = layer.vera_d
            tensors[f"{prefix}.vera_lambda_b"] = layer.vera_b
        else:
            tensors[f"{prefix}.lora_A.weight"] = layer.lora_A
            tensors[f"{prefix}.lora_B.weight"] = layer.lora_B
    bank = projection_bank(model)
    if bank is not None:
        tensors["base_model.vera_A"], tensors["base_model.vera_B"] = bank.pair("shared")

    out_dir = Path(out)
    with _all_or_nothing(out, base_out) as staged:
        files = {str(out_dir / PEFT_WEIGHTS): write_tensors(staged[out_dir] / PEFT_WEIGHTS, tensors)}
        config_bytes = json.dumps(peft_config(spec, list(layers)), indent=2).encode()
        write_bytes_atomic(staged[out_dir] / PEFT_CONFIG, config_bytes)
        files[str(out_dir / PEFT_CONFIG)] = len(config_bytes)
        # PEFT reads only its two files; this one tells a user of the adapter alone how its accuracy was measured.
        files.update({str(out_dir / name): size for name, size in _write_preprocessing(staged[out_dir], adapted.architecture).items()})
        if base_out:
            written = _write_plain(staged[Path(base_out)], adapted.base_state, adapted.architecture)
            files.update({str(Path(base_out) / name): size for name, size in written.items()})
    return Exported(files)


def export_merged(run_path: str, out: str) -> Exported:
    """Any adapter (VeRA or LoRA, linear or conv targets) folded into the base: the plain model's
    own architecture, loadable with `load_state_dict` and no vera-cli or PEFT."""
    _check_destinations(out)
    adapted = _adapted_model(run_path)
    with _all_or_nothing(out) as staged:
        written = _write_plain(staged[Path(out)], merged_plain(adapted.model).state_dict(), adapted.architecture)
    return Exported({str(Path(out) / name): size for name, size in written.items()})
