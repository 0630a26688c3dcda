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

Every preset starts in the data's scale: the attacker knows its auxiliary split's
per-channel mean m and std s, draws the start as m + s z with z ~ N(0, 1), and
takes its steps in those normalised units z (``init=data``; ``randn`` / ``uniform``
/ ``zeros`` start in pixel units instead). It returns the best iterate by its own
objective (gradient distance plus priors), not the last one.

Batches (B > 1) are recovered jointly: B images (and, with ``label=joint``, B
soft labels) are optimised against the one shared update; the runner pairs them
with the true images by Hungarian matching. ``label=auto`` uses iDLG's rule for
B = 1 and the count-based rule on the last layer's gradient for B > 1
(``privbench.attacks.label_recovery``), falling back to joint soft labels (and
saying so in the row) for a model without a final linear layer.

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

The attacker sees only the observation (model at the stated round in the
protocol's BatchNorm mode, shared gradients and buffers, update rule, batch size,
input shape, number of classes, auxiliary data). The best of ``restarts`` runs is
chosen by the objective, which the attacker can compute; the true images are
never consulted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch.nn import functional as F

from privbench import morphing, registry
from privbench.attacks import label_recovery
from privbench.attacks.base import Attack, AttackOutput, Progress, substage
from privbench.attacks.label_recovery import analytic_label
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
    # initial image: the auxiliary data's per-channel mean + std x N(0,1), steps in those normalised units (data);
    # or N(0,1), U(0,1), 0.5 everywhere in pixel units
    init: Literal["data", "randn", "uniform", "zeros"] = "data"
    # joint soft-label optimisation, iDLG's analytic rule (B = 1 only), class counts from the last layer's gradient
    # (count), Yin et al.'s distinct-label rule (yin), or auto: analytic for B = 1, count for B > 1
    label: Literal["joint", "analytic", "count", "yin", "auto"] = "joint"
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
    label: Literal["joint", "analytic", "count", "yin", "auto"] = "analytic"


