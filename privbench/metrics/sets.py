"""Set metrics over the reconstructions of one cell: Frechet distance and KID, with a sample-size policy.

Policy:
- A Frechet distance over d-dimensional features needs n >= 2d samples (below
  that the covariance estimate is rank-deficient and the value is dominated by
  its bias); below the minimum it yields no number and says why. FID on
  Inception pool3 features (d = 2048) therefore needs n >= 4096; ``fd_eval``
  uses a 32-d feature space and needs n >= 64.
- n is stored with every value, and values are compared only at equal n.
- The Frechet distance carries a 95% bootstrap interval (paired resampling of
  the n pairs); KID (unbiased, so usable at small n) carries its standard
  deviation over random subsets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

KID_MIN_N = 20


@dataclass(frozen=True)
class SetScore:
    """One set metric value; ``value`` None means not computed, and ``reason`` says why."""

    name: str
    value: float | None
    n: int
    interval: tuple[float, float] | None = None  # 95% bootstrap interval
    spread: float | None = None  # KID: std over subsets
    reason: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def frechet_min_n(dim: int) -> int:
    return 2 * dim


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to features ``a`` [N, D] and ``b`` [M, D].

    Statistics as pytorch-fid computes them (mean, ``np.cov(rowvar=False)``);
    the distance is pytorch-fid's ``calculate_frechet_distance``.
    """
    import warnings

    from pytorch_fid.fid_score import calculate_frechet_distance

    with warnings.catch_warnings():
        # rank-deficient covariances (dead ReLU features) are handled by pytorch-fid's eps offset
        warnings.simplefilter("ignore")
        return float(
            calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
        )


def frechet_score(
    name: str, a: np.ndarray, b: np.ndarray, min_n: int | None = None, bootstrap: int = 200, seed: int = 0
) -> SetScore:
    """Frechet distance of paired feature sets with a bootstrap interval, or no number below ``min_n``."""
    n = len(a)
    min_n = frechet_min_n(a.shape[1]) if min_n is None else min_n
    if n < min_n:
        return SetScore(
            name, None, n,
            reason=f"n={n} is below the minimum {min_n} (2 x {a.shape[1]} feature dimensions) for a Frechet distance",
        )
    value = frechet_distance(a, b)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(bootstrap):
        idx = rng.integers(0, n, n)
        draws.append(frechet_distance(a[idx], b[idx]))
    low, high = np.percentile(draws, [2.5, 97.5])
    return SetScore(name, value, n, interval=(float(low), float(high)))


def kid_score(name: str, a: np.ndarray, b: np.ndarray, subsets: int = 100, seed: int = 0) -> SetScore:
    """Kernel Inception Distance (Binkowski et al., 2018): unbiased MMD^2 with the kernel (x.y/d + 1)^3.

    Averaged over ``subsets`` random subsets of size min(1000, n // 2); the
    spread is their standard deviation.
    """
    n = min(len(a), len(b))
    if n < KID_MIN_N:
        return SetScore(name, None, n, reason=f"n={n} is below the minimum {KID_MIN_N} for KID")
    size = min(1000, n // 2)
    rng = np.random.default_rng(seed)
    values = [
        _mmd2_unbiased(a[rng.choice(len(a), size, replace=False)], b[rng.choice(len(b), size, replace=False)])
        for _ in range(subsets)
    ]
    return SetScore(name, float(np.mean(values)), n, spread=float(np.std(values)))


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    m = len(x)
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        - 2 * kxy.mean()
    )
