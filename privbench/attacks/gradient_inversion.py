"""Gradient inversion: reconstruct a client's images from the update it shares.

One implementation, three presets:

- ``dlg``  Deep Leakage from Gradients (Zhu et al., 2019): L2 gradient distance,
  L-BFGS, image and soft label optimised jointly.
- ``idlg`` improved DLG (Zhao et al., 2020): the label is read off the last
  layer's gradient (exact for one image whose penultimate activations are
  non-negative: sigmoid or ReLU), then only the image is optimised.
- ``invgrad`` Inverting Gradients (Geiping et al., 2020): cosine gradient
  distance, total-variation prior, Adam on the sign of the image gradient,
  images kept in [0, 1], learning rate x0.1 at 3/8, 5/8 and 7/8 of the steps.
  The paper runs 24,000 steps on a GPU; the default here is 2,000 (CPU budget).

Batches (B > 1) are recovered jointly: B images (and, with ``label=joint``, B
soft labels) are optimised against the one shared update; the runner pairs them
with the true images by Hungarian matching. ``label=auto`` uses iDLG's rule for
B = 1 and joint soft labels for B > 1 (the rule holds for one image only).

The update must be a gradient (one local SGD step); an update after several
local steps is refused rather than inverted under the wrong model. If the
observer holds only ciphertexts of the update (HE aggregator), there is nothing
to invert: the output is the uninformed prior guess (mid-gray images, class 0)
and the row says so.

The attacker uses everything the observation declares public. The update rule
(per-example clipping bound, divisor, as DP-SGD shares them) is applied to every
dummy gradient, so the objective compares like with like: an L2 distance against
an update scaled by 1/E is not misled by the scaling. When the model's input is
not an image (MpLe's morphed vectors), the input is optimised without image
priors (no [0, 1] box, no total variation) and then read as an image: the naive
presets unpad it; the adaptive ``dlg-mple`` / ``invgrad-mple`` (in
``privbench.attacks.mple``) map it back through the first layer the observer
holds.

The attacker sees only the observation (model at the stated round, shared
gradients, update rule, batch size, input shape, number of classes). The best of
``restarts`` runs is chosen by the final gradient distance, which the attacker
can compute; the true images are never consulted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch.nn import functional as F

from privbench import morphing, registry
from privbench.attacks.base import Attack, AttackOutput, Progress, substage
from privbench.config import Budget
from privbench.params import bounded
from privbench.threat import AttackError, GradientUpdate, Observation, Surface, UpdateRule


@dataclass(frozen=True)
class GradientInversionParams:
    distance: Literal["l2", "cosine"] = "l2"  # l2: sum of squared differences; cosine: 1 - cos over all parameters
    optimizer: Literal["lbfgs", "adam"] = "lbfgs"
    steps: int = bounded(300, ge=1, le=10**7)  # optimizer steps; an L-BFGS step makes up to 1.25 x lbfgs_max_iter evaluations
    lr: float = bounded(1.0, gt=0, le=1e4)
    lbfgs_max_iter: int = bounded(20, ge=1, le=100_000)
    restarts: int = bounded(2, ge=1, le=10_000)
    init: Literal["randn", "uniform", "zeros"] = "randn"  # initial image: N(0,1), U(0,1) or 0.5 everywhere
    # joint soft-label optimisation, iDLG's analytic rule (B = 1 only), or auto: analytic for B = 1, else joint
    label: Literal["joint", "analytic", "auto"] = "joint"
    tv_weight: float = bounded(0.0, ge=0, le=1e6)  # weight of the total variation prior (mean |dx| + mean |dy|, images in [0, 1])
    signed: bool = False  # step on the sign of the image gradient (Adam only)
    boxed: bool = False  # clamp images to [0, 1] after every step
    lr_drops: bool = False  # multiply the learning rate by 0.1 at 3/8, 5/8 and 7/8 of the steps
    # Expectation over transformation: average the gradient distance over this many forward passes of a
    # stochastic model (fresh encoder samples each); 1 is the naive single-sample objective.
    eot_samples: int = bounded(1, ge=1, le=10_000)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.restarts < 1 or self.lbfgs_max_iter < 1 or self.eot_samples < 1:
            raise ValueError("steps, restarts, lbfgs_max_iter and eot_samples must be >= 1")
        if self.lr <= 0 or self.tv_weight < 0:
            raise ValueError("lr must be > 0 and tv_weight >= 0")
        if self.signed and self.optimizer != "adam":
            raise ValueError("signed=true needs optimizer=adam")


@dataclass(frozen=True)
class IDLGParams(GradientInversionParams):
    label: Literal["joint", "analytic", "auto"] = "analytic"


@dataclass(frozen=True)
class InvertingGradientsParams(GradientInversionParams):
    distance: Literal["l2", "cosine"] = "cosine"
    optimizer: Literal["lbfgs", "adam"] = "adam"
    steps: int = bounded(2000, ge=1, le=10**7)
    lr: float = bounded(0.1, gt=0, le=1e4)
    label: Literal["joint", "analytic", "auto"] = "auto"
    tv_weight: float = bounded(0.2, ge=0, le=1e6)
    signed: bool = True
    boxed: bool = True
    lr_drops: bool = True


class _BudgetExhausted(Exception):
    pass


def l2_distance(dummy: tuple[torch.Tensor, ...], target: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return sum(((d - t) ** 2).sum() for d, t in zip(dummy, target, strict=True))


def cosine_distance(dummy: tuple[torch.Tensor, ...], target: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """1 - cosine similarity of the two updates flattened over all parameters, in [0, 2]."""
    dot = sum((d * t).sum() for d, t in zip(dummy, target, strict=True))
    dummy_norm = sum(d.pow(2).sum() for d in dummy).sqrt()
    target_norm = sum(t.pow(2).sum() for t in target).sqrt()
    return 1 - dot / (dummy_norm * target_norm + 1e-12)


DISTANCES = {"l2": l2_distance, "cosine": cosine_distance}


def label_loss(logits: torch.Tensor, labels_or_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against hard labels (int64 [B]) or against the soft labels softmax(label logits [B, K])."""
    if labels_or_logits.dtype == torch.long:
        return F.cross_entropy(logits, labels_or_logits)
    return torch.mean(torch.sum(-F.softmax(labels_or_logits, -1) * F.log_softmax(logits, -1), 1))


