"""Gradient inversion of a cell: V victims of one target (x R restarts) as one batched problem.

The per-victim attack is ``GradientInversion.run`` (``privbench.attacks.gradient_inversion``), the
reference; this module runs the same attack for many victims at once and reuses its pieces: the label rule,
the restart budget, the starts drawn from each victim's own attack seed (restart after restart), the update
rule (``form_update``), the distance, the TV prior, the restart score and the output. What changes is only
how the objective is evaluated: one ``torch.func.vmap`` over the P = V x R problems of
``grad(distance(form_update(grad(label_loss(functional_call(model, ...))))))``, so each problem's gradient
of its own objective comes out of one vectorised call (problems never mix: vmap keeps every reduction
inside its problem). Adam is elementwise and runs as ``torch.optim.Adam`` on the stacked [P, ...] leaves;
L-BFGS runs per problem in lockstep (``privbench.attacks.lbfgs_batched``). Each problem counts its
gradient evaluations against its own restart budget, as the sequential run does.

Victims that cannot be batched run the sequential attack instead, and their output says why
(``info["cell"]["batched"]`` false with the reason): an encrypted or multi-step update, EOT over several
encoder samples or a spiking network (whose encoder draws randomness vmap would share out differently),
a model or update rule that differs from the rest of the cell, or an objective vmap cannot transform.

Batching pays where an evaluation is dominated by per-operation overhead (LeNet: ~10x at 64 victims), not
where it is arithmetic (a wide ConvNet's per-victim weight gradients cost more under vmap than one
sequential evaluation). With ``engine="auto"`` each chunk is calibrated before it runs: one batched
evaluation of all its problems against one sequential evaluation (the faster of two timings each); when
the batched evaluation costs more per problem the chunk runs the sequential attack (the reason, with both
timings, in ``info["cell"]``). Adam gives the same reconstruction either way; L-BFGS differs by rounding.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.func import functional_call, grad, grad_and_value, vmap

from privbench.attacks import lbfgs_batched
from privbench.attacks.base import AttackOutput, Progress
from privbench.attacks.gradient_inversion import (
    Candidate,
    GradientInversion,
    form_update,
    label_loss,
    lr_milestones,
    mean_scale,
    restart_budget,
    total_variation,
)
from privbench.config import Budget
from privbench.threat import GradientUpdate, Observation

if TYPE_CHECKING:
    from privbench.attacks.gradient_inversion import Parametrisation


@dataclass
class _Victim:
    """One batchable victim: its attack, observation, label rule, fixed labels (int64 [B] or None) and the
    parametrisation of its inputs (pixels = mean + std z)."""

    index: int
    attack: "GradientInversion"
    observation: Observation
    update: GradientUpdate
    rule: str
    fixed_labels: torch.Tensor | None
    label_note: str
    scale: "Parametrisation"


# hooks whose overrides make the objective or the choice of a candidate per-victim state (GradInversion's
# BatchNorm prior read in ``prepare``, group consistency, its consensus pick): such attacks run sequentially
_HOOKS = ("run", "_invert", "prepare", "prior", "group_term", "_pick", "_draw_start", "_start")


def static_reason(attack_cls: type, params: Any) -> str | None:
    """Why victims of this attack class with these parameters never batch, known before any observation
    (None: they batch unless their observation says otherwise, see :func:`why_not_batched`)."""
    if params.eot_samples > 1:
        return "EOT over several encoder samples (per-sample randomness is not batched)"
    overridden = [h for h in _HOOKS if getattr(attack_cls, h) is not getattr(GradientInversion, h)]
    if overridden or getattr(attack_cls, "groups", 1) != 1:
        return (f"{attack_cls.registry_name} overrides {', '.join(overridden) or 'groups'} (per-victim priors or "
                f"jointly optimised candidate groups are not batched)")
    return None


def why_not_batched(attack: "GradientInversion", observation: Observation) -> str | None:
    """Why this victim runs the sequential attack rather than in the batch (None: it can be batched)."""
    update = observation.gradient_update
    if update is None:
        return "no gradient update in the observation"
    if update.encrypted:
        return "encrypted update (the output is the prior guess)"
    if update.local_steps != 1:
        return "multi-step update (refused by the attack)"
    reason = static_reason(type(attack), attack.params)
    if reason is None and attack.groups != 1:
        reason = f"{attack.registry_name} optimises groups of candidates jointly (not batched)"
    if reason is not None:
        return reason
    if hasattr(update.model, "timesteps") or hasattr(update.model, "encoding"):
        return "spiking network (stochastic encoder, snntorch state)"
    return None


def _signature(update: GradientUpdate) -> tuple:
    """What must be equal for victims to share one vmapped objective: architecture, shapes, rule, mode."""
    params = tuple((name, tuple(p.shape)) for name, p in update.model.named_parameters())
    return (type(update.model), params, update.batch_size, tuple(update.input_shape), update.num_classes,
            update.rule, update.model.training, update.morphed is None)


ENGINES = ("auto", "batched")


def run_cell(attacks: "list[GradientInversion]", observations: list[Observation], budget: Budget,
             progress: Progress | None = None, max_batch: int | None = None, engine: str = "auto"
             ) -> list[AttackOutput | Exception]:
    """One output (or the exception raised) per victim, as ``attacks[v].run(observations[v], budget)``
    would give it; batchable victims of one signature are solved together, ``max_batch`` at a time.
    ``engine``: ``auto`` batches a chunk only where a calibration finds it faster, ``batched`` always."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    outputs: list[AttackOutput | Exception | None] = [None] * len(attacks)
    groups: dict[tuple, list[_Victim]] = {}
    for v, (attack, observation) in enumerate(zip(attacks, observations, strict=True)):
        reason = why_not_batched(attack, observation)
        if reason is None:
            update = observation.gradient_update
            try:  # as the sequential run begins: the parametrisation, the labels, the attack's own preparation
                scale = attack.parametrisation(observation, update)
                rule, fixed, note = attack._recover_labels(update, observation)
                attack.prepare(observation, update)
            except Exception as exc:  # noqa: BLE001 - that victim's row fails (as its sequential run would)
                outputs[v] = exc
                continue
            victim = _Victim(v, attack, observation, update, rule, fixed, note, scale)
            groups.setdefault((*_signature(update), fixed is None), []).append(victim)
            continue
        outputs[v] = _sequential(attack, observation, budget, reason)
    size = max_batch or len(attacks) or 1
    for members in groups.values():
        for start in range(0, len(members), size):
            chunk = members[start : start + size]
            try:
                results = _solve(chunk, budget, progress, calibrate=engine == "auto")
            except _NotVectorisable as exc:  # not vmappable, or slower batched: every victim of the chunk alone
                for victim in chunk:
                    outputs[victim.index] = _sequential(victim.attack, victim.observation, budget, str(exc))
                continue
            for victim, result in zip(chunk, results, strict=True):
                outputs[victim.index] = result
    return outputs  # type: ignore[return-value]


