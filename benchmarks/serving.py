#!/usr/bin/env python3
"""Many adapters over one base: mixed-adapter batches against one merged model per adapter.

    python benchmarks/serving.py [--adapters 1 8 64 512] [--calls 20] [--batch 256]

For N adapters over one base and batches whose samples each use an adapter drawn at random
(the same draws for every setup), side by side on the ConvNet and on the ViT of pretrain-vit:
  - VeRA mixed: N VeRA adapters (one projection bank) in one model, `forward_mixed`;
  - LoRA mixed, ours: N LoRA adapters in one model, `forward_mixed`;
  - LoRA mixed, PEFT: the same LoRA weights in a PeftModel, its `adapter_names=`;
  - merged per adapter: N merged weight sets of the VeRA adapters, the base's adapted layers switched
    to each sample group's set before running that group;
  - VeRA, one adapter: the reference for the mixed batch's cost (every sample on one adapter).
Each setup is built, checked against VeRA mixed (or our LoRA, for PEFT's) and timed in turn:
images/s (median over the calls) and peak memory (the resident set's growth while the setup is built
and run; Linux only, else None), and the bytes on disk of N adapter files of each method.
`benchmarks/run.py` calls `serving` as one of its measurements.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import gc
import json
import time
from pathlib import Path
from statistics import median
from typing import Callable

import torch
from torch import nn

from vera_cli import config, fast
from vera_cli.adapters.config import AdapterConfig
from vera_cli.adapters.inject import adapted_layers, merged_plain
from vera_cli.adapters.mixed import forward_mixed
from vera_cli.adapters.named import add_adapter, adapter_names, set_adapter
from vera_cli.adapters.registry import named_tensors
from vera_cli.allocator import keep_freed_memory
from vera_cli.config import PretrainConfig
from vera_cli.models import ConvNet, build_model
from vera_cli.param_count import count_params, with_storage

# The method each model is measured with: the ConvNet's linear layers, the ViT's query and value (the VeRA paper's).
# On the ViT, r256 exceeds the width (128): a mixed batch's factored products then cost 2 r / width = 4 times a
# layer's own product per token, where one adapter merged costs nothing more; its r32 shows the cost at a rank
# below the width (measured at the largest N only).
MODELS = {
    "convnet": {"targets": ["linear"], "vera_rank": 32, "lora_rank": 8},
    "vit": {"targets": ["attention"], "vera_rank": 256, "lora_rank": 8, "vera_low_rank": 32},
}


def base_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return (ConvNet() if name == "convnet" else build_model(config.load(PretrainConfig, "pretrain-vit", {}).model)).eval()


def with_adapters(base: nn.Module, count: int, spec: AdapterConfig, seed: int = 0) -> nn.Module:
    """`count` adapters of `spec` on a copy of `base`, each with its own random values (as trained ones would)."""
    model = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed)
    for index in range(count):
        add_adapter(model, f"a{index}", spec)
        with torch.no_grad():
            for tensor in named_tensors(model, f"a{index}").values():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)
    return model


def _status_kib(field: str) -> int | None:
    try:
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1])


def peak_growth_mb(run: Callable[[], object], device: torch.device = torch.device("cpu")) -> tuple[object, float | None]:
    """`run()` and how far memory grew above its level before the call, at its peak: on a GPU its allocator's
    peak; else the resident set (Linux: the kernel's high-water mark, reset through /proc/self/clear_refs)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = run()
        return result, (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so that the level before is the true one
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return run(), None
    before = _status_kib("VmRSS")
    result = run()
    peak = _status_kib("VmHWM")
    return result, None if before is None or peak is None else (peak - before) / 1024


def _timed(call: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], inputs: torch.Tensor,
           draws: list[torch.Tensor]) -> float:
    """Images per second: the median over one call per draw, after one untimed call."""
    return _timed_together({"one": (call, draws)}, inputs)["one"]


def _timed_together(setups: dict[str, tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], list[torch.Tensor]]],
                    inputs: torch.Tensor) -> dict[str, float]:
    """Images per second of each setup, the median over one call per draw, the setups' calls taken in turn: a ratio
    of two of them is then measured under the same changes of the machine's speed (timed one after the other, the
    same one-adapter work read 66,709 and 82,943 images/s on two runs)."""
    synchronize = torch.cuda.synchronize if inputs.is_cuda else lambda: None
    seconds: dict[str, list[float]] = {name: [] for name in setups}
    with torch.no_grad():
        for call, draws in setups.values():
            call(inputs, draws[0])
        for turn in range(max(len(draws) for _, draws in setups.values())):
            for name, (call, draws) in setups.items():
                if turn < len(draws):
                    synchronize()
                    started = time.perf_counter()
                    call(inputs, draws[turn])
                    synchronize()
                    seconds[name].append(time.perf_counter() - started)
    return {name: len(inputs) / median(taken) for name, taken in seconds.items()}


