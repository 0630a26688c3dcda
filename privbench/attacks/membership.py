"""Membership inference against the released model (surface MODEL_QUERIES).

The attacker queries the released model (logits, or with ``label_only`` only the
predicted class) on candidate images with their class labels, and holds the
auxiliary split (other patients, disjoint from every candidate). It returns one
score per candidate, higher meaning "member"; the runner scores them against the
membership it withheld.

- ``loss-threshold`` (Yeom et al., 2018): score = -loss; the decision threshold is
  the median loss on auxiliary data (non-members by construction). Trains
  nothing; uses auxiliary data only for that threshold.
- ``shadow`` (Shokri et al., 2017): shadow models trained by privbench on the
  auxiliary split through the target's own defense pipeline, their outputs on
  their own in/out halves fed to ART's ``MembershipInferenceBlackBox``. Shadow
  data and candidates are disjoint. A shadow ensemble whose estimated training
  time exceeds ``shadow_budget_s`` makes the pair unsupported (with the estimate).
- ``lira`` (Carlini et al., 2022): N shadows of the target's training-set size
  and recipe on a balanced design over a pool (every pool example IN in the same
  number of shadows, up to one); logit-scaled confidence; per-example Gaussians.
  Online, the pool is the candidates (+ auxiliary images up to twice the shadow
  size), so by design each scored candidate is IN for about S * size / pool
  shadows and OUT for the rest; offline, the pool is auxiliary only (disjoint).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from privbench import registry
from privbench.attacks.base import Attack, AttackError, AttackOutput, Progress, substage
from privbench.config import Budget, ConfigError
from privbench.deps import require
from privbench.params import bounded
from privbench.threat import AttackSetting, Observation, Surface, UnsupportedPair


@torch.no_grad()
def query_logits(observation: Observation, images: torch.Tensor, label_only: bool, batch: int = 512) -> torch.Tensor:
    """Logits [N, K] from the released model; with ``label_only`` a one-hot of the predicted class."""
    out = torch.cat([observation.query(images[i : i + batch]) for i in range(0, len(images), batch)])
    if label_only:
        return F.one_hot(out.argmax(1), out.shape[1]).float()
    return out


def logit_confidence(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """LiRA's logit-scaled confidence log(p_y / (1 - p_y)), computed stably from logits [..., N, K]."""
    true = logits.gather(-1, labels.expand(*logits.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, labels.expand(*logits.shape[:-1]).unsqueeze(-1), float("-inf"))
    return true - torch.logsumexp(others, dim=-1)


class MembershipAttack(Attack):
    surface = Surface.MODEL_QUERIES
    family = "membership"

    def _check(self, observation: Observation) -> None:
        if observation.query is None or observation.candidates is None:
            raise AttackError(f"{self.registry_name} needs the MODEL_QUERIES surface with candidates to score")
        if observation.auxiliary is None or len(observation.auxiliary) == 0:
            raise ConfigError(f"{self.registry_name} needs auxiliary data; the auxiliary split is empty")


@dataclass(frozen=True)
class LossThresholdParams:
    label_only: bool = False  # only the predicted class is visible: loss is 0 if right, 1 if wrong
    threshold_quantile: float = bounded(0.5, gt=0, lt=1)  # decision threshold: this quantile of the auxiliary losses

    def __post_init__(self) -> None:
        if not 0 < self.threshold_quantile < 1:
            raise ValueError("threshold_quantile must be in (0, 1)")


@registry.attacks.register("loss-threshold")
class LossThreshold(MembershipAttack):
    """Yeom et al. 2018: low loss means member; threshold calibrated on auxiliary data only."""

    Params = LossThresholdParams
    description = "Loss threshold (Yeom et al. 2018): score -loss; threshold from auxiliary losses only."

    def _losses(self, observation: Observation, images, labels) -> torch.Tensor:
        logits = query_logits(observation, images, self.params.label_only)
        if self.params.label_only:
            return (logits.argmax(1) != labels).double()
        return F.cross_entropy(logits, labels, reduction="none").double()

    def run(self, observation: Observation, budget: Budget, progress: Progress | None = None) -> AttackOutput:
        self._check(observation)
        aux, cand = observation.auxiliary, observation.candidates
        threshold = float(torch.quantile(self._losses(observation, aux.images, aux.labels), self.params.threshold_quantile))
        losses = self._losses(observation, cand.images, cand.labels)
        return AttackOutput(
            scores=(-losses).numpy(), decisions=(losses <= threshold).numpy(),
            info={"threshold": threshold, "calibration": f"{self.params.threshold_quantile:g} quantile of auxiliary losses"},
        )


@dataclass(frozen=True)
class ShadowParams:
    shadows: int = bounded(4, ge=1, le=10_000)  # shadow models, each on its own disjoint part of the auxiliary split (half in, half out)
    attack_model: str = "rf"  # ART attack model type: nn, rf, gb, lr, dt, knn, svm
    shadow_budget_s: float = bounded(1800.0, gt=0, le=1e7)  # refuse (unsupported) if the shadows are estimated to take longer
    min_shadow_images: int = bounded(40, ge=1, le=10**7)  # each shadow's part of the auxiliary split must hold at least this many

    def __post_init__(self) -> None:
        if self.shadows < 1 or self.shadow_budget_s <= 0:
            raise ValueError("shadows must be >= 1 and shadow_budget_s > 0")


@registry.attacks.register("shadow")
class ShadowModels(MembershipAttack):
    """Shokri et al. 2017 with ART's MembershipInferenceBlackBox; shadows trained through the target's defense."""

    Params = ShadowParams
    description = "Shadow models (Shokri et al. 2017) trained through the target's defense, ART black-box attack model."
    stochastic = True  # which auxiliary images each shadow trains on, the shadows' seeds, the attack model's fit
    tiny_params = {"shadows": 2, "min_shadow_images": 8}

    def check_setting(self, setting: AttackSetting) -> None:
        _require_art()
        self._per_shadow(setting.n_auxiliary)

    def _per_shadow(self, n_auxiliary: int) -> int:
        """Auxiliary images per shadow; ConfigError if fewer than ``min_shadow_images``."""
        p = self.params
        per_shadow = n_auxiliary // p.shadows
        if per_shadow < p.min_shadow_images:
            raise ConfigError(
                f"shadow: {p.shadows} shadows need at least {p.shadows * p.min_shadow_images} auxiliary images "
                f"({p.min_shadow_images} each); the auxiliary split has {n_auxiliary}. Ask for fewer shadows."
            )
        return per_shadow

    def run(self, observation: Observation, budget: Budget, progress: Progress | None = None) -> AttackOutput:
        self._check(observation)
        p = self.params
        aux, cand = observation.auxiliary, observation.candidates
        per_shadow = self._per_shadow(len(aux))
        if observation.shadow_trainer is None:
            raise UnsupportedPair("shadow: the defense exposes no training pipeline to build shadows with")
        target_time = float(observation.notes.get("target_train_time_s") or 0.0)
        n_target = max(int(observation.notes.get("n_members") or 1), 1)
        estimate = p.shadows * target_time * (per_shadow / 2) / n_target
        if estimate > p.shadow_budget_s:
            raise UnsupportedPair(
                f"shadow: {p.shadows} shadows through this defense are estimated at {estimate:.0f} s, over the "
                f"shadow budget of {p.shadow_budget_s:.0f} s (raise shadow_budget_s or use fewer shadows)"
            )
        _require_art()
        from art.attacks.inference.membership_inference import MembershipInferenceBlackBox
        from art.estimators.classification import PyTorchClassifier

        order = np.random.default_rng(self.seed).permutation(len(aux))
        preds_in, preds_out, y_in, y_out, first = [], [], [], [], None
        shadow_progress = substage(progress, "shadow models")
        if shadow_progress:
            shadow_progress(0, p.shadows)
        for s in range(p.shadows):
            part = order[s * per_shadow : (s + 1) * per_shadow]
            inside, outside = aux.subset(part[: per_shadow // 2]), aux.subset(part[per_shadow // 2 :])
            model = observation.shadow_trainer(inside, self.seed + s).eval()
            first = first or model
            with torch.no_grad():
                preds_in.append(F.softmax(model(inside.images), 1).numpy())
                preds_out.append(F.softmax(model(outside.images), 1).numpy())
            y_in.append(inside.labels.numpy())
            y_out.append(outside.labels.numpy())
            if shadow_progress:
                shadow_progress(s + 1, p.shadows)
        if model_progress := substage(progress, "attack model"):
            model_progress(0, 1)  # ended by the scoring stage
        k = cand.num_classes
        onehot = np.eye(k, dtype=np.float32)
        target_probs = F.softmax(query_logits(observation, cand.images, False), 1).numpy().astype(np.float32)
        with _seeded_global_rngs(self.seed):
            estimator = PyTorchClassifier(first, loss=torch.nn.CrossEntropyLoss(), input_shape=cand.image_shape,
                                          nb_classes=k)
            art = MembershipInferenceBlackBox(estimator, input_type="prediction", attack_model_type=p.attack_model)
            art.fit(y=onehot[np.concatenate(y_in)], pred=np.concatenate(preds_in).astype(np.float32),
                    test_y=onehot[np.concatenate(y_out)], test_pred=np.concatenate(preds_out).astype(np.float32))
            scores = art.infer(None, onehot[cand.labels.numpy()], pred=target_probs, probabilities=True)
        scores = np.asarray(scores, dtype=np.float64).reshape(len(cand), -1)[:, -1]
        return AttackOutput(
            scores=scores, decisions=scores >= 0.5,
            info={"shadows": p.shadows, "images_per_shadow": per_shadow, "estimated_shadow_time_s": estimate,
                  "attack_model": f"ART MembershipInferenceBlackBox({p.attack_model})",
                  "data": "shadow data (auxiliary) disjoint from the candidates"},
        )


@contextlib.contextmanager
def _seeded_global_rngs(seed: int):
    """ART's attack models take no seed: scikit-learn's draw from numpy's global RNG, the ``nn`` model from torch's.
    Both are seeded from the attack seed while ART fits and scores, and restored afterwards, so a run is
    reproducible from its seed."""
    state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            np.random.set_state(state)


def _require_art() -> None:
    """ART and the scikit-learn attack models it fits, checked before anything is trained."""
    require("art", "the shadow attack (ART's black-box membership attack)")
    require("sklearn", "the shadow attack (ART's attack models)")


def balanced_inclusion(pool: int, size: int, shadows: int, generator: torch.Generator) -> torch.Tensor:
    """[S, P] bool: shadow s trains on the pool examples where row s is True.

    Every shadow gets exactly ``size`` distinct examples, and every example is IN
    in floor(S * size / P) or ceil(S * size / P) shadows, OUT in the others. It is
    a stream of random permutations of the pool cut into blocks of ``size``; where
    a block spans two permutations, its examples already drawn go to the back of
    the next one. With P = 2 * size and S even each example is IN in exactly half
    the shadows (Carlini et al.'s design).
    """
    if not 0 < size <= pool or shadows < 1:
        raise ValueError(f"need 0 < size <= pool and shadows >= 1; got size {size}, pool {pool}, shadows {shadows}")
    inside = torch.zeros(shadows, pool, dtype=torch.bool)
    stream = torch.empty(0, dtype=torch.long)
    for s in range(shadows):
        block, stream = stream[:size], stream[size:]
        if len(block) < size:
            perm = torch.randperm(pool, generator=generator)
            drawn = torch.zeros(pool, dtype=torch.bool)
            drawn[block] = True
            perm = torch.cat([perm[~drawn[perm]], perm[drawn[perm]]])
            need = size - len(block)
            block, stream = torch.cat([block, perm[:need]]), perm[need:]
        inside[s, block] = True
    return inside


@dataclass(frozen=True)
class LiRAParams:
    shadows: int = bounded(16, ge=2, le=10_000)
    online: bool = True  # shadows on a pool of auxiliary + candidates (IN and OUT Gaussians); else auxiliary only
    # Also query the horizontal flip (a Gaussian per view, scores averaged). Carlini et al. query the augmentations
    # the model trained with; privbench's training recipes use none, so a member's flip was never fit and only
    # dilutes the signal (on the overfit brain-tumor-mri sanity target it cost about 0.05 AUC).
    augment: bool = False
    # One variance shared by every example, IN and OUT alike (the authors' reference code for few shadows);
    # else per-example variances (needs many shadows: with S shadows an example has ~S*size/pool IN samples).
    fixed_variance: bool = True
    # Train the ensemble at once: one grouped network for Sequential conv/linear models, torch.func vmap for
    # other models without BatchNorm. Off by default: on this 2-core CPU it measured 1.06x (16 convnet shadows,
    # 2 threads, loaded machine): the training is compute-bound, not per-operation overhead bound, and grouped
    # convolutions cost about as much as S separate ones (benchmarks/perf/lira_shadows.py).
    vectorized: bool = False
    shadow_size: int | None = bounded(None, ge=1, le=10**9)  # images per shadow; None: the target's training-set size (public)

    def __post_init__(self) -> None:
        if self.shadows < 2:
            raise ValueError("lira needs at least 2 shadows")


@registry.attacks.register("lira")
class LiRA(MembershipAttack):
    """Likelihood-ratio attack (Carlini et al. 2022): per-example Gaussians of shadow confidences."""

    Params = LiRAParams
    description = "LiRA (Carlini et al. 2022): balanced shadow ensemble, logit confidence, online/offline."
    stochastic = True  # the shadows' inclusion design and seeds
    tiny_params = {"shadows": 2}

    def check_setting(self, setting: AttackSetting) -> None:
        self._pool_plan(setting.n_members, setting.n_candidates, setting.n_auxiliary)

    def _pool_plan(self, n_members: int, n_candidates: int, n_auxiliary: int) -> tuple[int, int]:
        """(shadow size, auxiliary images added to the online pool); ConfigError if the data cannot support it."""
        p = self.params
        size = p.shadow_size or n_members
        if not p.online:
            if n_auxiliary < 2 * size:
                raise ConfigError(
                    f"lira offline: shadows of {size} images need at least {2 * size} auxiliary images "
                    f"(each shadow trains on a random half of a pool); there are {n_auxiliary}. Lower shadow_size."
                )
            return size, 0
        # the candidates plus enough auxiliary images that each shadow's set is at most half the pool
        extra = max(0, 2 * size - n_candidates)
        if extra > n_auxiliary:
            raise ConfigError(f"lira: shadows of {size} images need {extra} auxiliary images; there are {n_auxiliary}")
        pool = n_candidates + extra
        needed = max(-(-pool // size), -(-pool // (pool - size)))
        if p.shadows < needed:
            raise ConfigError(
                f"lira online: with shadows of {size} images on a pool of {pool} (the candidates"
                f"{' + auxiliary' if extra else ''}), every candidate needs an IN and an OUT shadow: ask for at "
                f"least {needed} shadows (more give better per-example means), or online=false"
            )
        return size, extra

    def run(self, observation: Observation, budget: Budget, progress: Progress | None = None) -> AttackOutput:
        from privbench.attacks.shadow_ensemble import train_shadow_ensemble

        self._check(observation)
        p = self.params
        aux, cand = observation.auxiliary, observation.candidates
        n_members = int(observation.notes.get("n_members") or len(cand) // 2)
        size, extra = self._pool_plan(n_members, len(cand), len(aux))
        if p.online:
            pool_images, pool_labels = torch.cat([cand.images, aux.images[:extra]]), torch.cat([cand.labels, aux.labels[:extra]])
        else:
            pool_images, pool_labels = aux.images, aux.labels
        inside = balanced_inclusion(len(pool_images), size, p.shadows, torch.Generator().manual_seed(self.seed))
        recipe = observation.notes.get("training_recipe")
        ensemble = train_shadow_ensemble(observation, pool_images, pool_labels, inside, recipe, self.seed,
                                         vectorized=p.vectorized, progress=substage(progress, "shadow models"))
        views = [cand.images, cand.images.flip(-1)] if p.augment else [cand.images]
        per_view = []
        for view in views:
            target_phi = logit_confidence(query_logits(observation, view, False), cand.labels).double()
            shadow_phi = logit_confidence(ensemble.logits(view), cand.labels).double()
            if p.online:
                per_view.append(_online_scores(target_phi, shadow_phi, inside[:, : len(cand)], p.fixed_variance))
            else:
                per_view.append(_offline_scores(target_phi, shadow_phi, p.fixed_variance))
        scores = torch.stack(per_view).mean(0)
        in_counts = inside[:, : len(cand)].sum(0)
        return AttackOutput(
            scores=scores.numpy(), decisions=(scores > 0).numpy() if p.online else None,
            info={"shadows": p.shadows, "shadow_size": size, "pool": len(pool_images),
                  "inclusion": "balanced: each pool example IN in floor or ceil of shadows x size / pool shadows",
                  "in_shadows_per_candidate": [int(in_counts.min()), int(in_counts.max())],
                  "scoring": "online (IN and OUT Gaussians)" if p.online else "offline (one-sided, OUT Gaussian)",
                  "online": p.online, "augment": p.augment, "fixed_variance": p.fixed_variance,
                  "shadow_training": ensemble.how, "shadow_train_time_s": ensemble.seconds,
                  "data": "candidates are IN for part of the shadows, OUT for the rest (online, by design)" if p.online
                  else "shadow pool (auxiliary) disjoint from the candidates"},
        )


def _gauss_logpdf(x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return -0.5 * ((x - mu) / sigma) ** 2 - torch.log(sigma) - 0.5 * np.log(2 * np.pi)


def _online_scores(target: torch.Tensor, shadow: torch.Tensor, inside: torch.Tensor, fixed: bool) -> torch.Tensor:
    """log N(target; mu_in, s_in) - log N(target; mu_out, s_out) per candidate; target [N], shadow [S, N], inside [S, N].

    Every candidate needs at least one IN and one OUT shadow (the balanced design
    gives them). ``fixed``: one standard deviation for all, the pooled spread of
    the shadows around their candidate's IN or OUT mean (then the score is
    monotone in the target's confidence); else per-example IN and OUT spreads.
    """
    w_in, w_out = inside.double(), (~inside).double()
    n_in, n_out = w_in.sum(0), w_out.sum(0)
    if bool((n_in == 0).any() or (n_out == 0).any()):
        raise ValueError("online LiRA needs an IN and an OUT shadow for every candidate")
    mu_in, mu_out = (shadow * w_in).sum(0) / n_in, (shadow * w_out).sum(0) / n_out
    r_in, r_out = (shadow - mu_in) ** 2 * w_in, (shadow - mu_out) ** 2 * w_out
    if fixed:
        s_in = s_out = ((r_in.sum() + r_out.sum()) / (n_in.sum() + n_out.sum() - 2 * len(target)).clamp(min=1)).sqrt()
    else:  # an example with a single IN (OUT) sample takes the median per-example spread
        s_in, s_out = (r_in.sum(0) / (n_in - 1).clamp(min=1)).sqrt(), (r_out.sum(0) / (n_out - 1).clamp(min=1)).sqrt()
        s_in = torch.where(n_in > 1, s_in, s_in[n_in > 1].median() if bool((n_in > 1).any()) else s_out.median())
        s_out = torch.where(n_out > 1, s_out, s_out[n_out > 1].median() if bool((n_out > 1).any()) else s_in.median())
    s_in, s_out = torch.as_tensor(s_in).clamp(min=1e-6), torch.as_tensor(s_out).clamp(min=1e-6)
    return _gauss_logpdf(target, mu_in, s_in) - _gauss_logpdf(target, mu_out, s_out)


def _offline_scores(target: torch.Tensor, shadow: torch.Tensor, fixed: bool) -> torch.Tensor:
    """One-sided test against the OUT Gaussian: log P(phi_out <= target); target [N], shadow [S, N] (all OUT)."""
    mu = shadow.mean(0)
    if fixed:
        sigma = ((shadow - mu) ** 2).sum().div(max(shadow.numel() - shadow.shape[1], 1)).sqrt().expand_as(mu)
    else:
        sigma = ((shadow - mu) ** 2).sum(0).div(max(shadow.shape[0] - 1, 1)).sqrt()
    return torch.special.log_ndtr((target - mu) / sigma.clamp(min=1e-6))
