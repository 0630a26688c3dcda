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
    grouped: "StackedSequential | None" = None  # S copies as one grouped network

    @torch.no_grad()
    def logits(self, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
        """[S, N, K] logits of every shadow on ``images`` [N, C, H, W]."""
        if self.grouped is not None:
            return torch.cat([self.grouped.eval()(images[i : i + batch]) for i in range(0, len(images), batch)], 1)
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


def _equal_subsets(inside: torch.Tensor, how: str) -> torch.Tensor:
    """Pool indices [S, size] of each shadow's subset; ``inside`` [S, N] bool must mark equally many per shadow."""
    sizes = inside.sum(1)
    if not bool((sizes == sizes[0]).all()):
        raise ValueError(f"{how} shadow training needs equally large shadow subsets")
    return torch.stack([torch.nonzero(row).flatten() for row in inside])


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
    members = _equal_subsets(inside, "vectorized")
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


_STACKABLE = (nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Linear)


def stackable(model: nn.Module) -> bool:
    """Whether ``model`` is an nn.Sequential that :class:`StackedSequential` can run S copies of."""
    if not isinstance(model, nn.Sequential) or not all(isinstance(m, _STACKABLE) for m in model):
        return False
    convs_ok = all(m.groups == 1 and m.padding_mode == "zeros" and isinstance(m.padding, tuple)
                   for m in model if isinstance(m, nn.Conv2d))
    return convs_ok and all(m.start_dim == 1 and m.end_dim == -1 for m in model if isinstance(m, nn.Flatten))


class StackedSequential(nn.Module):
    """S copies of a Sequential of Conv2d / ReLU / MaxPool2d / Flatten / Linear as one network.

    Convolutions run as one grouped convolution with the S copies' channels side
    by side (input [B, S*C, H, W]); linear layers as one batched matmul (weights
    [S, in, out]). The arithmetic per copy is the module's own; each parameter
    of copy s is a slice of one stacked tensor, so one optimizer step (Adam and
    SGD act element by element) updates all copies exactly as S separate steps.
    """

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        self.copies = len(models)
        self.layers = list(models[0])
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for i, layer in enumerate(self.layers):
            if isinstance(layer, nn.Conv2d):
                self.weights.append(torch.cat([m[i].weight.detach() for m in models]).clone())
                self.biases.append(torch.cat([m[i].bias.detach() if m[i].bias is not None
                                              else torch.zeros(layer.out_channels) for m in models]).clone())
            elif isinstance(layer, nn.Linear):
                self.weights.append(torch.stack([m[i].weight.detach().T for m in models]).contiguous())
                self.biases.append(torch.stack([m[i].bias.detach() if m[i].bias is not None
                                                else torch.zeros(layer.out_features) for m in models]).unsqueeze(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [S, B, K]; ``x`` [S, B, C, H, W] (a batch per copy) or [B, C, H, W] (one batch for all copies)."""
        s = self.copies
        shared = x.dim() == 4
        b = x.shape[0] if shared else x.shape[1]
        h = x if shared else x.transpose(0, 1).reshape(b, -1, *x.shape[-2:])  # [B, S*C, H, W]
        k = 0
        for layer in self.layers:
            if isinstance(layer, nn.Conv2d):
                groups = 1 if shared else s  # one input for all copies: an ordinary convolution, S*out channels
                h = F.conv2d(h, self.weights[k], self.biases[k], layer.stride, layer.padding, layer.dilation, groups)
                shared, k = False, k + 1
            elif isinstance(layer, nn.Flatten):
                h = h.reshape(b, s, -1).transpose(0, 1) if not shared else h.flatten(1).expand(s, -1, -1)  # [S, B, F]
            elif isinstance(layer, nn.Linear):
                h = torch.baddbmm(self.biases[k], h, self.weights[k])
                k += 1
            else:
                h = layer(h)
        return h

    def unstack(self, models: list[nn.Module]) -> list[nn.Module]:
        """Copy the trained stacked parameters back into ``models`` (the S modules it was built from)."""
        with torch.no_grad():
            k = 0
            for i, layer in enumerate(self.layers):
                if isinstance(layer, (nn.Conv2d, nn.Linear)):
                    w, bias = self.weights[k], self.biases[k]
                    for j, m in enumerate(models):
                        if isinstance(layer, nn.Conv2d):
                            out = layer.out_channels
                            m[i].weight.copy_(w[j * out : (j + 1) * out])
                            if m[i].bias is not None:
                                m[i].bias.copy_(bias[j * out : (j + 1) * out])
                        else:
                            m[i].weight.copy_(w[j].T)
                            if m[i].bias is not None:
                                m[i].bias.copy_(bias[j, 0])
                    k += 1
        return models


def train_grouped(build_model: Callable[[int], nn.Module], images, labels, inside, params: TrainParams, seed: int,
                  progress=None) -> ShadowEnsemble:
    """All shadows at once as one :class:`StackedSequential` (grouped convolutions, batched matmuls).

    Same schedule as :func:`train_vectorized`: each step, shadow s takes the next
    batch of its own shuffled subset (the subsets must be equally large).
    """
    start = time.perf_counter()
    shadows = inside.shape[0]
    members = _equal_subsets(inside, "grouped")
    models = [build_model(seed + s) for s in range(shadows)]
    net = StackedSequential(models).train()
    optimizer = make_optimizer(params, net.parameters())
    generator = torch.Generator().manual_seed(seed)
    size = members.shape[1]
    for epoch in range(params.epochs):
        order = torch.stack([members[s, torch.randperm(size, generator=generator)] for s in range(shadows)])
        for begin in range(0, size, params.batch_size):
            idx = order[:, begin : begin + params.batch_size]  # [S, B]
            optimizer.zero_grad(set_to_none=True)
            logits = net(images[idx])  # [S, B, K]
            # the sum over shadows of each shadow's mean loss: shadow s's gradient is its own
            loss = F.cross_entropy(logits.flatten(0, 1), labels[idx].flatten(), reduction="sum") / idx.shape[1]
            loss.backward()
            optimizer.step()
        if progress:
            progress(epoch + 1, params.epochs)
    net.eval()
    return ShadowEnsemble(None, None, "vectorized (grouped convolutions, batched matmuls)",
                          time.perf_counter() - start, grouped=net)


def train_shadow_ensemble(observation, images, labels, inside, recipe: dict | None, seed: int, vectorized: bool = True,
                          progress=None) -> ShadowEnsemble:
    """Shadows that mimic the target's training: its plain recipe (vectorized where possible) or its pipeline."""
    if recipe is not None and observation.build_model is not None:
        params = TrainParams(**recipe)
        if vectorized and stackable(observation.build_model(seed)):
            return train_grouped(observation.build_model, images, labels, inside, params, seed, progress)
        if vectorized and not has_batchnorm(observation.build_model(seed)):
            return train_vectorized(observation.build_model, images, labels, inside, params, seed, progress)
        return train_sequential(observation.build_model, images, labels, inside, params, seed, progress)
    if observation.shadow_trainer is None:
        from privbench.attacks.base import AttackError

        raise AttackError("the defense exposes neither a training recipe nor a pipeline to train shadows with")
    start = time.perf_counter()
    models = []
    for s in range(inside.shape[0]):  # one tick per shadow trained through the defense
        models.append(observation.shadow_trainer(_subset(images, labels, inside[s]), seed + s).eval())
        if progress:
            progress(s + 1, inside.shape[0])
    return ShadowEnsemble(models, None, "one after another through the defense pipeline", time.perf_counter() - start)
