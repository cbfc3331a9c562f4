"""Gather, crop, flip and normalise a batch of uint8 images in one pass (augment.c)."""

from __future__ import annotations

import ctypes

import torch

from vera_cli.kernels.build import library


def supports(images: torch.Tensor) -> bool:
    """Whether augment.c can read these images: uint8 (N, C, H, W) on the CPU, contiguous."""
    return (images.device.type == "cpu" and images.dtype == torch.uint8 and images.dim() == 4
            and images.is_contiguous() and library() is not None)


def _address(t: torch.Tensor | None) -> ctypes.c_void_p | None:
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def augment(images: torch.Tensor, index: torch.Tensor, padding: int, offsets: tuple[torch.Tensor, torch.Tensor] | None,
            flips: torch.Tensor | None, table: torch.Tensor) -> torch.Tensor:
    """table[c][flip(crop(images[index]))] as float32 (B, C, H, W); check `supports` first.

    offsets: each image's crop rows and columns in [0, 2 * padding], or None; flips: bool per image, or None.
    """
    # Every tensor whose address is passed is held in a name until the call returns.
    index = index.to(torch.int64).contiguous()
    if index.numel() and not 0 <= int(index.min()) <= int(index.max()) < images.shape[0]:
        raise IndexError(f"image index out of range for {images.shape[0]} images")
    rows, cols = (None, None) if offsets is None else (o.to(torch.int64).contiguous() for o in offsets)
    flips = None if flips is None else flips.to(torch.bool).contiguous()
    table = table.to(torch.float32).contiguous()
    batch, (_, channels, height, width) = index.shape[0], images.shape
    out = torch.empty(batch, channels, height, width)
    library().vc_augment(batch, torch.get_num_threads(), channels, height, width, padding, _address(images),
                         _address(index), _address(rows), _address(cols), _address(flips), _address(table),
                         _address(out))
    return out