class _NotVectorisable(RuntimeError):
    pass


@dataclass(frozen=True)
class Calibration:
    """Seconds per problem-evaluation: batched (one vmapped call over all P problems, / P) and sequential (one
    evaluation of the first problem as the sequential attack makes it); each the faster of two timings."""

    batched_s: float
    sequential_s: float

    @property
    def batching_pays(self) -> bool:
        return self.batched_s < self.sequential_s

    def to_dict(self) -> dict[str, float]:
        return {"batched_ms_per_problem_eval": 1e3 * self.batched_s,
                "sequential_ms_per_eval": 1e3 * self.sequential_s}


def _calibrate(objective: "_Objective", first: _Victim, z0: torch.Tensor, y0: torch.Tensor | None) -> Calibration:
    """Time one batched evaluation of every problem against one sequential evaluation of the first problem
    (``GradientInversion.candidate_objective`` and its gradient to the inputs, as the sequential attack)."""
    batched = []
    for _ in range(2):
        start = time.perf_counter()
        objective(None, z0, y0)
        batched.append((time.perf_counter() - start) / len(z0))
    update = first.update
    params = [q for q in update.model.parameters() if q.requires_grad]
    target = mean_scale(update)
    sequential = []
    for _ in range(2):
        z = z0[0].clone().requires_grad_(True)
        y = None if y0 is None else y0[0].clone().requires_grad_(True)
        start = time.perf_counter()
        value = first.attack.candidate_objective(update, params, target, first.scale.pixels(z),
                                                 first.fixed_labels if y is None else y)
        torch.autograd.grad(value, [z] if y is None else [z, y])
        sequential.append(time.perf_counter() - start)
    return Calibration(min(batched), min(sequential))


