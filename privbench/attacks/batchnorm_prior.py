"""BatchNorm statistics as a prior: the distance between a layer's activation statistics and target ones.

Shared by DeepInversion (targets: the running statistics) and GradInversion (targets: the victim batch's
statistics from shared buffers, or the running statistics).
"""

from __future__ import annotations

import torch
from torch import nn


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers that carry running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats and m.running_mean is not None and m.running_var is not None]


def statistics_distance(activations: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                        unbiased: bool = False) -> torch.Tensor:
    """|mu - mean|_2 + |sigma^2 - var|_2 of ``activations`` [N, C, ...] per channel C, against ``mean``, ``var`` [C]."""
    per_channel = activations.transpose(0, 1).flatten(1)
    dims = [d for d in range(activations.dim()) if d != 1]
    return (torch.norm(activations.mean(dim=dims) - mean, 2)
            + torch.norm(per_channel.var(1, unbiased=unbiased) - var, 2))
