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


def _epsilon_lower_bounds(
    k_in: np.ndarray, k_out: np.ndarray, n_members: int, n_nonmembers: int, delta: float, confidence: float
) -> np.ndarray:
    """Lower bound on epsilon at each ROC point of ``k_in`` members and ``k_out`` nonmembers scored above its
    threshold; 0 where a point proves nothing. Simultaneous over every threshold (see ``dp_bound_check``)."""
    from scipy.stats import beta

    k_in, k_out = np.asarray(k_in, dtype=np.float64), np.asarray(k_out, dtype=np.float64)
    alpha_in = (1 - confidence) / (2 * n_members)  # per member order statistic
    alpha_out = (1 - confidence) / (2 * n_nonmembers)  # per nonmember order statistic
    tpr_low = np.where(k_in > 0, beta.ppf(alpha_in, np.maximum(k_in, 1), n_members - k_in + 1), 0.0)
    fpr_high = np.where(
        k_out < n_nonmembers, beta.isf(alpha_out, k_out + 1, np.maximum(n_nonmembers - k_out, 1)), 1.0
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        first = np.log((tpr_low - delta) / fpr_high)  # TPR <= e^eps FPR + delta
        second = np.log((1 - fpr_high - delta) / (1 - tpr_low))  # TNR <= e^eps FNR + delta
    bound = np.fmax(first, second)
    return np.where(np.isnan(bound), 0.0, np.maximum(bound, 0.0))


def dp_audit_power(n_members: int, n_nonmembers: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon lower bound ``n_members`` and ``n_nonmembers`` scored examples can certify.

    It is the bound a perfect attack (TPR 1 at FPR 0) would give at this
    ``confidence`` (the same correction as ``dp_bound_check``); no attack on this
    sample can show more, so a claimed epsilon at or above it cannot be
    contradicted by this audit whatever the target does. Epsilon in natural-log
    units, as the accountants report it. Example: 1,000 and 1,000 at 95% and
    delta 1e-5 give about 4.5.
    """
    return float(_epsilon_lower_bounds(np.array([n_members]), np.array([0]), n_members, n_nonmembers,
                                       delta, confidence)[0])


def dp_bound_check(
    roc: dict, epsilon: float, delta: float, n_members: int, n_nonmembers: int, confidence: float = 0.95
) -> dict:
    """Audit a membership ROC against the accountant's (epsilon, delta): an empirical epsilon lower bound.

    Any test between neighbouring datasets of an (eps, delta)-DP mechanism
    satisfies TPR <= e^eps FPR + delta and TNR <= e^eps FNR + delta (Kairouz et
    al. 2015), so each ROC point bounds epsilon from below by
    log((TPR - delta) / FPR) and log((1 - FPR - delta) / (1 - TPR)). As in the
    auditing of Jagielski et al. 2020 and Nasr et al. 2021, the rates are
    replaced by the conservative ends of Clopper-Pearson intervals (TPR low, FPR
    high). The thresholds are chosen after seeing the scores, so the intervals
    are made simultaneous: the interval at the k-th member score holds at level
    (1 - confidence) / (2 n_members), at the k-th nonmember score at
    (1 - confidence) / (2 n_nonmembers) (Bonferroni over the order statistics,
    each of whose true rate is Beta-distributed), so with probability at least
    ``confidence`` every point's bound holds at once and the largest is a lower
    bound on the true epsilon. Each scored example counts as one independent
    trial of the test, the usual per-example reading of a single target's ROC
    (the examples share one trained model; Steinke et al. 2023 analyse such
    one-run audits when members are included at random).

    Args:
        roc: ``{"fpr": [...], "tpr": [...]}`` as ``membership_metrics`` returns it.
        epsilon, delta: the accountant's guarantee (epsilon in natural-log units; ``inf`` when there is none).
        n_members, n_nonmembers: how many of each were scored (the ROC's denominators).
        confidence: joint confidence of the audit, in (0, 1).

    Returns a dict:
        ``empirical_epsilon_lower_bound``: the largest bound over the ROC points (0 if none is positive).
        ``dp_bound_violations``: ROC points whose bound exceeds ``epsilon`` (each a violation at ``confidence``).
        ``accountant_epsilon``: ``epsilon`` as given.
        ``dp_audit_confidence``: ``confidence``.
        ``dp_audit_power``: the largest bound this sample could certify at all (``dp_audit_power``).
        ``dp_audit_can_detect``: whether ``dp_audit_power`` exceeds ``epsilon``, i.e. whether any attack could
        have shown a violation here; if not, 0 violations is no evidence either way.
        ``dp_audit``: the verdict in words.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_members < 1 or n_nonmembers < 1:
        raise ValueError(f"the audit needs scored members and nonmembers; got {n_members} and {n_nonmembers}")
    fpr, tpr = np.asarray(roc["fpr"], dtype=np.float64), np.asarray(roc["tpr"], dtype=np.float64)
    bounds = _epsilon_lower_bounds(np.rint(tpr * n_members), np.rint(fpr * n_nonmembers),
                                   n_members, n_nonmembers, delta, confidence)
    lower = float(bounds.max()) if bounds.size else 0.0
    violations = int(np.count_nonzero(bounds > epsilon)) if math.isfinite(epsilon) else 0
    power = dp_audit_power(n_members, n_nonmembers, delta, confidence)
    can_detect = bool(power > epsilon)
    level = f"{confidence:.0%} confidence"
    if not math.isfinite(epsilon):
        verdict = (f"nothing to audit: the accountant gives no finite epsilon; epsilon >= {lower:.2f} with {level} "
                   f"(this sample can show up to {power:.2f})")
    elif violations:
        verdict = (f"violation: epsilon >= {lower:.2f} with {level}, above the accountant's {epsilon:.2f} "
                   f"({violations} ROC point{'s' if violations > 1 else ''})")
    elif can_detect:
        verdict = (f"no violation found: epsilon >= {lower:.2f} with {level}; {n_members} members and "
                   f"{n_nonmembers} nonmembers could have shown up to {power:.2f} against the accountant's "
                   f"{epsilon:.2f}")
    else:
        verdict = (f"no evidence: {n_members} members and {n_nonmembers} nonmembers can show at most epsilon "
                   f"{power:.2f} with {level}, not above the accountant's {epsilon:.2f}; no attack could "
                   f"have found a violation")
    return {
        "dp_bound_violations": violations,
        "empirical_epsilon_lower_bound": lower,
        "accountant_epsilon": epsilon,
        "dp_audit_confidence": confidence,
        "dp_audit_power": power,
        "dp_audit_can_detect": can_detect,
        "dp_audit": verdict,
    }
