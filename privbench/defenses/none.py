"""No defense: the baseline every other defense is compared with."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from privbench import registry
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


@dataclass(frozen=True)
class NoDefenseParams(TrainParams):
    pass


@registry.defenses.register("none")
class NoDefense(Defense):
    """No protection: plain training; every surface passes through unchanged."""

    Params = NoDefenseParams
    description = "No protection: plain training; every surface passes through unchanged."
    protects = frozenset()
    models = None  # any registered model
    default_model = "lenet"
    tiny_params = {"epochs": 1, "batch_size": 16}

    def fit(self, model: nn.Module, members, ctx: FitContext) -> Target:
        return fit_plainly(model, members, self.params, ctx)

    def plain_training_recipe(self) -> dict:
        import dataclasses

        return dataclasses.asdict(self.params)

    def observe(self, surface: Surface, target: Target, victim: Victim | None, ctx: FitContext) -> Observation:
        if surface is Surface.GRADIENTS:
            model = model_at_round(target, ctx.build_model, ctx.config.gradient_round)
            return gradient_observation(model, client_gradients(model, victim.images, victim.labels, ctx.config.bn_mode), victim, ctx)
        return released_model_observation(surface, target, "none")