def _mixed(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    forward = fast.forward(model)
    return lambda x, choice: forward_mixed(model, x, choice, forward)


def _peft_mixed(base: nn.Module, ours: nn.Module, spec: AdapterConfig) -> Callable:
    """The LoRA adapters of `ours` in a PeftModel; batches through its adapter_names hooks around the same fast
    forward of the base as ours (timing.product_forward's rule: the comparison measures the adapters alone)."""
    import peft

    names = adapter_names(ours)
    layers = adapted_layers(ours)
    lora = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(layers))
    model = peft.get_peft_model(copy.deepcopy(base), lora, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, lora)
    with torch.no_grad():
        for layer_name, layer in layers.items():
            target = model.base_model.model.get_submodule(layer_name)
            for name in names:
                target.lora_A[name].weight.copy_(layer.parts[name].tensor("lora_A"))
                target.lora_B[name].weight.copy_(layer.parts[name].tensor("lora_B"))
    model.eval()
    forward = fast.forward(model.get_base_model())

    def call(x: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        with model._enable_peft_forward_hooks(adapter_names=[names[i] for i in choice.tolist()]):
            return forward(x)

    return call


def _merged_per_adapter(vera: nn.Module) -> Callable:
    """One merged weight set per adapter; a batch runs group by group with the base's adapted layers switched."""
    names = adapter_names(vera)
    merged = {}
    for name in names:
        set_adapter(vera, name)
        merged[name] = {path: layer.parts[name].merged_weights(layer)[0].detach().clone()
                        for path, layer in adapted_layers(vera).items()}
    plain = merged_plain(copy.deepcopy(vera), names[0])
    layers = {path: plain.get_submodule(path) for path in merged[names[0]]}
    forward = fast.forward(plain)

    def call(x: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        out = None
        for index in torch.unique(choice).tolist():
            rows = (choice == index).nonzero().squeeze(1).to(x.device)
            for path, layer in layers.items():
                layer.weight.data = merged[names[index]][path]
            y = forward(x.index_select(0, rows))
            out = y.new_empty(len(x), *y.shape[1:]) if out is None else out
            out[rows] = y
        return out

    return call


def serving(adapter_counts: tuple[int, ...] = (1, 8, 64, 512), calls: int = 20, batch: int = 256,
            models: tuple[str, ...] = tuple(MODELS), device: torch.device = torch.device("cpu")) -> dict:
    # What lives before the measurement (torch, PEFT, transformers) stays: the collections before each setup's
    # memory is measured then walk only what the benchmark made.
    gc.freeze()
    try:
        return _serving(adapter_counts, calls, batch, models, device)
    finally:
        gc.unfreeze()


def _serving(adapter_counts: tuple[int, ...], calls: int, batch: int, models: tuple[str, ...],
             device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(batch, 3, 32, 32, generator=generator).to(device)
    result = {"batch": batch, "calls": calls, "models": {}}
    for model_name in models:
        settings = MODELS[model_name]
        base = base_model(model_name).to(device)
        vera_spec = AdapterConfig(method="vera", rank=settings["vera_rank"], sharing="sliced", targets=settings["targets"])
        lora_spec = AdapterConfig(method="lora", rank=settings["lora_rank"], targets=settings["targets"])
        rows: dict = {}
        for count in adapter_counts:
            draws = [torch.randint(0, count, (batch,), generator=generator) for _ in range(calls)]
            row: dict = {}

            def measure(name: str, build: Callable[[], tuple[Callable, object]],
                        reference: torch.Tensor | None = None) -> tuple[torch.Tensor, object, Callable]:
                """Build a setup and time it, its peak memory measured over both; returns its first output, what
                `build` made and the call."""
                def run():
                    call, made = build()
                    with torch.no_grad():
                        output = call(inputs, draws[0])
                    return output, made, call, _timed(call, inputs, draws)
                (output, made, call, rate), growth = peak_growth_mb(run, device)
                row[name] = {"images_per_second": rate, "peak_mb": growth}
                if reference is not None:
                    row[name]["max_difference"] = float((output - reference).abs().max())
                return output, made, call

            def mixed(spec: AdapterConfig, seed: int) -> tuple[Callable, nn.Module]:
                model = with_adapters(base, count, spec, seed)
                return _mixed(model), model

            vera_out, vera, _ = measure("vera mixed", lambda: mixed(vera_spec, 0))
            lora_out, lora, ours = measure("lora mixed", lambda: mixed(lora_spec, 1))
            try:
                _, _, peft_call = measure("peft lora mixed", lambda: (_peft_mixed(base, lora, lora_spec), None), lora_out)
                # Their ratio is a target: timed again in turn, so that both see the same machine.
                rates = _timed_together({"lora mixed": (ours, draws), "peft lora mixed": (peft_call, draws)}, inputs)
                for name, rate in rates.items():
                    row[name]["images_per_second"] = rate
                del peft_call
            except ImportError:
                pass
            measure("merged per adapter", lambda: (_merged_per_adapter(vera), None), vera_out)
            storage = with_storage(count_params(base, vera_spec), base, vera_spec, count, lora_spec.rank).storage
            row["disk_bytes"] = {entry.method: entry.total_bytes for entry in storage}
            rows[count] = row
            del vera, lora, ours
        # Timed last, on a warm process (timed first, the same work read 1,883 images/s against 22,916 in the N = 1
        # row), and the most adapters in turn with one, so that their ratio sees one machine.
        most = max(adapter_counts)
        draws = [torch.randint(0, most, (batch,), generator=generator) for _ in range(calls)]
        uniform = [torch.zeros(batch, dtype=torch.int64)] * calls

        def most_against_one(spec: AdapterConfig) -> dict:
            rates = _timed_together({"mixed": (_mixed(with_adapters(base, most, spec)), draws),
                                     "one": (_mixed(with_adapters(base, 1, spec)), uniform)}, inputs)
            return {"adapters": most, "vera mixed images/s": rates["mixed"], "vera images/s": rates["one"]}

        rows["single"] = most_against_one(vera_spec)
        if "vera_low_rank" in settings:
            rows["low rank"] = most_against_one(dataclasses.replace(vera_spec, rank=settings["vera_low_rank"]))
        result["models"][model_name] = {**settings, "rows": rows}
    return result


def main() -> None:
    keep_freed_memory()  # as the CLI does for every command
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 64, 512])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    print(json.dumps(serving(tuple(args.adapters), args.calls, args.batch), indent=2))


if __name__ == "__main__":
    main()
