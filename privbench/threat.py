"""Threat model: the surfaces an attacker can be given and what an observation holds.

An ``Observation`` carries only what the attacker may see under its surface.
The victim's true images and labels never enter it: the runner keeps them and
uses them for scoring alone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from privbench.datasets import ImageDataset


class AttackError(RuntimeError):
    """The attack cannot run on what the defense exposes (wrong surface, missing field); stored as unsupported."""


class UnsupportedPair(AttackError):
    """The pair cannot be run honestly within the attack's budget; stored as unsupported."""


class Surface(str, enum.Enum):
    GRADIENTS = "gradients"  # the update a client shares for the victim batch
    MODEL_WHITEBOX = "model_whitebox"  # the released model's weights and architecture
    MODEL_QUERIES = "model_queries"  # a query function returning the released model's outputs
    SHARED_DATA = "shared_data"  # what a data provider sends the service that trains on its data


@dataclass(frozen=True)
class UpdateRule:
    """How a shared update is formed from the batch's per-example gradients, as far as the protocol is public.

    update = (sum_i clip(g_i) + noise) / divisor, with clip(g) = g * min(1, clip_norm / (|g|_2 + 1e-6)),
    where g_i = d(cross-entropy of example i)/d(params). The defaults give the plain mean gradient.
    ``clip_norm`` None: no clipping. ``divisor`` None: the batch size (the mean). ``noise_std``: the
    per-coordinate std of the Gaussian noise added to the sum (public, but its draw is not): an attacker
    can simulate everything here except the noise itself.
    """

    clip_norm: float | None = None
    divisor: float | None = None
    noise_std: float = 0.0

    @property
    def is_plain_mean(self) -> bool:
        return self.clip_norm is None and self.divisor is None


@dataclass(frozen=True)
class MorphedLayer:
    """A first layer that takes morphed vectors, and what its holder knows about it (MpLe's C_ac).

    ``dense`` float32 [D, F*H'*W'] and ``bias`` [F]: ``t @ dense + bias`` are the first-layer features
    [F, H', W'] (``feature_shape``) of the image behind the morphed vector t [D]. ``image_shape``
    (C, H, W) and ``padding`` are public hyperparameters (D = C (H+2p) (W+2p)). ``public_kernel``
    [F, C, k, k] is the image-space convolution behind the layer when it is public, else None.
    """

    dense: "torch.Tensor"
    bias: "torch.Tensor"
    feature_shape: tuple[int, int, int]
    image_shape: tuple[int, int, int]
    padding: int
    public_kernel: "torch.Tensor | None" = None


@dataclass(frozen=True)
class GradientUpdate:
    """The update one client shares for the victim batch, as the defense lets it out.

    ``model`` is a fresh copy of the global model at ``round`` (the server knows it: it sent it), in
    the BatchNorm mode the client computed the update in (``bn_mode``: ``train`` uses the batch's
    statistics, ``eval`` the global running statistics), with the global model's buffers (never
    statistics of the victim batch).
    ``gradients`` are, per parameter of ``model`` in ``model.parameters()`` order, the update formed
    by ``rule`` (default: d(mean cross-entropy over the batch)/d(param)) and then whatever else the
    defense does to it. ``batch_size`` is the number of examples behind the update (public in FL: the
    client reports it). ``morphed``: the model's input is a morphed vector [1, 1, D], not an image,
    and this is the first layer the observer holds (None: the model takes images [C, H, W]).
    ``encrypted``: the observer holds only ciphertexts of the update (HE aggregator): ``gradients``
    is empty. ``local_steps``: SGD steps behind the update; with more than one it is
    (w_t - w_t+1) / lr after several steps, not a gradient. ``buffers``: the BatchNorm buffer values
    the update shares, in ``model.buffers()`` order, when the protocol shares them (FedAvg: the
    running statistics after the local steps, which reveal the batch's per-channel mean and variance);
    empty otherwise (buffers kept private, eval mode, or a model without BatchNorm).
    """

    model: "nn.Module"
    gradients: tuple["torch.Tensor", ...]
    batch_size: int
    input_shape: tuple[int, int, int]  # (C, H, W) of the model's input
    num_classes: int
    round: Literal["init", "trained"]
    loss: str = "cross_entropy(reduction=mean)"
    rule: UpdateRule = field(default_factory=UpdateRule)
    morphed: MorphedLayer | None = None
    encrypted: bool = False
    local_steps: int = 1
    buffers: tuple["torch.Tensor", ...] = ()
    bn_mode: Literal["train", "eval"] = "train"


