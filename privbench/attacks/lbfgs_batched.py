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
class _Evaluate:
    """A problem's request for an evaluation at x + t d (``d`` None: at x). Answered with
    ``(f, g, g . d, |g|_inf, point)``: floats, the gradient [n] and the point evaluated [n]."""

    x: torch.Tensor
    d: torch.Tensor | None
    t: float


@dataclass
class _Direction:
    """A problem's request for its next search direction: its gradient now and before, and its last step
    t d. Answered with ``(d, g . d, |d|_inf)``."""

    flat_grad: torch.Tensor
    prev_flat_grad: torch.Tensor
    last_d: torch.Tensor
    last_t: float


@dataclass
class Result:
    """Per problem: the final point [P, n], the evaluations spent [P] and why each stopped."""

    points: torch.Tensor
    evals: list[int]
    stopped: list[str]
    steps: list[int]


def _cubic_interpolate(x1, f1, g1, x2, f2, g2, bounds=None):
    # torch.optim.lbfgs._cubic_interpolate, on Python floats
    if bounds is not None:
        xmin_bound, xmax_bound = bounds
    else:
        xmin_bound, xmax_bound = (x1, x2) if x1 <= x2 else (x2, x1)
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    d2_square = d1**2 - g1 * g2
    if d2_square >= 0:
        d2 = math.sqrt(d2_square)
        if x1 <= x2:
            min_pos = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
        else:
            min_pos = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
        return min(max(min_pos, xmin_bound), xmax_bound)
    return (xmin_bound + xmax_bound) / 2.0


def _strong_wolfe(x, t, d, d_norm, f, g, gtd, g_max, c1=1e-4, c2=0.9, tolerance_change=1e-9, max_ls=25):
    """torch.optim.lbfgs._strong_wolfe as a generator on Python-float scalars: ``yield _Evaluate(x, d, t)``
    replaces ``obj_func(x, t, d)`` and its answer brings g . d and |g|_inf, computed for the whole round at
    once. Returns (f, g, t, evaluations, |g|_inf, point x + t d)."""
    f_new, g_new, gtd_new, g_max_new, x_new = yield _Evaluate(x, d, t)
    ls_func_evals = 1
    t_prev, f_prev, g_prev, gtd_prev, g_max_prev, x_prev = 0, f, g, gtd, g_max, x
    done = False
    ls_iter = 0
    while ls_iter < max_ls:
        if f_new > (f + c1 * t * gtd) or (ls_iter > 1 and f_new >= f_prev):
            bracket = [t_prev, t]
            bracket_f = [f_prev, f_new]
            bracket_g = [g_prev, g_new]
            bracket_gtd = [gtd_prev, gtd_new]
            bracket_state = [(g_max_prev, x_prev), (g_max_new, x_new)]
            break
        if abs(gtd_new) <= -c2 * gtd:
            bracket = [t]
            bracket_f = [f_new]
            bracket_g = [g_new]
            bracket_state = [(g_max_new, x_new)]
            done = True
            break
        if gtd_new >= 0:
            bracket = [t_prev, t]
            bracket_f = [f_prev, f_new]
            bracket_g = [g_prev, g_new]
            bracket_gtd = [gtd_prev, gtd_new]
            bracket_state = [(g_max_prev, x_prev), (g_max_new, x_new)]
            break
        min_step = t + 0.01 * (t - t_prev)
        max_step = t * 10
        tmp = t
        t = _cubic_interpolate(t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds=(min_step, max_step))
        t_prev = tmp
        f_prev, g_prev, gtd_prev, g_max_prev, x_prev = f_new, g_new, gtd_new, g_max_new, x_new
        f_new, g_new, gtd_new, g_max_new, x_new = yield _Evaluate(x, d, t)
        ls_func_evals += 1
        ls_iter += 1
    if ls_iter == max_ls:
        bracket = [0, t]
        bracket_f = [f, f_new]
        bracket_g = [g, g_new]
        bracket_state = [(g_max, x), (g_max_new, x_new)]
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
        f_new, g_new, gtd_new, g_max_new, x_new = yield _Evaluate(x, d, t)
        ls_func_evals += 1
        ls_iter += 1
        if f_new > (f + c1 * t * gtd) or f_new >= bracket_f[low_pos]:
            bracket[high_pos] = t
            bracket_f[high_pos] = f_new
            bracket_g[high_pos] = g_new
            bracket_gtd[high_pos] = gtd_new
            bracket_state[high_pos] = (g_max_new, x_new)
            low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True
            elif gtd_new * (bracket[high_pos] - bracket[low_pos]) >= 0:
                bracket[high_pos] = bracket[low_pos]
                bracket_f[high_pos] = bracket_f[low_pos]
                bracket_g[high_pos] = bracket_g[low_pos]
                bracket_gtd[high_pos] = bracket_gtd[low_pos]
                bracket_state[high_pos] = bracket_state[low_pos]
            bracket[low_pos] = t
            bracket_f[low_pos] = f_new
            bracket_g[low_pos] = g_new
            bracket_gtd[low_pos] = gtd_new
            bracket_state[low_pos] = (g_max_new, x_new)
    t = bracket[low_pos]
    g_max_low, x_low = bracket_state[low_pos]
    return bracket_f[low_pos], bracket_g[low_pos], t, ls_func_evals, g_max_low, x_low


