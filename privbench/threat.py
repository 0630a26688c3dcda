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
class GradientUpdate:
    """The update one client shares for the victim batch, as the defense lets it out.

    ``model`` is the global model at ``round`` (the server knows it: it sent it),
    in train mode. ``gradients`` are, per parameter of ``model`` in
    ``model.parameters()`` order, d(mean cross-entropy over the batch)/d(param)
    after whatever the defense does to them. ``batch_size`` is the number of
    images behind the update (public in FL: the client reports it).
    ``encrypted``: the observer holds only ciphertexts of the update (HE aggregator): ``gradients`` is
    empty. ``local_steps``: SGD steps behind the update; with more than one it is (w_t - w_t+1) / lr
    after several steps, not a gradient.
    """

    model: "nn.Module"
    gradients: tuple["torch.Tensor", ...]
    batch_size: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    round: Literal["init", "trained"]
    loss: str = "cross_entropy(reduction=mean)"
    # How a point of the model's input space reads as an image [B, C, H, W] to someone without the
    # defense's secrets; None when the model takes images. MpLe's model takes morphed vectors.
    read_as_image: "Callable[[torch.Tensor], torch.Tensor] | None" = None
    encrypted: bool = False
    local_steps: int = 1


@dataclass(frozen=True)
class SharedData:
    """The SHARED_DATA surface: what a data provider sends a service that trains on its behalf.

    ``sent`` float32 [B, D]: the victim batch as transmitted (MpLe: morphed, D = padded pixels);
    ``labels`` int64 [B]: the class labels sent with it (a service cannot train without them).
    ``first_layer`` float32 [D, F*H'*W']: the first layer sent with the data, as a dense matrix
    (MpLe: the augmented convolution C_ac); ``first_bias`` [F]; ``feature_shape`` (F, H', W').
    ``model``: the service's network after the first layer (it trained it). ``image_shape`` (C, H, W)
    and ``padding`` are public hyperparameters; ``public_kernel`` [F, C, k, k] is the first
    convolution C_r when it is public, else None. ``known_pairs(n)`` reveals n (original [n, C, H, W],
    sent [n, D]) pairs of other images from the same provider: only known-plaintext attacks call it.
    ``corpus`` is the whole training set as the service received it (the victim batch is part of it).
    """

    sent: "torch.Tensor"
    labels: "torch.Tensor"
    first_layer: "torch.Tensor"
    first_bias: "torch.Tensor"
    feature_shape: tuple[int, int, int]
    image_shape: tuple[int, int, int]
    padding: int
    model: "nn.Module"
    public_kernel: "torch.Tensor | None" = None
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
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Victim:
    """The ground truth behind an observation: held by the runner, never given to the attack.

    ``images`` float32 [B, C, H, W] in [0, 1]; ``labels`` int64 [B]; ``ids`` dataset ids.
    """

    images: "torch.Tensor"
    labels: "torch.Tensor"
    ids: tuple[str, ...]
