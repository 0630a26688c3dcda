"""The LeNet variant of the DLG paper (Zhu et al., 2019)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from privbench import registry
from privbench.params import bounded


@dataclass(frozen=True)
class LeNetParams:
    width: int = bounded(12, ge=1, le=4096)  # channels of each convolution
    init_range: float = bounded(0.5, gt=0, le=1000)  # weights and biases drawn from U(-init_range, init_range)


class LeNetDLG(nn.Module):
    """Three 5x5 convolutions (strides 2, 2, 1; sigmoid) and one linear layer.

    Input float [B, C, S, S]; with S=32 the feature maps are 16, 8, 8 and
    12*8*8 = 768 features reach the linear layer. Output logits [B, K].
    """

    def __init__(self, channels: int, image_size: int, num_classes: int, width: int = 12):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(width, width, 5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(width, width, 5, padding=2, stride=1),
            nn.Sigmoid(),
        )
        side = math.ceil(math.ceil(image_size / 2) / 2)
        self.fc = nn.Linear(width * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


@registry.models.register("lenet")
class LeNet:
    """DLG-paper LeNet: 3 conv 5x5 (12 ch, strides 2,2,1), sigmoid, U(-0.5,0.5) weights."""

    Params = LeNetParams

    @staticmethod
    def build(params: LeNetParams, channels: int, image_size: int, num_classes: int) -> nn.Module:
        model = LeNetDLG(channels, image_size, num_classes, params.width)
        with torch.no_grad():
            for p in model.parameters():
                p.uniform_(-params.init_range, params.init_range)
        return model