def _sequential(attack: "GradientInversion", observation: Observation, budget: Budget,
                reason: str) -> AttackOutput | Exception:
    try:
        output = attack.run(observation, budget)
    except Exception as exc:  # noqa: BLE001 - that victim's row only
        return exc
    output.info["cell"] = {"batched": False, "reason": reason}
    return output


class _Objective:
    """The vectorised objective of P problems: value [P] and gradients w.r.t. z [P, B, ...] (and label logits
    [P, B, K] for joint labels) from one vmap call, each problem against its own victim's update.

    A problem's objective is the sequential attack's: the gradient distance between the update its pixels
    (mean + std z, its victim's parametrisation) would give and its victim's shared update, plus the TV
    prior on image inputs. Train-mode BatchNorm normalises by the batch, so the model's running statistics
    are dropped (``replace_all_batch_norm_modules_``: they are never read in train mode, and vmap cannot
    update them in place); eval mode reads the global buffers, shared by every problem.
    """

    def __init__(self, victims: list[_Victim], victim_of: torch.Tensor):
        first = victims[0]
        attack, update = first.attack, first.update
        p = attack.params
        model = copy.deepcopy(update.model)
        if model.training:
            torch.func.replace_all_batch_norm_modules_(model)
        self.model = model
        self.names = [name for name, q in update.model.named_parameters() if q.requires_grad]
        states = [{**dict(v.update.model.named_parameters()), **dict(v.update.model.named_buffers())}
                  for v in victims]
        keys = list(states[0])
        shared = all(torch.equal(st[k], states[0][k]) for st in states[1:] for k in keys)
        self.shared = shared
        trainable = set(self.names)
        if shared:
            self.params = {n: states[0][n].detach() for n in self.names}
        else:
            self.params = {n: torch.stack([st[n].detach() for st in states]) for n in self.names}
        # what functional_call reads besides the trainable parameters: frozen parameters and the buffers the
        # model still has (none for train-mode BatchNorm after the replacement above)
        frozen = [n for n, _ in model.named_parameters() if n not in trainable] + [n for n, _ in model.named_buffers()]
        self.frozen = {n: states[0][n].detach() for n in frozen} if shared else \
            {n: torch.stack([st[n].detach() for st in states]) for n in frozen}
        targets = [mean_scale(v.update) for v in victims]
        self.targets = tuple(torch.stack([t[k] for t in targets]) for k in range(len(targets[0])))
        self.joint = first.fixed_labels is None
        self.fixed = None if self.joint else torch.stack([v.fixed_labels for v in victims])
        self.victim_of = victim_of
        self.rule = update.rule
        self.image_input = update.morphed is None
        self.tv_weight = p.tv_weight if self.image_input else 0.0
        self.signed = p.signed
        self.distance = attack.gradient_distance
        self.input_shape = (update.batch_size, *update.input_shape)
        self.label_shape = (update.batch_size, update.num_classes)
        zeros = torch.zeros(self.input_shape)
        self.mean = torch.stack([v.scale.mean + zeros for v in victims])  # [V, B, ...]
        self.std = torch.stack([v.scale.std + zeros for v in victims])
        argnums = (0, 1) if self.joint else 0
        self._fn = vmap(grad_and_value(self._one, argnums=argnums),
                        in_dims=(0, 0, 0, 0, 0, None if shared else 0, None if shared else 0))

    def pixels(self, ids: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor:
        """Pixels [Q, B, ...] of problems ``ids`` (None: all) at z [Q, B, ...]."""
        victims = self.victim_of if ids is None else self.victim_of[ids]
        return self.mean[victims] + self.std[victims] * z

    def clamp(self, ids: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor:
        """z with its pixels kept in [0, 1] (``Parametrisation.clamp_``)."""
        victims = self.victim_of if ids is None else self.victim_of[ids]
        mean, std = self.mean[victims], self.std[victims]
        return ((mean + std * z).clamp(0, 1) - mean) / std

    def _one(self, z: torch.Tensor, labels: torch.Tensor, target: tuple, mean: torch.Tensor, std: torch.Tensor,
             params: dict, frozen: dict) -> torch.Tensor:
        """One problem's objective: distance(update formed from its pixels, its victim's update) + TV prior."""
        names = self.names
        x = mean + std * z

        def loss_grads(inputs: torch.Tensor, lab: torch.Tensor) -> tuple[torch.Tensor, ...]:
            def loss(prm: dict) -> torch.Tensor:
                return label_loss(functional_call(self.model, (prm, frozen), (inputs,)), lab)

            g = grad(loss)(params)
            return tuple(g[n] for n in names)

        value = self.distance(form_update(loss_grads, x, labels, self.rule), target)
        if self.tv_weight:
            value = value + self.tv_weight * total_variation(x)
        return value

    def __call__(self, ids: torch.Tensor | None, z: torch.Tensor, y: torch.Tensor | None):
        """(values [Q], grad z [Q, B, ...], grad y [Q, B, K] or None) for problems ``ids`` (None: all)."""
        victims = self.victim_of if ids is None else self.victim_of[ids]
        targets = tuple(t[victims] for t in self.targets)
        params = self.params if self.shared else {n: q[victims] for n, q in self.params.items()}
        frozen = self.frozen if self.shared else {n: q[victims] for n, q in self.frozen.items()}
        labels = y if self.joint else self.fixed[victims]
        grads, values = self._fn(z, labels, targets, self.mean[victims], self.std[victims], params, frozen)
        gz, gy = grads if self.joint else (grads, None)
        if self.signed:
            gz = gz.sign()
        return values.detach(), gz.detach(), (None if gy is None else gy.detach())


class _Best:
    """Each problem's best iterate by its objective (the sequential attack's rule: a NaN is never kept) and
    its last objective value."""

    def __init__(self, problems: int):
        self.value = torch.full((problems,), float("inf"))
        self.found = torch.zeros(problems, dtype=torch.bool)
        self.z: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.last = torch.full((problems,), float("nan"))

    def update(self, ids: torch.Tensor, values: torch.Tensor, z: torch.Tensor, y: torch.Tensor | None) -> None:
        if self.z is None:
            self.z = torch.zeros((len(self.value), *z.shape[1:]), dtype=z.dtype)
            self.y = None if y is None else torch.zeros((len(self.value), *y.shape[1:]), dtype=y.dtype)
        self.last[ids] = values
        better = values < self.value[ids]
        if bool(better.any()):
            rows = ids[better]
            self.value[rows] = values[better]
            self.found[rows] = True
            self.z[rows] = z[better]
            if y is not None:
                self.y[rows] = y[better]


def _solve(victims: list[_Victim], budget: Budget, progress: Progress | None, calibrate: bool = False
           ) -> list[AttackOutput | Exception]:
    """The batched attack of victims sharing one signature: starts, optimisation, restart choice, outputs.
    With ``calibrate``, raises ``_NotVectorisable`` when one batched evaluation costs more per problem than a
    sequential one."""
    first = victims[0]
    p = first.attack.params
    restarts = p.restarts
    zs, ys = [], []
    for victim in victims:  # each victim's starts from its own attack seed, in the sequential order
        generator = torch.Generator().manual_seed(victim.attack.seed)
        for _ in range(restarts):
            z, y = victim.attack._draw_start(victim.update, victim.fixed_labels, generator, victim.scale)
            zs.append(z[0])
            ys.append(None if y is None else y[0])
    victim_of = torch.arange(len(victims)).repeat_interleave(restarts)
    objective = _Objective(victims, victim_of)
    z0 = torch.stack(zs)
    y0 = torch.stack(ys) if objective.joint else None
    per_restart = restart_budget(budget, restarts)
    limit = (float("inf") if per_restart is None else per_restart) - first.attack.final_evals
    boxed = p.boxed and objective.image_input
    start = time.perf_counter()
    try:
        objective(torch.zeros(1, dtype=torch.long), z0[:1], None if y0 is None else y0[:1])
    except Exception as exc:  # vmap cannot transform this objective (an override using unsupported ops)
        raise _NotVectorisable(f"the objective cannot be vectorised with torch.func ({type(exc).__name__}: "
                               f"{exc})") from exc
    calibration = _calibrate(objective, first, z0, y0) if calibrate else None
    if calibration is not None and not calibration.batching_pays:
        raise _NotVectorisable(
            f"batching does not pay for this model: one batched evaluation costs "
            f"{1e3 * calibration.batched_s:.2f} ms per problem against {1e3 * calibration.sequential_s:.2f} ms "
            f"sequentially (measured before the run; arithmetic, not per-operation overhead, dominates)")
    best = _Best(len(victim_of))
    steps = first.attack.schedule_steps(limit)  # Adam: the steps that fit the budget (lr drops inside it)
    if p.optimizer == "adam":
        z, y, evals, stopped = _adam(objective, best, z0, y0, p, steps, limit, boxed, progress)
    else:
        z, y, evals, stopped = _lbfgs(objective, best, z0, y0, p, steps, limit, boxed, progress)
    seconds = time.perf_counter() - start
    final_pixels = objective.pixels(None, z)
    best_pixels = None if best.z is None else objective.pixels(None, best.z)
    outputs: list[AttackOutput | Exception] = []
    for i, victim in enumerate(victims):
        attack, update = victim.attack, victim.update
        try:
            runs = []
            for r in range(restarts):
                k = i * restarts + r
                if bool(best.found[k]):
                    runs.append(Candidate(best_pixels[k], None if best.y is None else best.y[k],
                                          float(best.value[k]), evals[k], float(best.last[k])))
                else:  # not one finite evaluation: the final iterate, as the sequential run keeps it
                    runs.append(Candidate(final_pixels[k], None if y is None else y[k], float("inf"), evals[k],
                                          float(best.last[k])))
            output = attack._output(victim.observation, update, runs, victim.rule, victim.fixed_labels,
                                    victim.label_note, victim.scale, per_restart)
        except Exception as exc:  # noqa: BLE001 - that victim's row only
            outputs.append(exc)
            continue
        output.info["cell"] = {
            "batched": True, "victims": len(victims), "problems": len(victim_of), "optimizer": p.optimizer,
            "engine": "torch.func.vmap over victims x restarts" + (
                ", L-BFGS in lockstep (per-problem history and strong-Wolfe line search)"
                if p.optimizer == "lbfgs" else ", Adam on the stacked leaves"),
            "shared_model": objective.shared, "batch_seconds": seconds,
            "calibration": None if calibration is None else calibration.to_dict(),
            "restart_stops": stopped[i * restarts : (i + 1) * restarts],
        }
        outputs.append(output)
    return outputs


def _adam(objective: _Objective, best: _Best, z0: torch.Tensor, y0: torch.Tensor | None, p: Any, steps: int,
          limit: float, boxed: bool, progress: Progress | None
          ) -> tuple[torch.Tensor, torch.Tensor | None, list[int], list[str]]:
    """Adam (elementwise, so stacking problems changes nothing per problem) on [P, ...] leaves, in lockstep:
    every problem has the same step schedule and budget, so all stop together."""
    problems = len(z0)
    everyone = torch.arange(problems)
    z = z0.clone().requires_grad_(True)
    leaves = [z]
    y = None
    if y0 is not None:
        y = y0.clone().requires_grad_(True)
        leaves.append(y)
    opt = torch.optim.Adam(leaves, lr=p.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=lr_milestones(steps), gamma=0.1) \
        if p.lr_drops else None
    evals = 0
    stopped = "steps done"
    for step in range(steps):
        if evals + 1 > limit:
            stopped = "budget"
            break
        evals += 1
        opt.zero_grad(set_to_none=True)
        values, gz, gy = objective(None, z.detach(), None if y is None else y.detach())
        best.update(everyone, values, z.detach(), None if y is None else y.detach())
        z.grad = gz
        if y is not None:
            y.grad = gy
        opt.step()
        if boxed:
            with torch.no_grad():
                z.copy_(objective.clamp(None, z))
        if scheduler is not None:
            scheduler.step()
        if progress and (step % 10 == 0 or step == steps - 1):
            progress(step + 1, steps)
    return z.detach(), (None if y is None else y.detach()), [evals] * problems, [stopped] * problems


def _lbfgs(objective: _Objective, best: _Best, z0: torch.Tensor, y0: torch.Tensor | None, p: Any, steps: int,
           limit: float, boxed: bool, progress: Progress | None
           ) -> tuple[torch.Tensor, torch.Tensor | None, list[int], list[str]]:
    """L-BFGS per problem in lockstep on the flat vectors [z, y] (the order torch.optim.LBFGS flattens the
    sequential attack's leaves in)."""
    problems = len(z0)
    nz = z0[0].numel()
    start = z0.reshape(problems, -1) if y0 is None else torch.cat([z0.reshape(problems, -1),
                                                                   y0.reshape(problems, -1)], 1)
    z_shape, y_shape = objective.input_shape, objective.label_shape

    def evaluate(ids: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = len(ids)
        z = points[:, :nz].reshape(q, *z_shape)
        y = None if y0 is None else points[:, nz:].reshape(q, *y_shape)
        values, gz, gy = objective(ids, z, y)
        best.update(ids, values, z, y)
        flat = gz.reshape(q, -1) if gy is None else torch.cat([gz.reshape(q, -1), gy.reshape(q, -1)], 1)
        return values, flat

    def clamp(p_id: int, point: torch.Tensor) -> torch.Tensor:
        point = point.clone()
        ids = torch.tensor([p_id])
        point[:nz] = objective.clamp(ids, point[:nz].reshape(1, *z_shape)).reshape(-1)
        return point

    settings = lbfgs_batched.LBFGSSettings(steps=steps, lr_at=_lr_schedule(p, steps), max_iter=p.lbfgs_max_iter)
    result = lbfgs_batched.minimise(start, evaluate, settings, [limit] * problems, cost=1,
                                    after_step=clamp if boxed else None, progress=progress)
    points = result.points
    z = points[:, :nz].reshape(problems, *z_shape)
    y = None if y0 is None else points[:, nz:].reshape(problems, *y_shape)
    return z, y, result.evals, result.stopped


def _lr_schedule(p: Any, steps: int):
    """The learning rate of each of ``steps`` optimiser steps as the sequential attack's scheduler sets it."""
    if not p.lr_drops:
        return lambda step: p.lr
    dummy = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([dummy], lr=p.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=lr_milestones(steps), gamma=0.1)
    rates = []
    for _ in range(steps):
        rates.append(opt.param_groups[0]["lr"])
        scheduler.step()
    return lambda step: rates[step]
