"""GradInversion (Yin et al., CVPR 2021, "See through gradients: image batch recovery via GradInversion").

Gradient matching with two priors beyond total variation:

- **BatchNorm statistics.** Each BatchNorm layer's per-channel mean and variance of the
  reconstruction's activations is pulled towards the statistics the observation provides:
  the victim batch's own, derived exactly from the BatchNorm buffers when the protocol shares
  them (a train-mode step sets r' = (1 - m) r + m s, so s = (r' - (1 - m) r) / m, with the
  variance unbiased over the B x H x W values of a channel), else the model's running
  statistics (all an attacker has when the buffers stay private or the step ran in eval mode).
  The term is sum_l |mu_l(x) - mu_l|_2 + |var_l(x) - var_l|_2.
- **Group consistency.** ``groups`` candidates start from different seeds and are optimised
  jointly; each is pulled towards their pixel-wise mean (Yin et al. register the candidates
  before averaging; here they are averaged unregistered, which suits small, centred images).

Labels come from the count rule for batches (which handles repeated labels) or iDLG's rule for
one image (``label=yin`` gives the paper's distinct-label rule). Distance: cosine, as in Inverting
Gradients (scale-free, so one prior weight serves every model and round; ``distance=l2`` is the
paper's). The output is the candidate (or, if it scores better, the group mean) with the lowest
objective at the best iterate; every candidate's gradient evaluations count against the budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from privbench import registry
from privbench.attacks.batchnorm_prior import batchnorm_layers, statistics_distance
from privbench.attacks.gradient_inversion import (
    Candidate,
    GradientInversion,
    InvertingGradientsParams,
    Parametrisation,
)
from privbench.params import bounded
from privbench.threat import GradientUpdate, Observation


@dataclass(frozen=True)
class GradInversionParams(InvertingGradientsParams):
    label: Literal["joint", "analytic", "count", "yin", "auto"] = "auto"
    restarts: int = bounded(1, ge=1, le=10_000)
    groups: int = bounded(2, ge=1, le=64)  # candidates optimised jointly with the group-consistency term
    bn_weight: float = bounded(0.1, ge=0, le=1e6)  # weight of the BatchNorm-statistics prior
    group_weight: float = bounded(0.01, ge=0, le=1e6)  # weight of the pull towards the candidates' mean (pixels^2)
    l2_weight: float = bounded(1e-6, ge=0, le=1e6)  # weight of the mean squared pixel


@dataclass
class _BatchNormTarget:
    module: nn.Module
    mean: torch.Tensor  # [C]
    var: torch.Tensor  # [C]: unbiased for derived batch statistics, else the running variance
    from_batch: bool  # derived from the shared buffers (unbiased variance) rather than running statistics


@registry.attacks.register("gradinversion")
class GradInversion(GradientInversion):
    """GradInversion: gradient matching with BatchNorm-statistics and group-consistency priors."""

    Params = GradInversionParams
    description = ("GradInversion (Yin et al. 2021): BatchNorm-statistics prior (shared buffers or running "
                   "statistics), group consistency, count-based labels; cosine distance, TV, Adam.")
    tiny_params = {"steps": 4, "restarts": 1, "groups": 2}

    def __init__(self, params: GradInversionParams, seed: int):
        super().__init__(params, seed)
        self.groups = params.groups
        self.final_evals = 1 if params.groups > 1 else 0  # the group mean's objective
        self._targets: list[_BatchNormTarget] = []
        self._captured: dict[int, torch.Tensor] = {}
        self._hooks: list = []
        self._source = ""

    def prepare(self, observation: Observation, update: GradientUpdate) -> None:
        self._remove_hooks()
        with_statistics = {id(m) for m in batchnorm_layers(update.model)}
        layers = [(n, m) for n, m in update.model.named_modules() if id(m) in with_statistics]
        shared = dict(zip((n for n, _ in update.model.named_buffers()), update.buffers, strict=False))
        derive = bool(update.buffers) and update.bn_mode == "train"
        self._targets = []
        for name, module in layers:
            old_mean, old_var = module.running_mean.detach().clone(), module.running_var.detach().clone()
            if derive:
                m = module.momentum if module.momentum is not None else 1.0 / (float(module.num_batches_tracked) + 1)
                mean = (shared[f"{name}.running_mean"] - (1 - m) * old_mean) / m
                var = (shared[f"{name}.running_var"] - (1 - m) * old_var) / m
            else:
                mean, var = old_mean, old_var
            self._targets.append(_BatchNormTarget(module, mean.detach(), var.detach(), derive))
            self._hooks.append(module.register_forward_hook(self._capture))
        self._source = ("none (the model has no BatchNorm layer)" if not layers else
                        "the victim batch's statistics, derived from the shared BatchNorm buffers" if derive else
                        "the model's running statistics (the protocol shares no batch statistics)")

    def _capture(self, module: nn.Module, args: tuple, _output: torch.Tensor) -> None:
        if self._capturing:
            self._captured[id(module)] = args[0]

    _capturing = False

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def prior(self, x: torch.Tensor) -> torch.Tensor | float:
        p = self.params
        value = p.l2_weight * x.pow(2).mean() if p.l2_weight else 0.0
        if not self._targets or not p.bn_weight:
            return value
        self._capturing = True
        try:
            self._model(x)  # the hooks fill self._captured
        finally:
            self._capturing = False
        bn = 0.0
        for t in self._targets:
            a = self._captured[id(t.module)]
            unbiased = t.from_batch and a.numel() // a.shape[1] > 1
            bn = bn + statistics_distance(a, t.mean, t.var, unbiased)
        return value + p.bn_weight * bn

    def group_term(self, pixels: torch.Tensor) -> torch.Tensor | float:
        if not self.params.group_weight:
            return 0.0
        consensus = pixels.mean(dim=0, keepdim=True).detach()
        return self.params.group_weight * (pixels - consensus).pow(2).mean(dim=(1, 2, 3, 4)).sum()

    def describe(self) -> dict:
        p = self.params
        return {"bn_prior": f"weight {p.bn_weight:g}; target: {self._source}",
                "group_consistency": f"{p.groups} candidates, weight {p.group_weight:g}, unregistered mean"}

    def run(self, observation, budget, progress=None):
        update = observation.gradient_update
        self._model = update.model if update is not None else None
        try:
            return super().run(observation, budget, progress)
        finally:
            self._remove_hooks()  # the attacker's model copy carries no hook of this run after it

    def _pick(self, best: dict, evals: int, update: GradientUpdate, fixed_labels: torch.Tensor | None,
              scale: Parametrisation) -> Candidate:
        chosen = super()._pick(best, evals, update, fixed_labels, scale)
        if self.groups < 2 or fixed_labels is None:
            return chosen
        consensus = best["pixels"].mean(dim=0)
        score = self._objective_at(update, consensus, fixed_labels)
        chosen.evals += 1
        if score < chosen.objective:
            return Candidate(consensus, None, score, chosen.evals, chosen.last_objective)
        return chosen

    def _objective_at(self, update: GradientUpdate, pixels: torch.Tensor, labels: torch.Tensor) -> float:
        """The per-candidate objective (gradient distance, TV, priors) at ``pixels`` [B, C, H, W]."""
        from privbench.attacks.gradient_inversion import dummy_update, mean_scale, total_variation

        params = [q for q in update.model.parameters() if q.requires_grad]
        x = pixels.detach().requires_grad_(False)
        dummy = dummy_update(update.model, params, x, labels, update.rule, create_graph=False)
        value = self.gradient_distance(dummy, mean_scale(update)) + self.params.tv_weight * total_variation(x)
        with torch.no_grad():
            value = value + self.prior(x)
        return float(value.detach()) if float(value) == float(value) else float("inf")
