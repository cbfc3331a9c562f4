"""A small Vision Transformer for 32x32 images: the whole model in one file.

image (B,3,32,32) -> embed: Conv2d(kernel = stride = patch) + learned position -> (B, N, dim)
  -> depth x pre-norm Block: x + attn(norm1(x)), x + mlp(norm2(x))
  -> norm -> mean over the N patch tokens -> head: Linear(dim, classes)

Attention has separate `query`, `key`, `value` and `out` Linear layers (no fused qkv)
so that adapters can target the VeRA paper's query|value by name, as PEFT does on ViT.
The sequence is pooled by its mean, not a CLS token: small ViTs trained from scratch
do as well or better that way (Beyer et al. 2022, "Better plain ViT baselines"), the
sequence stays N = 64 long for patch 4, and there is nothing to learn for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vera_cli.models.config import ViTConfig


class PatchEmbedding(nn.Module):
    def __init__(self, cfg: ViTConfig, image_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.position = nn.Parameter(torch.zeros(1, (image_size // cfg.patch_size) ** 2, cfg.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Token-major memory: the transposed view would carry the convolution's channel-major layout through
        # every residual addition, and each layer norm would copy it (the step ran 5 % slower in fp32, 12 % in bf16).
        return self.proj(x).flatten(2).transpose(1, 2).contiguous() + self.position


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.dropout = cfg.dropout
        self.query = nn.Linear(cfg.dim, cfg.dim)
        self.key = nn.Linear(cfg.dim, cfg.dim)
        self.value = nn.Linear(cfg.dim, cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = (proj(x).view(batch, tokens, self.heads, dim // self.heads).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(batch, tokens, dim))


class MLP(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim)
        self.fc2 = nn.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """`features` is everything up to the pooled vector and `classifier` the head, as in the
    ConvNet, so head-only adaptation can run the frozen body once and cache its output."""

    classifier_name = "head"

    def __init__(self, cfg: ViTConfig | None = None, num_classes: int = 10, image_size: int = 32) -> None:
        super().__init__()
        cfg = cfg or ViTConfig()
        self.embed = PatchEmbedding(cfg, image_size)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, num_classes)
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.embed.position, std=0.02)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.through_blocks(self.tokens(x))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The patch tokens with their positions, as the first block reads them."""
        return self.drop(self.embed(x))

    def through_blocks(self, x: torch.Tensor, first: int = 0) -> torch.Tensor:
        """The pooled vector from the tokens entering block `first` (adaptation caches what comes before it)."""
        for block in self.blocks[first:]:
            x = block(x)
        return self.norm(x).mean(dim=1)

    def classifier(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    def feature_modules(self) -> list[nn.Module]:
        return [self.embed, self.blocks, self.norm]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _init_weights(module: nn.Module) -> None:
    # The usual ViT initialisation (timm, nanoGPT): small normal weights, zero biases.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
