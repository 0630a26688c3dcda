"""The linear algebra of MpLe / MoLe morphing: a first convolution as a dense matrix, the secret
morphing matrix, the augmented layer, and morphing itself.

Notation (row vectors, as in the papers): an image ``d`` [C, H, W] is zero-padded by the
convolution's padding and flattened to ``D = C (H+2p) (W+2p)`` values. The first convolution
``C_r`` is the dense matrix ``W_r`` [D, F*H'*W'] with ``d W_r`` = conv(d) flattened channel-major.
The provider morphs ``t = d M`` with a secret invertible ``M`` [D, D] and sends
``C_ac = M^-1 W_r P``, where ``P`` permutes the F output channels; then ``t C_ac = d W_r P``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import scipy.linalg
import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from privbench.threat import MorphedLayer


class MorphingError(ValueError):
    """A shape or memory mismatch in morphing; the message says what and how to fix it."""


@dataclass(frozen=True)
class ConvGeometry:
    """What the dense form of a stride-1 convolution depends on (sizes in pixels / channels)."""

    channels: int
    height: int
    width: int
    out_channels: int
    kernel: int
    padding: int

    @classmethod
    def of(cls, conv: nn.Conv2d, image_shape: tuple[int, int, int]) -> "ConvGeometry":
        if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
            raise MorphingError(f"morphing supports a stride-1, dilation-1, ungrouped first convolution; got {conv}")
        if conv.kernel_size[0] != conv.kernel_size[1] or conv.padding[0] != conv.padding[1]:
            raise MorphingError(f"morphing supports a square kernel and padding; got {conv}")
        c, h, w = image_shape
        if conv.in_channels != c:
            raise MorphingError(f"the first convolution takes {conv.in_channels} channels, the images have {c}")
        return cls(c, h, w, conv.out_channels, conv.kernel_size[0], int(conv.padding[0]))

    @property
    def padded(self) -> int:
        """D: values of one padded, flattened image."""
        return self.channels * (self.height + 2 * self.padding) * (self.width + 2 * self.padding)

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """(F, H', W') of the convolution's output."""
        k, p = self.kernel, self.padding
        return self.out_channels, self.height + 2 * p - k + 1, self.width + 2 * p - k + 1

    @property
    def features(self) -> int:
        f, h, w = self.feature_shape
        return f * h * w

    def dense_bytes(self, dtype: torch.dtype = torch.float32) -> int:
        """Memory of one dense [D, F*H'*W'] matrix."""
        return self.padded * self.features * torch.empty((), dtype=dtype).element_size()

    def describe(self) -> str:
        return (f"{self.channels}x{self.height}x{self.width} input, padding {self.padding}, "
                f"{self.out_channels} output channels of {self.kernel}x{self.kernel}")


