"""The baseline ConvNet of the write-up."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def conv_pool_relu(x: torch.Tensor, conv: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    # ReLU after the pool, not before: the two commute exactly, and the ReLU then touches a quarter of the values.
    return F.relu(F.max_pool2d(conv(x), 2))


class ConvNet(nn.Module):
    """conv(3->6,5) pool conv(6->16,5) pool -> fc1 400->120 -> fc2 ->84 -> fc3 -> fc4 -> fc5 ->10.

    76,286 parameters. The write-up's unused conv3 is left out. `features` is the
    convolutional prefix and `classifier` the fully connected part, so that a
    frozen prefix can be run once and its output cached.
    """

    classifier_name = "fc5"

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
        return torch.flatten(conv_pool_relu(conv_pool_relu(x, self.conv1), self.conv2), 1)

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