@dataclass(frozen=True)
class SharedData:
    """The SHARED_DATA surface: what a data provider sends a service that trains on its behalf.

    ``sent`` float32 [B, D]: the victim batch as transmitted (MpLe: morphed, D = padded pixels);
    ``labels`` int64 [B]: the class labels sent with it (a service cannot train without them).
    ``layer``: the first layer sent with the data (MpLe: the augmented convolution C_ac) and the
    public facts about it. ``model``: the service's network after the first layer (it trained it).
    ``known_pairs(n)`` reveals n (original [n, C, H, W], sent [n, D]) pairs of other images from
    the same provider: only known-plaintext attacks call it. ``corpus`` is the whole training set
    as the service received it (the victim batch is part of it).
    """

    sent: "torch.Tensor"
    labels: "torch.Tensor"
    layer: MorphedLayer
    model: "nn.Module"
    known_pairs: "Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None" = None
    corpus: "torch.Tensor | None" = None  # [N, D]: every training image the service received, as sent


@dataclass(frozen=True)
class Observation:
    """What the attacker sees. Fields outside the surface are None."""

    surface: Surface
    gradient_update: GradientUpdate | None = None
    shared: SharedData | None = None
    model: "nn.Module | None" = None
    query: "Callable[[torch.Tensor], torch.Tensor] | None" = None  # images [B,C,H,W] -> logits [B,K]
    auxiliary: "ImageDataset | None" = None  # the attacker's population data (other patients)
    candidates: "ImageDataset | None" = None  # images and class labels whose membership is asked, not revealed
    shadow_trainer: "Callable[[ImageDataset, int], nn.Module] | None" = None  # the target's training pipeline
    build_model: "Callable[[int], nn.Module] | None" = None  # the public architecture, initialised from a seed
    # model inversion from queries: the released model's outputs (logits [B, K]) on the victims' images, which stay
    # withheld (an instance-level attacker holds a victim's prediction vector, not its image)
    victim_outputs: "torch.Tensor | None" = None
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Victim:
    """The ground truth behind an observation: held by the runner, never given to the attack.

    ``images`` float32 [B, C, H, W] in [0, 1]; ``labels`` int64 [B]; ``ids`` dataset ids.
    """

    images: "torch.Tensor"
    labels: "torch.Tensor"
    ids: tuple[str, ...]


@dataclass(frozen=True)
class MembershipTruth:
    """The ground truth behind a membership observation, held by the runner: ``is_member`` bool [N],
    one per candidate in the observation's order."""

    is_member: "np.ndarray"


@dataclass(frozen=True)
class InversionTruth:
    """The ground truth behind a model-inversion observation, held by the runner for scoring alone.

    ``members``: the target's training set (what a class-level inversion should resemble; the scorer's
    evaluation classifier trains on it); ``nonmembers``: held-out images of the same classes (a leak is an
    inversion closer to members than to these); ``victims``: the members whose prediction vectors an
    instance-level observation carries (MODEL_QUERIES), else None. Nothing is read from ``members`` or
    ``nonmembers`` until the scorer does. ``identity``: what names these splits (for the scorer's caches).
    """

    members: "ImageDataset"
    nonmembers: "ImageDataset"
    victims: Victim | None = None
    identity: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AttackSetting:
    """The public shape of a run, known before anything is trained, so an attack can refuse bad input early.

    Sizes are image counts; ``image_shape`` is (C, H, W).
    """

    n_members: int
    n_nonmembers: int
    n_auxiliary: int
    victim_batch: int
    num_classes: int
    image_shape: tuple[int, int, int]

    @property
    def n_candidates(self) -> int:
        """Images whose membership a membership attack scores: every member and every nonmember."""
        return self.n_members + self.n_nonmembers