def pad_flat(images: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
    """[B, C, H, W] -> [B, D]: zero-pad as the convolution does, flatten."""
    expected = (geometry.channels, geometry.height, geometry.width)
    if tuple(images.shape[1:]) != expected:
        raise MorphingError(
            f"the morphing matrix was built for {expected[0]}x{expected[1]}x{expected[2]} images "
            f"({geometry.padded} padded values); got images of shape {tuple(images.shape[1:])}. "
            f"Use the image_size and channels the defense was fitted with."
        )
    p = geometry.padding
    return F.pad(images, (p, p, p, p)).flatten(1)


def unpad(flat: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
    """[B, D] -> [B, C, H, W]: the inverse of ``pad_flat`` (padding values dropped)."""
    p, c, h, w = geometry.padding, geometry.channels, geometry.height, geometry.width
    return flat.reshape(-1, c, h + 2 * p, w + 2 * p)[:, :, p : p + h, p : p + w]


def layer_geometry(layer: "MorphedLayer") -> ConvGeometry:
    """The convolution geometry behind a morphed first layer, from its public shapes."""
    c, h, w = layer.image_shape
    f, hf, _ = layer.feature_shape
    return ConvGeometry(c, h, w, f, h + 2 * layer.padding - hf + 1, layer.padding)


def read_morphed(sent: torch.Tensor, layer: "MorphedLayer", scaling: str = "minmax") -> torch.Tensor:
    """The naive reading of morphed vectors [B, D] as images [B, C, H, W] in [0, 1]: unpad, then scale
    (``minmax`` per image, or ``clip``)."""
    images = unpad(sent.double().flatten(1), layer_geometry(layer))
    if scaling == "minmax":
        low = images.amin(dim=(1, 2, 3), keepdim=True)
        high = images.amax(dim=(1, 2, 3), keepdim=True)
        images = (images - low) / (high - low).clamp(min=1e-12)
    return torch.nan_to_num(images, nan=0.5).clamp(0, 1).float()


def convolve_rows(rows: torch.Tensor, weight: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
    """``rows @ W_r`` for rows [R, D] of padded images: each row convolved (valid) -> [R, F*H'*W'] (no bias).

    Exact and cheap because W_r is the convolution: row r of ``X W_r`` is the convolution of row r
    read as a padded image. Chunked to bound transient memory.
    """
    c, p = geometry.channels, geometry.padding
    shaped = rows.reshape(-1, c, geometry.height + 2 * p, geometry.width + 2 * p)
    return torch.cat([F.conv2d(shaped[i : i + 512], weight.to(rows.dtype)).flatten(1)
                      for i in range(0, len(shaped), 512)])


def dense_conv_matrix(weight: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
    """W_r [D, F*H'*W'] with ``pad_flat(d) @ W_r == conv2d(d, weight, padding=p).flatten(1)`` (no bias)."""
    return convolve_rows(torch.eye(geometry.padded, dtype=weight.dtype), weight, geometry)


def secret_matrix(size: int, kind: str, seed: int, max_condition: float) -> tuple[torch.Tensor, float]:
    """A random invertible [size, size] float64 matrix and its 2-norm condition number.

    ``orthogonal``: Haar-distributed (QR of a Gaussian with the sign fix), condition 1.
    ``gaussian``: i.i.d. N(0, 1/size) entries, redrawn until the condition is below ``max_condition``.
    """
    generator = torch.Generator().manual_seed(seed)
    for _ in range(100):
        gauss = torch.randn(size, size, generator=generator, dtype=torch.float64)
        if kind == "orthogonal":
            q, r = torch.linalg.qr(gauss)
            matrix = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
        elif kind == "gaussian":
            matrix = gauss / size**0.5
        else:
            raise MorphingError(f"unknown morphing matrix kind {kind!r}; use 'orthogonal' or 'gaussian'")
        singular = scipy.linalg.svdvals(matrix.numpy())  # scipy's LAPACK driver: ~20x faster than torch's here
        condition = float(singular[0] / max(singular[-1], 1e-300))
        if condition < max_condition:
            return matrix, condition
    raise MorphingError(f"no {kind} {size}x{size} matrix with condition < {max_condition:g} in 100 draws; "
                        f"raise max_condition or use matrix=orthogonal")


def permute_channels(dense: torch.Tensor, permutation: torch.Tensor, feature_shape: tuple[int, int, int]) -> torch.Tensor:
    """Reorder the output channels of a dense [D, F*H'*W'] layer: channel j of the result is channel permutation[j]."""
    f, h, w = feature_shape
    return dense.reshape(-1, f, h * w)[:, permutation].reshape(dense.shape[0], -1)


def augmented_layer(matrix: torch.Tensor, weight: torch.Tensor, permutation: torch.Tensor,
                    geometry: ConvGeometry) -> torch.Tensor:
    """C_ac = M^-1 W_r P [D, F*H'*W'] in ``matrix``'s dtype: the rows of M^-1 convolved, channels permuted."""
    inverse = torch.linalg.inv(matrix)  # well-conditioned by construction (secret_matrix checks it)
    return permute_channels(convolve_rows(inverse, weight, geometry), permutation, geometry.feature_shape)


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else total physical memory."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class AugmentedConv(nn.Module):
    """The service's first layer: ``t [B, D] -> t @ C_ac + bias`` reshaped to [B, F, H', W']. Frozen (buffers)."""

    def __init__(self, dense: torch.Tensor, bias: torch.Tensor, feature_shape: tuple[int, int, int]):
        super().__init__()
        self.register_buffer("dense", dense)
        self.register_buffer("bias", bias)
        self.feature_shape = tuple(feature_shape)

    def forward(self, morphed: torch.Tensor) -> torch.Tensor:
        out = morphed.to(self.dense.dtype) @ self.dense
        return out.reshape(-1, *self.feature_shape) + self.bias.reshape(1, -1, 1, 1)
