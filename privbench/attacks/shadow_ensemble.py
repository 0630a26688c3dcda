"""Training an ensemble of shadow models, vectorized with torch.func or one after another.

Each shadow s trains on the pool examples where ``inside[s]`` is True, with the
target's recipe (epochs, batch size, optimizer).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from torch.nn import functional as F

from privbench.training import TrainParams, make_optimizer, train_classifier

if TYPE_CHECKING:
    from privbench.datasets import ImageDataset


@dataclass
class ShadowEnsemble:
    models: list[nn.Module] | None  # one after another
    stacked: tuple[dict, dict, nn.Module] | None  # (params [S, ...], buffers, meta-device base module)
    how: str
    seconds: float

    @torch.no_grad()
    def logits(self, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
        """[S, N, K] logits of every shadow on ``images`` [N, C, H, W]."""
        if self.stacked is not None:
            from torch.func import functional_call, vmap

            params, buffers, base = self.stacked

            def forward(p, b, x):
                return functional_call(base, (p, b), (x,))

            call = vmap(forward, in_dims=(0, 0, None))
            return torch.cat([call(params, buffers, images[i : i + batch]) for i in range(0, len(images), batch)], 1)
        return torch.stack([torch.cat([m.eval()(images[i : i + batch]) for i in range(0, len(images), batch)])
                            for m in self.models])


def _subset(images, labels, mask) -> "ImageDataset":
    """The pool examples where ``mask`` [N] is True, as a dataset."""
    from privbench.datasets import ImageDataset

    idx = torch.nonzero(mask).flatten()
    classes = tuple(str(k) for k in range(int(labels.max()) + 1))
    return ImageDataset(images[idx], labels[idx], classes, tuple(str(int(i)) for i in idx))


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def train_sequential(build_model: Callable[[int], nn.Module], images, labels, inside, params: TrainParams, seed: int,
                     progress=None) -> ShadowEnsemble:
    start = time.perf_counter()
    models = []
    for s in range(inside.shape[0]):
        data = _subset(images, labels, inside[s])
        model = build_model(seed + s)
        train_classifier(model, data, params, seed + s)
        models.append(model.eval())
        if progress:
            progress(s + 1, inside.shape[0])
    return ShadowEnsemble(models, None, "one after another", time.perf_counter() - start)


def train_vectorized(build_model: Callable[[int], nn.Module], images, labels, inside, params: TrainParams, seed: int,
                     progress=None) -> ShadowEnsemble:
    """All shadows at once: each step, shadow s takes the next batch of its own shuffled subset.

    The subsets must be equally large (LiRA's are). Per-shadow batches [S, B, ...]
    go through one vmapped forward/backward, so the arithmetic equals training
    the shadows one after another; the gain is fewer, larger operations.
    """
    from torch.func import functional_call, grad, stack_module_state, vmap

    start = time.perf_counter()
    shadows = inside.shape[0]
    sizes = inside.sum(1)
    if not bool((sizes == sizes[0]).all()):
        raise ValueError("vectorized shadow training needs equally large shadow subsets")
    members = torch.stack([torch.nonzero(inside[s]).flatten() for s in range(shadows)])  # [S, size]
    models = [build_model(seed + s) for s in range(shadows)]
    stacked_params, stacked_buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def loss(p, b, x, y):
        return F.cross_entropy(functional_call(base, (p, b), (x,)), y)

    per_model_grad = vmap(grad(loss), in_dims=(0, 0, 0, 0))
    optimizer = make_optimizer(params, stacked_params.values())
    generator = torch.Generator().manual_seed(seed)
    size = members.shape[1]
    for epoch in range(params.epochs):
        order = torch.stack([members[s, torch.randperm(size, generator=generator)] for s in range(shadows)])
        for begin in range(0, size, params.batch_size):
            idx = order[:, begin : begin + params.batch_size]  # [S, B]
            grads = per_model_grad(stacked_params, stacked_buffers, images[idx], labels[idx])
            for name, tensor in stacked_params.items():
                tensor.grad = grads[name]
            optimizer.step()
        if progress:
            progress(epoch + 1, params.epochs)
    for tensor in stacked_params.values():
        tensor.grad = None
    return ShadowEnsemble(None, (stacked_params, stacked_buffers, base), "vectorized (torch.func vmap)",
                          time.perf_counter() - start)


def train_shadow_ensemble(observation, images, labels, inside, recipe: dict | None, seed: int, vectorized: bool = True,
                          progress=None) -> ShadowEnsemble:
    """Shadows that mimic the target's training: its plain recipe (vectorized where possible) or its pipeline."""
    if recipe is not None and observation.build_model is not None:
        params = TrainParams(**recipe)
        if vectorized and not has_batchnorm(observation.build_model(seed)):
            return train_vectorized(observation.build_model, images, labels, inside, params, seed, progress)
        return train_sequential(observation.build_model, images, labels, inside, params, seed, progress)
    if observation.shadow_trainer is None:
        from privbench.attacks.base import AttackError

        raise AttackError("the defense exposes neither a training recipe nor a pipeline to train shadows with")
    start = time.perf_counter()
    models = [observation.shadow_trainer(_subset(images, labels, inside[s]), seed + s).eval()
              for s in range(inside.shape[0])]
    return ShadowEnsemble(models, None, "one after another through the defense pipeline", time.perf_counter() - start)
