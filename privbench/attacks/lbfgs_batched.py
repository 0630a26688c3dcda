"""L-BFGS with a strong-Wolfe line search for P independent problems evaluated in lockstep.

Each problem runs ``torch.optim.LBFGS(..., line_search_fn="strong_wolfe")``'s algorithm, step for step and
branch for branch (ported from torch 2.x ``torch/optim/lbfgs.py``), as a Python generator that asks for
what it needs: an evaluation (objective and gradient at a point) or a search direction (the two-loop
recursion over its own history). The driver (:func:`minimise`) collects the requests of every problem that
is still running, answers all evaluations of a round in one vectorised call and all directions of a round
in one batched two-loop recursion, and sends the answers back. Problems never share anything: each has
its own history (s, y, rho), its own step length and line-search state, its own evaluation budget; a
problem that has finished (converged, out of budget, non-finite) is no longer evaluated.

The numbers differ from the sequential optimiser's only by rounding (vectorised dot products and
evaluations sum in another order), which the line search may turn into different branches later on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Generator

import torch

Evaluate = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# (problem ids int64 [Q], points [Q, n]) -> (objective values [Q], gradients [Q, n])


@dataclass(frozen=True)
class LBFGSSettings:
    """torch.optim.LBFGS's settings, per problem. ``lr_at(step)``: the learning rate of optimiser step
    ``step`` (0-based; a scheduler's value); ``steps``: optimiser steps (``LBFGS.step`` calls)."""

    steps: int
    lr_at: Callable[[int], float]
    max_iter: int = 20
    max_eval: int | None = None  # None: max_iter * 5 // 4, as torch
    tolerance_grad: float = 1e-7
    tolerance_change: float = 1e-9
    history_size: int = 100

    @property
    def evals_per_step(self) -> int:
        return self.max_eval if self.max_eval is not None else self.max_iter * 5 // 4


@dataclass
class _Direction:
    """A problem's request for its next search direction: its gradient now and before, and its last step."""

    flat_grad: torch.Tensor
    prev_flat_grad: torch.Tensor
    step: torch.Tensor  # s = d * t


@dataclass
class Result:
    """Per problem: the final point [P, n], the evaluations spent [P] and why each stopped."""

    points: torch.Tensor
    evals: list[int]
    stopped: list[str]
    steps: list[int]


def _cubic_interpolate(x1, f1, g1, x2, f2, g2, bounds=None):
    # torch.optim.lbfgs._cubic_interpolate, unchanged
    if bounds is not None:
        xmin_bound, xmax_bound = bounds
    else:
        xmin_bound, xmax_bound = (x1, x2) if x1 <= x2 else (x2, x1)
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    d2_square = d1**2 - g1 * g2
    if d2_square >= 0:
        d2 = d2_square.sqrt()
        if x1 <= x2:
            min_pos = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
        else:
            min_pos = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
        return min(max(min_pos, xmin_bound), xmax_bound)
    return (xmin_bound + xmax_bound) / 2.0


def _strong_wolfe(x, t, d, f, g, gtd, c1=1e-4, c2=0.9, tolerance_change=1e-9, max_ls=25):
    """torch.optim.lbfgs._strong_wolfe as a generator: ``yield point`` replaces ``obj_func(x, t, d)``."""
    d_norm = d.abs().max()
    g = g.clone(memory_format=torch.contiguous_format)
    f_new, g_new = yield x.add(d, alpha=t)
    ls_func_evals = 1
    gtd_new = g_new.dot(d)
    t_prev, f_prev, g_prev, gtd_prev = 0, f, g, gtd
    done = False
    ls_iter = 0
    while ls_iter < max_ls:
        if f_new > (f + c1 * t * gtd) or (ls_iter > 1 and f_new >= f_prev):
            bracket = [t_prev, t]
            bracket_f = [f_prev, f_new]
            bracket_g = [g_prev, g_new.clone(memory_format=torch.contiguous_format)]
            bracket_gtd = [gtd_prev, gtd_new]
            break
        if abs(gtd_new) <= -c2 * gtd:
            bracket = [t]
            bracket_f = [f_new]
            bracket_g = [g_new]
            done = True
            break
        if gtd_new >= 0:
            bracket = [t_prev, t]
            bracket_f = [f_prev, f_new]
            bracket_g = [g_prev, g_new.clone(memory_format=torch.contiguous_format)]
            bracket_gtd = [gtd_prev, gtd_new]
            break
        min_step = t + 0.01 * (t - t_prev)
        max_step = t * 10
        tmp = t
        t = _cubic_interpolate(t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds=(min_step, max_step))
        t_prev = tmp
        f_prev = f_new
        g_prev = g_new.clone(memory_format=torch.contiguous_format)
        gtd_prev = gtd_new
        f_new, g_new = yield x.add(d, alpha=t)
        ls_func_evals += 1
        gtd_new = g_new.dot(d)
        ls_iter += 1
    if ls_iter == max_ls:
        bracket = [0, t]
        bracket_f = [f, f_new]
        bracket_g = [g, g_new]
    insuf_progress = False
    low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[-1] else (1, 0)
    while not done and ls_iter < max_ls:
        if abs(bracket[1] - bracket[0]) * d_norm < tolerance_change:
            break
        t = _cubic_interpolate(bracket[0], bracket_f[0], bracket_gtd[0], bracket[1], bracket_f[1], bracket_gtd[1])
        eps = 0.1 * (max(bracket) - min(bracket))
        if min(max(bracket) - t, t - min(bracket)) < eps:
            if insuf_progress or t >= max(bracket) or t <= min(bracket):
                if abs(t - max(bracket)) < abs(t - min(bracket)):
                    t = max(bracket) - eps
                else:
                    t = min(bracket) + eps
                insuf_progress = False
            else:
                insuf_progress = True
        else:
            insuf_progress = False
        f_new, g_new = yield x.add(d, alpha=t)
        ls_func_evals += 1
        gtd_new = g_new.dot(d)
        ls_iter += 1
        if f_new > (f + c1 * t * gtd) or f_new >= bracket_f[low_pos]:
            bracket[high_pos] = t
            bracket_f[high_pos] = f_new
            bracket_g[high_pos] = g_new.clone(memory_format=torch.contiguous_format)
            bracket_gtd[high_pos] = gtd_new
            low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True
            elif gtd_new * (bracket[high_pos] - bracket[low_pos]) >= 0:
                bracket[high_pos] = bracket[low_pos]
                bracket_f[high_pos] = bracket_f[low_pos]
                bracket_g[high_pos] = bracket_g[low_pos]
                bracket_gtd[high_pos] = bracket_gtd[low_pos]
            bracket[low_pos] = t
            bracket_f[low_pos] = f_new
            bracket_g[low_pos] = g_new.clone(memory_format=torch.contiguous_format)
            bracket_gtd[low_pos] = gtd_new
    t = bracket[low_pos]
    f_new = bracket_f[low_pos]
    g_new = bracket_g[low_pos]
    return f_new, g_new, t, ls_func_evals


def _problem(z: torch.Tensor, s: LBFGSSettings, after_step: Callable[[int, torch.Tensor], torch.Tensor] | None,
             status: dict, index: int) -> Generator:
    """One problem's optimisation: ``s.steps`` calls of ``LBFGS.step`` as the sequential attack makes them,
    with its stopping rule (the step's first loss repeats, or is non-finite). Yields points to evaluate
    (answered with (loss float, flat gradient [n])) or ``_Direction`` requests (answered with d [n]);
    returns the final point. ``after_step(index, z)`` is applied after every step (the [0, 1] box)."""
    max_eval = s.evals_per_step
    n_total = 0  # state["n_iter"]
    d = t = prev_flat_grad = None
    previous = None
    for step in range(s.steps):
        lr = s.lr_at(step)
        orig_loss, flat_grad = yield z
        loss = orig_loss
        current_evals = 1
        if not bool(flat_grad.abs().max() <= s.tolerance_grad):
            n_iter = 0
            while n_iter < s.max_iter:
                n_iter += 1
                n_total += 1
                if n_total == 1:
                    d = flat_grad.neg()
                else:
                    d = yield _Direction(flat_grad, prev_flat_grad, d.mul(t))
                prev_flat_grad = flat_grad.clone(memory_format=torch.contiguous_format)
                prev_loss = loss
                t = min(1.0, 1.0 / flat_grad.abs().sum()) * lr if n_total == 1 else lr
                gtd = flat_grad.dot(d)
                if gtd > -s.tolerance_change:
                    break
                x_init = z.clone(memory_format=torch.contiguous_format)
                loss, flat_grad, t, ls_func_evals = yield from _strong_wolfe(
                    x_init, t, d, loss, flat_grad, gtd, tolerance_change=s.tolerance_change,
                    max_ls=max_eval - current_evals)
                z = x_init.add(d, alpha=t)
                opt_cond = flat_grad.abs().max() <= s.tolerance_grad
                current_evals += ls_func_evals
                if n_iter == s.max_iter or current_evals >= max_eval or opt_cond:
                    break
                if d.mul(t).abs().max() <= s.tolerance_change or abs(loss - prev_loss) < s.tolerance_change:
                    break
        if after_step is not None:
            z = after_step(index, z)
        status["steps"] = step + 1
        # the sequential attack's rule: L-BFGS returns the same value once it can make no progress
        if previous is not None and orig_loss == previous or not math.isfinite(orig_loss):
            status["stopped"] = "no progress" if math.isfinite(orig_loss) else "non-finite objective"
            return z
        previous = orig_loss
    status["stopped"] = "steps done"
    return z


class _History:
    """Every problem's L-BFGS history in ring buffers: the pairs (s, y) in one tensor [P, 2H, n] (s in slots
    [0, H), y in [H, 2H)), rho [P, H], the Gram matrices s_j . y_i and y_j . y_i [P, H, H], pairs accepted [P]
    and H_diag [P].

    The two-loop recursion is evaluated in its compact form: with the Gram matrices, each loop is a
    triangular solve over the (at most H) coefficients, and the history vectors are read twice per round
    (one product with [g, s_new, y_new], one to form the direction), so a round of directions costs a fixed
    number of vectorised operations whatever the history's length. The result is the two-loop's, up to
    rounding (the sums are formed in another order).
    """

    def __init__(self, problems: int, n: int, size: int, dtype: torch.dtype):
        self.size = size
        self.pairs = torch.zeros(problems, 2 * size, n, dtype=dtype)
        self.sy = torch.zeros(problems, size, size, dtype=dtype)  # [p, j, i] = s_j . y_i (physical slots)
        self.yy = torch.zeros(problems, size, size, dtype=dtype)  # [p, j, i] = y_j . y_i
        self.rho = torch.zeros(problems, size, dtype=dtype)
        self.count = torch.zeros(problems, dtype=torch.long)  # pairs ever accepted (the ring's write position)
        self.h_diag = torch.ones(problems, dtype=dtype)

    def directions(self, ids: torch.Tensor, requests: list[_Direction]) -> torch.Tensor:
        """Update the histories of problems ``ids`` [Q] with their last step (if y.s > 1e-10, as torch does) and
        return their directions [Q, n] = -H_p g from the two-loop recursion, each over its own history only."""
        size = self.size
        g = torch.stack([r.flat_grad for r in requests])
        y_new = g - torch.stack([r.prev_flat_grad for r in requests])
        s_new = torch.stack([r.step for r in requests])
        ys = torch.linalg.vecdot(y_new, s_new)
        accept = ys > 1e-10
        any_accepted = bool(accept.any())
        if any_accepted:
            rows = ids[accept]
            slot = self.count[rows] % size
            self.pairs[rows, slot] = s_new[accept]
            self.pairs[rows, size + slot] = y_new[accept]
            self.rho[rows, slot] = 1.0 / ys[accept]
            self.h_diag[rows] = ys[accept] / torch.linalg.vecdot(y_new[accept], y_new[accept])
            self.count[rows] += 1
        # S and Y times g, s_new, y_new: [Q, 2H, 3]. With more than half of the problems asking, the product runs
        # over every problem's history in place (the others' rows multiply zeros) rather than copying Q histories.
        rhs = torch.stack([g, s_new, y_new], 2)
        in_place = 2 * len(ids) > len(self.count)
        if in_place:
            full = rhs.new_zeros((len(self.count), *rhs.shape[1:]))
            full[ids] = rhs
            prod = torch.bmm(self.pairs, full)[ids]
        else:
            pairs = self.pairs.index_select(0, ids)
            prod = torch.bmm(pairs, rhs)
        if any_accepted:  # the new pair's rows and columns of the Gram matrices
            rows = ids[accept]
            slot = (self.count[rows] - 1) % size
            self.sy[rows, slot, :] = prod[accept, size:, 1]
            self.sy[rows, :, slot] = prod[accept, :size, 2]
            self.yy[rows, slot, :] = prod[accept, size:, 2]
            self.yy[rows, :, slot] = prod[accept, size:, 2]
        s_g, y_g = prod[:, :size, 0], prod[:, size:, 0]
        count = self.count[ids]
        num = count.clamp(max=size)
        logical = torch.arange(size)
        valid = logical.unsqueeze(0) < num.unsqueeze(1)  # [Q, H], oldest first
        perm = (count.unsqueeze(1) - num.unsqueeze(1) + logical.unsqueeze(0)) % size  # logical -> physical slot
        rho = torch.where(valid, self.rho[ids].gather(1, perm), 0.0)
        sy = self.sy[ids]
        sy = sy.gather(1, perm.unsqueeze(2).expand(-1, -1, size)).gather(2, perm.unsqueeze(1).expand(-1, size, -1))
        sy = torch.where(valid.unsqueeze(2) & valid.unsqueeze(1), sy, 0.0)
        eye = torch.eye(size, dtype=g.dtype).expand(len(ids), -1, -1)
        # loop 1 (newest to oldest): a_j = rho_j s_j . q_j, q_j = -g - sum_{i newer} a_i y_i
        upper = eye + rho.unsqueeze(2) * sy.triu(1)
        a = torch.linalg.solve_triangular(upper, (-rho * s_g.gather(1, perm)).unsqueeze(2), upper=True).squeeze(2)
        a_phys = torch.zeros_like(a).scatter(1, perm, a)
        # q = -g - Y^T a, so y_j . q = -y_j . g - sum_i a_i y_j . y_i
        y_q = -y_g - torch.bmm(self.yy[ids], a_phys.unsqueeze(2)).squeeze(2)
        # loop 2 (oldest to newest): r = H_diag q + sum_i c_i s_i, c_j = a_j - rho_j y_j . r_j
        h_diag = self.h_diag[ids]
        y_r0 = h_diag.unsqueeze(1) * y_q.gather(1, perm)
        lower = eye + rho.unsqueeze(2) * sy.transpose(1, 2).tril(-1)
        c = torch.linalg.solve_triangular(lower, (a - rho * y_r0).unsqueeze(2), upper=False).squeeze(2)
        c_phys = torch.zeros_like(c).scatter(1, perm, torch.where(valid, c, 0.0))
        coef = torch.cat([c_phys, -h_diag.unsqueeze(1) * a_phys], 1)  # r = -H_diag g + S^T c - H_diag Y^T a
        if in_place:
            full = coef.new_zeros((len(self.count), coef.shape[1]))
            full[ids] = coef
            combined = torch.bmm(full.unsqueeze(1), self.pairs).squeeze(1)[ids]
        else:
            combined = torch.bmm(coef.unsqueeze(1), pairs).squeeze(1)
        return -h_diag.unsqueeze(1) * g + combined


def minimise(start: torch.Tensor, evaluate: Evaluate, settings: LBFGSSettings, limits: list[float],
             cost: int = 1, after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
             progress: Callable[[int, int], None] | None = None) -> Result:
    """Run L-BFGS on P problems from ``start`` [P, n] in lockstep.

    ``evaluate(ids, points)`` answers one round of evaluations. Each evaluation costs ``cost`` gradient
    evaluations of problem p's budget ``limits[p]``; a problem that would exceed it stops at the point it
    asked to evaluate (as the sequential attack stops when its closure refuses). Progress is reported as
    (steps of the slowest running problem, steps).
    """
    problems, n = start.shape
    history = _History(problems, n, settings.history_size, start.dtype)
    status = [{"steps": 0, "stopped": ""} for _ in range(problems)]
    gens = [_problem(start[p].clone(), settings, after_step, status[p], p) for p in range(problems)]
    used = [0] * problems
    final: list[torch.Tensor | None] = [None] * problems
    requests: dict[int, object] = {}

    def advance(p: int, answer) -> None:
        try:
            requests[p] = gens[p].send(answer)
        except StopIteration as stop:
            final[p] = stop.value
            requests.pop(p, None)

    if progress is not None:
        progress(0, settings.steps)
    for p in range(problems):
        advance(p, None)
    last_reported = 0
    while requests:
        while True:
            asking = [p for p, r in requests.items() if isinstance(r, _Direction)]
            if not asking:
                break
            directions = history.directions(torch.tensor(asking), [requests[p] for p in asking])
            for i, p in enumerate(asking):
                advance(p, directions[i])
        ready = []
        for p, point in list(requests.items()):
            if used[p] + cost > limits[p]:  # out of budget: stop at the point it asked for
                final[p] = point
                status[p]["stopped"] = "budget"
                del requests[p]
                gens[p].close()
            else:
                ready.append(p)
        if not ready:
            continue
        values, grads = evaluate(torch.tensor(ready), torch.stack([requests[p] for p in ready]))
        for p in ready:
            used[p] += cost
        for i, (p, value) in enumerate(zip(ready, values.tolist(), strict=True)):
            advance(p, (value, grads[i]))
        if progress is not None and requests:
            slowest = min(status[p]["steps"] for p in requests)
            if slowest != last_reported:
                last_reported = slowest
                progress(slowest, settings.steps)
    return Result(torch.stack(final), used, [s["stopped"] for s in status], [s["steps"] for s in status])
