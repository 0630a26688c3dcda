"""Gradient pruning as a privbench defense plugin (Zhu, Liu & Han, "Deep Leakage from Gradients", NeurIPS 2019).

The defense the DLG paper evaluates against its own attack: before a client shares its update, the
entries of smallest magnitude are set to zero and only the rest is sent. ``prune`` is the fraction
zeroed: in each parameter's gradient tensor (``scope=layer``, as in deep gradient compression and
the reference implementations of the defense), or across the whole update (``scope=global``).
Exactly ``floor(prune * n)`` entries of a tensor of n entries are zeroed, the smallest first (ties
by position), so the result is deterministic.

- **GRADIENTS** (what ``gradprune`` protects): the plain update, d(mean cross-entropy)/d(parameters)
  at the stated round (``UpdateRule()``: no clipping, no noise, divided by the batch size), then
  pruned. The pruning fraction is a public protocol parameter and the surviving entries show which
  were kept: an attacker knows both.
- **Training**: every training step's gradient is pruned the same way before the optimizer step
  (clients train as they share), so the released model shows what pruning costs in accuracy. The
  utility twin is the same training without pruning (privbench's ``none``: same order, same
  optimizer, same seeds); ``prune=0`` trains exactly the twin.
- **MODEL_WHITEBOX / MODEL_QUERIES**: the released model, passed through unprotected.

Pruning is not differentiable end to end: the top-k selection has no gradient, and a naive attacker
that matches its dummy gradient to the pruned update is also pulled towards the zeros the defense
wrote, which are not the client's gradient. The defense therefore declares
``differentiable = False`` (results of naive gradient attacks against it are not a measure of its
strength). The adaptive attack ``dlg-gradprune`` (``MaskedDLG``) knows the rule: it compares its
dummy gradient with the update only on the entries the update kept (the support is visible), so
the zeros no longer mislead it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from privbench.attacks.gradient_inversion import DLG
from privbench.defenses.base import (
    Defense,
    FitContext,
    Target,
    client_gradients,
    fit_plainly,
    gradient_observation,
    model_at_round,
    released_model_observation,
)
from privbench.threat import Observation, Surface, Victim
from privbench.training import TrainParams

__version__ = "0.1.0"
__all__ = ["GradPruneParams", "GradientPruning", "MaskedDLG", "prune"]


def prune(tensors: tuple[torch.Tensor, ...] | list[torch.Tensor], fraction: float,
          scope: Literal["layer", "global"] = "layer") -> tuple[torch.Tensor, ...]:
    """``tensors`` with the ``floor(fraction * n)`` smallest-magnitude entries set to zero (new tensors).

    Args:
        tensors: one gradient per parameter.
        fraction: in [0, 1); 0 returns copies.
        scope: ``layer`` prunes each tensor on its own (n = its size); ``global`` ranks all entries together.

    Example:
        >>> prune((torch.tensor([0.1, -3.0, 0.5, 2.0]),), 0.5)
        (tensor([ 0.0000, -3.0000,  0.0000,  2.0000]),)
    """
    if scope == "layer":
        return tuple(_prune_one(t, fraction) for t in tensors)
    flat = _prune_one(torch.cat([t.reshape(-1) for t in tensors]), fraction)
    return tuple(part.reshape(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors,
                                                             strict=True))


def _prune_one(tensor: torch.Tensor, fraction: float) -> torch.Tensor:
    flat = tensor.detach().reshape(-1).clone()
    k = math.floor(fraction * flat.numel() + 1e-9)
    if k:
        flat[torch.argsort(flat.abs(), stable=True)[:k]] = 0
    return flat.reshape(tensor.shape)


@dataclass(frozen=True)
class GradPruneParams(TrainParams):
    """Training (``TrainParams``) under gradient pruning: ``prune`` in [0, 1) of each update's entries (the
    smallest in magnitude) are zeroed, per parameter tensor (``scope=layer``) or over the whole update."""

    prune: float = 0.9
    scope: Literal["layer", "global"] = "layer"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.prune < 1:  # also refuses nan
            raise ValueError(f"prune must be in [0, 1) (the fraction of each update zeroed), got {self.prune}")
        if self.scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {self.scope!r}")


class GradientPruning(Defense):
    """Gradient pruning (Zhu et al. 2019): shared updates and training steps keep their largest entries only."""

    Params = GradPruneParams
    description = ("Gradient pruning (Zhu et al. 2019): the smallest `prune` fraction of each shared update (and "
                   "of every training step's gradient) is zeroed, per layer; not differentiable end to end.")
    protects = frozenset({Surface.GRADIENTS})
    differentiable = False  # the top-k selection has no gradient: naive gradient attacks are not adaptive here
    stochastic = False
    models = None  # any registered model: pruning acts on gradients, whatever the architecture
    default_model = "lenet"
    tiny_params = {"epochs": 1, "batch_size": 16, "prune": 0.9}

    def _prune_gradients(self, model: nn.Module) -> None:
        """Prune the ``.grad`` of ``model``'s parameters in place (between backward and the optimizer step)."""
        params = [p for p in model.parameters() if p.grad is not None]
        for param, pruned in zip(params, prune([p.grad for p in params], self.params.prune, self.params.scope),
                                 strict=True):
            param.grad.copy_(pruned)

    def fit(self, model: nn.Module, members, ctx: FitContext) -> Target:
        target = fit_plainly(model, members, self.params, ctx, before_step=self._prune_gradients)
        target.training["gradient_pruning"] = {"prune": self.params.prune, "scope": self.params.scope,
                                               "applied_to": "every training step's gradient, before the step"}
        target.costs["update_density"] = 1 - self.params.prune  # fraction of each update's entries sent
        return target

    def observe(self, surface: Surface, target: Target, victim: Victim | None, ctx: FitContext) -> Observation:
        if surface is not Surface.GRADIENTS:
            return released_model_observation(surface, target, "gradprune")
        model = model_at_round(target, ctx.build_model, ctx.config.gradient_round)
        plain = client_gradients(model, victim.images, victim.labels, ctx.config.bn_mode)
        shared = prune(plain, self.params.prune, self.params.scope)
        kept = sum(int((g != 0).sum()) for g in shared) / max(sum(g.numel() for g in shared), 1)
        return gradient_observation(
            model, shared, victim, ctx,
            mechanism=f"plain mean gradient, then the smallest {self.params.prune:g} of "
                      f"{'each layer' if self.params.scope == 'layer' else 'the whole update'} set to zero",
            prune=self.params.prune, scope=self.params.scope, nonzero_fraction=kept,
        )

    def utility_twin(self) -> Defense:
        from privbench.defenses.none import NoDefense, NoDefenseParams

        train = {f.name: getattr(self.params, f.name) for f in dataclasses.fields(TrainParams)}
        return NoDefense(NoDefenseParams(**train))


class MaskedDLG(DLG):
    """DLG adapted to gradient pruning: the gradient distance counts only the entries the shared update kept."""

    description = ("DLG adapted to gradient pruning: L2 distance, L-BFGS, joint soft label, the dummy gradient "
                   "masked to the entries the shared update kept (the pruned zeros carry no information).")
    tiny_defense = GradientPruning
    adaptive_for = ("gradprune",)

    def gradient_distance(self, dummy: tuple[torch.Tensor, ...], target: tuple[torch.Tensor, ...]) -> torch.Tensor:
        masked = tuple(d * (t != 0) for d, t in zip(dummy, target, strict=True))
        return super().gradient_distance(masked, target)
