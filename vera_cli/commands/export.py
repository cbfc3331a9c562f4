"""`vera export --format peft`: an adapter directory that Hugging Face PEFT loads as it is.

What maps to what (PEFT 0.13+ key layout):
- VeRA: `<layer>.vera_d` -> `base_model.model.<layer>.vera_lambda_d`, `vera_b` -> `vera_lambda_b`;
  the one sliced projection pair -> `base_model.vera_A` / `base_model.vera_B`, always stored
  (`save_projection: true`) so that loading never depends on regenerating them.
- LoRA: `<layer>.lora_A` -> `base_model.model.<layer>.lora_A.weight`, `lora_B` -> `lora_B.weight`.
This module writes plain JSON and safetensors; it does not need peft installed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from vera_cli import config as config_module
from vera_cli.adapters.files import apply_adapter, read_adapter_meta
from vera_cli.adapters.inject import adapted_layers, projection_bank
from vera_cli.bases import fingerprint, load_pretrained
from vera_cli.config import AdapterConfig
from vera_cli.data import MEAN, STD
from vera_cli.errors import VeraError
from vera_cli.runs import open_run, write_bytes_atomic, write_tensors

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


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


def peft_config(spec: AdapterConfig, targets: list[str]) -> dict:
    common = {"base_model_name_or_path": None, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
              "layers_pattern": None, "layers_to_transform": None, "modules_to_save": None, "revision": None,
              "target_modules": targets, "task_type": None, "r": spec.rank}
    if spec.method == "vera":
        return {**common, "peft_type": "VERA", "projection_prng_key": spec.projection_seed, "save_projection": True,
                "vera_dropout": spec.dropout, "d_initial": spec.d_init, "init_weights": True}
    return {**common, "peft_type": "LORA", "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
            "init_lora_weights": True, "use_rslora": False, "use_dora": False}


def export_peft(run_path: str, out: str, base_out: str | None = None) -> Exported:
    run = open_run(run_path, ("adapt",))
    meta = read_adapter_meta(run.path)
    spec = config_module.build(AdapterConfig, meta["adapter"])
    _check_representable(spec)
    destinations = [Path(out)] + ([Path(base_out)] if base_out else [])
    for folder in destinations:
        if folder.exists() and any(folder.iterdir()):
            raise VeraError(f"{folder} already exists and is not empty: choose another folder")
    base_run = open_run(meta["base_run"], ("pretrain",))
    model, _ = load_pretrained(base_run, torch.device("cpu"))
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_adapter(model, run.path, fingerprint(model))

    tensors = {}
    for name, layer in adapted_layers(model).items():
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

    files: dict[str, int] = {}
    out_dir = Path(out)
    files[str(out_dir / PEFT_WEIGHTS)] = write_tensors(out_dir / PEFT_WEIGHTS, tensors)
    config_bytes = json.dumps(peft_config(spec, list(adapted_layers(model))), indent=2).encode()
    write_bytes_atomic(out_dir / PEFT_CONFIG, config_bytes)
    files[str(out_dir / PEFT_CONFIG)] = len(config_bytes)
    if base_out:
        base_dir = Path(base_out)
        files[str(base_dir / "model.safetensors")] = write_tensors(base_dir / "model.safetensors", base_state)
        preprocessing = json.dumps({
            "input": "RGB images as uint8 (N, 3, 32, 32), channel-major like the CIFAR-10 python release",
            "scale": "divide by 255", "mean": list(MEAN), "std": list(STD),
            "normalised": "(x / 255 - mean[c]) / std[c] per channel c"}, indent=2).encode()
        write_bytes_atomic(base_dir / "preprocessing.json", preprocessing)
        files[str(base_dir / "preprocessing.json")] = len(preprocessing)
    return Exported(files)
