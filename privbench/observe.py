"""Each surface's Observation, built from what the defense releases and the attacker's own data.

The defense answers ``observe(surface, target, victim, ctx)`` with its release; this module adds
only what the attacker holds by its threat model (the auxiliary split, anonymous candidates, a
shadow recipe built from public parts) and keeps the ground truth (``Victim``,
``MembershipTruth``) apart for scoring. Nothing here closes over the runner's context: the
callables an observation carries are small dataclasses whose fields are the public parts they
use, so a reachability walk (``privbench.reachability``) can check them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from privbench.config import ConfigError, RunConfig, derive_seed
from privbench.threat import MembershipTruth, Observation, Surface, Victim

if TYPE_CHECKING:
    from torch import nn

    from privbench.datasets import ImageDataset
    from privbench.datasets.splits import Splits
    from privbench.defenses.base import Defense, FitContext, Target

SEED_PURPOSES = ("init", "train", "secrets", "victim", "observe", "attack")


@dataclass(frozen=True)
class Architecture:
    """The public architecture of the target: ``build(seed)`` initialises it from a seed."""

    model: str
    model_params: tuple
    channels: int
    image_size: int
    num_classes: int

    @classmethod
    def of(cls, config: RunConfig, num_classes: int) -> "Architecture":
        return cls(config.model, config.model_params, config.channels, config.image_size, num_classes)

    def __call__(self, seed: int) -> "nn.Module":
        from privbench.models import build_model

        return build_model(self.model, dict(self.model_params), self.channels, self.image_size, self.num_classes, seed)


@dataclass(frozen=True)
class ShadowTrainer:
    """Trains a shadow model through the target's defense pipeline on the attacker's own data.

    Holds the defense (its public parameters), the public architecture, the run's public settings
    (seeds removed) and the attacker's auxiliary data for held-out utility. Each shadow's seeds,
    secrets included, derive from the shadow seed, so no shadow shares the target's secrets.
    """

    defense: "Defense"
    architecture: Architecture
    settings: RunConfig
    heldout: "ImageDataset"

    def __call__(self, data: "ImageDataset", seed: int) -> "nn.Module":
        from privbench.defenses.base import FitContext

        seeds = {purpose: derive_seed(seed, purpose) for purpose in SEED_PURPOSES}
        ctx = FitContext(
            config=self.settings, build_model=lambda: self.architecture(seed), nonmembers=self.heldout, seeds=seeds,
            data_identity={"shadow_data": data.ids_digest(), "shadow_seed": seed},
        )
        return self.defense.fit(self.architecture(seed), data, ctx).model


def public_settings(config: RunConfig) -> RunConfig:
    """``config`` without the seeds that locate the target's members and secrets (split, target, run seeds)."""
    return dataclasses.replace(config, seed=0, split_seed=0, target_seed=None)


def choose_victim(members: "ImageDataset", batch: int, seed: int) -> Victim:
    """``batch`` distinct members drawn by ``seed``: the client whose update or data is attacked."""
    if batch > len(members):
        raise ConfigError(f"victim_batch={batch} exceeds the {len(members)} members")
    idx = np.random.default_rng(seed).choice(len(members), size=batch, replace=False)
    chosen = members.subset(idx)
    return Victim(images=chosen.images, labels=chosen.labels, ids=chosen.ids)


def client_observation(defense: "Defense", surface: Surface, target: "Target", victim: Victim,
                       auxiliary: "ImageDataset", ctx: "FitContext") -> Observation:
    """GRADIENTS or SHARED_DATA: the defense's release for the victim batch, plus the attacker's population data."""
    observation = defense.observe(surface, target, victim, ctx)
    return dataclasses.replace(observation, auxiliary=auxiliary)


def membership_observation(defense: "Defense", surface: Surface, target: "Target", parts: "Splits",
                           ctx: "FitContext") -> tuple[Observation, MembershipTruth]:
    """The released-model observation plus what a membership attacker holds, and the truth kept apart.

    Candidates are every member and every nonmember (unique images: the split dropped duplicates),
    shuffled, with anonymous ids; which is which stays in the returned ``MembershipTruth``. ROC
    metrics are rates within each class, so the two need not be equal in number.
    """
    from privbench.datasets import ImageDataset

    members, nonmembers = parts.members, parts.nonmembers
    if len(members) == 0 or len(nonmembers) == 0:
        raise ConfigError("membership scoring needs non-empty members and nonmembers splits")
    n = len(members)
    order = np.random.default_rng(ctx.seeds["victim"]).permutation(n + len(nonmembers))
    images = torch.cat([members.images, nonmembers.images])[order]
    labels = torch.cat([members.labels, nonmembers.labels])[order]
    candidates = ImageDataset(images, labels, members.class_names, tuple(f"candidate/{i}" for i in range(len(order))),
                              {"source": "the run's members and nonmembers, shuffled; membership withheld"})
    architecture = Architecture.of(ctx.config, members.num_classes)
    release = defense.observe(surface, target, None, ctx)
    notes: dict[str, Any] = {
        **release.notes,
        "target_train_time_s": target.costs.get("train_time_s"),
        "n_members": n,
        "n_candidates": len(order),
        "training_recipe": defense.plain_training_recipe(),
    }
    observation = dataclasses.replace(
        release, auxiliary=parts.auxiliary, candidates=candidates, build_model=architecture, notes=notes,
        shadow_trainer=ShadowTrainer(defense, architecture, public_settings(ctx.config), parts.auxiliary),
    )
    return observation, MembershipTruth(is_member=order < n)
