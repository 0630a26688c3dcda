"""Attacks on MpLe: the service provider (SHARED_DATA) or an eavesdropper (GRADIENTS) reconstructs the images.

- ``mple-view`` (naive): reads the morphed vector t as an image.
- ``mple-feature-leak`` (adaptive): t C_ac is the permuted first-layer feature maps of the image,
  F filtered copies of it. The filters are identified blind from the cross-relation
  ``corr(f_i, k_j) = corr(f_j, k_i)`` (Xu, Liu, Tong & Kailath 1995), which holds for any two
  channels of one image; with a public C_r they are matched to the known filters (undoing the
  permutation), else kept up to a global scale fixed from the auxiliary data's mean intensity.
  The image is then the least-squares deconvolution.
- ``mple-known-plaintext`` (adaptive): from n (d, t) pairs, a minimum-norm or ridge estimate of
  M^-1 unmorphs the victim's t.

And on MpLe's GRADIENTS surface (an eavesdropper on the service's training updates, who holds the
service model and so C_ac): ``dlg-mple`` / ``invgrad-mple`` invert the morphed input t without image
priors and map it back to an image as ``mple-feature-leak`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.nn import functional as F

from privbench import morphing, registry
from privbench.attacks.base import Attack, AttackOutput, Progress
from privbench.attacks.gradient_inversion import GradientInversion, GradientInversionParams, InvertingGradientsParams
from privbench.config import Budget
from privbench.params import bounded
from privbench.threat import AttackError, GradientUpdate, MorphedLayer, Observation, SharedData, Surface


class SharedDataAttack(Attack):
    surface = Surface.SHARED_DATA
    family = "reconstruction"
    tiny_defense = "mple"

    def _shared(self, observation: Observation) -> SharedData:
        if observation.shared is None:
            raise AttackError(f"{self.registry_name} needs the shared_data surface; the observation has none")
        return observation.shared



def features_to_images(sent: torch.Tensor, layer: MorphedLayer, auxiliary_mean: float | None,
                       corpus: torch.Tensor | None, ridge: float) -> tuple[torch.Tensor, dict]:
    """Images [B, C, H, W] behind morphed vectors ``sent`` [B, D], using only the layer its holder has.

    ``sent @ layer.dense`` are the (permuted) first-layer features of the images. Their filters are
    identified blind by the cross-relation; with a public kernel they are matched to it (undoing the
    permutation), else one global scale is fixed so that the mean reconstruction of ``corpus`` (or of
    ``sent``) has the intensity ``auxiliary_mean``. Then least-squares deconvolution.
    """
    geometry = morphing.layer_geometry(layer)
    if geometry.channels != 1:
        raise AttackError("the feature-leak mapping models single-channel images only (the cross-relation needs "
                          f"one input channel); these have {geometry.channels}")
    dense = layer.dense.double()
    features = (sent.double() @ dense).reshape(-1, *layer.feature_shape)
    kernels, gap = identify_filters(features)  # [F, 3, 3], unit norm overall, sign and scale unknown
    info: dict = {"eigen_gap": gap}
    shape = (geometry.out_channels, 1, geometry.kernel, geometry.kernel)
    if layer.public_kernel is not None:
        known = layer.public_kernel.double().reshape(geometry.out_channels, -1)
        order, agreement = match_filters(kernels.reshape(geometry.out_channels, -1), known)
        images = deconvolve(features, known[order].reshape(shape), geometry, ridge)
        info.update(c_r="public: filters matched to C_r, permutation undone",
                    permutation_recovered=[int(i) for i in order], min_match_correlation=agreement)
        return images, info
    kernels = kernels.reshape(shape)
    images = deconvolve(features, kernels, geometry, ridge)
    if auxiliary_mean is None:
        raise AttackError("with a secret C_r the feature-leak mapping needs auxiliary images to fix the scale")
    # One unknown scale (and sign) for every image: fix it so that the mean reconstruction of what the
    # holder received (linear, so computed from the mean of t) has the auxiliary data's mean intensity.
    pool = corpus if corpus is not None else sent
    mean_features = (pool.double().mean(0, keepdim=True) @ dense).reshape(1, *layer.feature_shape)
    mean_image = deconvolve(mean_features, kernels, geometry, ridge)
    scale = auxiliary_mean / float(mean_image.mean())
    info.update(c_r="secret: filters identified up to one scale; scale and sign matched to the auxiliary "
                f"mean over the {len(pool)} morphed vectors held", scale=scale)
    return images * scale, info


@dataclass(frozen=True)
class ViewParams:
    scaling: Literal["minmax", "clip"] = "minmax"  # per-image min-max to [0, 1], or clip to [0, 1]


@registry.attacks.register("mple-view")
class MorphedView(SharedDataAttack):
    """Naive: the morphed vector, unpadded to the image grid and scaled to [0, 1], taken as the image."""

    Params = ViewParams
    description = "MpLe naive: read the morphed vector t directly as an image (per-image min-max scaling)."

    def run(self, observation: Observation, budget: Budget, progress: Progress | None = None) -> AttackOutput:
        shared = self._shared(observation)
        images = morphing.read_morphed(shared.sent, shared.layer, self.params.scaling)
        return AttackOutput(images=images, labels=shared.labels.clone(),
                            info={"reading": f"t unpadded, {self.params.scaling}", "labels": "sent in the clear"})


@dataclass(frozen=True)
class FeatureLeakParams:
    ridge: float = bounded(1e-9, ge=0, le=1e6)  # relative Tikhonov term of the deconvolution (x trace / n)


@registry.attacks.register("mple-feature-leak")
class FeatureLeak(SharedDataAttack):
    """Adaptive: t C_ac gives the first-layer features; blind filter identification, then deconvolution."""

    adaptive_for = ("mple",)
    Params = FeatureLeakParams
    description = ("MpLe adaptive: t C_ac = permuted C_r features of the image; identify the filters by the "
                   "cross-relation (match to C_r when public), least-squares deconvolution.")

    def run(self, observation: Observation, budget: Budget, progress: Progress | None = None) -> AttackOutput:
        shared = self._shared(observation)
        auxiliary_mean = None if observation.auxiliary is None else float(observation.auxiliary.images.double().mean())
        images, info = features_to_images(shared.sent, shared.layer, auxiliary_mean, shared.corpus, self.params.ridge)
        return AttackOutput(images=images.clamp(0, 1).float(), labels=shared.labels.clone(),
                            info={**info, "labels": "sent in the clear"})


def identify_filters(features: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Blind SIMO filter identification: features [B, F, H', W'] of single-channel images -> kernels [F, k*k].

    Minimises sum over channel pairs of ||corr(f_i, k_j) - corr(f_j, k_i)||^2 (kernel size inferred as 3)
    over unit-norm stacked kernels: the eigenvector of the smallest eigenvalue. Returns it and the
    ratio of the second smallest to the smallest eigenvalue (large: identifiable).
    """
    batch, channels = features.shape[:2]
    size = 3
    gram = torch.zeros(channels, channels, size * size, size * size, dtype=torch.float64)
    for image in features:
        patches = F.unfold(image.unsqueeze(1), size)  # [F, 9, P]: the valid 3x3 patches of each channel
        gram += torch.einsum("akp,blp->abkl", patches, patches)
    # Q[a, a] = sum_{b != a} G[b, b]; Q[a, b] = -G[b, a]
    q = -gram.transpose(0, 1).clone()
    diagonal = gram[torch.arange(channels), torch.arange(channels)]  # [F, 9, 9]
    total = diagonal.sum(0)
    for a in range(channels):
        q[a, a] = total - diagonal[a]
    q = q.permute(0, 2, 1, 3).reshape(channels * size * size, channels * size * size)
    values, vectors = torch.linalg.eigh((q + q.T) / 2)
    gap = float(values[1] / values[0].abs().clamp(min=1e-300))
    return vectors[:, 0].reshape(channels, size * size), gap