@dataclass(frozen=True)
class InvertingGradientsParams(GradientInversionParams):
    distance: Literal["l2", "cosine"] = "cosine"
    optimizer: Literal["lbfgs", "adam"] = "adam"
    steps: int = bounded(2000, ge=1, le=10**7)
    lr: float = bounded(0.1, gt=0, le=1e4)
    label: Literal["joint", "analytic", "count", "yin", "auto"] = "auto"
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
    gradients. The one definition both the sequential attack (autograd) and the batched cell (torch.func,
    ``privbench.attacks.batched``) use."""
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


@dataclass
class Parametrisation:
    """Pixels x = mean + std * z: the attack optimises z, in the units of the data's spread.

    ``mean`` and ``std`` broadcast against [B, C, H, W] (per channel, from the auxiliary split) or are
    0 and 1 (pixel units: ``init`` randn / uniform / zeros, or a model input that is not an image).
    """

    mean: torch.Tensor
    std: torch.Tensor
    description: str

    def pixels(self, z: torch.Tensor) -> torch.Tensor:
        return self.mean + self.std * z

    def normalised(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def clamp_(self, z: torch.Tensor) -> None:
        """Keep the pixels of ``z`` in [0, 1], in place."""
        z.copy_(self.normalised(self.pixels(z).clamp(0, 1)))


@dataclass
class Candidate:
    """One reconstruction: the best iterate of a run (or of one group of a joint run), by the objective."""

    inputs: torch.Tensor  # [B, ...] the model's inputs (pixels for images)
    label_logits: torch.Tensor | None  # [B, K] soft labels (joint rule), else None
    objective: float  # gradient distance + priors at this iterate (what the attacker minimises)
    evals: int = 0
    last_objective: float = float("nan")  # the objective at the run's last evaluation (diagnostic)


def restart_budget(budget: Budget, restarts: int) -> int | None:
    """Gradient evaluations each restart may spend (None: the attack's own schedule)."""
    return None if budget.max_grad_evals is None else max(1, budget.max_grad_evals // restarts)


def lr_milestones(steps: int) -> list[int]:
    """The steps after which ``lr_drops`` multiplies the learning rate by 0.1 (3/8, 5/8 and 7/8 of ``steps``)."""
    return [int(steps * f) for f in (3 / 8, 5 / 8, 7 / 8)]


class AttackDiverged(RuntimeError):
    """No restart of a gradient-inversion run had one finite objective value: the row is failed, not scored."""


class GradientInversion(Attack):
    Params = GradientInversionParams
    surface = Surface.GRADIENTS
    family = "reconstruction"
    stochastic = True  # random starts (images, soft labels) drawn from the attack seed
    tiny_params = {"steps": 2, "restarts": 2, "lbfgs_max_iter": 4}
    groups = 1  # candidates optimised jointly per run (GradInversion's group consistency uses several)
    final_evals = 0  # gradient evaluations a run keeps back for choosing among its candidates (``_pick``)

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
        scale = self.parametrisation(observation, update)
        rule, fixed_labels, label_note = self._recover_labels(update, observation)
        self.prepare(observation, update)
        per_restart = restart_budget(budget, p.restarts)
        generator = torch.Generator().manual_seed(self.seed)
        runs: list[Candidate] = []
        for restart in range(p.restarts):
            part = substage(progress, f"restart {restart + 1}/{p.restarts}", restart * p.steps, p.restarts * p.steps)
            runs.append(self._invert(update, fixed_labels, generator, per_restart, part, scale))
        return self._output(observation, update, runs, rule, fixed_labels, label_note, scale, per_restart)

    @classmethod
    def cell_batches(cls, params: dict) -> bool:
        from privbench.attacks import batched

        return batched.static_reason(cls, cls.Params(**params)) is None

    @classmethod
    def run_cell(cls, attacks: list[Attack], observations: list[Observation], budget: Budget,
                 progress: Progress | None = None, engine: str = "auto") -> list[AttackOutput | Exception]:
        """V victims of one target as one batched problem (``privbench.attacks.batched``): each victim gets
        what ``run`` gives it, up to rounding. ``engine="auto"`` batches only where it measures faster."""
        from privbench.attacks import batched

        return batched.run_cell(attacks, observations, budget, progress, engine=engine)

    def _output(self, observation: Observation, update: GradientUpdate, runs: list[Candidate], rule: str,
                fixed_labels: torch.Tensor | None, label_note: str, scale: Parametrisation,
                per_restart: int | None) -> AttackOutput:
        """The run's output from its restarts' candidates: the restart with the lowest objective.

        Raises AttackDiverged when no restart had a finite objective value (nothing to choose: the row is
        failed rather than scored on a stand-in image)."""
        best = min(range(len(runs)), key=lambda i: runs[i].objective)
        chosen = runs[best]
        if not math.isfinite(chosen.objective):
            raise AttackDiverged(f"{self.registry_name} diverged: no restart of {len(runs)} reached a finite "
                                 f"objective value")
        labels = fixed_labels if chosen.label_logits is None else chosen.label_logits.argmax(1)
        distance = self._gradient_distance_at(update, chosen.inputs, labels if chosen.label_logits is None
                                              else chosen.label_logits)
        images, info = self.to_images(chosen.inputs.detach(), update, observation)
        if not update.rule.is_plain_mean:
            info["update_rule"] = (f"dummy updates formed by the public rule: clip_norm={update.rule.clip_norm}, "
                                   f"divisor={update.rule.divisor}; noise std {update.rule.noise_std:g} not removable")
        return AttackOutput(
            images=torch.nan_to_num(images, nan=0.5).clamp(0, 1),
            labels=labels,
            grad_evals=sum(r.evals for r in runs),
            info={
                "gradient_distance": distance,
                "restart_objectives": [r.objective for r in runs],
                "restart_last_objectives": [r.last_objective for r in runs],
                "restart_grad_evals": [r.evals for r in runs],
                "steps_per_restart": self.schedule_steps(float("inf") if per_restart is None
                                                         else per_restart - self.final_evals),
                "chosen_restart": best,
                "label_rule": rule,
                **({"label_note": label_note} if label_note else {}),
                "batch_size": update.batch_size,
                "bn_mode": update.bn_mode,
                "init": scale.description,
                "selection": "best iterate of each restart, then the restart with the lowest objective "
                             "(attacker-computable)",
                **self.describe(),
                **info,
            },
        )

    def gradient_distance(self, dummy: tuple[torch.Tensor, ...], target: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The objective's distance between a dummy update and the shared one (``distance``: l2 or cosine), also
        the restart score. An adaptive variant overrides it to model what the defense did to the update."""
        return DISTANCES[self.params.distance](dummy, target)

    def prepare(self, observation: Observation, update: GradientUpdate) -> None:
        """Hook run once before the restarts: a subclass reads what its priors need from the observation."""

    def prior(self, x: torch.Tensor) -> torch.Tensor | float:
        """Extra prior terms on one candidate's pixels ``x`` [B, C, H, W] beyond TV (a subclass adds them)."""
        return 0.0

    def describe(self) -> dict:
        """Row notes on the objective (a subclass states its priors)."""
        return {}

    def parametrisation(self, observation: Observation, update: GradientUpdate) -> Parametrisation:
        """How pixels relate to the optimised variable: the auxiliary split's per-channel scale for
        ``init=data`` on images, pixel units otherwise."""
        unit = Parametrisation(torch.tensor(0.0), torch.tensor(1.0), "")
        if update.morphed is not None:
            unit.description = f"{'N(0,1)' if self.params.init in ('data', 'randn') else self.params.init} in the " \
                               f"morphed input space (not an image: no data scale applies)"
            return unit
        if self.params.init != "data":
            unit.description = {"randn": "N(0,1) pixels", "uniform": "U(0,1) pixels",
                                "zeros": "0.5 everywhere"}[self.params.init]
            return unit
        if observation.auxiliary is None or len(observation.auxiliary) == 0:
            raise AttackError(f"{self.registry_name} with init=data needs the auxiliary split's statistics; the "
                              f"observation holds no auxiliary data (use init=randn)")
        images = observation.auxiliary.images.float()
        mean = images.mean(dim=(0, 2, 3)).reshape(1, -1, 1, 1)
        std = images.std(dim=(0, 2, 3)).reshape(1, -1, 1, 1).clamp_min(1e-3)
        return Parametrisation(mean, std, "the auxiliary split's per-channel mean + std x N(0,1), steps in those "
                                          f"units (mean {mean.flatten().tolist()}, std {std.flatten().tolist()})")

    def _recover_labels(self, update: GradientUpdate, observation: Observation
                        ) -> tuple[str, torch.Tensor | None, str]:
        """(rule used, fixed labels int64 [B] or None for joint soft labels, a note for the row)."""
        rule = self.params.label
        note = ""
        if rule == "auto":
            rule = "analytic" if update.batch_size == 1 else "count"
            if rule == "count":
                try:
                    label_recovery.last_layer(update)
                except AttackError as exc:
                    rule, note = "joint", f"count rule not applicable ({exc}): joint soft labels instead"
        if rule == "analytic":
            return rule, analytic_label(update), note
        if rule == "yin":
            return rule, label_recovery.yin_labels(update, mean_scale(update)), note
        if rule == "count":
            if update.morphed is None and observation.auxiliary is not None and len(observation.auxiliary):
                probe, note = observation.auxiliary.images[:256].float(), "mean softmax estimated on 256 auxiliary images"
            else:
                generator = torch.Generator().manual_seed(self.seed)
                probe = torch.randn((64, *update.input_shape), generator=generator)
                note = "mean softmax estimated on 64 N(0,1) inputs (no auxiliary data in the model's input space)"
            return rule, label_recovery.count_labels(update, mean_scale(update), probe), note
        return rule, None, note

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
    def _start(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """The initial optimised variable (normalised units for init=data, pixels otherwise)."""
        if self.params.init in ("data", "randn"):
            return torch.randn(shape, generator=generator)
        if self.params.init == "uniform":
            return torch.rand(shape, generator=generator)
        return torch.full(shape, 0.5)

    def group_term(self, pixels: torch.Tensor) -> torch.Tensor | float:
        """A coupling between the jointly optimised candidates ``pixels`` [G, B, C, H, W] (none here)."""
        return 0.0

    def _draw_start(self, update: GradientUpdate, fixed_labels: torch.Tensor | None, generator: torch.Generator,
                    scale: Parametrisation) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One restart's start from ``generator``: the optimised variable z [G, B, ...] (in [0, 1] pixels when
        boxed) and, for joint labels, label logits [G, B, K]; drawn in this order, restart after restart."""
        shape = (update.batch_size, *update.input_shape)
        z = self._start((self.groups, *shape), generator)
        if self.params.boxed and update.morphed is None:
            with torch.no_grad():
                scale.clamp_(z)
        y = None
        if fixed_labels is None:
            y = torch.randn((self.groups, update.batch_size, update.num_classes), generator=generator)
        return z, y

    def candidate_objective(self, update: GradientUpdate, params: list[torch.Tensor], target: tuple[torch.Tensor, ...],
                            pixels: torch.Tensor, labels_or_logits: torch.Tensor) -> torch.Tensor:
        """One candidate's objective at ``pixels`` [B, ...]: the gradient distance of its dummy update to
        ``target`` (averaged over ``eot_samples`` forward passes), plus the TV prior and the subclass's priors
        where the input is an image."""
        p = self.params
        image_input = update.morphed is None
        value = 0.0
        for _ in range(p.eot_samples):
            dummy = dummy_update(update.model, params, pixels, labels_or_logits, update.rule)
            value = value + self.gradient_distance(dummy, target) / p.eot_samples
        if image_input and p.tv_weight:
            value = value + p.tv_weight * total_variation(pixels)
        if image_input:
            value = value + self.prior(pixels)
        return value

    def _invert(self, update: GradientUpdate, fixed_labels: torch.Tensor | None, generator: torch.Generator,
                max_evals: int | None, progress: Progress | None, scale: Parametrisation) -> Candidate:
        """One run: ``groups`` candidates optimised jointly; returns the best candidate at the best iterate."""
        p = self.params
        groups = self.groups
        model = update.model
        params = [q for q in model.parameters() if q.requires_grad]
        target = mean_scale(update)
        image_input = update.morphed is None  # image priors (box, TV) only where the input is an image
        boxed = p.boxed and image_input
        z, y = self._draw_start(update, fixed_labels, generator, scale)
        z.requires_grad_(True)
        leaves = [z]
        if y is not None:
            y.requires_grad_(True)
            leaves.append(y)
        evals = 0
        limit = max_evals if max_evals is not None else float("inf")
        limit -= self.final_evals  # kept for the choice among the candidates after the loop
        best: dict = {"total": float("inf")}

        def objective() -> torch.Tensor:
            nonlocal evals
            if evals + groups * p.eot_samples > limit:
                raise _BudgetExhausted
            evals += groups * p.eot_samples  # each candidate's dummy update is one gradient evaluation per sample
            pixels = scale.pixels(z)
            per_group = [self.candidate_objective(update, params, target, pixels[g],
                                                  fixed_labels if y is None else y[g]) for g in range(groups)]
            total = sum(per_group) + (self.group_term(pixels) if groups > 1 and image_input else 0.0)
            grads = torch.autograd.grad(total, leaves)
            for leaf, grad in zip(leaves, grads, strict=True):
                leaf.grad = grad
            if p.signed:
                z.grad.sign_()
            value = float(total.detach())
            best["last"] = value
            if value < best["total"]:  # NaN never compares smaller: a diverged iterate is never kept
                best.update(total=value, groups=[float(v.detach()) if torch.is_tensor(v) else float(v) for v in per_group], pixels=pixels.detach().clone(),
                            labels=None if y is None else y.detach().clone())
            return total.detach()

        if p.optimizer == "lbfgs":
            opt = torch.optim.LBFGS(leaves, lr=p.lr, max_iter=p.lbfgs_max_iter, line_search_fn="strong_wolfe")
        else:
            opt = torch.optim.Adam(leaves, lr=p.lr)
        steps = self.schedule_steps(limit)
        scheduler = None
        if p.lr_drops:
            scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=lr_milestones(steps), gamma=0.1)
        previous = None
        try:
            for step in range(steps):
                if p.optimizer == "lbfgs":
                    value = opt.step(objective)
                else:
                    opt.zero_grad(set_to_none=True)
                    value = objective()
                    opt.step()
                if boxed:
                    with torch.no_grad():
                        scale.clamp_(z)
                if scheduler is not None:
                    scheduler.step()
                if progress and (step % 10 == 0 or step == p.steps - 1):
                    progress(step + 1, steps)
                if p.optimizer == "lbfgs":
                    # L-BFGS returns the same value once it can make no progress: stop spending evaluations.
                    if previous is not None and value == previous or not torch.isfinite(value):
                        break
                    previous = value
        except _BudgetExhausted:
            pass
        if "pixels" not in best:  # not one finite evaluation (budget below one evaluation, or NaN from the start)
            with torch.no_grad():
                best.update(total=float("inf"), groups=[float("inf")] * groups, pixels=scale.pixels(z).detach(),
                            labels=None if y is None else y.detach())
        return self._pick(best, evals, update, fixed_labels, scale)

    def schedule_steps(self, max_evals: float) -> int:
        """The Adam steps a run takes: ``steps``, or fewer when its evaluation budget runs out first, so that
        the learning-rate drops fall inside the budget (at 3/8, 5/8 and 7/8 of the steps actually taken).
        L-BFGS (a variable number of evaluations per step) keeps ``steps`` and stops when the budget does."""
        p = self.params
        if p.optimizer != "adam" or max_evals == float("inf"):
            return p.steps
        return max(1, min(p.steps, int(max_evals) // (self.groups * p.eot_samples)))

    def _pick(self, best: dict, evals: int, update: GradientUpdate, fixed_labels: torch.Tensor | None,
              scale: Parametrisation) -> Candidate:
        """The group with the lowest objective at the best iterate."""
        g = min(range(len(best["groups"])), key=lambda i: best["groups"][i])
        labels = None if best["labels"] is None else best["labels"][g]
        return Candidate(best["pixels"][g], labels, best["groups"][g], evals, best.get("last", float("nan")))

    def _gradient_distance_at(self, update, inputs, labels_or_logits) -> float:
        """Gradient distance (without priors) of ``inputs``: reported in the row."""
        model = update.model
        params = [q for q in model.parameters() if q.requires_grad]
        inputs = torch.nan_to_num(inputs, nan=0.5)
        value = 0.0
        for _ in range(self.params.eot_samples):
            dummy = dummy_update(model, params, inputs, labels_or_logits, update.rule, create_graph=False)
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
