"""What a model is built from: its name and settings.

Free of torch, like the adapters package's config, so that reading a config (and with it
`vera runs` and shell completion) stays cheap; the layers live in convnet.py and vit.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from vera_cli.errors import VeraError

IMAGE_SIZE = 32


@dataclass
class ViTConfig:
    patch_size: int = 4
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 2
    dropout: float = 0.0


@dataclass
class ModelConfig:
    name: Literal["convnet", "vit"] = "convnet"
    vit: ViTConfig = field(default_factory=ViTConfig)
    # How a test image is classified: alone, or by the mean of its and its mirror image's logits. Kept with
    # the base run, so that every later command measures the base and its adapters the same way; "none"
    # here because runs recorded before the key were measured on the images alone.
    tta: Literal["none", "flip"] = "none"
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


def vit_parameters(vit: ViTConfig, num_classes: int = 10) -> int:
    """A ViT's parameter count from its settings alone (nothing is built): models.vit, layer by layer."""
    dim, hidden, tokens = vit.dim, vit.mlp_ratio * vit.dim, (IMAGE_SIZE // vit.patch_size) ** 2
    embed = 3 * vit.patch_size ** 2 * dim + dim + tokens * dim
    block = 2 * dim + 4 * (dim * dim + dim) + 2 * dim + (dim * hidden + hidden) + (hidden * dim + dim)
    return embed + vit.depth * block + 2 * dim + dim * num_classes + num_classes