def match_filters(estimated: torch.Tensor, known: torch.Tensor) -> tuple[np.ndarray, float]:
    """Assign each observed channel j a known filter order[j] by |normalised correlation| (Hungarian)."""
    from scipy.optimize import linear_sum_assignment

    a = estimated / estimated.norm(dim=1, keepdim=True).clamp(min=1e-300)
    b = known / known.norm(dim=1, keepdim=True).clamp(min=1e-300)
    similarity = (a @ b.T).abs().numpy()
    rows, cols = linear_sum_assignment(-similarity)
    order = cols[np.argsort(rows)]
    return order, float(similarity[np.arange(len(order)), order].min())


def deconvolve(features: torch.Tensor, kernels: torch.Tensor, geometry: morphing.ConvGeometry,
               ridge: float) -> torch.Tensor:
    """Least-squares images [B, C, H, W] with zero padding, given features [B, F, H', W'] and kernels [F, C, k, k]."""
    dense = morphing.dense_conv_matrix(kernels, geometry)  # [D, F*H'*W']
    interior = morphing.pad_flat(torch.ones(1, *((geometry.channels, geometry.height, geometry.width))),
                                 geometry)[0].bool()
    a = dense[interior]  # [C*H*W, F*H'*W']: the padding is known to be zero
    normal = a @ a.T
    normal += ridge * normal.diagonal().mean() * torch.eye(len(normal), dtype=normal.dtype)
    solution = torch.linalg.solve(normal, a @ features.flatten(1).T).T  # [B, C*H*W]
    return solution.reshape(-1, geometry.channels, geometry.height, geometry.width)


