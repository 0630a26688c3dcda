"""Versions, git commit and thread settings recorded with every run."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from privbench import __version__

if TYPE_CHECKING:
    from privbench.config import RunConfig

THREADS_ENV = "PRIVBENCH_THREADS"
MAX_THREADS = 1024


def default_threads() -> int:
    """Intra-op threads: ``$PRIVBENCH_THREADS`` if set, else 1.

    The models here are small: one thread is as fast as two for a batch-of-one
    gradient evaluation, and leaves a core free for a second run; more threads
    than cores (oversubscription) slowed evaluations many-fold in our trials.

    Raises:
        ConfigError: ``$PRIVBENCH_THREADS`` is not an integer in [1, 1024].
    """
    from privbench.config import ConfigError

    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return 1
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{THREADS_ENV}={raw!r} is not an integer number of threads; set it to an integer in "
                          f"[1, {MAX_THREADS}] or unset it (default 1)") from None
    if not 1 <= value <= MAX_THREADS:
        raise ConfigError(f"{THREADS_ENV}={raw!r}: the number of threads must be in [1, {MAX_THREADS}]")
    return value


def batch_threads() -> int:
    """Intra-op threads of a batched cell job (``bench run --seeds``) when neither ``--threads`` nor
    ``$PRIVBENCH_THREADS`` is set: every core. A batched evaluation of many victims is large enough for
    intra-op parallelism to pay (dlg on LeNet at 64 victims: 0.93 -> 0.45 ms per victim-evaluation from one
    thread to two, ``benchmarks/perf/victim_cells.py``), unlike a batch-of-one run."""
    if os.environ.get(THREADS_ENV, "").strip():
        return default_threads()
    return max(1, min(os.cpu_count() or 1, MAX_THREADS))


def resolve_threads(threads: int | None) -> int:
    """``threads`` (``--threads``) if given, else :func:`default_threads`; checked before anything runs.

    Raises:
        ConfigError: ``threads`` is given and not an integer in [1, 1024], or ``$PRIVBENCH_THREADS`` is bad.
    """
    from privbench.config import ConfigError

    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise ConfigError(f"--threads must be an integer in [1, {MAX_THREADS}], got {threads!r}")
    return threads


def configure_threads(threads: int | None) -> int:
    """Set torch's intra-op (and inter-op, once) thread counts; returns the intra-op count.

    Raises:
        ConfigError: as :func:`resolve_threads`.
    """
    import torch

    n = resolve_threads(threads)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # can only be set once per process, before parallel work
        pass
    return n


@lru_cache(maxsize=1)
def git_commit() -> dict[str, str | bool] | None:
    """The commit of the privbench checkout, if it is one (and whether it has uncommitted changes)."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here, capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head, "dirty": bool(dirty)}


def versions(plugins: dict[str, str] | None = None) -> dict[str, str]:
    import numpy
    import torch

    out = {
        "privbench": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }
    for dist in ("pillow",):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    out.update(plugins or {})
    return out


def plugin_versions(config: "RunConfig") -> dict[str, str]:
    """Versions of the distributions any named plugin component came from (the attack family's scorer included)."""
    from privbench import registry

    out = {}
    family = getattr(registry.attacks.get(config.attack), "family", None)
    for reg, name in [*registry.named_by(config), (registry.metrics, family)]:
        if name is None or name not in reg:
            continue
        origin = reg.entry(name).origin
        if origin.source == "plugin" and origin.distribution:
            out[f"plugin:{origin.distribution}"] = origin.version or "?"
    return out
