"""The models by name: the write-up's ConvNet (the default) and a small Vision Transformer.

Importing this package does not import torch: the configs come from `config.py`, and the
model classes load when first built or asked for.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable

from vera_cli.errors import VeraError
from vera_cli.models.config import IMAGE_SIZE, ModelConfig, ViTConfig, vit_parameters

if TYPE_CHECKING:
    from torch import nn


def _convnet(cfg: ModelConfig) -> "nn.Module":
    from vera_cli.models.convnet import ConvNet

    return ConvNet()


def _vit(cfg: ModelConfig) -> "nn.Module":
    from vera_cli.models.vit import ViT

    return ViT(cfg.vit, image_size=IMAGE_SIZE)


MODELS: dict[str, Callable[[ModelConfig], "nn.Module"]] = {"convnet": _convnet, "vit": _vit}


def build_model(cfg: ModelConfig | str) -> nn.Module:
    """The model `cfg` describes; a bare name builds that model with its default settings. One whose weights
    alone would not fit in this machine's memory is refused before any is allocated."""
    name = cfg.name if isinstance(cfg, ModelConfig) else cfg
    if name not in MODELS:
        raise VeraError(f"unknown model {name!r}: choose from {', '.join(MODELS)}")
    cfg = cfg if isinstance(cfg, ModelConfig) else ModelConfig(name)
    require_memory(cfg, physical_memory())
    return MODELS[name](cfg)


# float32 weights; training adds as much again for the gradients and twice that for AdamW's two moments.
WEIGHT_BYTES = 4
TRAINING_BYTES = 16


def require_memory(cfg: ModelConfig, memory: int | None, bytes_per_parameter: int = WEIGHT_BYTES,
                   what: str = "its weights alone") -> None:
    """Refuse a model whose parameters need more than `memory` bytes (None: unknown, nothing refused).
    Only the ViT's size is a setting; the ConvNet is small and fixed."""
    if cfg.name != "vit" or memory is None:
        return
    count = vit_parameters(cfg.vit)
    needed = count * bytes_per_parameter
    if needed > memory:
        vit = cfg.vit
        raise VeraError(f"model.vit (dim {_amount(vit.dim)}, depth {_amount(vit.depth)}, mlp_ratio "
                        f"{_amount(vit.mlp_ratio)}) has {_amount(count)} parameters: {_gigabytes(needed)} for {what}, "
                        f"more than the {_gigabytes(memory)} of memory here; choose a smaller model.vit.dim or "
                        "model.vit.depth")


def _amount(value: int) -> str:
    """A count as digits, or as a power of ten where it has too many to read."""
    return f"{value:,}" if value < 10**15 else f"about 10^{len(str(value)) - 1}"


def _gigabytes(size: int) -> str:
    return f"{size / 1e9:,.1f} GB" if size < 10**24 else f"about 10^{len(str(size)) - 10} GB"


def physical_memory() -> int | None:
    """This machine's memory in bytes; None where the system does not say (Windows)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def __getattr__(name: str):
    # The model classes import torch: loaded on first use, not with the package.
    if name == "ConvNet":
        from vera_cli.models.convnet import ConvNet

        return ConvNet
    if name == "ViT":
        from vera_cli.models.vit import ViT

        return ViT
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["IMAGE_SIZE", "MODELS", "TRAINING_BYTES", "WEIGHT_BYTES", "ConvNet", "ModelConfig", "ViT", "ViTConfig",
           "build_model", "count_parameters", "physical_memory", "require_memory", "vit_parameters"]
