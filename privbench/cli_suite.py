"""``bench suite``: run a suite spec's grid on local workers or a Dask cluster (registered on cli.app)."""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.table import Table

from privbench.cli import _fail_input, _input_errors, _json, _log_to_stderr, _say, _text, app, err_console


@app.command()
def suite(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="Suite spec (TOML), e.g. benchmarks/suites/quick.toml.")],
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Worker processes on this machine.")] = 1,
    threads: Annotated[int, typer.Option(help="Torch / OpenMP / MKL threads per worker (jobs x threads <= cores).")] = 1,
    scheduler: Annotated[str | None, typer.Option(help="Address of a Dask scheduler (tcp://HOST:PORT): run the "
                                                  "jobs on its workers instead of local processes.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the expanded grid and what is stored; run nothing.")] = False,
    data_root: Annotated[Path | None, typer.Option(help="Folder holding the datasets (default $PRIVBENCH_DATA_DIR).")] = None,
    store_path: Annotated[Path | None, typer.Option("--store", help="SQLite results file.")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Trained targets and preprocessed data (every worker must "
                                                   "read and write it); default <home>/cache.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a machine-readable summary at the end.")] = False,
    batch_victims: Annotated[int, typer.Option(help="Jobs that attack one target and differ only in their seed "
                                               "(a cell's victims) run together, up to this many per job, when the "
                                               "attack batches them (gradient inversion); 0 runs one job per "
                                               "row.")] = 64,
) -> None:
    """Run every job of a suite's grid that is not stored yet, targets first, and store one row per job.

    Exit codes: 0 every job stored ok or unsupported, 1 some job failed (stored as failed; rerun to retry),
    2 bad input (nothing run), 130 interrupted (Ctrl-C or SIGTERM once lets running jobs finish and stores them;
    twice stops them). Rerunning after any interruption or kill runs only what is missing."""
    from privbench.store import Store
    from privbench.suite import coordinator
    from privbench.suite import spec as speclib
    from privbench.suite.backends import BackendError, DaskBackend, LocalBackend

    _log_to_stderr(logging.WARNING, err_console.is_terminal)
    root = str(data_root) if data_root else None
    try:
        spec = speclib.load(spec_path)
        store = Store(store_path)
        if batch_victims < 0:
            raise speclib.SpecError(f"--batch-victims must be >= 0 (0: one job per row), got {batch_victims}")
        if dry_run:
            _dry_run(spec, store, root, cache_dir, as_json, batch_victims, jobs)
            return
        backend = DaskBackend(scheduler, threads) if scheduler else LocalBackend(jobs, threads)
    except (*_input_errors(), speclib.SpecError, BackendError) as exc:
        _fail_input(exc)
    display = _Display(spec.name, live=err_console.is_terminal and not as_json)
    # SIGTERM (kill, a scheduler's stop, a shell's background job) stops the suite as Ctrl-C does: a suite
    # started with `&` from a non-interactive shell ignores SIGINT, so this is how it is stopped gracefully
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with display:
            summary = coordinator.run(spec, store, backend, data_root=root, cache_dir=cache_dir, listener=display,
                                      batch_victims=batch_victims)
    except (*_input_errors(), speclib.SpecError, BackendError) as exc:
        backend.close(cancel=True)
        _fail_input(exc)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if as_json:
        typer.echo(_json(summary.to_dict()))
    else:
        _print_summary(summary)
    raise typer.Exit(130 if summary.interrupted else 1 if summary.failed or summary.fits_failed else 0)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _dry_run(spec: Any, store: Any, root: str | None, cache_dir: Path | None, as_json: bool, batch_victims: int,
             workers: int) -> None:
    from privbench.store import home
    from privbench.suite import plan as planlib

    plan = planlib.make(spec, store, root, cache_dir or home() / "cache", batch_victims, workers)
    facts = {"suite": spec.name, "spec_hash": spec.spec_hash, **plan.describe()}
    if as_json:
        typer.echo(_json({**facts, "jobs_to_run": plan.job_names(),
                          "targets_to_train": [fit.name for fit in plan.fits]}))
        return
    cells = f" ({facts['in_cells']} of them in {facts['cell_jobs']} cell jobs)" if facts["cell_jobs"] else ""
    _say(f"suite {spec.name} ({spec.path}, spec {spec.spec_hash[:12]}): {facts['jobs']} jobs, {facts['stored']} "
         f"stored, {facts['to_run']} to run{cells}; {facts['targets']} distinct targets, "
         f"{facts['targets_to_train']} to train")
    for fit in plan.fits:
        _say("  ", fit.name)
    for name in plan.job_names():
        _say("  ", name)


class _Display:
    """Progress: a live table in a terminal (done / running / failed / left, the running jobs, elapsed and
    ETA), otherwise one log line per finished job."""

    def __init__(self, name: str, live: bool):
        self.name, self.live = name, live
        self._live: Live | None = None
        self._log = logging.getLogger("privbench.suite")

    def __enter__(self) -> "_Display":
        if self.live:
            self._live = Live(Table(), console=err_console, refresh_per_second=2, transient=True)
            self._live.__enter__()
        else:
            _log_to_stderr(logging.INFO, False)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def __call__(self, event: str, progress: Any, outcome: Any) -> None:
        if event == "interrupt":
            _say("interrupted: no new job is scheduled; running jobs finish and are stored (Ctrl-C again stops "
                 "them)", err=True)
        elapsed = time.perf_counter() - progress.started
        eta = progress.eta()
        left = progress.total - progress.done - len(progress.running)
        status = (f"{progress.done}/{progress.total} done, {len(progress.running)} running, {progress.failed} failed, "
                  f"{left} left; {elapsed:.0f} s elapsed, ETA {'?' if eta is None else f'{eta:.0f} s'}")
        if self._live is not None:
            table = Table(title=f"suite {self.name}: {status}", show_header=False, box=None)
            for name in progress.running.values():
                table.add_row(_text(("running", "cyan")), _text(name))
            self._live.update(table)
        elif event == "done" and outcome is not None:
            self._log.info("%s %s (%.1f s); %s", outcome.status, outcome.name, outcome.seconds, status)


def _print_summary(summary: Any) -> None:
    overhead = summary.overhead
    _say(f"suite {summary.suite}: {summary.jobs} jobs, {summary.stored_before} stored before; this run: "
         f"{summary.ok} ok, {summary.unsupported} unsupported, {summary.failed} failed, {summary.fits} targets "
         f"trained ({summary.fits_failed} failed)" + (f", {summary.not_run} not run" if summary.not_run else ""))
    _say(f"wall time {summary.wall_time_s:.1f} s on {summary.workers} worker(s); jobs' own time "
         f"{summary.job_time_s:.1f} s" + (f"; overhead {100 * overhead:.1f}% of worker time" if overhead is not None
                                          else ""))
    for failure in summary.failures:  # one line each, never wrapped, so it can be copied whole
        _say(("failed:", "bold red"), f" {failure['job']} (run {failure['run_id']}): {failure['error']}")
    if summary.interrupted:
        _say("interrupted: rerun the same command to finish the grid (stored rows are not run again)", err=True)
