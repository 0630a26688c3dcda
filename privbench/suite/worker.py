"""What a suite's worker process runs: one fit job, one attack job or one cell job (several victims of one
target, one row each), never a write to the store.

An attack job computes its row into a staging folder and writes ``result.json`` there atomically; the
coordinator alone inserts it into the store. Locally the staging folder is in the store's own
``artifacts/`` (``store.make_staging``, locked while the worker computes, so a killed worker's folder is
removed by the next ``recover`` and a finished one imported). On a Dask cluster, where workers may not
see the store's disk, the row and its artifact files travel back to the coordinator in the outcome.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                    "PRIVBENCH_THREADS")


@dataclass(frozen=True)
class Task:
    """One job as a worker receives it (plain data, so it pickles to any worker)."""

    kind: str  # "fit", "attack" or "cell"
    name: str
    config: dict[str, Any]  # the requested config (attack, a cell's first victim) or the resolved config (fit)
    fingerprint: str
    data_root: str | None
    cache_dir: str
    threads: int
    allow_download: bool = False
    staging_root: str | None = None  # the store's artifacts folder, if this worker can write it
    suite: dict[str, str] = field(default_factory=dict)  # name, spec_hash
    victims: list[dict[str, Any]] = field(default_factory=list)  # a cell: each victim's requested config
    cell: dict[str, Any] = field(default_factory=dict)  # a cell: id, size, each victim's index in the cell


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
    parts: list["Outcome"] | None = None  # a cell job: one attack outcome per victim, in the task's order


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
    if task.kind == "cell":
        return _cell(task, start)
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
    from privbench.threat import AttackError

    requested = configlib.RunConfig.from_dict(task.config)
    resolved = configlib.resolve(requested)
    options = _options(task)
    result = runner.new_result(requested, resolved, options)
    result.info["suite"] = dict(task.suite)
    with _stagings(task, [result.run_id]) as (staging,):
        try:
            runner.execute(resolved, options, result, staging, None)
        except Exception as exc:  # stored as the row's status; input errors too: the suite goes on
            result.status = "unsupported" if isinstance(exc, AttackError) else "failed"
            result.error = f"{type(exc).__name__}: {exc}"
            result.traceback = traceback.format_exc()
        result.wall_time_s = time.perf_counter() - start
        return _staged(task.name, result, staging, task.staging_root is not None)


def _cell(task: Task, start: float) -> Outcome:
    """Victims of one target in one batched job (``runner.compute_batch``, as ``bench run --seeds`` runs
    them): one staged row per victim, handed back as the outcome's parts."""
    from privbench import config as configlib
    from privbench import runner

    requested = [configlib.RunConfig.from_dict(c) for c in task.victims]
    resolved = [configlib.resolve(c) for c in requested]
    options = _options(task)
    rows = [runner.new_result(r, s, options, task.fingerprint) for r, s in zip(requested, resolved, strict=True)]
    for row in rows:
        row.info["suite"] = dict(task.suite)
    chunk = list(zip(task.cell["indices"], requested, resolved, strict=True))
    with _stagings(task, [row.run_id for row in rows]) as stagings:
        try:
            runner.compute_batch(chunk, options, rows, stagings, None, task.cell["id"], task.cell["size"])
        except Exception as exc:  # input errors: every victim's row fails with it, the suite goes on
            for row in rows:
                row.status, row.error, row.traceback = "failed", f"{type(exc).__name__}: {exc}", traceback.format_exc()
                row.wall_time_s = (time.perf_counter() - start) / len(rows)
        shared = task.staging_root is not None
        parts = [_staged(f"{task.name} victim seed {config.seed}", row, staging, shared)
                 for config, row, staging in zip(requested, rows, stagings, strict=True)]
    status = "ok" if all(p.status == "ok" for p in parts) else \
        ("failed" if any(p.status == "failed" for p in parts) else "unsupported")
    return Outcome("cell", task.name, status, time.perf_counter() - start, parts=parts)


def _staged(name: str, result: Any, staging: Path, shared: bool) -> Outcome:
    """The outcome of one row: its ``result.json`` written into its staging folder; with a shared disk the
    folder itself, else its artifact files, travel back to the coordinator."""
    from privbench.store import RESULT_FILE, Store

    Store._keep(result, staging / RESULT_FILE)
    outcome = Outcome("attack", name, result.status, result.wall_time_s, result.error, result.traceback,
                      row=result.to_dict())
    if shared:
        outcome.staging = str(staging)
    else:
        outcome.files = {str(p.relative_to(staging)): p.read_bytes() for p in staging.rglob("*")
                         if p.is_file() and p.name != RESULT_FILE}
    return outcome


@contextlib.contextmanager
def _stagings(task: Task, run_ids: list[str]) -> Iterator[list[Path]]:
    """Staging folders for ``run_ids``: in the store's artifacts folder, locked while the job computes (shared
    disk), or temporary folders removed when the job has handed its files back."""
    from privbench.store import make_staging

    folders: list[Path] = []
    locks: list[Any] = []
    try:
        for run_id in run_ids:
            if task.staging_root is not None:
                folder, lock = make_staging(Path(task.staging_root), run_id)
                locks.append(lock)
            else:
                folder = Path(tempfile.mkdtemp(prefix=f"privbench-{run_id}-"))
            folders.append(folder)
        yield folders
    finally:
        for lock in locks:
            lock.close()
        if task.staging_root is None:
            for folder in folders:
                shutil.rmtree(folder, ignore_errors=True)
