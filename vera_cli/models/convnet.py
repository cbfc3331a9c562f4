"""The baseline ConvNet of the write-up."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vera_cli.kernels import convnet_features as fused


class ConvNet(nn.Module):
    """conv(3->6,5) pool conv(6->16,5) pool -> fc1 400->120 -> fc2 ->84 -> fc3 -> fc4 -> fc5 ->10.

    76,286 parameters. The write-up's unused conv3 is left out. `features` is the
    convolutional prefix and `classifier` the fully connected part, so that a
    frozen prefix can be run once and its output cached.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 84)
        self.fc4 = nn.Linear(84, 84)
        self.fc5 = nn.Linear(84, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if not self._modules_called() and fused.supports(x, self.conv1, self.conv2):
            return fused.features(x, self.conv1, self.conv2)
        # oneDNN's convolutions run 10-40 % faster on channels-last input (measured on 2 CPU cores).
        x = x.contiguous(memory_format=torch.channels_last)
        plain = not self._modules_called() and x.device.type == "cpu"
        conv1, conv2 = _lane_padded(self.conv1, self.conv2) if plain else (self.conv1, self.conv2)
        # ReLU after the pool, not before: the two commute exactly, and the ReLU and its backward
        # then touch a quarter of the values.
        x = F.relu(F.max_pool2d(conv1(x), 2))
        x = F.relu(F.max_pool2d(conv2(x), 2))
        return torch.flatten(x, 1)

    def _modules_called(self) -> bool:
        # An adapter wraps a convolution in its own forward, and a hook (pruning, weight norm) expects the module
        # to be called: those run as they are, and so does a GPU or the meta device (not measured).
        return any(type(conv) is not nn.Conv2d or conv._forward_pre_hooks or conv._forward_hooks
                   for conv in (self.conv1, self.conv2))

    def classifier(self, x: torch.Tensor) -> torch.Tensor:
        return self.after_first_classifier_layer(self.fc1(x))

    def first_classifier_layer(self) -> nn.Module:
        return self.fc1

    def after_first_classifier_layer(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        x = F.relu(self.fc2(x))
        x = F.relu(self.fc3(x))
        x = F.relu(self.fc4(x))
        return self.fc5(x)

    def feature_modules(self) -> list[nn.Module]:
        return [self.conv1, self.conv2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# A 256-bit vector holds 8 float32s: oneDNN's convolution kernels and the channels-last pool vectorise over
# channels, and conv1's 6 leave a quarter of each vector empty. conv1 runs with 2 zero filters appended, whose
# outputs stay 0 through pool and ReLU, and conv2 reads them through 2 zero input channels: the same function
# and gradients (the padding's gradient is dropped). A training step, 2 CPU cores, batch 512: about 10 %
# more images/s, measured round robin on AVX2 (benchmarks/README.md, round six).
LANES = 8


def _lane_padded(conv1: nn.Conv2d, conv2: nn.Conv2d) -> tuple[Callable, Callable]:
    extra = -conv1.out_channels % LANES
    weight1 = F.pad(conv1.weight, (0, 0, 0, 0, 0, 0, 0, extra)).contiguous(memory_format=torch.channels_last)
    bias1 = F.pad(conv1.bias, (0, extra))
    weight2 = F.pad(conv2.weight, (0, 0, 0, 0, 0, extra)).contiguous(memory_format=torch.channels_last)
    return (lambda x: F.conv2d(x, weight1, bias1)), (lambda x: F.conv2d(x, weight2, conv2.bias))
