"""A slimmed capsule network with dynamic routing (Sabour, Frosst and Hinton, 2017).

The original (256-channel 9x9 convolution, 32 x 8D primary capsule types on
28x28 MNIST) has about 7M parameters; this one has a ``width``-channel first
convolution and ``primary_types`` capsule types, about 0.2M parameters at 32x32
with the defaults. Training everywhere in privbench is cross-entropy on logits,
so the logits are ``logit_scale`` times the class capsules' lengths; the
paper's margin loss and reconstruction decoder are omitted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from privbench import registry
from privbench.config import ConfigError
from privbench.params import bounded


@dataclass(frozen=True)
class CapsNetParams:
    width: int = bounded(32, ge=1, le=4096)  # channels of the first convolution
    primary_types: int = bounded(4, ge=1, le=1024)  # primary capsule channels (capsule types)
    primary_dim: int = bounded(8, ge=1, le=1024)  # pose dimensions of a primary capsule
    class_dim: int = bounded(16, ge=1, le=1024)  # pose dimensions of a class capsule
    routing_iterations: int = bounded(3, ge=1, le=1000)
    kernel: int = bounded(9, ge=1, le=64)  # kernel of both convolutions (9 as in the paper; 5 for 16x16 inputs)
    logit_scale: float = bounded(10.0, gt=0, le=1e6)  # logits = logit_scale * capsule length (lengths are in [0, 1))

    def __post_init__(self) -> None:
        if min(self.width, self.primary_types, self.primary_dim, self.class_dim, self.routing_iterations,
               self.kernel) < 1:
            raise ValueError("capsnet sizes and routing_iterations must be >= 1")
        if self.logit_scale <= 0:
            raise ValueError(f"logit_scale must be > 0, got {self.logit_scale}")


def squash(s: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """v = |s|^2 / (1 + |s|^2) * s / |s|: keeps the direction, maps the length into [0, 1)."""
    norm2 = (s * s).sum(dim, keepdim=True)
    return norm2 / (1 + norm2) * s / torch.sqrt(norm2 + eps)


class CapsuleNetwork(nn.Module):
    """Conv (ReLU) -> primary capsules (conv, stride 2, squash) -> class capsules by dynamic routing.

    Input float [B, C, S, S]; output logits [B, K] = logit_scale * |v_k|. The first convolution has
    stride 2 for inputs of 64 pixels or more, so 64x64 keeps about as many primary capsules as 32x32.
    """

    def __init__(self, channels: int, image_size: int, num_classes: int, p: CapsNetParams):
        super().__init__()
        self.p = p
        stride = 2 if image_size >= 64 else 1
        self.conv = nn.Conv2d(channels, p.width, p.kernel, stride=stride)
        side = (image_size - p.kernel) // stride + 1
        self.primary = nn.Conv2d(p.width, p.primary_types * p.primary_dim, p.kernel, stride=2)
        side = (side - p.kernel) // 2 + 1 if side >= p.kernel else 0
        if side < 1:
            raise ConfigError(f"capsnet: kernel={p.kernel} is too large for {image_size}x{image_size} inputs; "
                              f"use kernel=5 (or smaller)")
        self.num_primary = p.primary_types * side * side
        # one transformation matrix per (primary capsule, class): [N, K, class_dim, primary_dim]
        # std 1/sqrt(primary_dim): class capsules start with lengths of order 0.5, not near 0 (flat logits)
        self.weights = nn.Parameter(
            torch.randn(self.num_primary, num_classes, p.class_dim, p.primary_dim) / p.primary_dim**0.5
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p
        h = F.relu(self.conv(x))
        u = self.primary(h)  # [B, T*D, s, s]
        b, _, s, _ = u.shape
        u = u.view(b, p.primary_types, p.primary_dim, s, s).permute(0, 1, 3, 4, 2).reshape(b, -1, p.primary_dim)
        u = squash(u)  # [B, N, D]
        u_hat = torch.einsum("nkdc,bnc->bnkd", self.weights, u)  # predictions [B, N, K, class_dim]
        logits_b = torch.zeros(u_hat.shape[:3], dtype=u_hat.dtype, device=u_hat.device)
        for i in range(p.routing_iterations):
            c = torch.softmax(logits_b, dim=2)  # each primary capsule's coupling over classes
            v = squash((c.unsqueeze(-1) * u_hat).sum(1))  # [B, K, class_dim]
            if i < p.routing_iterations - 1:
                logits_b = logits_b + (u_hat * v.unsqueeze(1)).sum(-1)
        return p.logit_scale * v.norm(dim=-1)


@registry.models.register("capsnet")
class CapsNet:
    """Capsule network with dynamic routing (Sabour et al. 2017), slimmed (width 32, 4 x 8D primary types)."""

    Params = CapsNetParams
    tiny_params = {"width": 8, "primary_types": 2, "kernel": 5}  # for the conformance kit (privbench.testing)

    @staticmethod
    def build(params: CapsNetParams, channels: int, image_size: int, num_classes: int) -> nn.Module:
        return CapsuleNetwork(channels, image_size, num_classes, params)
