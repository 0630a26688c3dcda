"""VGG-16 (Simonyan & Zisserman 2015) adapted to small images: 3x3 convolutions, pooling only while the map is > 1 px."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from privbench import registry
from privbench.params import bounded

# Output channels of the 13 convolutions; "M" is a 2x2 max-pool.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


@dataclass(frozen=True)
class VGGParams:
    width: float = bounded(1.0, gt=0, le=64)  # channel multiplier: 1.0 is VGG-16's 64..512 channels
    batch_norm: bool = True  # BatchNorm after every convolution (VGG-16-BN); trains from scratch reliably
    hidden: int = bounded(512, ge=1, le=65_536)  # units of the hidden classifier layer

    def __post_init__(self) -> None:
        if self.width <= 0 or self.hidden < 1:
            raise ValueError("width must be > 0 and hidden >= 1")


@registry.models.register("vgg")
class VGG16:
    """VGG-16 for 16-64 px inputs: 13 conv3x3(pad 1)-[BN]-ReLU, up to 5 max-pools, linear(hidden)-ReLU-linear(K).

    A pool is skipped once the feature map is 1 px wide, so 16 px inputs work.
    The first layer is a plain ``Conv2d`` on the image (MpLe replaces it).
    """

    Params = VGGParams
    tiny_params = {"width": 0.125, "hidden": 16}  # for the conformance kit (privbench.testing)

    @staticmethod
    def build(params: VGGParams, channels: int, image_size: int, num_classes: int) -> nn.Module:
        layers: list[nn.Module] = []
        side, in_ch = image_size, channels
        for item in VGG16_LAYOUT:
            if item == "M":
                if side > 1:
                    layers.append(nn.MaxPool2d(2))
                    side //= 2
                continue
            out_ch = max(1, round(int(item) * params.width))
            layers.append(nn.Conv2d(in_ch, out_ch, 3, padding=1))
            if params.batch_norm:
                layers.append(nn.BatchNorm2d(out_ch))
            layers.append(nn.ReLU())
            in_ch = out_ch
        layers += [nn.Flatten(), nn.Linear(in_ch * side * side, params.hidden), nn.ReLU(),
                   nn.Linear(params.hidden, num_classes)]
        return nn.Sequential(*layers)
