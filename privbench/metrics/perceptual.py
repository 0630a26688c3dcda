"""Perceptual metrics with pretrained networks: LPIPS (per image) and Inception features (FID, KID).

Weights come from :mod:`privbench.metrics.weights` (offline first). When a file
is missing the metric raises :class:`~privbench.metrics.weights.WeightsMissing`;
callers record "no number, and this reason", never a number from stand-in
weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from unittest import mock

import numpy as np
import torch
from torch.nn import functional as F

from privbench.metrics import weights

Backbone = Literal["alex", "vgg", "squeeze"]
BACKBONE_WEIGHTS = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}
LPIPS_MIN_SIZE = 64  # LPIPS was calibrated on 64x64 patches; AlexNet shrinks 32x32 to almost nothing


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """[B, 1 or 3, H, W] -> [B, 3, H, W] (grayscale repeated)."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class LPIPS:
    """Learned Perceptual Image Patch Similarity (Zhang et al., 2018) through the ``lpips`` package.

    Images in [0, 1], [B, C, H, W]; grayscale is repeated to 3 channels, images
    smaller than 64x64 are upsampled (bilinear) to 64x64, then scaled to [-1, 1]
    as the package expects. Returns float64 [B]; lower is more similar.
    """

    higher_is_better = False
    family = "reconstruction"

    def __init__(self, backbone: Backbone = "alex", allow_download: bool = False):
        if backbone not in BACKBONE_WEIGHTS:
            raise ValueError(f"LPIPS backbone must be one of {list(BACKBONE_WEIGHTS)}, got {backbone!r}")
        self.backbone = backbone
        self.allow_download = allow_download
        self.depends_on = weights.KNOWN[BACKBONE_WEIGHTS[backbone]].filename
        self._net = None

    def name(self, image_size: int) -> str:
        if image_size < LPIPS_MIN_SIZE:
            return f"lpips[{self.backbone},up{LPIPS_MIN_SIZE}-bilinear]"
        return f"lpips[{self.backbone}]"

    def network(self):
        if self._net is None:
            self._net = build_lpips(self.backbone, self.allow_download)
        return self._net

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        x = to_rgb(images.float())
        if min(x.shape[-2:]) < LPIPS_MIN_SIZE:
            x = F.interpolate(x, size=(LPIPS_MIN_SIZE, LPIPS_MIN_SIZE), mode="bilinear", align_corners=False)
        return x

    @torch.no_grad()
    def __call__(self, prediction: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        net = self.network()
        value = net(self.preprocess(prediction), self.preprocess(truth), normalize=True)
        return value.flatten().double()


def build_lpips(backbone: Backbone, allow_download: bool = False):
    """An ``lpips.LPIPS`` whose backbone and linear layers privbench loaded itself (weights_only)."""
    import lpips

    backbone_state = weights.load_state_dict(BACKBONE_WEIGHTS[backbone], allow_download)
    net = lpips.LPIPS(pretrained=False, net=backbone, pnet_rand=True, verbose=False)
    lin_path = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{backbone}.pth"
    lin_state = torch.load(lin_path, map_location="cpu", weights_only=True)  # saved from CUDA tensors
    # The file holds lin0..linK; `lins` aliases them, the backbone and scaling constants are set elsewhere.
    required = {k for k in net.state_dict() if k.split(".")[0][:3] == "lin" and k.split(".")[0][3:].isdigit()}
    _, unexpected = net.load_state_dict(lin_state, strict=False)
    if unexpected or required - set(lin_state):
        raise RuntimeError(f"LPIPS linear weights at {lin_path} do not fit the {backbone} network")
    # lpips splits torchvision's `features` into slices that keep the original indices as names:
    # slice<k>.<i>.<param> holds features.<i>.<param>.
    mapped = {key: backbone_state["features." + key.split(".", 1)[1]] for key in net.net.state_dict()}
    net.net.load_state_dict(mapped)
    return net.eval()


class InceptionFeatures:
    """2048-d pool3 features of pytorch-fid's InceptionV3 (weights ``pt_inception-2015-12-05``).

    Images in [0, 1], [N, C, H, W]; grayscale repeated to 3 channels; resized to
    299x299 (bilinear) and scaled to [-1, 1] inside the network, as pytorch-fid does.
    """

    name = "inception-pool3@299px-bilinear"
    dim = 2048

    def __init__(self, allow_download: bool = False, batch_size: int = 32):
        self.allow_download = allow_download
        self.batch_size = batch_size
        self._net = None

    def network(self):
        if self._net is None:
            from pytorch_fid import inception as fid_inception

            state = weights.load_state_dict("inception-fid", self.allow_download)
            # pytorch-fid fetches its checkpoint by URL inside the constructor; hand it ours instead.
            with mock.patch.object(fid_inception, "load_state_dict_from_url", lambda *a, **k: state):
                net = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[self.dim]])
            self._net = net.eval()
        return self._net

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        net = self.network()
        out = [
            net(to_rgb(images[i : i + self.batch_size].float()))[0].flatten(1).double().numpy()
            for i in range(0, len(images), self.batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, self.dim))
