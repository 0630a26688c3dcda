"""The suite's coordinator: plans, schedules fit jobs before the attack and cell jobs that need them, and
alone writes the store (one row per attack job, one per victim of a cell job, inserted as they arrive; a row
already stored is kept).

Ctrl-C once: nothing new is scheduled, running jobs finish and are stored, the suite ends (exit 130).
Ctrl-C twice: running jobs are stopped (local workers terminated); nothing of theirs is stored and their
staging folders are cleaned up by the next run. Rerunning a suite runs only what is not stored.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
import traceback
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from privbench import runner
from privbench.store import RunResult, Store, home, result_from_dict
from privbench.suite import plan as planlib
from privbench.suite.spec import SuiteSpec
from privbench.suite.worker import Outcome, Task


@dataclass
class Summary:
    """The end of a suite run, for the screen and ``--json``."""

    suite: str
    spec_hash: str
    jobs: int
    stored_before: int
    ok: int = 0
    unsupported: int = 0
    failed: int = 0
    fits: int = 0
    fits_failed: int = 0
    not_run: int = 0  # left when the suite was interrupted
    wall_time_s: float = 0.0
    job_time_s: float = 0.0  # sum of the jobs' own times (fit + attack)
    interrupted: bool = False
    failures: list[dict[str, str]] = field(default_factory=list)

    workers: int = 1

    @property
    def overhead(self) -> float | None:
        """The share of the workers' time not spent inside jobs: 1 - job time / (wall time x workers)."""
        if self.wall_time_s <= 0 or self.job_time_s <= 0:
            return None
        return 1.0 - self.job_time_s / (self.wall_time_s * self.workers)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "overhead": self.overhead}


@dataclass
class Progress:
    """What the display shows: counts, running jobs and an ETA from the mean time per job kind."""

    total: int
    capacity: int
    done: int = 0
    failed: int = 0
    running: dict[Any, str] = field(default_factory=dict)
    times: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    left: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def eta(self) -> float | None:
        remaining = 0.0
        for kind, count in self.left.items():
            if count and not self.times.get(kind):
                return None
            if count:
                remaining += statistics.fmean(self.times[kind]) * count
        return remaining / self.capacity


Listener = Callable[[str, Progress, Outcome | None], None]  # (event, progress, outcome): "start", "done", "tick"


def run(spec: SuiteSpec, store: Store, backend: Any, *, data_root: str | None = None, cache_dir: Path | None = None,
        allow_download: bool = False, listener: Listener | None = None, batch_victims: int = 0) -> Summary:
    """Run what ``spec``'s grid has not stored yet on ``backend``; returns the summary. ``batch_victims`` >= 2:
    the victims of one target run together, that many per cell job (``plan.make``)."""
    start = time.perf_counter()
    store.recover()  # rows that killed coordinators or workers finished are stored before planning
    store.check_writable()
    cache_dir = cache_dir or home() / "cache"
    plan = planlib.make(spec, store, data_root, cache_dir, batch_victims, backend.capacity)
    summary = Summary(spec.name, spec.spec_hash, len(spec.jobs), len(plan.stored), workers=backend.capacity)
    store.tag_suite(spec.name, spec.spec_hash, sorted(set(plan.stored.values())))
    suite_tag = {"name": spec.name, "spec_hash": spec.spec_hash}

    def task(job: planlib.FitJob | planlib.AttackJob | planlib.CellJob) -> Task:
        shared = str(store.artifacts_root) if backend.shares_disk else None
        common = (data_root, str(cache_dir), backend.threads, allow_download, shared, suite_tag)
        if isinstance(job, planlib.FitJob):
            return Task("fit", job.name, job.config.to_dict(), job.fingerprint, *common)
        if isinstance(job, planlib.CellJob):
            victims = [j.job.config.to_dict() for j in job.jobs]
            return Task("cell", job.name, victims[0], job.fingerprint, *common, victims=victims,
                        cell={"id": job.cell_id, "size": job.cell_size, "indices": list(job.indices)})
        return Task("attack", job.name, job.job.config.to_dict(), job.fingerprint, *common)

    waiting: dict[str, list[planlib.AttackJob | planlib.CellJob]] = defaultdict(list)
    queue: deque[tuple[Task, Any]] = deque()
    fit_keys = {fit.key for fit in plan.fits}
    for fit in plan.fits:
        queue.append((task(fit), fit))
    for job in [*plan.attacks, *plan.cells]:
        if job.target in fit_keys:
            waiting[job.target].append(job)
        else:
            queue.append((task(job), job))
    progress = Progress(total=len(plan.fits) + len(plan.attacks) + len(plan.cells), capacity=backend.capacity,
                        left={"fit": len(plan.fits), "attack": len(plan.attacks), "cell": len(plan.cells)})
    notify = listener or (lambda *_: None)
    running: dict[Any, tuple[Task, Any]] = {}
    attempts: dict[str, int] = defaultdict(lambda: 1)
    interrupts = 0
    try:
        while queue or running:
            try:
                while queue and len(running) < backend.capacity and not interrupts:
                    item = queue.popleft()
                    future = backend.submit(item[0])
                    running[future] = item
                    progress.running[future] = item[0].name
                    notify("start", progress, None)
                if not running:
                    break
                for future in backend.wait(list(running)):
                    item = running.pop(future)
                    progress.running.pop(future, None)
                    outcome = _outcome(future, item[0], backend)
                    if outcome.status == "lost" and attempts[item[0].name] < MAX_ATTEMPTS and not interrupts:
                        attempts[item[0].name] += 1  # its worker died: run it again, once, on a fresh worker
                        queue.appendleft(item)
                        continue
                    _handle(outcome, item, store, summary, spec, waiting, queue, task, progress)
                    notify("done", progress, outcome)
            except KeyboardInterrupt:
                interrupts += 1
                summary.interrupted = True
                if interrupts > 1:
                    backend.close(cancel=True)
                    running.clear()
                    break
                notify("interrupt", progress, None)
    finally:
        summary.not_run = sum(_rows(job) for _, job in [*queue, *running.values()]) + \
            sum(_rows(job) for jobs in waiting.values() for job in jobs)
        backend.close(cancel=bool(running))
        summary.wall_time_s = time.perf_counter() - start
    return summary


