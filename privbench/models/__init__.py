"""Target model architectures. Each registered model is a class with a ``Params``
dataclass and ``build(params, channels, image_size, num_classes) -> nn.Module``."""

from __future__ import annotations

from typing import Any, Mapping

from privbench import registry


def build_model(
    name: str, params: Mapping[str, Any], channels: int, image_size: int, num_classes: int, seed: int
):
    """Build model ``name`` with its weights initialised deterministically from ``seed``."""
    import torch

    spec = registry.models.get(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.build(spec.Params(**dict(params)), channels, image_size, num_classes)
    return model
