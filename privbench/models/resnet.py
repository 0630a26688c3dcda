"""A small CIFAR-style ResNet (ResNet-8 / ResNet-20): ReLU, BatchNorm, average pooling, no max-pool."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from privbench import registry
from privbench.params import bounded


@dataclass(frozen=True)
class ResNetParams:
    depth: int = bounded(8, ge=8, le=1000)  # 6n+2: 8 (one block per stage), 14, 20 (three blocks per stage)
    width: int = bounded(16, ge=1, le=4096)  # channels of the first stage; the later stages have 2x and 4x

    def __post_init__(self) -> None:
        if (self.depth - 2) % 6 != 0 or self.depth < 8:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (8, 14, 20, ...), got {self.depth}")
        if self.width < 1:
            raise ValueError(f"width must be positive, got {self.width}")


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """Input [B, C, S, S] -> logits [B, K]; stages at S, S/2, S/4, then global average pooling."""

    def __init__(self, channels: int, num_classes: int, depth: int, width: int):
        super().__init__()
        n = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        blocks: list[nn.Module] = []
        c_in = width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                blocks.append(BasicBlock(c_in, c_out, 2 if (stage > 0 and i == 0) else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


@registry.models.register("resnet")
class ResNet:
    """Small ResNet (depth 6n+2, width w): ReLU, BatchNorm, global average pooling."""

    Params = ResNetParams

    @staticmethod
    def build(params: ResNetParams, channels: int, image_size: int, num_classes: int) -> nn.Module:
        return SmallResNet(channels, num_classes, params.depth, params.width)
