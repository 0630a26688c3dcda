"""Hostile files planted in every cache and in the store: no stored code runs, nothing is trusted blindly.

Rather than naming the caches one by one (``test_cache.py`` does that for each cache's own loader),
these tests let real commands fill ``<home>/cache`` and the store, replace *every* file found there
with a pickle whose loading would run code, and run the commands again: the payload must never run,
each command must still succeed (a bad cache entry is a miss, a bad artifact is skipped), and what it
skipped must be named.
"""

from __future__ import annotations

import functools
import json
import pickle
from pathlib import Path

import pytest
from typer.testing import CliRunner

from privbench.cli import app
from privbench.store import RESULT_FILE, Store

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")]

runner = CliRunner()
TINY = ["--image-size", "16", "--attack-param", "steps=3", "--attack-param", "restarts=1",
        "--defense-param", "epochs=1"]


class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def tiny_eval_classifier(monkeypatch):
    from privbench import scoring

    monkeypatch.setattr(scoring.eval_classifier, "EvalClassifierSpec", functools.partial(
        scoring.eval_classifier.EvalClassifierSpec, width=4, feature_dim=4, epochs=1))


def test_every_cache_file_replaced_by_a_pickle_that_runs_code(bench_home, tmp_path, tiny_eval_classifier):
    assert invoke("run", *TINY).exit_code == 0
    assert invoke("score").exit_code == 0
    planted = sorted(p for p in (bench_home / "cache").rglob("*") if p.is_file() and p.suffix != ".lock")  # locks hold no data
    assert {p.relative_to(bench_home / "cache").parts[0] for p in planted} >= {"targets", "datasets", "eval"}
    marker = tmp_path / "marker"
    for path in planted:
        path.write_bytes(pickle.dumps(_Payload(marker)))
    again = invoke("run", *TINY, "--force")
    assert again.exit_code == 0, again.output
    scored = invoke("score")
    assert scored.exit_code == 0, scored.output
    assert not marker.exists()
    text = " ".join((again.output + scored.output).split())
    for folder in ("targets", "datasets", "eval"):
        assert f"cache/{folder}/" in text and "unreadable" in text  # each planted entry named as it is discarded
    rebuilt = sorted(p for p in (bench_home / "cache").rglob("*") if p.is_file() and p.suffix != ".lock")
    assert rebuilt and all(p.read_bytes() != pickle.dumps(_Payload(marker)) for p in rebuilt)


def test_every_artifact_replaced_by_a_pickle_that_runs_code(bench_home, tmp_path, tiny_eval_classifier):
    for seed in (0, 1):
        assert invoke("run", *TINY, "--seed", seed).exit_code == 0
    marker = tmp_path / "marker"
    planted = sorted(p for p in (bench_home / "artifacts").rglob("*") if p.is_file() and p.name != RESULT_FILE)
    assert any(p.name == "reconstruction.pt" for p in planted)
    for path in planted:
        path.write_bytes(pickle.dumps(_Payload(marker)))
    scored = invoke("score")
    assert scored.exit_code == 0, scored.output
    assert not marker.exists()
    assert "none of its 2 run(s) has a readable reconstruction" in " ".join(scored.output.split())
    assert invoke("runs").exit_code == 0


@pytest.mark.parametrize("change,message", [
    ({"run_id": "../../outside"}, "not a run id"),
    ({"run_id": "/abs/path"}, "not a run id"),
    ({"status": "ok'; DROP TABLE runs; --"}, "not one of"),
    ({"config": {"defense": ["not", "text"]}}, "config field 'defense'"),
    ({"metrics": "not an object"}, "not a JSON object"),
])
def test_a_hostile_result_left_in_staging_is_not_imported(bench_home, change, message, caplog):
    store = Store()
    first = invoke("run", *TINY, "--json")
    row = json.loads(first.stdout)
    staging = store.artifacts_root / ".staging-20260101T000000-hostile1"
    staging.mkdir(parents=True)
    (staging / RESULT_FILE).write_text(json.dumps({**row, "run_id": "20260101T000000-hostile1", **change}))
    notes = Store().recover()
    assert notes == []
    assert message in caplog.text and str(staging) in caplog.text
    assert staging.is_dir()  # left in place for a person to look at, never deleted
    assert Store().counts() == {"ok": 1}
    assert not (bench_home.parent / "outside").exists()
