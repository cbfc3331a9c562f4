"""The models by name: the write-up's ConvNet (the default) and a small Vision Transformer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Literal

from torch import nn

from vera_cli.errors import VeraError
from vera_cli.models.convnet import ConvNet
from vera_cli.models.vit import ViT, ViTConfig

IMAGE_SIZE = 32


@dataclass
class ModelConfig:
    name: Literal["convnet", "vit"] = "convnet"
    vit: ViTConfig = field(default_factory=ViTConfig)
    # `model: vit` means `model: {name: vit}`: configs written before the section existed still load.
    SHORTHAND: ClassVar[str] = "name"

    def __post_init__(self) -> None:
        vit = self.vit
        checks = [
            (vit.patch_size >= 1 and IMAGE_SIZE % vit.patch_size == 0,
             f"model.vit.patch_size must divide the image size {IMAGE_SIZE}, got {vit.patch_size}"),
            (vit.heads >= 1 and vit.dim >= 1 and vit.dim % vit.heads == 0,
             f"model.vit.dim ({vit.dim}) must be a positive multiple of model.vit.heads ({vit.heads})"),
            (vit.depth >= 1, f"model.vit.depth must be at least 1, got {vit.depth}"),
            (vit.mlp_ratio >= 1, f"model.vit.mlp_ratio must be at least 1, got {vit.mlp_ratio}"),
            (0 <= vit.dropout < 1, f"model.vit.dropout must be in [0, 1), got {vit.dropout}"),
        ]
        for ok, message in checks:
            if not ok:
                raise VeraError(message)


MODELS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "convnet": lambda cfg: ConvNet(),
    "vit": lambda cfg: ViT(cfg.vit, image_size=IMAGE_SIZE),
}


def build_model(cfg: ModelConfig | str) -> nn.Module:
    """The model `cfg` describes; a bare name builds that model with its default settings."""
    name = cfg.name if isinstance(cfg, ModelConfig) else cfg
    if name not in MODELS:
        raise VeraError(f"unknown model {name!r}: choose from {', '.join(MODELS)}")
    return MODELS[name](cfg if isinstance(cfg, ModelConfig) else ModelConfig(name))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["MODELS", "ConvNet", "ModelConfig", "ViT", "ViTConfig", "build_model", "count_parameters"]
