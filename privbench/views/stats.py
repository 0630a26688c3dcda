"""Estimates with n and a bootstrap interval, or n/a with the reason; never a stand-in 0."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

BOOTSTRAP_B = 2000
BOOTSTRAP_SEED = 0
LEVEL = 0.95
BOOTSTRAP_NOTE = (f"95% percentile bootstrap intervals, B={BOOTSTRAP_B} resamples with a fixed seed "
                  f"({BOOTSTRAP_SEED}); n is the number of values resampled")


def finite(values: Sequence[Any]) -> list[float]:
    """The finite numbers among ``values`` (None, text, NaN and infinities left out)."""
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(v):
            out.append(float(v))
    return out


def na(reason: str, n: int = 0) -> dict[str, Any]:
    return {"value": None, "ci": None, "n": n, "reason": reason}


def estimate(values: Sequence[Any], stat: str = "median", *, what: str = "values", reason_if_empty: str = "",
             ci: Sequence[float] | None = None, ci_over: str | None = None) -> dict[str, Any]:
    """``stat`` (median or mean) of the finite ``values`` with n and a percentile bootstrap interval.

    One value: no bootstrap (the interval is ``ci`` when given, e.g. a run's own interval over its candidates,
    else None with the reason). No value: n/a with ``reason_if_empty``.
    """
    xs = np.asarray(finite(values), dtype=np.float64)
    n = int(xs.size)
    if n == 0:
        return na(reason_if_empty or f"no {what} stored")
    fn: Callable[..., Any] = np.median if stat == "median" else np.mean
    value = float(fn(xs))
    out: dict[str, Any] = {"value": value, "ci": None, "n": n, "stat": stat, "reason": None}
    if n >= 2 and float(np.ptp(xs)) > 0:
        out["ci"] = bootstrap_ci(xs, fn)
        out["ci_over"] = ci_over or what
    elif ci is not None and len(ci) == 2 and all(isinstance(c, (int, float)) for c in ci):
        out["ci"] = [float(ci[0]), float(ci[1])]
        out["ci_over"] = "the run's own bootstrap over its candidates" + (
            f" (the {n} {what} gave the same value)" if n > 1 else "")
    else:
        out["ci_reason"] = f"n=1: no interval over {what}" if n == 1 else f"the {n} {what} gave the same value"
    return out


def bootstrap_ci(xs: np.ndarray, fn: Callable[..., Any], b: int = BOOTSTRAP_B, seed: int = BOOTSTRAP_SEED,
                 level: float = LEVEL) -> list[float]:
    """Percentile bootstrap interval of ``fn`` over resamples of ``xs`` (fixed seed: the same numbers each time)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, xs.size, size=(b, xs.size))
    stats = fn(xs[idx], axis=1)
    lo, hi = np.percentile(stats, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return [float(lo), float(hi)]


def spread(values: Sequence[Any]) -> float | None:
    xs = finite(values)
    return float(np.std(xs, ddof=1)) if len(xs) >= 2 else None


def fmt_number(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 1e4:
        return f"{value:,.0f}" if abs(value) < 1e9 else f"{value:.3g}"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.2g}"
    return f"{value:.{digits}g}"


def short_reason(reason: str, limit: int = 160) -> str:
    """A reason as a table shows it: its first sentence, at most ``limit`` characters (the JSON keeps it whole)."""
    text = " ".join(str(reason).split())
    if ". " in text:
        text = text[: text.index(". ")]
    return text if len(text) <= limit else text[: limit - 1] + "…"


def fmt_estimate(est: dict[str, Any] | None, digits: int = 4, *, with_reason: bool = True) -> str:
    """``0.412 [0.38, 0.45] n=10``, or ``n/a (reason)``; a failed / missing number is never 0."""
    if not est or est.get("value") is None:
        reason = short_reason((est or {}).get("reason") or "not stored")
        return f"n/a ({reason})" if with_reason else "n/a"
    text = fmt_number(est["value"], digits)
    if est.get("ci"):
        text += f" [{fmt_number(est['ci'][0], digits)}, {fmt_number(est['ci'][1], digits)}]"
    return text + f" n={est['n']}"
