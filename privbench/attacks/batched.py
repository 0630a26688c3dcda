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
    form_update,
    label_loss,
    label_rule,
    lr_milestones,
    mean_scale,
    restart_budget,
    total_variation,
)
from privbench.config import Budget
from privbench.threat import GradientUpdate, Observation

if TYPE_CHECKING:
    from privbench.attacks.gradient_inversion import GradientInversion


@dataclass
class _Victim:
    """One batchable victim: its attack, observation, label rule and fixed labels (int64 [B] or None)."""

    index: int
    attack: "GradientInversion"
    observation: Observation
    update: GradientUpdate
    rule: str
    fixed_labels: torch.Tensor | None


def why_not_batched(attack: "GradientInversion", observation: Observation) -> str | None:
    """Why this victim runs the sequential attack rather than in the batch (None: it can be batched)."""
    update = observation.gradient_update
    if update is None:
        return "no gradient update in the observation"
    if update.encrypted:
        return "encrypted update (the output is the prior guess)"
    if update.local_steps != 1:
        return "multi-step update (refused by the attack)"
    if attack.params.eot_samples > 1:
        return "EOT over several encoder samples (per-sample randomness is not batched)"
    if hasattr(update.model, "timesteps") or hasattr(update.model, "encoding"):
        return "spiking network (stochastic encoder, snntorch state)"
    return None


def _signature(update: GradientUpdate) -> tuple:
    """What must be equal for victims to share one vmapped objective: architecture, shapes, rule, mode."""
    params = tuple((name, tuple(p.shape)) for name, p in update.model.named_parameters())
    return (type(update.model), params, update.batch_size, tuple(update.input_shape), update.num_classes,
            update.rule, update.model.training, update.morphed is None)


def run_cell(attacks: "list[GradientInversion]", observations: list[Observation], budget: Budget,
             progress: Progress | None = None, max_batch: int | None = None) -> list[AttackOutput | Exception]:
    """One output (or the exception raised) per victim, as ``attacks[v].run(observations[v], budget)``
    would give it; batchable victims of one signature are solved together, ``max_batch`` at a time."""
    outputs: list[AttackOutput | Exception | None] = [None] * len(attacks)
    groups: dict[tuple, list[_Victim]] = {}
    for v, (attack, observation) in enumerate(zip(attacks, observations, strict=True)):
        reason = why_not_batched(attack, observation)
        if reason is None:
            try:
                rule, fixed = label_rule(attack.params, observation.gradient_update)
            except Exception as exc:  # noqa: BLE001 - that victim's row fails (as its sequential run would)
                outputs[v] = exc
                continue
            victim = _Victim(v, attack, observation, observation.gradient_update, rule, fixed)
            groups.setdefault(_signature(victim.update), []).append(victim)
            continue
        outputs[v] = _sequential(attack, observation, budget, reason)
    size = max_batch or len(attacks) or 1
    for members in groups.values():
        for start in range(0, len(members), size):
            chunk = members[start : start + size]
            try:
                results = _solve(chunk, budget, progress)
            except _NotVectorisable as exc:  # the objective cannot be vmapped: every victim of the chunk alone
                for victim in chunk:
                    outputs[victim.index] = _sequential(victim.attack, victim.observation, budget, str(exc))
                continue
            for victim, result in zip(chunk, results, strict=True):
                outputs[victim.index] = result
    return outputs  # type: ignore[return-value]


class _NotVectorisable(RuntimeError):
    pass


def _sequential(attack: "GradientInversion", observation: Observation, budget: Budget,
                reason: str) -> AttackOutput | Exception:
    try:
        output = attack.run(observation, budget)
    except Exception as exc:  # noqa: BLE001 - that victim's row only
        return exc
    output.info["cell"] = {"batched": False, "reason": reason}
    return output


