"""The ConvNet's convolutional prefix, fast: the compiled kernel where it runs, else lane-padded
channels-last convolutions; the same function as `ConvNet.features` to float rounding."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vera_cli.fast.convnet_features import features as fused_features, supports as fused_supports
from vera_cli.models.convnet import ConvNet, conv_pool_relu

# A 256-bit vector holds 8 float32s: oneDNN's convolution kernels and the channels-last pool vectorise over
# channels, and conv1's 6 leave a quarter of each vector empty. conv1 runs with 2 zero filters appended, whose
# outputs stay 0 through pool and ReLU, and conv2 reads them through 2 zero input channels: the same function
# and gradients (the padding's gradient is dropped), about 10 % more images/s in a training step on AVX2.
LANES = 8


def features(model: ConvNet, x: torch.Tensor) -> torch.Tensor:
    called = _modules_called(model)
    if not called and fused_supports(x, model.conv1, model.conv2):
        return fused_features(x, model.conv1, model.conv2)
    # oneDNN's convolutions run 10-40 % faster on channels-last input (measured on 2 CPU cores).
    x = x.contiguous(memory_format=torch.channels_last)
    padded = not called and x.device.type == "cpu"
    conv1, conv2 = _lane_padded(model.conv1, model.conv2) if padded else (model.conv1, model.conv2)
    return torch.flatten(conv_pool_relu(conv_pool_relu(x, conv1), conv2), 1)


def _modules_called(model: ConvNet) -> bool:
    # An adapter wraps a convolution in its own forward, and a hook (pruning, weight norm) expects the module
    # to be called: those run as they are.
    return any(type(conv) is not nn.Conv2d or conv._forward_pre_hooks or conv._forward_hooks
               for conv in (model.conv1, model.conv2))


def _lane_padded(conv1: nn.Conv2d, conv2: nn.Conv2d) -> tuple[Callable, Callable]:
    extra = -conv1.out_channels % LANES
    weight1 = F.pad(conv1.weight, (0, 0, 0, 0, 0, 0, 0, extra)).contiguous(memory_format=torch.channels_last)
    bias1 = F.pad(conv1.bias, (0, extra))
    weight2 = F.pad(conv2.weight, (0, 0, 0, 0, 0, extra)).contiguous(memory_format=torch.channels_last)
    return (lambda x: F.conv2d(x, weight1, bias1)), (lambda x: F.conv2d(x, weight2, conv2.bias))
