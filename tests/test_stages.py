"""Stages as the user sees them: start and end detection, log lines, bars, --quiet / --verbose, Ctrl-C."""

import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from privbench import cache
from privbench.attacks.base import substage
from privbench.cli import app
from privbench.stages import BarSink, LogSink, StageProgress, StageTracker, interrupted_summary

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--image-size", "16", "--attack-param", "steps=5", "--attack-param", "restarts=1", "--defense-param", "epochs=1"]
runner = CliRunner()


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Recorder:
    def __init__(self):
        self.events = []

    def started(self, stage):
        self.events.append(("start", stage.name))

    def updated(self, stage):
        pass

    def ended(self, stage):
        self.events.append((stage.outcome, stage.name, stage.seconds()))


def test_a_stage_ends_at_done_equals_total_or_when_the_next_one_starts():
    clock, sink = Clock(), Recorder()
    tracker = StageTracker([sink], clock=clock)
    tracker("data", 0, 1)
    clock.now = 1.0
    tracker("data", 1, 1)  # done == total
    tracker("train", 0, 3)
    clock.now = 4.0
    tracker("train", 2, 3)
    clock.now = 5.0
    tracker("attack: restart 1/2", 1, 100)  # train never reached 3/3: ends here
    clock.now = 7.0
    tracker("attack: restart 1/2", 1, 100)
    tracker("train", 1, 3)  # a name seen before is a new occurrence
    clock.now = 8.0
    tracker.close()
    assert sink.events == [
        ("start", "data"), ("done", "data", 1.0), ("start", "train"), ("done", "train", 4.0),
        ("start", "attack: restart 1/2"), ("done", "attack: restart 1/2", 2.0),
        ("start", "train"), ("done", "train", 1.0),
    ]
    assert tracker.timings() == "data 1.0 s, train 4.0 s, attack: restart 1/2 2.0 s, train 1.0 s"


def test_a_lower_done_restarts_the_stage_and_close_records_the_outcome():
    clock, sink = Clock(), Recorder()
    tracker = StageTracker([sink], clock=clock)
    tracker("train", 3, 5)
    tracker("train", 1, 5)  # the same name counting again from the start: a second occurrence
    clock.now = 2.0
    tracker.close("interrupted")
    assert [e[:2] for e in sink.events] == [("start", "train"), ("done", "train"), ("start", "train"),
                                            ("interrupted", "train")]
    assert tracker.current is None


def test_log_sink_writes_one_line_per_start_and_end(caplog):
    clock = Clock()
    tracker = StageTracker([LogSink(clock=clock)], clock=clock)
    with caplog.at_level(logging.DEBUG, logger="privbench"):
        tracker("train", 0, 10)
        for done in range(1, 11):
            clock.now = done * 10.0
            tracker("train", done, 10)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert lines == ["stage 'train' started", "stage 'train' done in 100.0 s"]
    progress = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert progress and all(re.fullmatch(r"stage 'train': \d+/10, \d+ s elapsed, about \d+ s left", m) for m in progress)


def test_bar_sink_draws_bars_and_leaves_a_line_per_finished_stage():
    from rich.console import Console

    out = io.StringIO()
    with BarSink(Console(file=out, force_terminal=True, width=120)) as bar:
        tracker = StageTracker([bar])
        tracker("train [x]", 0, 4)
        tracker("train [x]", 4, 4)
        tracker("attack: restart 1/1", 1, 10)
        tracker.close()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert "stage train [x] done in" in text and "stage attack: restart 1/1 done in" in text


def test_attack_substages_are_stages_of_their_own_or_shift_a_plain_progress():
    calls = []
    stage = StageProgress(lambda *a: calls.append(a), "attack")
    substage(stage, "restart 2/2", 5, 10)(3, 5)
    stage(1, 2)
    assert calls == [("attack: restart 2/2", 3, 5), ("attack", 1, 2)]
    plain = []
    substage(lambda d, t: plain.append((d, t)), "restart 2/2", 5, 10)(3, 5)
    assert plain == [(8, 10)]
    assert substage(None, "x") is None


def test_interrupted_summary_names_the_finished_stages_that_wrote_cache_files(tmp_path):
    root = tmp_path / "cache"
    tracker = StageTracker()
    assert interrupted_summary(tracker, root) == ["nothing was cached yet"]
    tracker("train", 0, 2)
    tracker("train", 2, 2)
    cache.note("write", root / "targets" / "abc.pt")  # written after train ended: train's output
    cache.note("hit", root / "datasets" / "d.npz")
    cache.note("write", tmp_path / "elsewhere" / "x.pt")  # outside the cache folder: not counted
    tracker("attack: restart 1/2", 1, 10)
    lines = interrupted_summary(tracker, root)
    assert re.fullmatch(r"interrupted in stage 'attack: restart 1/2' after \d+\.\d s", lines[0])
    assert re.fullmatch(r"stages finished and cached, reused on the next run: train \(\d+\.\d s\)", lines[1])
    assert lines[2:] == ["read from an earlier run's cache (reused again): preprocessed dataset",
                         f"cache folder: {root.resolve()}"]


