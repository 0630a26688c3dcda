"""What a suite's worker process runs: one fit job or one attack job, never a write to the store.

An attack job computes its row into a staging folder and writes ``result.json`` there atomically; the
coordinator alone inserts it into the store. Locally the staging folder is in the store's own
``artifacts/`` (``store.make_staging``, locked while the worker computes, so a killed worker's folder is
removed by the next ``recover`` and a finished one imported). On a Dask cluster, where workers may not
see the store's disk, the row and its artifact files travel back to the coordinator in the outcome.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                    "PRIVBENCH_THREADS")


@dataclass(frozen=True)
class Task:
    """One job as a worker receives it (plain data, so it pickles to any worker)."""

    kind: str  # "fit" or "attack"
    name: str
    config: dict[str, Any]  # the requested config (attack) or the resolved config (fit)
    fingerprint: str
    data_root: str | None
    cache_dir: str
    threads: int
    allow_download: bool = False
    staging_root: str | None = None  # the store's artifacts folder, if this worker can write it
    suite: dict[str, str] = field(default_factory=dict)  # name, spec_hash


@dataclass
class Outcome:
    """What a job hands back: its status, its own time, and for an attack the row (and, without a shared
    staging folder, its artifact files)."""

    kind: str
    name: str
    status: str  # ok / failed / unsupported (fit: ok / failed)
    seconds: float
    error: str | None = None
    traceback: str | None = None
    row: dict[str, Any] | None = None
    staging: str | None = None
    files: dict[str, bytes] | None = None


def pin_threads(threads: int) -> None:
    """Limit every math library of this process to ``threads`` threads (before torch is imported)."""
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)


def init_local_worker(threads: int, parent: int) -> None:
    """Initializer of a local worker process: pinned threads, Ctrl-C left to the coordinator (which lets
    running jobs finish), and exit as soon as the coordinator is gone (killed with SIGKILL, say)."""
    pin_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="privbench-parent-watch").start()


def run(task: Task) -> Outcome:
    """Run ``task``; every error of the job itself becomes a failed outcome, never an exception."""
    from privbench.provenance import configure_threads

    configure_threads(task.threads)
    start = time.perf_counter()
    if task.kind == "fit":
        return _fit(task, start)
    return _attack(task, start)


def _options(task: Task):
    from privbench.runner import RunOptions

    return RunOptions(data_root=task.data_root, allow_download=task.allow_download, threads=task.threads,
                      cache_dir=Path(task.cache_dir))


def _fit(task: Task, start: float) -> Outcome:
    from privbench.config import RunConfig
    from privbench.run_setup import fit_target

    scratch = Path(tempfile.mkdtemp(prefix="privbench-fit-"))
    try:
        fit_target(RunConfig.from_dict(task.config), _options(task), task.fingerprint, scratch)
        return Outcome("fit", task.name, "ok", time.perf_counter() - start)
    except Exception as exc:
        return Outcome("fit", task.name, "failed", time.perf_counter() - start, f"{type(exc).__name__}: {exc}",
                       traceback.format_exc())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _attack(task: Task, start: float) -> Outcome:
    from privbench import config as configlib
    from privbench import runner
    from privbench.store import RESULT_FILE, Store, make_staging
    from privbench.threat import AttackError

    requested = configlib.RunConfig.from_dict(task.config)
    resolved = configlib.resolve(requested)
    options = _options(task)
    result = runner.new_result(requested, resolved, options)
    result.info["suite"] = dict(task.suite)
    shared = task.staging_root is not None
    if shared:
        staging, lock = make_staging(Path(task.staging_root), result.run_id)
    else:
        staging, lock = Path(tempfile.mkdtemp(prefix=f"privbench-{result.run_id}-")), None
    try:
        try:
            runner.execute(resolved, options, result, staging, None)
        except Exception as exc:  # stored as the row's status; input errors too: the suite goes on
            result.status = "unsupported" if isinstance(exc, AttackError) else "failed"
            result.error = f"{type(exc).__name__}: {exc}"
            result.traceback = traceback.format_exc()
        result.wall_time_s = time.perf_counter() - start
        Store._keep(result, staging / RESULT_FILE)
        outcome = Outcome("attack", task.name, result.status, result.wall_time_s, result.error, result.traceback,
                          row=result.to_dict())
        if shared:
            outcome.staging = str(staging)
        else:
            outcome.files = {str(p.relative_to(staging)): p.read_bytes() for p in staging.rglob("*")
                             if p.is_file() and p.name != RESULT_FILE}
        return outcome
    finally:
        if lock is not None:
            lock.close()
        if not shared:
            shutil.rmtree(staging, ignore_errors=True)
