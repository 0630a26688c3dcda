"""On-disk cache of preprocessed datasets: one uncompressed .npz per (source, size, channels).

A file holds uint8 images [N, C, H, W], int64 labels [N], ids, class names and the
provenance (JSON), and is read without pickle. Files are written with
``privbench.cache.atomic_write`` so a crashed or concurrent run never leaves a half-written
file under the final name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from privbench.cache import atomic_write, note

PREPROCESS_VERSION = 1
"""Bump when decoding/resizing changes, so old cache files are not reused."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedArrays:
    """images: uint8 [N, C, H, W]; labels: int64 [N]."""

    images: np.ndarray
    labels: np.ndarray
    ids: tuple[str, ...]
    class_names: tuple[str, ...]
    provenance: dict[str, Any]


def default_cache_dir() -> Path:
    """``$PRIVBENCH_HOME/cache/datasets`` if PRIVBENCH_HOME is set, else ``./runs/cache/datasets``."""
    home = os.environ.get("PRIVBENCH_HOME")
    base = Path(home).expanduser() if home else Path("runs")
    return base / "cache" / "datasets"


def cache_path(
    cache_dir: Path,
    name: str,
    arg: str | None,
    fingerprint: str,
    image_size: int,
    channels: int,
) -> Path:
    """``<cache_dir>/<name>-<S>x<S>x<C>-<key>.npz``; key hashes every input of preprocessing."""
    key_text = json.dumps([name, arg, fingerprint, image_size, channels, PREPROCESS_VERSION], sort_keys=True)
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    return Path(cache_dir) / f"{safe}-{image_size}x{image_size}x{channels}-{key}.npz"


def read(path: Path) -> CachedArrays | None:
    """The cached arrays, or None if absent; a corrupt file is deleted (with a warning) -> None."""
    if not path.is_file():
        log.debug("cache miss: %s", path)
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = CachedArrays(
                images=z["images"],
                labels=z["labels"].astype(np.int64, copy=False),
                ids=tuple(z["ids"].tolist()),
                class_names=tuple(z["class_names"].tolist()),
                provenance=json.loads(str(z["provenance"])),
            )
        _check(arrays)
    except Exception as exc:  # any unreadable cache (truncated zip, bad JSON, ...) is rebuilt
        log.warning("dataset cache file %s is unreadable (%s); deleting and rebuilding it", path, exc)
        path.unlink(missing_ok=True)
        return None
    note("hit", path)
    return arrays


def write(path: Path, arrays: CachedArrays) -> None:
    """Write atomically; a failure (read-only disk, ...) is logged, not raised: the cache is optional."""
    _check(arrays)

    def save(f) -> None:
        np.savez(
            f,
            images=arrays.images,
            labels=arrays.labels,
            ids=np.array(arrays.ids, dtype=str),
            class_names=np.array(arrays.class_names, dtype=str),
            provenance=np.array(json.dumps(arrays.provenance, sort_keys=True)),
        )

    try:
        atomic_write(path, save)
    except OSError as exc:
        log.warning(
            "could not write dataset cache %s (%s); continuing without the cache. "
            "Set PRIVBENCH_HOME to a writable folder to enable it.",
            path,
            exc,
        )


def _check(a: CachedArrays) -> None:
    n = a.images.shape[0] if a.images.ndim == 4 else -1
    if a.images.dtype != np.uint8 or n < 0 or a.labels.shape != (n,) or len(a.ids) != n:
        raise ValueError(
            f"inconsistent arrays: images {a.images.dtype} {a.images.shape}, labels {a.labels.shape}, {len(a.ids)} ids"
        )
    if n and (a.labels.min() < 0 or a.labels.max() >= len(a.class_names)):
        raise ValueError(f"labels outside [0, {len(a.class_names)})")