class _Objective:
    """The vectorised objective of P problems: value [P] and gradients w.r.t. inputs [P, B, ...] (and label
    logits [P, B, K] for joint labels) from one vmap call, each problem against its own victim's update."""

    def __init__(self, victims: list[_Victim], victim_of: torch.Tensor):
        first = victims[0]
        attack, update = first.attack, first.update
        p = attack.params
        model = copy.deepcopy(update.model)
        if model.training:  # train-mode BatchNorm normalises by the batch; its running statistics are unused
            torch.func.replace_all_batch_norm_modules_(model)
        self.model = model
        self.names = [name for name, q in update.model.named_parameters() if q.requires_grad]
        per_victim = [dict(v.update.model.named_parameters()) for v in victims]
        shared = all(torch.equal(pv[name], per_victim[0][name]) for pv in per_victim[1:] for name in self.names)
        self.params = {n: per_victim[0][n].detach() for n in self.names} if shared else \
            {n: torch.stack([pv[n].detach() for pv in per_victim]) for n in self.names}
        self.shared_params = shared
        frozen = {n: q.detach() for n, q in model.named_parameters() if n not in self.names}
        self.buffers = {**frozen, **{n: b for n, b in model.named_buffers()}}
        targets = [mean_scale(v.update) for v in victims]
        self.targets = tuple(torch.stack([t[k] for t in targets]) for k in range(len(targets[0])))
        self.joint = first.fixed_labels is None
        self.fixed = None if self.joint else torch.stack([v.fixed_labels for v in victims])
        self.victim_of = victim_of
        self.rule = update.rule
        image_input = update.morphed is None
        self.tv_weight = p.tv_weight if image_input else 0.0
        self.signed = p.signed
        self.distance = attack.gradient_distance
        self.input_shape = (update.batch_size, *update.input_shape)
        self.label_shape = (update.batch_size, update.num_classes)
        argnums = (0, 1) if self.joint else 0
        self._fn = vmap(grad_and_value(self._one, argnums=argnums),
                        in_dims=(0, 0, 0, None if shared else 0, None))

    def _one(self, x: torch.Tensor, labels: torch.Tensor, target: tuple, params: dict, buffers: dict
             ) -> torch.Tensor:
        """One problem's objective: distance(update formed from x, its victim's update) + TV prior."""
        names = self.names

        def loss_grads(inputs: torch.Tensor, lab: torch.Tensor) -> tuple[torch.Tensor, ...]:
            def loss(prm: dict) -> torch.Tensor:
                return label_loss(functional_call(self.model, (prm, buffers), (inputs,)), lab)

            g = grad(loss)(params)
            return tuple(g[n] for n in names)

        value = self.distance(form_update(loss_grads, x, labels, self.rule), target)
        if self.tv_weight:
            value = value + self.tv_weight * total_variation(x)
        return value

    def __call__(self, ids: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor | None):
        """(values [Q], grad x [Q, B, ...], grad y [Q, B, K] or None) for problems ``ids`` (None: all)."""
        victims = self.victim_of if ids is None else self.victim_of[ids]
        targets = tuple(t[victims] for t in self.targets)
        params = self.params if self.shared_params else {n: q[victims] for n, q in self.params.items()}
        labels = y if self.joint else self.fixed[victims]
        grads, values = self._fn(x, labels, targets, params, self.buffers)
        gx, gy = grads if self.joint else (grads, None)
        if self.signed:
            gx = gx.sign()
        return values.detach(), gx.detach(), (None if gy is None else gy.detach())


def _solve(victims: list[_Victim], budget: Budget, progress: Progress | None) -> list[AttackOutput | Exception]:
    """The batched attack of victims sharing one signature: starts, optimisation, restart choice, outputs."""
    first = victims[0]
    p = first.attack.params
    restarts = p.restarts
    xs, ys = [], []
    for victim in victims:  # each victim's starts from its own attack seed, in the sequential order
        generator = torch.Generator().manual_seed(victim.attack.seed)
        for _ in range(restarts):
            x, y = victim.attack._draw_start(victim.update, victim.fixed_labels, generator)
            xs.append(x)
            ys.append(y)
    victim_of = torch.arange(len(victims)).repeat_interleave(restarts)
    objective = _Objective(victims, victim_of)
    x0 = torch.stack(xs)
    y0 = None if objective.joint else None
    if objective.joint:
        y0 = torch.stack(ys)
    per_restart = restart_budget(budget, restarts)
    limit = float("inf") if per_restart is None else per_restart
    boxed = p.boxed and first.update.morphed is None
    start = time.perf_counter()
    try:
        objective(torch.arange(min(1, len(victim_of))), x0[:1], None if y0 is None else y0[:1])
    except Exception as exc:  # vmap cannot transform this objective (an override using unsupported ops)
        raise _NotVectorisable(f"the objective cannot be vectorised with torch.func ({type(exc).__name__}: "
                               f"{exc})") from exc
    if p.optimizer == "adam":
        x, y, evals, stopped = _adam(objective, x0, y0, p, limit, boxed, progress)
    else:
        x, y, evals, stopped = _lbfgs(objective, x0, y0, p, limit, boxed, progress)
    seconds = time.perf_counter() - start
    outputs: list[AttackOutput | Exception] = []
    for i, victim in enumerate(victims):
        attack, update = victim.attack, victim.update
        try:
            runs = []
            for r in range(restarts):
                k = i * restarts + r
                runs.append(attack._restart_result(update, victim.fixed_labels, x[k], None if y is None else y[k],
                                                   evals[k]))
            output = attack._output(victim.observation, update, runs, victim.rule)
        except Exception as exc:  # noqa: BLE001 - that victim's row only
            outputs.append(exc)
            continue
        output.info["cell"] = {
            "batched": True, "victims": len(victims), "problems": len(victim_of), "optimizer": p.optimizer,
            "engine": "torch.func.vmap over victims x restarts" + (
                ", L-BFGS in lockstep (per-problem history and strong-Wolfe line search)"
                if p.optimizer == "lbfgs" else ", Adam on the stacked leaves"),
            "shared_model": objective.shared_params, "batch_seconds": seconds,
            "restart_stops": stopped[i * restarts : (i + 1) * restarts],
        }
        outputs.append(output)
    return outputs