MAX_ATTEMPTS = 2  # a job whose worker dies twice (a crash it causes itself) is stored as failed


def _rows(job: Any) -> int:
    """The rows a job would store: none for a fit, one for an attack job, one per victim for a cell job."""
    return 0 if isinstance(job, planlib.FitJob) else len(_attack_jobs(job))


def _outcome(future: Any, task: Task, backend: Any) -> Outcome:
    """The job's outcome; a worker that died (killed, out of memory) gives status ``lost``."""
    try:
        return future.result()
    except Exception as exc:  # the worker process itself failed, not the job's code
        status = "lost" if backend.lost(exc) else "failed"
        return Outcome(task.kind, task.name, status, 0.0, f"its worker died: {type(exc).__name__}: {exc}",
                       traceback.format_exc())


def _handle(outcome: Outcome, item: tuple[Task, Any], store: Store, summary: Summary, spec: SuiteSpec,
            waiting: dict[str, list[Any]], queue: deque, task: Callable, progress: Progress) -> None:
    tsk, job = item
    summary.job_time_s += outcome.seconds
    progress.times[outcome.kind].append(outcome.seconds)
    progress.left[outcome.kind] -= 1
    progress.done += 1
    if outcome.kind == "fit":
        summary.fits += 1
        dependents = waiting.pop(job.key, [])
        if outcome.status == "ok":
            for dependent in dependents:
                queue.append((task(dependent), dependent))
            return
        summary.fits_failed += 1
        progress.failed += 1
        for dependent in dependents:  # each row stored as failed, naming the fit that failed
            for attack in _attack_jobs(dependent):
                row = _failed_row(attack, f"training its target failed: {outcome.error}", outcome.traceback, spec)
                _store(store, row, None, None, summary, spec, attack.name)
            kind = "cell" if isinstance(dependent, planlib.CellJob) else "attack"
            progress.left[kind] -= 1
            progress.done += 1
            progress.failed += 1
        return
    if outcome.kind == "cell" and outcome.parts is not None:
        for attack, part in zip(job.jobs, outcome.parts, strict=True):
            _store(store, result_from_dict(part.row), part.staging, part.files, summary, spec, attack.name)
    elif outcome.row is None:  # the worker died (twice) before the job produced its rows
        for attack in _attack_jobs(job):
            row = _failed_row(attack, outcome.error or "worker lost", outcome.traceback, spec)
            _store(store, row, None, None, summary, spec, attack.name)
    else:
        _store(store, result_from_dict(outcome.row), outcome.staging, outcome.files, summary, spec, job.name)
    if outcome.status in ("failed", "lost"):
        progress.failed += 1


def _attack_jobs(job: Any) -> list[planlib.AttackJob]:
    """The rows of an attack or cell job, as attack jobs."""
    return list(job.jobs) if isinstance(job, planlib.CellJob) else [job]


def _failed_row(job: planlib.AttackJob, error: str, trace: str | None, spec: SuiteSpec) -> RunResult:
    from privbench.runner import RunOptions

    result = runner.new_result(job.job.config, job.resolved, RunOptions())
    result.status, result.error, result.traceback = "failed", error, trace
    result.info["suite"] = {"name": spec.name, "spec_hash": spec.spec_hash}
    return result


def _store(store: Store, result: RunResult, staging: str | None, files: dict[str, bytes] | None, summary: Summary,
           spec: SuiteSpec, name: str) -> None:
    folder = Path(staging) if staging else None
    if files is not None:
        folder = store.staging_dir(result.run_id)
        for rel, data in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)
    stored = store.record(result, folder)
    store.tag_suite(spec.name, spec.spec_hash, [stored.run_id])
    status = stored.status if not stored.cached else "ok"
    if status == "ok":
        summary.ok += 1
    elif status == "unsupported":
        summary.unsupported += 1
    else:
        summary.failed += 1
        summary.failures.append({"job": name, "run_id": stored.run_id,
                                 "error": (stored.error or "").splitlines()[0] if stored.error else ""})
