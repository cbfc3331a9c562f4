"""Gather, crop, flip and normalise a batch of uint8 images in one pass (augment.c)."""

from __future__ import annotations

import torch

from vera_cli.data import augmented as plain_augmented, channel_stats
from vera_cli.fast.build import address, call, library


def augmented(images: torch.Tensor, index: torch.Tensor, padding: int = 0,
              offsets: tuple[torch.Tensor, torch.Tensor] | None = None, flips: torch.Tensor | None = None) -> torch.Tensor:
    """`vera_cli.data.augmented`, as one compiled pass where it can run: the same floats as torch's operators,
    which made a quarter of a training step at batch 512."""
    if supports(images, padding):
        return augment(images, index, padding, offsets, flips, *channel_stats(images.device))
    return plain_augmented(images, index, padding, offsets, flips)


def supports(images: torch.Tensor, padding: int) -> bool:
    """Whether augment.c can read these images: uint8 (N, C, H, 32) on the CPU, contiguous, cropped by at most 32."""
    return (images.device.type == "cpu" and images.dtype == torch.uint8 and images.dim() == 4
            and images.is_contiguous() and images.shape[3] == 32 and padding <= 32 and library() is not None)



def augment(images: torch.Tensor, index: torch.Tensor, padding: int, offsets: tuple[torch.Tensor, torch.Tensor] | None,
            flips: torch.Tensor | None, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(flip(crop(images[index])) - mean[c]) / std[c] as float32 (B, C, H, W); check `supports` first.

    offsets: each image's crop rows and columns in [0, 2 * padding], or None; flips: bool per image, or None;
    mean and std: one float per channel.
    """
    # Every tensor whose address is passed is held in a name until the call returns. The C code trusts every
    # length and range, so they are checked here.
    index = index.to(torch.int64).flatten().contiguous()
    count, channels = index.numel(), images.shape[1]
    if count and not 0 <= int(index.min()) <= int(index.max()) < images.shape[0]:
        raise IndexError(f"image index out of range for {images.shape[0]} images")
    rows, cols = (None, None) if offsets is None else (o.to(torch.int64).flatten().contiguous() for o in offsets)
    flips = None if flips is None else flips.to(torch.bool).flatten().contiguous()
    mean, std = (t.to(torch.float32).flatten().contiguous() for t in (mean, std))
    if any(t is not None and t.numel() != count for t in (rows, cols, flips)):
        raise ValueError(f"crop offsets and flips need one value per image ({count})")
    if mean.numel() != channels or std.numel() != channels:
        raise ValueError(f"mean and std need one value per channel ({channels})")
    if rows is not None and count and not (0 <= min(int(rows.min()), int(cols.min()))
                                           and max(int(rows.max()), int(cols.max())) <= 2 * padding):
        raise ValueError(f"crop offsets must lie in [0, {2 * padding}]")
    height, width = images.shape[2:]
    out = torch.empty(count, channels, height, width)
    if call("vc_augment", count, torch.get_num_threads(), channels, height, width, padding, address(images),
            address(index), address(rows), address(cols), address(flips), address(mean),
            address(std), address(out)):
        raise ValueError(f"augment.c takes images 32 pixels wide and crops of up to 32 pixels, not {width} and {padding}")
    return out
