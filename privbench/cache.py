"""Keys and atomic files for privbench's on-disk caches (targets, defense stages, evaluation classifier, datasets).

Every cache names its entries by :func:`cache_key`, writes them with :func:`atomic_write` (a crashed or
concurrent run never leaves a half-written file under the final name) and reads them without executing
anything stored in them: :func:`load_torch` uses ``torch.load(weights_only=True)``, :func:`load_json`
plain JSON, and the dataset cache reads its ``.npz`` files without pickle. An entry that cannot be read
(truncated, not what the cache stores, or holding pickled code) is a cache miss: a warning is logged,
the file is removed and the value is recomputed. Caches log a failed write and continue without storing;
a cache failure is never fatal to a run, and a cached file is never trusted to run code.

Each file written or read back is noted in an in-process record (:func:`events`), which ``bench run``
reads to say, on Ctrl-C, what was cached and will be reused; hits, misses and writes are logged at
debug level (``bench run --verbose``).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

log = logging.getLogger(__name__)

_RESERVED = ("kind", "privbench")


@dataclass(frozen=True)
class CacheEvent:
    """A cache file written (``"write"``) or read back (``"hit"``) in this process, at ``time.perf_counter()``."""

    kind: str
    path: Path
    time: float


_EVENTS: deque[CacheEvent] = deque(maxlen=10_000)


def note(kind: str, path: Path) -> None:
    """Record a cache ``"write"`` or ``"hit"`` of ``path`` in this process (and log it at debug level)."""
    _EVENTS.append(CacheEvent(kind, Path(path), time.perf_counter()))
    log.debug("cache %s: %s", kind, path)


def events() -> list[CacheEvent]:
    """The cache files written or read back in this process so far, oldest first (the latest 10,000)."""
    return list(_EVENTS)


# The version of the code that shapes cached values (dataset preprocessing, target training, defenses' fits,
# evaluation classifiers). Bump it with any change to that code; a release that changes only attacks,
# observations or scoring keeps it, so its trained targets stay valid (results are keyed by the release).
CACHE_VERSION = "0.2.0"


def cache_key(kind: str, identity: Mapping[str, Any]) -> str:
    """The sha256 hex digest naming one cache entry of ``kind`` (e.g. ``"target"``, ``"gascnn-stage"``).

    ``identity`` must hold everything that shaped the cached value besides the code's version
    (``CACHE_VERSION``, added here): the component's name and parameters, the seeds it
    used, and, for anything derived from data, the data identity dict that defenses receive as
    ``FitContext.data_identity`` (``dataset``, ``data_fingerprint``, ``split_seed``, ``split``,
    ``image_size``, ``channels``), plus which part of the data (e.g. a hash of the member ids) when that
    is narrower than a whole split. Values must be JSON-able (mappings, lists, tuples, str, numbers,
    bool, None); mapping order does not matter.

    Raises:
        ValueError: if ``identity`` uses a reserved name (``kind``, ``privbench``).

    Example:
        >>> key = cache_key("eval-classifier", {"dataset": "synthetic-mri", "data_fingerprint": "ab12",
        ...                                     "split_seed": 0, "epochs": 20})
        >>> len(key)
        64
    """
    from privbench.config import digest

    clash = [name for name in _RESERVED if name in identity]
    if clash:
        raise ValueError(f"cache identity must not use the reserved name(s) {clash}")
    return digest({"kind": kind, "privbench": CACHE_VERSION, **identity})


def state_digest(state: Mapping[str, Any]) -> str:
    """sha256 hex digest of a state dict (names, dtypes, shapes and values of its tensors), for cache identities.

    Names a model's exact weights (e.g. a fresh model's initialization) where its seed alone may not.
    """
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, value in state.items():
        h.update(f"{name}\0".encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}\0".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(f"{type(value).__name__}:{value!r}\0".encode())
    return h.hexdigest()


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Create or replace ``path`` with what ``write`` writes to a binary file object, atomically.

    ``write`` writes to a temp file with a unique name in the same folder (``os.replace`` must not
    cross file systems), opened with ``"xb"`` so it gets the user's umask (unlike mkstemp's 0600); the
    temp file then replaces ``path`` in one step. On any failure the temp file is removed and ``path``
    is left as it was. The parent folder is created if needed.

    Raises:
        OSError: the folder or file could not be written; callers decide whether that is fatal (caches
            log it and continue without storing). Whatever ``write`` raises is re-raised.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    note("write", path)


def save_torch(path: Path, obj: Any) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically; ``obj`` must be loadable with ``weights_only=True``.

    Allowed: tensors, dicts (and OrderedDicts such as state dicts), lists and tuples of them, and plain
    str / int / float / bool / None / bytes values (no numpy scalars, dataclasses or modules).

    Raises:
        TypeError: ``obj`` holds a value :func:`load_torch` would refuse (checked before writing).
        OSError: as :func:`atomic_write` (a write that fails inside torch, too).
    """
    import torch

    _check_weights_only(obj, "obj")

    def write(f: BinaryIO) -> None:
        try:
            torch.save(obj, f)
        except RuntimeError as exc:  # torch's zip writer reports a failed write as a RuntimeError
            raise OSError(f"could not write {path}: {exc}") from exc

    atomic_write(Path(path), write)


