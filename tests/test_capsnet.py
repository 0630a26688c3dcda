"""capsnet: shapes at 16/32/64 pixels, squash, routing couplings, and a kernel too large for the input."""

import pytest
import torch

from privbench import registry
from privbench.config import ConfigError
from privbench.models import build_model
from privbench.models.capsnet import squash


@pytest.mark.parametrize("size, params", [(16, {"kernel": 5}), (32, {}), pytest.param(64, {}, marks=pytest.mark.slow)])
def test_capsnet_builds_and_outputs_scaled_lengths(size, params):
    model = build_model("capsnet", params, 1, size, 4, seed=0)
    logits = model(torch.rand(3, 1, size, size))
    assert logits.shape == (3, 4)
    scale = model.p.logit_scale
    assert torch.all(logits >= 0) and torch.all(logits < scale)  # scale x length, length in [0, 1)
    assert sum(p.numel() for p in model.parameters()) < 400_000 and not list(model.buffers())
    assert registry.models.entry("capsnet").origin.source == "builtin"


def test_squash_keeps_direction_and_bounds_length():
    s = torch.tensor([[3.0, 4.0], [0.03, 0.04]])
    v = squash(s)
    torch.testing.assert_close(v.norm(dim=-1), torch.tensor([25 / 26, 0.0025 / 1.0025]))
    torch.testing.assert_close(v / v.norm(dim=-1, keepdim=True), s / s.norm(dim=-1, keepdim=True))


def test_kernel_too_large_for_the_input_is_a_config_error():
    with pytest.raises(ConfigError, match="kernel=5"):
        build_model("capsnet", {}, 1, 16, 4, seed=0)
