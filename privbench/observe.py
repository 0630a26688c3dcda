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
from privbench.threat import AttackError, InversionTruth, MembershipTruth, Observation, Surface, Victim

if TYPE_CHECKING:
    from torch import nn

    from privbench.attacks.base import Attack
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


@dataclass
class CountedQuery:
    """The released model's query interface with a count of the images queried (a query budget is counted in
    images, like gradient evaluations): ``query(images [B, C, H, W]) -> logits [B, K]``, ``images_queried``."""

    query: "Any"  # the defense's query function
    images_queried: int = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.images_queried += int(images.shape[0])
        return self.query(images)


def inversion_victims(members: "ImageDataset", seed: int) -> Victim:
    """One member of each class, drawn by ``seed``: whose prediction vectors an instance-level (query) inversion
    attacker holds. Classes without members are left out."""
    rng = np.random.default_rng(seed)
    labels = members.labels.numpy()
    idx = [int(rng.choice(np.flatnonzero(labels == k))) for k in range(members.num_classes) if (labels == k).any()]
    chosen = members.subset(idx)
    return Victim(images=chosen.images, labels=chosen.labels, ids=chosen.ids)


def inversion_observation(defense: "Defense", surface: Surface, target: "Target", parts: "Splits",
                          ctx: "FitContext") -> tuple[Observation, InversionTruth]:
    """A model-inversion attacker's observation, and the truth kept apart for scoring.

    The attacker gets the defense's release on ``surface`` (MODEL_WHITEBOX: the released model in eval mode,
    with its BatchNorm statistics if it has any; MODEL_QUERIES: a counted query function, plus the released
    model's outputs on one victim member per class, their images withheld), the auxiliary split (public
    data of the same kind, disjoint from the members) and the public shape of the task. It never gets a
    member image: the members, nonmembers and victims go to the returned ``InversionTruth`` only, and
    nothing is read from the members here except, on MODEL_QUERIES, the victims' images to query the model.
    """
    if surface not in (Surface.MODEL_WHITEBOX, Surface.MODEL_QUERIES):
        raise AttackError(f"model inversion attacks the released model (model_whitebox or model_queries), "
                          f"not {surface.value}")
    release = defense.observe(surface, target, None, ctx)
    auxiliary = parts.auxiliary
    notes: dict[str, Any] = {**release.notes, "num_classes": auxiliary.num_classes,
                             "image_shape": list(auxiliary.image_shape), "n_auxiliary": len(auxiliary)}
    if release.model is not None:
        notes["released_model"] = type(release.model).__name__
    victims, outputs, query = None, None, release.query
    if surface is Surface.MODEL_QUERIES:
        victims = inversion_victims(parts.members, ctx.seeds["victim"])
        with torch.no_grad():
            outputs = release.query(victims.images.clone()).detach().clone()
        query = CountedQuery(release.query)
        notes["victims"] = len(victims.labels)
    observation = dataclasses.replace(release, query=query, auxiliary=auxiliary, victim_outputs=outputs, notes=notes)
    truth = InversionTruth(members=parts.members, nonmembers=parts.nonmembers, victims=victims,
                           identity=dict(ctx.data_identity))
    return observation, truth


def for_attack(attack: "Attack", defense: "Defense", target: "Target", parts: "Splits", ctx: "FitContext"
               ) -> "tuple[Observation, Victim | MembershipTruth | InversionTruth]":
    """The observation ``attack`` gets (by its surface and family) and the truth kept apart for its scorer."""
    surface = attack.surface
    if surface in (Surface.GRADIENTS, Surface.SHARED_DATA):
        truth = choose_victim(parts.members, ctx.config.victim_batch, ctx.seeds["victim"])
        return client_observation(defense, surface, target, truth, parts.auxiliary, ctx), truth
    if attack.family == "model_inversion":
        return inversion_observation(defense, surface, target, parts, ctx)
    return membership_observation(defense, surface, target, parts, ctx)