# -- bench run ---------------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("one_thread")
def test_bench_run_with_redirected_output_logs_one_line_per_stage_start_and_end(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PRIVBENCH_HOME": str(tmp_path / "home"), "PRIVBENCH_THREADS": "1"}
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        code = subprocess.run([sys.executable, "-m", "privbench.cli", "run", *TINY], stdout=stdout, stderr=stderr,
                              stdin=subprocess.DEVNULL, env=env, cwd=tmp_path, timeout=300).returncode
    log = err.read_text()
    assert code == 0, log + out.read_text()
    started = re.findall(r"^\d\d:\d\d:\d\d privbench: stage '([^']+)' started$", log, re.M)
    ended = re.findall(r"^\d\d:\d\d:\d\d privbench: stage '([^']+)' done in \d+\.\d s$", log, re.M)
    assert started == ended  # each stage: one start line, then one end line, in order
    assert len(started) == len(set(started))
    assert {"data", "train", "observation", "attack: restart 1/1", "scoring"} <= set(started)
    result = re.findall(r"^\d\d:\d\d:\d\d privbench: run \S+ ok in \d+\.\d s: psnr .* \(baseline .*\)", log, re.M)
    assert len(result) == 1, log
    printed = out.read_text()
    assert "psnr" in printed and "stage times: data " in printed and "stage '" not in printed


@pytest.mark.usefixtures("bench_home", "one_thread")
def test_quiet_prints_no_stage_lines_and_verbose_adds_debug_lines():
    normal = runner.invoke(app, ["run", *TINY])
    assert normal.exit_code == 0, normal.output
    assert "privbench: stage 'train' started" in normal.stderr
    quiet = runner.invoke(app, ["run", *TINY, "--force", "--quiet"])
    assert quiet.exit_code == 0, quiet.output
    assert "stage" not in quiet.stderr and "psnr" in quiet.stdout and "stage times" not in quiet.stdout
    verbose = runner.invoke(app, ["run", *TINY, "--force", "--verbose"])
    assert verbose.exit_code == 0, verbose.output
    assert "privbench.cache: cache hit: " in verbose.stderr  # the target and the data come from the cache
    assert runner.invoke(app, ["run", "--quiet", "--verbose"]).exit_code == 2
    assert not logging.getLogger("privbench").handlers  # each command's log handler ends with it


@pytest.mark.usefixtures("bench_home", "one_thread")
def test_ctrl_c_says_which_finished_stages_were_cached(monkeypatch):
    from privbench import registry
    from privbench.store import Store

    def interrupt(self, observation, budget, progress=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(registry.attacks.get("dlg"), "run", interrupt)
    result = runner.invoke(app, ["run", *TINY])
    assert result.exit_code == 130, result.output
    assert "interrupted: nothing was stored for this run" in result.stderr
    cached = re.search(r"^stages finished and cached, reused on the next run: (.*)$", result.stderr, re.M)
    assert cached and "data (" in cached.group(1) and "train (" in cached.group(1), result.stderr
    assert Store().counts() == {}


@pytest.mark.usefixtures("bench_home")
def test_ctrl_c_before_anything_was_cached_says_so(monkeypatch):
    from privbench import datasets

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets, "load", interrupt)
    result = runner.invoke(app, ["run", *TINY])
    assert result.exit_code == 130
    assert "interrupted in stage 'data'" in result.stderr and "nothing was cached yet" in result.stderr


@pytest.mark.usefixtures("bench_home", "one_thread")
def test_the_shadow_attack_reports_one_tick_per_shadow_model():
    from privbench.config import RunConfig
    from privbench.runner import run
    from privbench.store import Store

    calls = []
    config = RunConfig(attack="shadow", image_size=16, defense_params={"epochs": "1"}, attack_params={"shadows": "2"})
    result = run(config, Store(), progress=lambda *call: calls.append(call))
    assert result.status == "ok", result.error
    assert [c for c in calls if c[0].startswith("attack")] == [
        ("attack: shadow models", 0, 2), ("attack: shadow models", 1, 2), ("attack: shadow models", 2, 2),
        ("attack: attack model", 0, 1)]
    assert calls[:2] == [("data", 0, 1), ("setup", 0, 1)] and ("scoring", 0, 1) in calls