@dataclass(frozen=True)
class KnownPlaintextParams:
    pairs: int = bounded(256, ge=1, le=10**7)  # known (image, morphed) pairs of the same provider
    estimator: Literal["minnorm", "ridge"] = "minnorm"
    ridge: float = bounded(1e-3, ge=0, le=1e6)  # ridge only: lambda relative to the mean diagonal of T^T T

    def __post_init__(self) -> None:
        if self.pairs < 1 or self.ridge < 0:
            raise ValueError("pairs must be >= 1 and ridge >= 0")


@registry.attacks.register("mple-known-plaintext")
class KnownPlaintext(SharedDataAttack):
    """Adaptive: estimate M^-1 from n known (d, t) pairs by least squares and unmorph the victim's t."""

    adaptive_for = ("mple",)
    Params = KnownPlaintextParams
    description = "MpLe adaptive: n known (image, morphed) pairs -> minimum-norm/ridge estimate of M^-1 -> unmorph."
    tiny_params = {"pairs": 8}

    def run(self, observation: Observation, budget: Budget, progress: Progress | None = None) -> AttackOutput:
        shared = self._shared(observation)
        if shared.known_pairs is None:
            raise AttackError("mple-known-plaintext: the observation offers no known pairs")
        geometry = morphing.layer_geometry(shared.layer)
        originals, morphed = shared.known_pairs(self.params.pairs)
        target = morphing.pad_flat(originals.double(), geometry)  # [n, D]
        sent = morphed.double()
        if self.params.estimator == "minnorm":
            inverse = torch.linalg.pinv(sent) @ target  # [D, D], minimum-norm solution of sent @ N = target
        else:
            gram = sent.T @ sent
            lam = self.params.ridge * float(gram.diagonal().mean())
            inverse = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), sent.T @ target)
        images = morphing.unpad(shared.sent.double() @ inverse, geometry)
        return AttackOutput(images=images.clamp(0, 1).float(), labels=shared.labels.clone(),
                            info={"pairs": self.params.pairs, "estimator": self.params.estimator,
                                  "unknowns": geometry.padded, "labels": "sent in the clear"})


# -- adaptive gradient inversion against MpLe's GRADIENTS surface ----------------------------------


class _MorphedGradientInversion(GradientInversion):
    """Gradient inversion of the morphed input t (no image priors), then t -> image through the layer held.

    The eavesdropper holds the service model, so it holds C_ac (``update.morphed``) and, when public, C_r.
    ``t C_ac`` are the first-layer features of the victim's image; ``features_to_images`` identifies the
    filters and deconvolves, as ``mple-feature-leak`` does for the service provider.
    """

    tiny_defense = "mple"

    def to_images(self, inputs: torch.Tensor, update: GradientUpdate,
                  observation: Observation) -> tuple[torch.Tensor, dict]:
        if update.morphed is None:
            raise AttackError(f"{self.registry_name} attacks a model whose input is morphed (the mple defense's "
                              f"gradients surface); this model takes images")
        auxiliary_mean = None if observation.auxiliary is None else float(observation.auxiliary.images.double().mean())
        images, info = features_to_images(inputs.flatten(1), update.morphed, auxiliary_mean, None, ridge=1e-9)
        return images, {**info, "read_as_image": "inverted t without image priors, then t C_ac -> filters -> "
                        "least-squares deconvolution (what the observer holds: C_ac, public C_r)"}


@dataclass(frozen=True)
class MorphedDLGParams(GradientInversionParams):
    # Adaptive: take the label the update gives away (iDLG's rule, one image) instead of optimising a soft label;
    # joint soft labels for batches.
    label: Literal["joint", "analytic", "auto"] = "auto"


@registry.attacks.register("dlg-mple")
class MorphedDLG(_MorphedGradientInversion):
    """DLG on the morphed input (analytic label for one image), mapped back to an image through C_ac and C_r."""

    adaptive_for = ("mple",)
    Params = MorphedDLGParams
    description = "MpLe adaptive gradient inversion: DLG on morphed t (no image priors), then t C_ac deconvolved."


@registry.attacks.register("invgrad-mple")
class MorphedInvertingGradients(_MorphedGradientInversion):
    """Inverting Gradients on the morphed input (box and TV dropped), mapped back through C_ac."""

    adaptive_for = ("mple",)
    Params = InvertingGradientsParams
    description = ("MpLe adaptive gradient inversion: Inverting Gradients on morphed t (box and TV dropped), "
                   "then t C_ac deconvolved.")
    tiny_params = {"steps": 8, "restarts": 2}