def load_torch(path: Path) -> Any | None:
    """What :func:`save_torch` stored at ``path`` (tensors on the CPU), or None on a cache miss.

    Loaded with ``torch.load(weights_only=True)``: a file holding anything other than tensors and
    plain containers is refused, never executed. Missing -> None; unreadable or unsafe -> a warning is
    logged, the file removed, None.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        log.debug("cache miss: %s", path)
        return None
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, foreign or unsafe (pickled code): a miss, never fatal
        _discard(path, exc)
        return None
    note("hit", path)
    return value


def save_json(path: Path, obj: Any, *, default: Callable[[Any], Any] | None = None) -> None:
    """Write ``obj`` as JSON (UTF-8) to ``path`` atomically; ``default`` as in :func:`json.dumps`.

    Raises:
        TypeError / ValueError: ``obj`` is not JSON-able (checked before writing).
        OSError: as :func:`atomic_write`.
    """
    data = json.dumps(obj, default=default).encode()
    atomic_write(Path(path), lambda f: f.write(data))


def load_json(path: Path) -> Any | None:
    """The JSON value at ``path``, or None on a cache miss (missing; unreadable -> warning, file removed)."""
    path = Path(path)
    if not path.is_file():
        log.debug("cache miss: %s", path)
        return None
    try:
        value = json.loads(path.read_bytes().decode())
    except Exception as exc:  # truncated or not JSON: a miss, never fatal
        _discard(path, exc)
        return None
    note("hit", path)
    return value


def _discard(path: Path, exc: BaseException) -> None:
    log.warning("cache file %s is unreadable or unsafe (%s: %s); deleting it and recomputing",
                path, type(exc).__name__, exc)
    try:
        path.unlink(missing_ok=True)
    except OSError as unlink_error:
        log.warning("could not delete cache file %s (%s)", path, unlink_error)


_LEAVES = (str, bytes, int, float, bool, complex, type(None))


def _check_weights_only(value: Any, where: str) -> None:
    import torch

    kind = type(value)
    if kind in (torch.Tensor, torch.nn.Parameter) or kind in _LEAVES:
        return
    if kind in (torch.Size, torch.dtype, torch.device):
        return
    if kind in (dict, OrderedDict):
        for key, item in value.items():
            _check_weights_only(key, f"{where} key")
            _check_weights_only(item, f"{where}[{key!r}]")
        return
    if kind in (list, tuple):
        for i, item in enumerate(value):
            _check_weights_only(item, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {kind.__module__}.{kind.__qualname__}, which torch.load(weights_only=True) may refuse; "
        f"store tensors, dicts, lists, tuples and plain str / int / float / bool / None values only"
    )

