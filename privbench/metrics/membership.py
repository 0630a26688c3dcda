"""Membership-inference metrics: ROC AUC, TPR at low FPR with bootstrap intervals, balanced accuracy, advantage.

Scores: higher means "more likely a member". ``is_member``: bool [N]. A TPR at a
target FPR is reported only when the nonmembers number at least 10 / FPR (1,000
for 1%, 10,000 for 0.1%); below that a value would rest on one or two false
positives, so it is None with the reason.
"""

from __future__ import annotations

import math

import numpy as np

FPR_TARGETS = (0.01, 0.001)


def roc_curve(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), thresholds descending; a point per distinct score, starting at (0, 0)."""
    scores = np.asarray(scores, dtype=np.float64)
    is_member = np.asarray(is_member, dtype=bool)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], is_member[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[distinct]
    fps = np.cumsum(~y)[distinct]
    tpr = np.r_[0.0, tps / max(y.sum(), 1)]
    fpr = np.r_[0.0, fps / max((~y).sum(), 1)]
    return fpr, tpr, np.r_[np.inf, s[distinct]]


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    return float(np.trapezoid(tpr, fpr))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """Highest TPR among operating points whose FPR is at most ``target``."""
    ok = fpr <= target + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def membership_metrics(
    scores: np.ndarray, is_member: np.ndarray, decisions: np.ndarray | None = None,
    bootstrap: int = 200, seed: int = 0,
) -> tuple[dict, dict, dict]:
    """(metrics, reasons for any None, ROC arrays). ``decisions``: the attack's own member/non-member calls."""
    scores = np.asarray(scores, dtype=np.float64)
    is_member = np.asarray(is_member, dtype=bool)
    n_in, n_out = int(is_member.sum()), int((~is_member).sum())
    if n_in == 0 or n_out == 0:
        raise ValueError(f"membership scoring needs members and nonmembers; got {n_in} and {n_out}")
    fpr, tpr, thresholds = roc_curve(scores, is_member)
    metrics: dict = {
        "auc": auc(fpr, tpr),
        "advantage": float((tpr - fpr).max()),
        "n_members_scored": n_in,
        "n_nonmembers_scored": n_out,
    }
    metrics["balanced_accuracy_best"] = 0.5 * (1 + metrics["advantage"])
    if decisions is not None:
        d = np.asarray(decisions, dtype=bool)
        metrics["balanced_accuracy"] = 0.5 * (d[is_member].mean() + (~d[~is_member]).mean())
    reasons: dict = {}
    rng = np.random.default_rng(seed)
    members, nonmembers = np.flatnonzero(is_member), np.flatnonzero(~is_member)
    boot = []
    for _ in range(bootstrap):
        idx = np.r_[rng.choice(members, n_in), rng.choice(nonmembers, n_out)]
        f, t, _ = roc_curve(scores[idx], is_member[idx])
        boot.append((auc(f, t), *[tpr_at_fpr(f, t, x) for x in FPR_TARGETS]))
    boot_arr = np.asarray(boot)
    metrics["auc_ci"] = [float(v) for v in np.percentile(boot_arr[:, 0], [2.5, 97.5])]
    for k, target in enumerate(FPR_TARGETS, start=1):
        name = f"tpr_at_{target:g}_fpr"
        needed = int(np.ceil(10 / target))
        if n_out < needed:
            metrics[name] = None
            reasons[name] = f"needs at least {needed} nonmembers (10 / FPR); this split has {n_out}"
        else:
            metrics[name] = tpr_at_fpr(fpr, tpr, target)
            metrics[f"{name}_ci"] = [float(v) for v in np.percentile(boot_arr[:, k], [2.5, 97.5])]
    roc = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": [float(x) for x in thresholds]}
    return metrics, reasons, roc


def dp_bound_check(roc: dict, epsilon: float, delta: float, n_members: int, n_nonmembers: int) -> dict:
    """Check every ROC point against the (epsilon, delta)-DP hypothesis-testing bounds.

    Any attack on an (eps, delta)-DP mechanism satisfies TPR <= e^eps FPR + delta
    and 1 - TPR >= e^-eps (1 - FPR - delta) (Kairouz et al., 2015). Both are
    evaluated at the point's conservative corner: TPR at the lower and FPR at
    the upper end of their 95% Clopper-Pearson intervals, so that sampling noise
    at the ends of the curve is not called a violation (a gross-error check, not
    a test). The same corners give the empirical epsilon lower bound, the max
    over points of log((TPR - delta) / FPR) and log((1 - FPR - delta) / (1 - TPR)).
    """
    from scipy.stats import beta

    fpr, tpr = np.asarray(roc["fpr"]), np.asarray(roc["tpr"])
    k_in, k_out = np.rint(tpr * n_members), np.rint(fpr * n_nonmembers)
    tpr_low = np.where(k_in > 0, beta.ppf(0.025, k_in, n_members - k_in + 1), 0.0)
    fpr_high = np.where(k_out < n_nonmembers, beta.ppf(0.975, k_out + 1, n_nonmembers - k_out), 1.0)
    if math.isfinite(epsilon):
        first = tpr_low > np.exp(epsilon) * fpr_high + delta
        second = 1 - tpr_low < np.exp(-epsilon) * (1 - fpr_high - delta)
        violations = int(np.count_nonzero(first | second))
    else:
        violations = 0
    with np.errstate(divide="ignore", invalid="ignore"):
        lower = np.concatenate([np.log((tpr_low - delta) / fpr_high), np.log((1 - fpr_high - delta) / (1 - tpr_low))])
    lower = lower[np.isfinite(lower)]
    return {
        "dp_bound_violations": violations,
        "empirical_epsilon_lower_bound": float(max(lower.max(), 0.0)) if lower.size else 0.0,
        "accountant_epsilon": epsilon,
    }
