"""The models by name: the write-up's ConvNet (the default) and a small Vision Transformer.

Importing this package does not import torch: the configs come from `config.py`, and the
model classes load when first built or asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from vera_cli.errors import VeraError
from vera_cli.models.config import IMAGE_SIZE, ModelConfig, ViTConfig

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
    """The model `cfg` describes; a bare name builds that model with its default settings."""
    name = cfg.name if isinstance(cfg, ModelConfig) else cfg
    if name not in MODELS:
        raise VeraError(f"unknown model {name!r}: choose from {', '.join(MODELS)}")
    return MODELS[name](cfg if isinstance(cfg, ModelConfig) else ModelConfig(name))


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


__all__ = ["IMAGE_SIZE", "MODELS", "ConvNet", "ModelConfig", "ViT", "ViTConfig", "build_model", "count_parameters"]
