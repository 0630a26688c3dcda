"""Member / non-member / auxiliary splits of a de-duplicated pool.

Membership inference is only meaningful if no image (or a near copy of it) sits on both
sides, so duplicates are grouped first and one representative per group is kept:
exact duplicates have identical preprocessed uint8 pixels, near duplicates differ by less
than ``near_duplicate_rms`` RMS on a 16x16 grayscale area-average downsample.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from privbench.datasets.base import DatasetError, ImageDataset
from privbench.params import bounded, check_instance

MAX_SPLIT_COUNT = 10**9

DOWNSAMPLE = 16  # near-duplicate comparison grid, pixels per side
_CHUNK = 1024  # rows per block of the pairwise-distance computation


@dataclass(frozen=True)
class SplitSpec:
    """Split sizes as fractions of the de-duplicated pool, or absolute counts (which win)."""

    members_fraction: float = bounded(0.5, gt=0, lt=1)
    nonmembers_fraction: float = bounded(0.25, gt=0, lt=1)  # auxiliary gets the rest
    members: int | None = bounded(None, ge=1, le=MAX_SPLIT_COUNT)  # absolute counts override the fractions when given
    nonmembers: int | None = bounded(None, ge=1, le=MAX_SPLIT_COUNT)
    auxiliary: int | None = bounded(None, ge=1, le=MAX_SPLIT_COUNT)
    near_duplicate_rms: float = bounded(0.01, ge=0, le=1)  # RMS pixel difference (images in [0,1]) on a 16x16 grayscale downsample below which two images are near duplicates

    def __post_init__(self) -> None:
        for name in ("members_fraction", "nonmembers_fraction"):
            f = getattr(self, name)
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f < 1.0:
                raise DatasetError(f"split spec: {name} must be a number in (0, 1), got {f!r}.")
        for name in ("members", "nonmembers", "auxiliary"):
            n = getattr(self, name)
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
                raise DatasetError(f"split spec: {name} must be a positive integer count or None, got {n!r}.")
        if self.members is None and self.nonmembers is None and self.auxiliary is None:
            total = self.members_fraction + self.nonmembers_fraction
            if total >= 1.0:
                raise DatasetError(
                    f"split spec: members_fraction + nonmembers_fraction = {total:g} leaves no auxiliary "
                    f"images; make the sum < 1 (the auxiliary split gets the rest)."
                )
        r = self.near_duplicate_rms
        if isinstance(r, bool) or not isinstance(r, (int, float)) or r < 0:
            raise DatasetError(f"split spec: near_duplicate_rms must be >= 0 (0 disables it), got {r!r}.")
        try:
            check_instance(self)
        except ValueError as exc:
            raise DatasetError(f"split spec: {exc}.") from None


@dataclass(frozen=True, eq=False)
class Splits:
    """Three disjoint subsets of the de-duplicated pool, in seeded random order."""

    members: ImageDataset
    nonmembers: ImageDataset
    auxiliary: ImageDataset
    dedup: dict[str, Any]  # exact/near_duplicates_removed, groups, method, images_before/after

    def describe(self) -> dict[str, Any]:
        """Split sizes and the de-duplication record (JSON-serialisable)."""
        used = len(self.members) + len(self.nonmembers) + len(self.auxiliary)
        return {
            "members": len(self.members),
            "nonmembers": len(self.nonmembers),
            "auxiliary": len(self.auxiliary),
            "unused": int(self.dedup.get("images_after", used)) - used,
            "dedup": dict(self.dedup),
        }


def make(dataset: ImageDataset, spec: SplitSpec, seed: int) -> Splits:
    """De-duplicate ``dataset``, shuffle the survivors with ``seed`` and cut them into three splits."""
    kept, dedup = deduplicate(dataset, spec.near_duplicate_rms)
    n = len(kept)
    m = spec.members if spec.members is not None else int(spec.members_fraction * n)
    k = spec.nonmembers if spec.nonmembers is not None else int(spec.nonmembers_fraction * n)
    a = spec.auxiliary if spec.auxiliary is not None else n - m - k
    pool = (
        f"{n} unique images ({len(dataset)} loaded, {dedup['exact_duplicates_removed']} exact and "
        f"{dedup['near_duplicates_removed']} near duplicates removed)"
    )
    if m + k + max(a, 0) > n:
        raise DatasetError(
            f"splits need {m} + {k} + {max(a, 0)} = {m + k + max(a, 0)} images but the pool has only {pool}. "
            f"Lower the split counts or fractions."
        )
    for name, size in (("members", m), ("nonmembers", k), ("auxiliary", a)):
        if size <= 0:
            raise DatasetError(
                f"the {name} split would be empty: the pool has {pool}. Lower the other splits' "
                f"fractions/counts, or use a larger dataset."
            )
    order = kept[np.random.default_rng(seed).permutation(n)]
    return Splits(
        members=dataset.subset(order[:m]),
        nonmembers=dataset.subset(order[m : m + k]),
        auxiliary=dataset.subset(order[m + k : m + k + a]),
        dedup=dedup,
    )


def deduplicate(dataset: ImageDataset, near_rms: float) -> tuple[np.ndarray, dict[str, Any]]:
    """Indices kept (ascending; the lowest index of each duplicate group) and the dedup record."""
    pixels = dataset.to_uint8()
    n = len(pixels)
    # exact[i] = first index with the same bytes; it is the minimum of its exact class.
    first: dict[bytes, int] = {}
    exact = np.array(
        [first.setdefault(hashlib.sha1(p.tobytes()).digest(), i) for i, p in enumerate(pixels)],
        dtype=np.int64,
    )
    parent = exact.copy()
    unique = np.flatnonzero(exact == np.arange(n))
    if near_rms > 0 and unique.size > 1:
        small = _downsample(pixels[unique])
        for a, b in _near_pairs(small, near_rms):
            _union(parent, int(unique[a]), int(unique[b]))
    root = np.array([_find(parent, i) for i in range(n)], dtype=np.int64)
    kept = np.flatnonzero(root == np.arange(n))
    removed = np.flatnonzero(root != np.arange(n))
    # Exact: every copy beyond the first of a set of byte-identical images; near: the rest removed.
    n_exact = n - int(unique.size)
    dedup = {
        "exact_duplicates_removed": n_exact,
        "near_duplicates_removed": int(removed.size) - n_exact,
        "groups": int(np.unique(root[removed]).size),
        "method": (
            "exact: identical preprocessed uint8 pixels (SHA-1 of the bytes); near: RMS difference "
            f"< {near_rms:g} (pixels in [0,1]) on a {DOWNSAMPLE}x{DOWNSAMPLE} channel-mean grayscale "
            "area-average downsample; groups = connected components of both relations, lowest index kept"
        ),
        "images_before": n,
        "images_after": int(kept.size),
    }
    return kept, dedup


def _downsample(pixels: np.ndarray) -> np.ndarray:
    """uint8 [N, C, H, W] -> float64 [N, 16*16]: channel mean, area average, values in [0, 1]."""
    import torch
    import torch.nn.functional as F

    out = np.empty((len(pixels), DOWNSAMPLE * DOWNSAMPLE), dtype=np.float64)
    for s in range(0, len(pixels), 4096):  # bounded memory for large pools
        x = torch.from_numpy(pixels[s : s + 4096]).to(torch.float64).div_(255.0).mean(1, keepdim=True)
        out[s : s + 4096] = F.adaptive_avg_pool2d(x, DOWNSAMPLE).flatten(1).numpy()
    return out


def _near_pairs(x: np.ndarray, rms: float) -> np.ndarray:
    """Pairs (i, j), i != j, of rows of ``x`` [M, D] with RMS difference < ``rms``; int64 [P, 2].

    Rows are sorted by mean: |mean(a) - mean(b)| <= RMS(a - b), so each block of rows only
    needs the columns whose mean is within ``rms`` of it. Squared distances use
    ||a||^2 + ||b||^2 - 2 a.b in float64.
    """
    m, d = x.shape
    limit = rms * rms * d  # squared-distance threshold
    means = x.mean(axis=1)
    order = np.argsort(means, kind="stable")
    xs, ms = x[order], means[order]
    sq = np.einsum("ij,ij->i", xs, xs)
    found = [np.empty((0, 2), dtype=np.int64)]
    for i0 in range(0, m, _CHUNK):
        i1 = min(i0 + _CHUNK, m)
        j1 = int(np.searchsorted(ms, ms[i1 - 1] + rms, side="right"))
        d2 = sq[i0:i1, None] + sq[None, i0:j1] - 2.0 * (xs[i0:i1] @ xs[i0:j1].T)
        ii, jj = np.nonzero(d2 < limit)
        upper = jj > ii  # both local offsets from i0: each pair once, no self-pairs
        found.append(np.stack([order[ii[upper] + i0], order[jj[upper] + i0]], axis=1))
    return np.concatenate(found)


def _find(parent: np.ndarray, i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]  # path halving
        i = int(parent[i])
    return i


def _union(parent: np.ndarray, a: int, b: int) -> None:
    """Join the groups of a and b under the smaller root, so every root is its group's minimum."""
    ra, rb = _find(parent, a), _find(parent, b)
    if ra != rb:
        parent[max(ra, rb)] = min(ra, rb)
