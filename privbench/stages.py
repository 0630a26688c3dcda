"""The stages of a run as the user sees them: start and end, bars or log lines, times, and what was cached.

The runner, the defenses and the attacks report ``progress(stage, done, total)``. :class:`StageTracker`
turns those calls into stages: a stage starts at its first call and ends when ``done`` reaches
``total`` or when another stage starts; :meth:`StageTracker.close` ends the last one when the run
returns. Sinks show the stages: :class:`LogSink` writes one line when a stage starts and one when it
ends (with its seconds) through the ``privbench`` logger, for output that is not a terminal;
:class:`BarSink` draws a rich progress bar per stage with the elapsed and the estimated remaining time.
After Ctrl-C, :func:`interrupted_summary` says which finished stages wrote cache files in this
process (``privbench.cache.events``) and will be reused by the next run.

Example:
    >>> tracker = StageTracker()
    >>> tracker("train", 1, 2); tracker("train", 2, 2); tracker("attack", 1, 10)
    >>> [(s.name, s.outcome) for s in tracker.stages]
    [('train', 'done'), ('attack', 'running')]
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

log = logging.getLogger("privbench")

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)


def begin(progress: ProgressFn | None, stage: str) -> None:
    """Report that ``stage`` starts (a stage of one step; :func:`end` or the next stage ends it)."""
    if progress is not None:
        progress(stage, 0, 1)


def end(progress: ProgressFn | None, stage: str) -> None:
    """Report that ``stage`` (started with :func:`begin`) is done."""
    if progress is not None:
        progress(stage, 1, 1)


class StageProgress:
    """An attack's ``progress(done, total)``, reported as the run stage ``stage``.

    ``sub(name)`` gives the progress of one part of the attack (a restart, the shadow models) reported
    as its own stage ``"<stage>: <name>"``; attacks reach it through ``privbench.attacks.base.substage``.
    """

    def __init__(self, progress: ProgressFn, stage: str):
        self.progress, self.stage = progress, stage

    def __call__(self, done: int, total: int) -> None:
        self.progress(self.stage, done, total)

    def sub(self, name: str) -> "StageProgress":
        return StageProgress(self.progress, f"{self.stage}: {name}")


def attack_progress(progress: ProgressFn | None) -> StageProgress | None:
    """The attack's progress within the run's ``progress`` (stage ``attack``), or None."""
    return None if progress is None else StageProgress(progress, "attack")


@dataclass
class Stage:
    """One occurrence of a stage: its name, its last (done, total), when it started and ended, and how."""

    name: str
    total: int
    start: float
    done: int = 0
    end: float | None = None
    outcome: str = "running"  # then "done", "failed" or "interrupted"

    def seconds(self, now: float | None = None) -> float:
        stop = self.end if self.end is not None else (now if now is not None else time.perf_counter())
        return stop - self.start


class Sink(Protocol):
    def started(self, stage: Stage) -> None: ...
    def updated(self, stage: Stage) -> None: ...
    def ended(self, stage: Stage) -> None: ...


class StageTracker:
    """A ``progress(stage, done, total)`` function that records stages and tells its sinks.

    A call with a new stage name, or with ``done`` lower than the running stage's, ends the running
    stage and starts a new one (a name may occur again, e.g. a twin's ``train``); a call with
    ``done >= total`` ends its stage.
    """

    def __init__(self, sinks: "list[Sink] | tuple[Sink, ...]" = (), clock: Callable[[], float] = time.perf_counter):
        self.sinks = list(sinks)
        self.clock = clock
        self.created = clock()
        self.stages: list[Stage] = []
        self.current: Stage | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = self.clock()
        current = self.current
        if current is None or current.name != stage or done < current.done:
            self._end(now, "done")
            current = self.current = Stage(stage, total, now)
            self.stages.append(current)
            for sink in self.sinks:
                sink.started(current)
        current.done, current.total = done, total
        for sink in self.sinks:
            sink.updated(current)
        if done >= total:
            self._end(now, "done")

    def close(self, outcome: str = "done") -> None:
        """End the running stage, if any, as ``outcome`` (``done`` when the run returned, ``failed``,
        ``interrupted``)."""
        self._end(self.clock(), outcome)

    def _end(self, now: float, outcome: str) -> None:
        current, self.current = self.current, None
        if current is None:
            return
        current.end, current.outcome = now, outcome
        for sink in self.sinks:
            sink.ended(current)

    def timings(self) -> str:
        """``"data 0.2 s, train 3.1 s, ..."``: every stage that ran, in order, with its seconds."""
        return ", ".join(f"{s.name} {s.seconds(self.clock()):.1f} s" for s in self.stages)


class LogSink:
    """One log line when a stage starts and one when it ends, through the ``privbench`` logger (INFO);
    with debug logging on, also the stage's progress and estimated time left at most every ``every`` s."""

    def __init__(self, logger: logging.Logger = log, every: float = 30.0, clock: Callable[[], float] = time.perf_counter):
        self.log, self.every, self.clock = logger, every, clock
        self._last = 0.0

    def started(self, stage: Stage) -> None:
        self.log.info("stage '%s' started", stage.name)
        self._last = self.clock()

    def updated(self, stage: Stage) -> None:
        now = self.clock()
        if not self.log.isEnabledFor(logging.DEBUG) or now - self._last < self.every or stage.done >= stage.total:
            return
        self._last = now
        elapsed = stage.seconds(now)
        left = f", about {elapsed * (stage.total - stage.done) / stage.done:.0f} s left" if stage.done > 0 else ""
        self.log.debug("stage '%s': %d/%d, %.0f s elapsed%s", stage.name, stage.done, stage.total, elapsed, left)

    def ended(self, stage: Stage) -> None:
        if stage.outcome == "done":
            self.log.info("stage '%s' done in %.1f s", stage.name, stage.seconds())
        else:
            self.log.info("stage '%s' %s after %.1f s", stage.name, stage.outcome, stage.seconds())


class BarSink:
    """A rich progress bar per running stage (done/total, elapsed, estimated time left) on ``console``; a
    finished stage leaves one line with its time. Use as a context manager around the run."""

    def __init__(self, console: Any):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        # stage names can come from plugins: shown as written, never read as markup
        self.bar = Progress(
            TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("elapsed,"), TimeRemainingColumn(), TextColumn("left"), console=console, transient=True,
        )
        self._task: Any = None

    def __enter__(self) -> "BarSink":
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def started(self, stage: Stage) -> None:
        self._task = self.bar.add_task(stage.name, total=stage.total)

    def updated(self, stage: Stage) -> None:
        self.bar.update(self._task, completed=stage.done, total=stage.total)

    def ended(self, stage: Stage) -> None:
        from rich.text import Text

        self.bar.remove_task(self._task)
        word = "done in" if stage.outcome == "done" else f"{stage.outcome} after"
        self.bar.console.print(Text(f"stage {stage.name} {word} {stage.seconds():.1f} s", style="dim"))


_KINDS = {"targets": "trained target", "datasets": "preprocessed dataset", "gascnn": "gascnn stage output",
          "eval": "evaluation classifier"}


def interrupted_summary(tracker: StageTracker, cache_root: Path) -> list[str]:
    """What to tell the user after Ctrl-C: the stage interrupted, the finished stages whose outputs were
    cached in this process (reused by the next run), the entries read back from an earlier run's cache,
    or that nothing was cached yet."""
    from privbench import cache

    root = Path(cache_root).resolve()
    events = [e for e in cache.events() if e.time >= tracker.created and _under(e.path, root)]
    lines = []
    running = tracker.current
    if running is not None:
        lines.append(f"interrupted in stage '{running.name}' after {running.seconds(tracker.clock()):.1f} s")
    cached: dict[int, Stage] = {}
    for event in events:
        if event.kind == "write" and (stage := _stage_at(tracker, event.time)) is not None:
            cached[id(stage)] = stage
    names = [f"{s.name} ({s.seconds(tracker.clock()):.1f} s{'' if s.outcome == 'done' else ', the part finished'})"
             for s in tracker.stages if id(s) in cached]
    unattributed = [e for e in events if e.kind == "write" and _stage_at(tracker, e.time) is None]
    if names:
        lines.append("stages finished and cached, reused on the next run: " + ", ".join(names))
    elif unattributed:
        lines.append("cached, reused on the next run: " + _describe(unattributed, root))
    hits = [e for e in events if e.kind == "hit"]
    if hits:
        lines.append("read from an earlier run's cache (reused again): " + _describe(hits, root))
    if not names and not unattributed:
        lines.append("nothing new was cached by this run" if hits else "nothing was cached yet")
    else:
        lines.append(f"cache folder: {root}")
    return lines


def _stage_at(tracker: StageTracker, t: float) -> Stage | None:
    """The stage running at ``t``, or the last one that ended before it (stages do not overlap)."""
    before = [s for s in tracker.stages if s.start <= t]
    return before[-1] if before else None


def _under(path: Path, root: Path) -> bool:
    try:
        Path(path).resolve().relative_to(root)
    except ValueError:
        return False
    return True


def _describe(events: list, root: Path) -> str:
    counts: dict[str, set[str]] = {}
    for event in events:
        folder = Path(event.path).resolve().relative_to(root).parts[0]
        counts.setdefault(_KINDS.get(folder, folder), set()).add(Path(event.path).stem)
    return ", ".join(kind if len(stems) == 1 else f"{len(stems)} x {kind}" for kind, stems in counts.items())