def dummy_update(model: torch.nn.Module, params: list[torch.Tensor], inputs: torch.Tensor,
                 labels_or_logits: torch.Tensor, rule: UpdateRule, create_graph: bool = True) -> tuple[torch.Tensor, ...]:
    """What ``rule`` makes of ``inputs`` [B, ...] under ``model``, noise aside, in the scale of a mean gradient.

    Plain mean: one backward pass. With clipping: one backward per example (B is small), each
    example's gradient scaled by min(1, C / (|g|_2 + 1e-6)) as Opacus does, then averaged. The
    rule's divisor is left out here and undone on the shared update instead (``mean_scale``), so
    the objective keeps the magnitude of a plain gradient match (an update divided by E = 64 would
    otherwise make an L2 objective E^2 times smaller, below the optimiser's tolerances).
    """

    def loss_grads(x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(label_loss(model(x), labels), params, create_graph=create_graph)

    return form_update(loss_grads, inputs, labels_or_logits, rule)


def form_update(loss_grads, inputs: torch.Tensor, labels_or_logits: torch.Tensor,
                rule: UpdateRule) -> tuple[torch.Tensor, ...]:
    """The update ``rule`` forms from ``loss_grads(inputs, labels) -> d(label_loss)/d(params)`` (one tensor per
    parameter): the batch's mean gradient, or with ``rule.clip_norm`` the mean of the per-example clipped
    gradients. The one definition both the sequential attack (autograd) and the batched cell (torch.func) use."""
    if rule.clip_norm is None:
        return tuple(loss_grads(inputs, labels_or_logits))
    total = None
    for i in range(len(inputs)):
        grads = loss_grads(inputs[i : i + 1], labels_or_logits[i : i + 1])
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        factor = (rule.clip_norm / (norm + 1e-6)).clamp(max=1.0)
        scaled = [g * factor for g in grads]
        total = scaled if total is None else [t + g for t, g in zip(total, scaled, strict=True)]
    return tuple(t / len(inputs) for t in total)


def mean_scale(update: GradientUpdate) -> tuple[torch.Tensor, ...]:
    """The shared update with its public divisor replaced by the batch size: comparable to ``dummy_update``."""
    gradients = tuple(g.detach() for g in update.gradients)
    if update.rule.divisor is None:
        return gradients
    return tuple(g * (update.rule.divisor / update.batch_size) for g in gradients)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of horizontally and vertically adjacent pixels; x [B, C, H, W]."""
    return (x[..., :, 1:] - x[..., :, :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()


def analytic_label(update: GradientUpdate) -> torch.Tensor:
    """iDLG: for one image, the true class is the row of the last layer's weight gradient with negative sum.

    d(CE)/dW_k = (p_k - y_k) h with h >= 0, so only the true class's row is
    non-positive. Returns int64 [1]. Valid for batch size 1 only.
    """
    if update.batch_size != 1:
        raise AttackError(f"the analytic (iDLG) label rule holds for one image only; batch size is {update.batch_size}")
    for grad in reversed(update.gradients):
        if grad.dim() == 2 and grad.shape[0] == update.num_classes:
            return grad.sum(dim=1).argmin().reshape(1)
    raise AttackError("no final linear layer with one row per class found for the analytic label rule")


def label_rule(params: GradientInversionParams, update: GradientUpdate) -> tuple[str, torch.Tensor | None]:
    """The label rule a run uses (``auto`` resolved by the batch size) and its fixed labels int64 [B], or None
    for joint soft labels."""
    rule = params.label if params.label != "auto" else ("analytic" if update.batch_size == 1 else "joint")
    return rule, (analytic_label(update) if rule == "analytic" else None)


def restart_budget(budget: Budget, restarts: int) -> int | None:
    """Gradient evaluations each restart may spend (None: the attack's own schedule)."""
    return None if budget.max_grad_evals is None else max(1, budget.max_grad_evals // restarts)


def lr_milestones(steps: int) -> list[int]:
    """The steps after which ``lr_drops`` multiplies the learning rate by 0.1 (3/8, 5/8 and 7/8 of ``steps``)."""
    return [int(steps * f) for f in (3 / 8, 5 / 8, 7 / 8)]


class AttackDiverged(RuntimeError):
    """Every restart of a gradient-inversion run ended at non-finite inputs: the row is failed, not scored."""


class GradientInversion(Attack):
    Params = GradientInversionParams
    surface = Surface.GRADIENTS
    family = "reconstruction"
    stochastic = True  # random starts (images, soft labels) drawn from the attack seed
    tiny_params = {"steps": 2, "restarts": 2, "lbfgs_max_iter": 4}

    def run(self, observation: Observation, budget: Budget, progress: Progress | None = None) -> AttackOutput:
        update = observation.gradient_update
        if update is None:
            raise AttackError(f"{self.registry_name} needs the GRADIENTS surface; the observation has no update")
        p = self.params
        if update.encrypted:
            return self._prior_guess(update)
        if update.local_steps != 1:
            raise AttackError(
                f"the shared update is the result of {update.local_steps} local SGD steps, not a gradient; "
                f"{self.registry_name} models a single gradient and does not model multi-step updates "
                f"(use local_steps=1)"
            )
        rule, fixed_labels = label_rule(p, update)
        per_restart = restart_budget(budget, p.restarts)
        generator = torch.Generator().manual_seed(self.seed)
        runs = []
        for restart in range(p.restarts):
            part = substage(progress, f"restart {restart + 1}/{p.restarts}", restart * p.steps, p.restarts * p.steps)
            images, label_logits, evals = self._invert(update, fixed_labels, generator, per_restart, part)
            runs.append(self._restart_result(update, fixed_labels, images, label_logits, evals))
        return self._output(observation, update, runs, rule)

    @classmethod
    def run_cell(cls, attacks: list[Attack], observations: list[Observation], budget: Budget,
                 progress: Progress | None = None) -> list[AttackOutput | Exception]:
        """V victims of one target as one batched problem (``privbench.attacks.batched``): each victim gets
        what ``run`` gives it, up to rounding."""
        from privbench.attacks import batched

        return batched.run_cell(attacks, observations, budget, progress)

    def _restart_result(self, update: GradientUpdate, fixed_labels: torch.Tensor | None, inputs: torch.Tensor,
                        label_logits: torch.Tensor | None, evals: int) -> tuple:
        """(score, inputs, labels, evals, finite) of one restart: its final inputs [B, ...] scored by the
        attacker's restart score; ``finite`` whether the inputs are all finite."""
        labels = fixed_labels if fixed_labels is not None else label_logits.argmax(1)
        distance = self._final_distance(update, inputs, labels if label_logits is None else label_logits)
        return distance, inputs, labels, evals, bool(torch.isfinite(inputs).all())

    def _output(self, observation: Observation, update: GradientUpdate, runs: list[tuple], rule: str) -> AttackOutput:
        """The run's output from its restarts (``_restart_result`` tuples): the restart with the lowest score.

        Raises AttackDiverged when the chosen restart's inputs are non-finite (every restart diverged, or the
        score could not tell): the row is failed rather than scored on a stand-in image."""
        total_evals = sum(r[3] for r in runs)
        best = min(range(len(runs)), key=lambda i: runs[i][0])
        distance, inputs, labels, _, finite = runs[best]
        if not finite:
            raise AttackDiverged(f"{self.registry_name} diverged: the chosen restart ({best + 1} of {len(runs)}) "
                                 f"ended at non-finite inputs (restart scores {[r[0] for r in runs]})")
        images, info = self.to_images(inputs.detach(), update, observation)
        if not update.rule.is_plain_mean:
            info["update_rule"] = (f"dummy updates formed by the public rule: clip_norm={update.rule.clip_norm}, "
                                   f"divisor={update.rule.divisor}; noise std {update.rule.noise_std:g} not removable")
        return AttackOutput(
            images=torch.nan_to_num(images, nan=0.5).clamp(0, 1),
            labels=labels,
            grad_evals=total_evals,
            info={
                "gradient_distance": distance,
                "restart_distances": [r[0] for r in runs],
                "restart_grad_evals": [r[3] for r in runs],
                "chosen_restart": best,
                "label_rule": rule,
                "batch_size": update.batch_size,
                "selection": "lowest final gradient distance (attacker-computable)",
                **info,
            },
        )

    def gradient_distance(self, dummy: tuple[torch.Tensor, ...], target: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The objective's distance between a dummy update and the shared one (``distance``: l2 or cosine), also
        the restart score. An adaptive variant overrides it to model what the defense did to the update."""
        return DISTANCES[self.params.distance](dummy, target)

    def _prior_guess(self, update: GradientUpdate) -> AttackOutput:
        """No plaintext to invert: mid-gray images and class 0, what an attacker guesses knowing nothing."""
        shape = (update.batch_size, *update.input_shape)
        return AttackOutput(
            images=torch.full(shape, 0.5),
            labels=torch.zeros(update.batch_size, dtype=torch.long),
            grad_evals=0,
            info={
                "no_plaintext": "the observer holds only ciphertexts of the update: nothing to invert",
                "output": "uninformed prior guess: every pixel 0.5 (mid-gray), label 0",
                "batch_size": update.batch_size,
            },
        )

    def to_images(self, inputs: torch.Tensor, update: GradientUpdate,
                  observation: Observation) -> tuple[torch.Tensor, dict]:
        """The reconstructed model inputs as images [B, C, H, W]; images pass through, morphed vectors are
        unpadded and clipped (the naive reading, without the defense's secrets)."""
        if update.morphed is None:
            return inputs, {}
        return morphing.read_morphed(inputs.flatten(1), update.morphed, "clip"), {
            "read_as_image": "reconstructed the morphed input t, then unpadded it as an image (naive reading)"}

    # -- internals ----------------------------------------------------------
    def _init_images(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        if self.params.init == "randn":
            return torch.randn(shape, generator=generator)
        if self.params.init == "uniform":
            return torch.rand(shape, generator=generator)
        return torch.full(shape, 0.5)

    def _draw_start(self, update: GradientUpdate, fixed_labels: torch.Tensor | None, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One restart's start from ``generator``: inputs [B, ...] and, for joint labels, label logits [B, K]
        (drawn in this order, restart after restart)."""
        x = self._init_images((update.batch_size, *update.input_shape), generator)
        y = None
        if fixed_labels is None:
            y = torch.randn((update.batch_size, update.num_classes), generator=generator)
        return x, y

    def _invert(self, update, fixed_labels, generator, max_evals, progress):
        p = self.params
        model = update.model
        params = [q for q in model.parameters() if q.requires_grad]
        target = mean_scale(update)
        distance_fn = self.gradient_distance
        image_input = update.morphed is None  # image priors (box, TV) only where the input is an image
        boxed, tv_weight = p.boxed and image_input, p.tv_weight if image_input else 0.0
        x, y = self._draw_start(update, fixed_labels, generator)
        x.requires_grad_(True)
        leaves = [x]
        if y is not None:
            y.requires_grad_(True)
            leaves.append(y)
        evals = 0
        limit = max_evals if max_evals is not None else float("inf")

        def objective() -> torch.Tensor:
            nonlocal evals
            if evals + p.eot_samples > limit:
                raise _BudgetExhausted
            evals += p.eot_samples  # each encoder sample is one gradient evaluation of the target model
            value = 0.0
            for _ in range(p.eot_samples):
                dummy = dummy_update(model, params, x, fixed_labels if y is None else y, update.rule)
                value = value + distance_fn(dummy, target) / p.eot_samples
            if tv_weight:
                value = value + tv_weight * total_variation(x)
            grads = torch.autograd.grad(value, leaves)
            for leaf, grad in zip(leaves, grads, strict=True):
                leaf.grad = grad
            if p.signed:
                x.grad.sign_()
            return value.detach()

        if p.optimizer == "lbfgs":
            opt = torch.optim.LBFGS(leaves, lr=p.lr, max_iter=p.lbfgs_max_iter, line_search_fn="strong_wolfe")
        else:
            opt = torch.optim.Adam(leaves, lr=p.lr)
        scheduler = None
        if p.lr_drops:
            scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=lr_milestones(p.steps), gamma=0.1)
        previous = None
        try:
            for step in range(p.steps):
                if p.optimizer == "lbfgs":
                    value = opt.step(objective)
                else:
                    opt.zero_grad(set_to_none=True)
                    value = objective()
                    opt.step()
                if boxed:
                    with torch.no_grad():
                        x.clamp_(0, 1)
                if scheduler is not None:
                    scheduler.step()
                if progress and (step % 10 == 0 or step == p.steps - 1):
                    progress(step + 1, p.steps)
                if p.optimizer == "lbfgs":
                    # L-BFGS returns the same value once it can make no progress: stop spending evaluations.
                    if previous is not None and value == previous or not torch.isfinite(value):
                        break
                    previous = value
        except _BudgetExhausted:
            pass
        return x.detach(), (None if y is None else y.detach()), evals

    def _final_distance(self, update, images, labels_or_logits) -> float:
        """Gradient distance (without prior) of the final images: the attacker's restart score."""
        model = update.model
        params = [q for q in model.parameters() if q.requires_grad]
        images = torch.nan_to_num(images, nan=0.5)
        value = 0.0
        for _ in range(self.params.eot_samples):
            dummy = dummy_update(model, params, images, labels_or_logits, update.rule, create_graph=False)
            value += float(self.gradient_distance(dummy, mean_scale(update))) / self.params.eot_samples
        return value if value == value else float("inf")


@registry.attacks.register("dlg")
class DLG(GradientInversion):
    """Deep Leakage from Gradients: L2 distance, L-BFGS, joint image and soft-label optimisation."""

    Params = GradientInversionParams
    description = "Deep Leakage from Gradients (Zhu et al. 2019): L2 gradient distance, L-BFGS, joint soft label."


@registry.attacks.register("idlg")
class IDLG(GradientInversion):
    """iDLG: label from the last layer's gradient, then L-BFGS on the image (batch size 1)."""

    Params = IDLGParams
    description = "iDLG (Zhao et al. 2020): analytic label from the last layer's gradient, then L-BFGS on the image."


@registry.attacks.register("invgrad")
class InvertingGradients(GradientInversion):
    """Inverting Gradients: cosine distance, TV prior, signed Adam, boxed, step-wise lr drops."""

    Params = InvertingGradientsParams
    description = (
        "Inverting Gradients (Geiping et al. 2020): cosine distance, TV prior, signed Adam with lr drops; "
        "works on ReLU networks."
    )
    tiny_params = {"steps": 8, "restarts": 2}


@dataclass(frozen=True)
class SNNInvertingGradientsParams(InvertingGradientsParams):
    eot_samples: int = bounded(4, ge=1, le=10_000)


@dataclass(frozen=True)
class SNNDLGParams(GradientInversionParams):
    eot_samples: int = bounded(4, ge=1, le=10_000)


class _SpikingAdaptive(GradientInversion):
    """Adaptive variants for spiking targets: they require the model to be a spiking network (T, encoder)."""

    tiny_defense = "gascnn"
    adaptive_for = ("gascnn",)

    def run(self, observation: Observation, budget: Budget, progress: Progress | None = None) -> AttackOutput:
        update = observation.gradient_update
        if update is None or not hasattr(update.model, "timesteps") or not hasattr(update.model, "encoding"):
            raise AttackError(f"{self.registry_name} attacks spiking networks (a model with timesteps and an "
                              f"encoder, e.g. the gascnn defense); this target is not one")
        deterministic = update.model.encoding == "direct"
        if deterministic and self.params.eot_samples > 1:  # no encoder randomness: EOT would only split the budget
            import dataclasses

            self.params = dataclasses.replace(self.params, eot_samples=1)
        output = super().run(observation, budget, progress)
        output.info["adaptive"] = (
            f"same T={update.model.timesteps} and surrogate as the client; {update.model.encoding} encoder; "
            f"objective averaged over {self.params.eot_samples} encoder samples (EOT), sampling passed straight "
            f"through (the gradient of the expected, rate-coded input)"
            + ("; direct encoding is deterministic, so one sample per evaluation" if deterministic else "")
        )
        return output


@registry.attacks.register("invgrad-snn")
class SNNInvertingGradients(_SpikingAdaptive):
    """Inverting Gradients against a spiking network, with EOT over the input encoder."""

    Params = SNNInvertingGradientsParams
    description = "Inverting Gradients adapted to SNNs: EOT over encoder samples, straight-through rate input."
    tiny_params = {"steps": 4, "restarts": 1}


@registry.attacks.register("dlg-snn")
class SNNDLG(_SpikingAdaptive):
    """DLG against a spiking network, with EOT over the input encoder."""

    Params = SNNDLGParams
    description = "DLG adapted to SNNs: EOT over encoder samples, straight-through rate input."
    tiny_params = {"steps": 2, "restarts": 1, "lbfgs_max_iter": 4}