def _adam(objective: _Objective, x0: torch.Tensor, y0: torch.Tensor | None, p: Any, limit: float, boxed: bool,
          progress: Progress | None) -> tuple[torch.Tensor, torch.Tensor | None, list[int], list[str]]:
    """Adam (elementwise, so stacking problems changes nothing per problem) on [P, ...] leaves, in lockstep:
    every problem has the same step schedule and budget, so all stop together."""
    problems = len(x0)
    x = x0.clone().requires_grad_(True)
    leaves = [x]
    y = None
    if y0 is not None:
        y = y0.clone().requires_grad_(True)
        leaves.append(y)
    opt = torch.optim.Adam(leaves, lr=p.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=lr_milestones(p.steps), gamma=0.1) \
        if p.lr_drops else None
    evals = 0
    stopped = "steps done"
    for step in range(p.steps):
        if evals + 1 > limit:
            stopped = "budget"
            break
        evals += 1
        opt.zero_grad(set_to_none=True)
        _, gx, gy = objective(None, x.detach(), None if y is None else y.detach())
        x.grad = gx
        if y is not None:
            y.grad = gy
        opt.step()
        if boxed:
            with torch.no_grad():
                x.clamp_(0, 1)
        if scheduler is not None:
            scheduler.step()
        if progress and (step % 10 == 0 or step == p.steps - 1):
            progress(step + 1, p.steps)
    return x.detach(), (None if y is None else y.detach()), [evals] * problems, [stopped] * problems


def _lbfgs(objective: _Objective, x0: torch.Tensor, y0: torch.Tensor | None, p: Any, limit: float, boxed: bool,
           progress: Progress | None) -> tuple[torch.Tensor, torch.Tensor | None, list[int], list[str]]:
    """L-BFGS per problem in lockstep on the flat vectors [x, y] (the order torch.optim.LBFGS flattens the
    sequential attack's leaves in)."""
    problems = len(x0)
    nx = x0[0].numel()
    start = x0.reshape(problems, -1) if y0 is None else torch.cat([x0.reshape(problems, -1),
                                                                   y0.reshape(problems, -1)], 1)
    x_shape, y_shape = objective.input_shape, objective.label_shape

    def evaluate(ids: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = len(ids)
        x = points[:, :nx].reshape(q, *x_shape)
        y = None if y0 is None else points[:, nx:].reshape(q, *y_shape)
        values, gx, gy = objective(ids, x, y)
        flat = gx.reshape(q, -1) if gy is None else torch.cat([gx.reshape(q, -1), gy.reshape(q, -1)], 1)
        return values, flat

    lr_at = _lr_schedule(p)

    def clamp(z: torch.Tensor) -> torch.Tensor:
        z = z.clone()
        z[:nx].clamp_(0, 1)
        return z

    settings = lbfgs_batched.LBFGSSettings(steps=p.steps, lr_at=lr_at, max_iter=p.lbfgs_max_iter)
    result = lbfgs_batched.minimise(start, evaluate, settings, [limit] * problems, cost=1,
                                    after_step=clamp if boxed else None, progress=progress)
    points = result.points
    x = points[:, :nx].reshape(problems, *x_shape)
    y = None if y0 is None else points[:, nx:].reshape(problems, *y_shape)
    return x, y, result.evals, result.stopped


def _lr_schedule(p: Any):
    """The learning rate of each optimiser step as the sequential attack's scheduler sets it."""
    if not p.lr_drops:
        return lambda step: p.lr
    dummy = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([dummy], lr=p.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=lr_milestones(p.steps), gamma=0.1)
    rates = []
    for _ in range(p.steps):
        rates.append(opt.param_groups[0]["lr"])
        scheduler.step()
    return lambda step: rates[step]