def _problem(z: torch.Tensor, s: LBFGSSettings, after_step: Callable[[int, torch.Tensor], torch.Tensor] | None,
             status: dict, index: int) -> Generator:
    """One problem's optimisation: ``s.steps`` calls of ``LBFGS.step`` as the sequential attack makes them,
    with its stopping rule (the step's first loss repeats, or is non-finite). Yields ``_Evaluate`` and
    ``_Direction`` requests; returns the final point. ``after_step(index, z)`` is applied after every step
    (the [0, 1] box). Scalars are Python floats (torch keeps 0-d tensors: the same arithmetic up to rounding);
    the gradients and points the driver sends back are never modified in place, so no copies are kept."""
    max_eval = s.evals_per_step
    n_total = 0  # state["n_iter"]
    d = prev_flat_grad = None
    t = 0.0
    previous = None
    for step in range(s.steps):
        lr = s.lr_at(step)
        orig_loss, flat_grad, _, g_max, _ = yield _Evaluate(z, None, 0.0)
        loss = orig_loss
        current_evals = 1
        if not g_max <= s.tolerance_grad:
            n_iter = 0
            while n_iter < s.max_iter:
                n_iter += 1
                n_total += 1
                if n_total == 1:
                    d = flat_grad.neg()
                    gtd = float(flat_grad.dot(d))
                    d_norm = g_max
                    t = min(1.0, 1.0 / float(flat_grad.abs().sum())) * lr
                else:
                    d, gtd, d_norm = yield _Direction(flat_grad, prev_flat_grad, d, t)
                    t = lr
                prev_flat_grad = flat_grad
                prev_loss = loss
                if gtd > -s.tolerance_change:
                    break
                loss, flat_grad, t, ls_func_evals, g_max, z = yield from _strong_wolfe(
                    z, t, d, d_norm, loss, flat_grad, gtd, g_max, tolerance_change=s.tolerance_change,
                    max_ls=max_eval - current_evals)
                current_evals += ls_func_evals
                if n_iter == s.max_iter or current_evals >= max_eval or g_max <= s.tolerance_grad:
                    break
                if d_norm * t <= s.tolerance_change or abs(loss - prev_loss) < s.tolerance_change:
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
    """Every problem's L-BFGS history in ring buffers: s and y [P, H, n], rho [P, H], the Gram matrices
    s_j . y_i and y_j . y_i [P, H, H], pairs accepted [P] and H_diag [P].

    The two-loop recursion is evaluated in its compact form: with the Gram matrices, each loop is a
    triangular solve over the (at most H) coefficients, and the history vectors are read twice per round
    (one product with [g, s_new, y_new], one to form the direction), so a round of directions costs a fixed
    number of vectorised operations whatever the history's length. The result is the two-loop's, up to rounding (the sums
    are formed in another order).
    """

    def __init__(self, problems: int, n: int, size: int, dtype: torch.dtype):
        self.size = size
        self.s = torch.zeros(problems, size, n, dtype=dtype)
        self.y = torch.zeros(problems, size, n, dtype=dtype)
        self.sy = torch.zeros(problems, size, size, dtype=dtype)  # [p, j, i] = s_j . y_i (physical slots)
        self.yy = torch.zeros(problems, size, size, dtype=dtype)  # [p, j, i] = y_j . y_i
        self.rho = torch.zeros(problems, size, dtype=dtype)
        self.count = torch.zeros(problems, dtype=torch.long)  # pairs ever accepted (the ring's write position)
        self.h_diag = torch.ones(problems, dtype=dtype)

    def _times(self, ids: torch.Tensor, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """S v and Y v for problems ``ids`` and vectors [Q, c, n]: two [Q, H, c] products.

        The vectors go in as a transposed view (bmm reads the history rows contiguously that way, about 3x
        faster than a [Q, n, c] operand). With more than half of the problems asking, the product runs over
        every problem's history in place (the others' rows multiply zeros) rather than copying Q histories.
        """
        if 2 * len(ids) > len(self.count):
            full = vectors.new_zeros((len(self.count), *vectors.shape[1:]))
            full[ids] = vectors
            operand = full.transpose(1, 2)
            return (torch.bmm(self.s, operand)[ids], torch.bmm(self.y, operand)[ids])
        operand = vectors.transpose(1, 2)
        return (torch.bmm(self.s.index_select(0, ids), operand),
                torch.bmm(self.y.index_select(0, ids), operand))

    def _combine(self, ids: torch.Tensor, s_coef: torch.Tensor, y_coef: torch.Tensor) -> torch.Tensor:
        """S^T a + Y^T b for problems ``ids`` and coefficients [Q, H]: [Q, n]."""
        if 2 * len(ids) > len(self.count):
            a = s_coef.new_zeros((len(self.count), self.size))
            b = s_coef.new_zeros((len(self.count), self.size))
            a[ids], b[ids] = s_coef, y_coef
            return (torch.bmm(a.unsqueeze(1), self.s) + torch.bmm(b.unsqueeze(1), self.y)
                    ).squeeze(1)[ids]
        return (torch.bmm(s_coef.unsqueeze(1), self.s.index_select(0, ids))
                + torch.bmm(y_coef.unsqueeze(1), self.y.index_select(0, ids))).squeeze(1)

    def directions(self, ids: torch.Tensor, requests: list[_Direction]) -> torch.Tensor:
        """Update the histories of problems ``ids`` [Q] with their last step (if y.s > 1e-10, as torch does) and
        return their directions [Q, n] = -H_p g from the two-loop recursion, each over its own history only."""
        size = self.size
        g = torch.stack([r.flat_grad for r in requests])
        y_new = g - torch.stack([r.prev_flat_grad for r in requests])
        s_new = torch.stack([r.last_d for r in requests]) * torch.tensor([r.last_t for r in requests],
                                                                         dtype=g.dtype).unsqueeze(1)
        ys = torch.linalg.vecdot(y_new, s_new)
        accept = ys > 1e-10
        any_accepted = bool(accept.any())
        if any_accepted:
            rows = ids[accept]
            slot = self.count[rows] % size
            self.s[rows, slot] = s_new[accept]
            self.y[rows, slot] = y_new[accept]
            self.rho[rows, slot] = 1.0 / ys[accept]
            self.h_diag[rows] = ys[accept] / torch.linalg.vecdot(y_new[accept], y_new[accept])
            self.count[rows] += 1
        count = self.count[ids]
        # Every ring is read in full, its empty slots masked: reading only the slots some problem has filled
        # would make a problem's rounding depend on the others' history lengths (gemm sums in another order).
        h_diag = self.h_diag[ids]
        s_prod, y_prod = self._times(ids, torch.stack([g, s_new, y_new], 1))  # S, Y times g, s, y: [Q, H, 3]
        if any_accepted:  # the new pair's rows and columns of the Gram matrices
            rows = ids[accept]
            slot = (self.count[rows] - 1) % size
            self.sy[rows, slot] = y_prod[accept, :, 1]
            self.sy[rows, :, slot] = s_prod[accept, :, 2]
            self.yy[rows, slot] = y_prod[accept, :, 2]
            self.yy[rows, :, slot] = y_prod[accept, :, 2]
        s_g, y_g = s_prod[:, :, 0], y_prod[:, :, 0]
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
        y_r0 = h_diag.unsqueeze(1) * y_q.gather(1, perm)
        lower = eye + rho.unsqueeze(2) * sy.transpose(1, 2).tril(-1)
        c = torch.linalg.solve_triangular(lower, (a - rho * y_r0).unsqueeze(2), upper=False).squeeze(2)
        c_phys = torch.zeros_like(c).scatter(1, perm, torch.where(valid, c, 0.0))
        # r = -H_diag g + S^T c - H_diag Y^T a
        return -h_diag.unsqueeze(1) * g + self._combine(ids, c_phys, -h_diag.unsqueeze(1) * a_phys)


def minimise(start: torch.Tensor, evaluate: Evaluate, settings: LBFGSSettings, limits: list[float],
             cost: int = 1, after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
             progress: Callable[[int, int], None] | None = None) -> Result:
    """Run L-BFGS on P problems from ``start`` [P, n] in lockstep.

    ``evaluate(ids, points)`` answers one round of evaluations. Each evaluation costs ``cost`` gradient
    evaluations of problem p's budget ``limits[p]``; a problem that would exceed it stops at the point it
    asked to evaluate (as the sequential attack stops when its closure refuses). Progress is reported as
    (steps of the slowest running problem, steps). What every problem's algorithm needs besides its
    evaluations (the points x + t d, g . d, |g|_inf, the directions and their norms) is computed for the
    whole round in a few vectorised operations, so the per-problem Python work is scalar bookkeeping.
    """
    problems, n = start.shape
    history = _History(problems, n, settings.history_size, start.dtype)
    status = [{"steps": 0, "stopped": ""} for _ in range(problems)]
    gens = [_problem(start[p].clone(), settings, after_step, status[p], p) for p in range(problems)]
    used = [0] * problems
    final: list[torch.Tensor | None] = [None] * problems
    requests: dict[int, object] = {}
    zeros = start.new_zeros(n)

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
            gtds = torch.linalg.vecdot(directions, torch.stack([requests[p].flat_grad for p in asking])).tolist()
            norms = directions.abs().amax(1).tolist()
            for i, p in enumerate(asking):
                advance(p, (directions[i], gtds[i], norms[i]))
        ready = []
        for p, request in list(requests.items()):
            if used[p] + cost > limits[p]:  # out of budget: stop at the point it asked for
                final[p] = request.x if request.d is None else request.x.add(request.d, alpha=request.t)
                status[p]["stopped"] = "budget"
                del requests[p]
                gens[p].close()
            else:
                ready.append(p)
        if not ready:
            continue
        asked = [requests[p] for p in ready]
        directions = torch.stack([zeros if r.d is None else r.d for r in asked])
        steps = torch.tensor([r.t for r in asked], dtype=start.dtype).unsqueeze(1)
        points = torch.stack([r.x for r in asked]).addcmul_(steps, directions)  # x + t d (x where d is None)
        values, grads = evaluate(torch.tensor(ready), points)
        gtds = torch.linalg.vecdot(grads, directions).tolist()
        maxima = grads.abs().amax(1).tolist()
        for p in ready:
            used[p] += cost
        for i, (p, value) in enumerate(zip(ready, values.tolist(), strict=True)):
            advance(p, (value, grads[i], gtds[i], maxima[i], points[i]))
        if progress is not None and requests:
            slowest = min(status[p]["steps"] for p in requests)
            if slowest != last_reported:
                last_reported = slowest
                progress(slowest, settings.steps)
    return Result(torch.stack(final), used, [s["stopped"] for s in status], [s["steps"] for s in status])
