"""Shadow ensembles: the grouped (stacked) network and vmap paths compute what S separate models compute."""

import pytest
import torch
from torch.nn import functional as F

from privbench.attacks.shadow_ensemble import (
    StackedSequential,
    stackable,
    train_grouped,
    train_sequential,
    train_vectorized,
)
from privbench.models import build_model
from privbench.training import TrainParams, make_optimizer


def _models(n, width=4, size=16):
    return [build_model("convnet", {"width": width, "hidden": 8}, 1, size, 3, seed) for seed in range(n)]


def test_stackable_models():
    assert stackable(_models(1)[0])
    assert not stackable(build_model("lenet", {}, 1, 16, 3, 0))


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_grouped_step_equals_separate_steps(optimizer):
    torch.manual_seed(0)
    models = _models(3)
    net = StackedSequential(models)
    x, y = torch.rand(3, 5, 1, 16, 16), torch.randint(0, 3, (3, 5))
    assert torch.allclose(net(x), torch.stack([m(x[s]) for s, m in enumerate(models)]), atol=1e-5)
    assert torch.allclose(net(x[0]), torch.stack([m(x[0]) for m in models]), atol=1e-5)  # one batch for all
    params = TrainParams(optimizer=optimizer, lr=0.01)
    opt = make_optimizer(params, net.parameters())
    for _ in range(2):  # two steps, so Adam's moments matter
        opt.zero_grad()
        (F.cross_entropy(net(x).flatten(0, 1), y.flatten(), reduction="sum") / 5).backward()
        opt.step()
    for s, m in enumerate(models):
        single = make_optimizer(params, m.parameters())
        for _ in range(2):
            single.zero_grad()
            F.cross_entropy(m(x[s]), y[s]).backward()
            single.step()
    copies = net.unstack(_models(3))
    for m, c in zip(models, copies, strict=True):
        for a, b in zip(m.parameters(), c.parameters(), strict=True):
            assert torch.allclose(a, b, atol=1e-5)


def test_vectorized_paths_train_like_sequential():
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(40, 1, 16, 16, generator=g), torch.randint(0, 3, (40,), generator=g)
    labels[:20] = 0
    images[:20] += 0.5
    inside = torch.stack([torch.randperm(40, generator=g) < 20 for _ in range(3)])
    params = TrainParams(epochs=15, batch_size=10, lr=0.01)

    def factory(seed):
        return _models(1 + seed)[seed]

    results = [train(factory, images, labels, inside, params, 0)
               for train in (train_grouped, train_vectorized, train_sequential)]
    losses = [F.cross_entropy(r.logits(images).flatten(0, 1), labels.repeat(3)).item() for r in results]
    start = F.cross_entropy(torch.stack([factory(s)(images) for s in range(3)]).flatten(0, 1), labels.repeat(3))
    assert all(loss < 0.8 * start.item() for loss in losses), (losses, start)
    assert results[0].logits(images).shape == (3, 40, 3)
