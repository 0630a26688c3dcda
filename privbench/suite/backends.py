"""Where a suite's jobs run: local worker processes, or an existing Dask distributed cluster.

Both give the coordinator the same three calls: ``submit(task) -> future``, ``wait(futures) -> done``
(at least one finished) and ``close(cancel)``; ``capacity`` is how many jobs run at once.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
from typing import Any

from privbench.suite import worker


class BackendError(RuntimeError):
    """The execution backend cannot be used (bad --jobs / --threads, no Dask, unreachable scheduler)."""


class LocalBackend:
    """``jobs`` worker processes on this machine, each pinned to ``threads`` math-library threads."""

    shares_disk = True  # workers stage results in the store's own artifacts folder

    def __init__(self, jobs: int, threads: int):
        cores = os.cpu_count() or 1
        if jobs < 1:
            raise BackendError(f"--jobs must be at least 1, got {jobs}")
        if jobs * threads > cores:
            raise BackendError(f"--jobs {jobs} x --threads {threads} = {jobs * threads} threads would oversubscribe "
                               f"this machine's {cores} cores; lower --jobs or --threads so that their product is "
                               f"at most {cores}")
        self.capacity, self.threads = jobs, threads
        self._pool = self._new_pool()

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(
            max_workers=self.capacity, mp_context=multiprocessing.get_context("spawn"),
            initializer=worker.init_local_worker, initargs=(self.threads, os.getpid()))

    def submit(self, task: worker.Task) -> cf.Future:
        try:
            return self._pool.submit(worker.run, task)
        except cf.process.BrokenProcessPool:  # a worker died (killed, out of memory): start fresh workers
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
            return self._pool.submit(worker.run, task)

    @staticmethod
    def lost(exc: BaseException) -> bool:
        """Whether ``exc`` (a future's error) means the worker died, not that the job failed."""
        return isinstance(exc, cf.process.BrokenProcessPool)

    @staticmethod
    def wait(futures: list[Any]) -> set[Any]:
        done, _ = cf.wait(futures, return_when=cf.FIRST_COMPLETED)
        return done

    def close(self, cancel: bool = False) -> None:
        if cancel:  # running jobs are stopped: their staging folders are cleaned up by the next run
            for process in list(getattr(self._pool, "_processes", {}).values()):
                process.terminate()
        self._pool.shutdown(wait=not cancel, cancel_futures=True)


class DaskBackend:
    """Jobs submitted to an existing Dask distributed scheduler at ``address`` (``tcp://HOST:PORT``).

    Every worker must have privbench (and any plugin the suite names) installed, and read the data and
    cache folders at the same paths. Results come back to the coordinator, which alone writes the store.
    """

    shares_disk = False

    def __init__(self, address: Any, threads: int):
        try:
            import distributed
        except ImportError:
            raise BackendError("--scheduler needs Dask distributed: pip install 'privbench[dask]'") from None
        self._distributed = distributed
        self._own = not isinstance(address, distributed.Client)
        try:
            self._client = address if isinstance(address, distributed.Client) else distributed.Client(
                address, timeout="20s")
        except (OSError, TimeoutError, ValueError) as exc:
            raise BackendError(f"cannot reach the Dask scheduler at {address}: {exc}. Start one with "
                               f"'dask scheduler' and workers with 'dask worker {address} --nthreads 1'") from None
        nthreads = self._client.nthreads()
        self.capacity = max(1, sum(nthreads.values()))
        self.threads = threads

    def submit(self, task: worker.Task) -> Any:
        return self._client.submit(worker.run, task, pure=False)

    def lost(self, exc: BaseException) -> bool:
        """Whether ``exc`` means the job's workers died (Dask retries a task whose worker died itself and
        raises KilledWorker once it gives up)."""
        return type(exc).__name__ == "KilledWorker"

    def wait(self, futures: list[Any]) -> set[Any]:
        done, _ = self._distributed.wait(futures, return_when="FIRST_COMPLETED")
        return set(done)

    def close(self, cancel: bool = False) -> None:
        if self._own:
            self._client.close()
