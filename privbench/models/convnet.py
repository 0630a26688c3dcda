"""A small ReLU convolutional network without normalisation layers (DP-SGD compatible)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from privbench import registry
from privbench.params import bounded


@dataclass(frozen=True)
class ConvNetParams:
    width: int = bounded(32, ge=1, le=4096)  # channels of the first convolution; the second has 2x
    hidden: int = bounded(128, ge=1, le=65_536)  # units of the hidden linear layer


@registry.models.register("convnet")
class ConvNet:
    """conv3x3(w)-ReLU-maxpool, conv3x3(2w)-ReLU-maxpool, linear(hidden)-ReLU, linear(K)."""

    Params = ConvNetParams

    @staticmethod
    def build(params: ConvNetParams, channels: int, image_size: int, num_classes: int) -> nn.Module:
        w = params.width
        side = image_size // 4
        return nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * w * side * side, params.hidden),
            nn.ReLU(),
            nn.Linear(params.hidden, num_classes),
        )


