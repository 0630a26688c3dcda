"""The results store under faults: checked before computing, nothing finished lost, one ok row per request,
strict JSON, damaged rows and artifacts skipped with a warning, and the CLI's exit codes and messages.

Each class covers one kind of fault with several instances of it; the runs are tiny (16 px, 3 steps).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from privbench.cli import app
from privbench.config import RunConfig
from privbench.defenses.none import NoDefense
from privbench.runner import run
from privbench.store import RESULT_FILE, RunResult, Store, StoreError, dumps, loads

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()
TINY = ["--image-size", "16", "--attack-param", "steps=3", "--attack-param", "restarts=1",
        "--defense-param", "epochs=1"]
TINY_CONFIG = dict(image_size=16, attack_params={"steps": 3, "restarts": 1}, defense_params={"epochs": 1})


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    return " ".join(text.split())


@contextlib.contextmanager
def read_only(path: Path):
    """Make ``path`` (a file or folder) unwritable, even for root (``chattr +i``); skip if that cannot be done."""
    path = Path(path)
    mode = path.stat().st_mode
    immutable = False
    if os.geteuid() == 0:
        immutable = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
        if not immutable:
            pytest.skip("running as root without chattr: cannot make a path read-only")
    else:
        path.chmod(mode & ~0o222)
    try:
        yield path
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        else:
            path.chmod(mode)


@pytest.fixture
def no_fit(monkeypatch):
    """Fail the test if a target is trained: the store must be refused before anything is computed."""
    def fit(self, model, members, ctx):
        raise AssertionError("the run computed although its result could not be stored")

    monkeypatch.setattr(NoDefense, "fit", fit)


def fake_result(run_id: str, *, key: str = "k", status: str = "ok", created: str = "2026-01-01T00:00:00",
                **changes) -> RunResult:
    values = dict(run_id=run_id, created_at=created, status=status, config=RunConfig(model="lenet").to_dict(),
                  config_hash="h", cache_key=f"c-{key}", request_key=f"q-{key}", privbench_version="0",
                  metrics={"psnr": 20.0}, costs={}, info={}, wall_time_s=1.0, grad_evals=1)
    values.update(changes)
    return RunResult(**values)


# -- (2) the store is checked before anything is computed ------------------------------------------


def _foreign_schema(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, payload TEXT)")


def _old_schema(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE runs (run_id TEXT PRIMARY KEY, created_at TEXT, status TEXT, config_json TEXT)")


def _newer_schema(path: Path) -> None:
    Store(path)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the store is in WAL mode: the file itself holds the change
    conn.close()


def _other_program(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00garbage, not a database\xff" * 100)


def _truncated_db(path: Path) -> None:
    Store(path)
    data = path.read_bytes()
    path.write_bytes(data[:100] + b"\x13" * (len(data) - 100))


HOSTILE_STORES = {
    "foreign schema": (_foreign_schema, "has a 'runs' table of another layout"),
    "old schema": (_old_schema, "missing"),
    "newer schema": (_newer_schema, "written by a newer privbench"),
    "another program's database": (_other_program, "not a privbench results store"),
    "not a database": (_garbage, "is corrupt or not a SQLite database"),
    "corrupt database": (_truncated_db, "is corrupt or not a SQLite database"),
}


class TestStoreCheckedBeforeComputing:
    @pytest.mark.parametrize("case", list(HOSTILE_STORES))
    def test_hostile_store_file_exits_2_and_is_left_untouched(self, tmp_path, no_fit, case):
        plant, message = HOSTILE_STORES[case]
        path = tmp_path / "store.sqlite"
        plant(path)
        before = path.read_bytes()
        result = invoke("run", *TINY, "--store", path)
        assert result.exit_code == 2, result.output
        assert message in flat(result.output) and str(path) in flat(result.output)
        assert "PRIVBENCH_HOME to a writable folder" not in flat(result.output)  # the cause is named, not a guess
        assert "Traceback" not in result.output
        assert path.read_bytes() == before
        assert not (tmp_path / "artifacts").exists()

    def test_read_only_database_file(self, tmp_path, no_fit):
        path = tmp_path / "store.sqlite"
        Store(path)
        with read_only(path):
            result = invoke("run", *TINY, "--store", path)
        assert result.exit_code == 2 and "cannot be written" in flat(result.output), result.output
        assert "Traceback" not in result.output

    def test_read_only_store_folder(self, tmp_path, no_fit):
        folder = tmp_path / "runs"
        folder.mkdir()
        Store(folder / "store.sqlite")
        with read_only(folder):
            result = invoke("run", *TINY, "--store", folder / "store.sqlite")
        assert result.exit_code == 2 and "not writable" in flat(result.output), result.output
        assert "Traceback" not in result.output

    def test_read_only_folder_without_a_store(self, tmp_path, no_fit):
        folder = tmp_path / "runs"
        folder.mkdir()
        with read_only(folder):
            result = invoke("run", *TINY, "--store", folder / "store.sqlite")
        assert result.exit_code == 2 and "cannot be written" in flat(result.output), result.output
        assert not (folder / "store.sqlite").exists()

    def test_too_little_free_space(self, tmp_path, no_fit, monkeypatch):
        monkeypatch.setenv("PRIVBENCH_STORE_MIN_FREE_MB", str(10**12))
        result = invoke("run", *TINY, "--store", tmp_path / "store.sqlite")
        assert result.exit_code == 2 and "privbench keeps a margin" in flat(result.output), result.output
        assert "PRIVBENCH_STORE_MIN_FREE_MB" in flat(result.output)

    def test_store_path_that_is_a_folder(self, tmp_path, no_fit):
        result = invoke("run", *TINY, "--store", tmp_path)
        assert result.exit_code == 2 and "is a folder" in flat(result.output)

    def test_a_stored_result_is_still_served_from_a_read_only_store(self, bench_home):
        first = invoke("run", *TINY, "--json")
        assert first.exit_code == 0, first.output
        with read_only(bench_home / "privbench.sqlite"), read_only(bench_home):
            again = invoke("run", *TINY, "--json")
        assert again.exit_code == 0, again.output
        assert json.loads(again.stdout)["cached"]


# -- (2) nothing finished is lost ------------------------------------------------------------------


def _fail_commit(monkeypatch, exc: BaseException):
    calls = []
    original = Store._commit

    def commit(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise exc
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Store, "_commit", commit)


class TestFinishedWorkIsKept:
    @pytest.mark.parametrize("error", [sqlite3.OperationalError("database or disk is full"),
                                       sqlite3.OperationalError("attempt to write a readonly database"),
                                       OSError(28, "No space left on device")])
    def test_a_failed_final_write_keeps_the_result_and_bench_import_stores_it(self, bench_home, monkeypatch, error):
        _fail_commit(monkeypatch, error)
        result = invoke("run", *TINY)
        assert result.exit_code == 2, result.output
        text = flat(result.output)
        assert "Nothing is lost" in text and "bench import" in text and "Traceback" not in result.output
        kept = next((bench_home / "artifacts").glob(".staging-*"))
        assert str(kept) in text
        assert (kept / RESULT_FILE).is_file() and (kept / "reconstruction.png").is_file()
        assert Store().counts() == {}
        imported = invoke("import", kept)
        assert imported.exit_code == 0, imported.output
        row = Store().all_ok()[0]
        assert row.run_id == loads((bench_home / "artifacts" / row.run_id / RESULT_FILE).read_text())["run_id"]
        assert (bench_home / row.artifacts / "reconstruction.png").is_file()
        assert not kept.exists()
        again = invoke("import", bench_home / "artifacts" / row.run_id)
        assert again.exit_code == 0 and "already stored" in again.output
        assert Store().counts() == {"ok": 1}

    def test_the_next_run_stores_a_kept_result_instead_of_recomputing(self, bench_home, monkeypatch):
        _fail_commit(monkeypatch, sqlite3.OperationalError("database or disk is full"))
        assert invoke("run", *TINY).exit_code == 2
        monkeypatch.setattr(NoDefense, "fit", lambda *a: (_ for _ in ()).throw(AssertionError("recomputed")))
        again = invoke("run", *TINY, "--json")
        assert again.exit_code == 0, again.output
        assert json.loads(again.stdout)["cached"]
        assert not list((bench_home / "artifacts").glob(".staging-*"))

    def test_an_interrupt_during_the_write_keeps_the_result(self, bench_home, monkeypatch):
        _fail_commit(monkeypatch, KeyboardInterrupt())
        store = Store()
        with pytest.raises(KeyboardInterrupt):
            run(RunConfig(**TINY_CONFIG), store)
        kept = next((bench_home / "artifacts").glob(".staging-*"))
        assert (kept / RESULT_FILE).is_file()
        store.release(kept)  # the process that was interrupted ends here
        assert [line.startswith("stored the result") for line in Store().recover()] == [True]
        assert Store().counts() == {"ok": 1}

    def test_a_killed_runs_staging_folder_is_removed_and_a_live_one_is_left(self, bench_home):
        import fcntl

        store = Store()
        dead = store.artifacts_root / ".staging-20260101T000000-dead0001"
        live = store.artifacts_root / ".staging-20260101T000000-live0001"
        for folder in (dead, live):
            folder.mkdir(parents=True)
            (folder / "reconstruction.png").write_bytes(b"png")
        with open(live / ".lock", "a+b") as held:  # a running process holds its lock
            fcntl.flock(held.fileno(), fcntl.LOCK_EX)
            notes = store.recover()
            assert live.is_dir() and not dead.exists()
        assert len(notes) == 1 and "stopped before it finished" in notes[0]

    def test_a_running_runs_staging_folder_is_never_recovered(self, bench_home, monkeypatch):
        from privbench.attacks.gradient_inversion import DLG

        original, seen = DLG.run, {}

        def spy(self, observation, budget, progress=None):
            seen["notes"] = Store().recover()  # another process starting meanwhile
            seen["staging"] = list((bench_home / "artifacts").glob(".staging-*"))
            return original(self, observation, budget, progress)

        monkeypatch.setattr(DLG, "run", spy)
        result = run(RunConfig(**TINY_CONFIG), Store())
        assert seen["notes"] == [] and len(seen["staging"]) == 1
        assert result.status == "ok" and Store().counts() == {"ok": 1}

    @pytest.mark.parametrize("content,message", [
        ("not json", "not a readable privbench result"),
        (json.dumps({"run_id": "../../escape", "status": "ok"}), "not a run id"),
        (json.dumps(["a", "list"]), "expected a JSON object"),
        (None, "holds no result.json"),
    ])
    def test_import_refuses_what_is_not_a_result(self, bench_home, tmp_path, content, message):
        folder = tmp_path / "kept"
        folder.mkdir()
        if content is not None:
            data = fake_result("r1").to_dict()
            (folder / RESULT_FILE).write_text(content if not content.startswith("{") else
                                              json.dumps({**data, **json.loads(content)}))
        result = invoke("import", folder)
        assert result.exit_code == 2 and message in flat(result.output), result.output
        assert not (bench_home / "privbench.sqlite").exists() or Store().counts() == {}


# -- (3) one ok row per request key ---------------------------------------------------------------


class TestOneOkRowPerKey:
    def test_concurrent_writers_of_one_config_store_one_row(self, tmp_path):
        store = Store(tmp_path / "s.sqlite")
        results: list[RunResult] = []
        barrier = threading.Barrier(4)

        def write(i: int) -> None:
            barrier.wait()
            results.append(Store(store.path).record(fake_result(f"r{i}", created=f"2026-01-01T00:00:0{i}")))

        threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert store.counts() == {"ok": 1}
        assert len({r.run_id for r in results}) == 1  # every writer returns the one stored row
        assert sum(not r.cached for r in results) == 1

    def test_force_replaces_and_keeps_the_old_row_as_superseded(self, tmp_path):
        store = Store(tmp_path / "s.sqlite")
        store.record(fake_result("r1"))
        store.record(fake_result("r2", created="2026-01-02T00:00:00"), replace=True)
        assert store.counts() == {"ok": 1, "superseded": 1}
        assert store.find_ok(request_key="q-k").run_id == "r2" and store.get("r1").status == "superseded"

    def test_the_database_refuses_a_second_ok_row(self, tmp_path):
        store = Store(tmp_path / "s.sqlite")
        store.record(fake_result("r1"))
        with sqlite3.connect(store.path) as conn, pytest.raises(sqlite3.IntegrityError):
            conn.execute("INSERT INTO runs SELECT 'r2', created_at, status, defense, attack, dataset, model, seed, "
                         "config_hash, cache_key, request_key, privbench_version, config_json, metrics_json, "
                         "costs_json, info_json, wall_time_s, grad_evals, error, traceback, artifacts FROM runs")
        store.record(fake_result("f1", status="failed"))
        store.record(fake_result("f2", status="failed"))  # failures are history, never served: any number
        assert store.counts() == {"ok": 1, "failed": 2}

    def test_an_earlier_stores_duplicates_are_read_once_and_superseded_on_upgrade(self, tmp_path):
        from privbench.scoring import reconstruction_cells
        from privbench.store import TABLES

        path = tmp_path / "old.sqlite"
        with sqlite3.connect(path) as conn:  # an earlier privbench's store: no unique index, three copies
            conn.executescript(TABLES)
        for i in range(3):
            row = fake_result(f"r{i}", created=f"2026-01-0{i + 1}T00:00:00", artifacts=f"artifacts/r{i}")
            with sqlite3.connect(path) as conn:
                conn.execute(f"INSERT INTO runs VALUES ({', '.join('?' * 21)})",
                             tuple(Store._row_values(row)[c] for c in (
                                 "run_id", "created_at", "status", "defense", "attack", "dataset", "model", "seed",
                                 "config_hash", "cache_key", "request_key", "privbench_version", "config_json",
                                 "metrics_json", "costs_json", "info_json", "wall_time_s", "grad_evals", "error",
                                 "traceback", "artifacts")))
        reader = Store(path, create=False)  # readers never modify a store
        assert [r.run_id for r in reader.all_ok()] == ["r2"] and reader.counts() == {"ok": 1}
        assert [len(rows) for rows in reconstruction_cells(reader).values()] == [1]
        writer = Store(path)  # a writer upgrades it: the newest row stays ok
        assert writer.counts() == {"ok": 1, "superseded": 2} and writer.find_ok(cache_key="c-k").run_id == "r2"


# -- (4) strict JSON in the store -----------------------------------------------------------------


class TestStrictJson:
    VALUES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "nested": [1.0, {"x": math.inf}], "ok": 0.5}

    def test_non_finite_floats_are_stored_as_valid_json_and_read_back(self, tmp_path):
        store = Store(tmp_path / "s.sqlite")
        store.record(fake_result("r1", metrics=dict(self.VALUES), costs={"c": math.nan}, info={"i": [math.inf]}))
        with sqlite3.connect(store.path) as conn:
            for column in ("config_json", "metrics_json", "costs_json", "info_json"):
                assert conn.execute(f"SELECT COUNT(*) FROM runs WHERE NOT json_valid({column})").fetchone() == (0,)
            assert conn.execute("SELECT json_extract(metrics_json, '$.ok') FROM runs").fetchone() == (0.5,)
        back = store.get("r1")
        assert math.isnan(back.metrics["nan"]) and back.metrics["inf"] == math.inf
        assert back.metrics["-inf"] == -math.inf and back.metrics["nested"] == [1.0, {"x": math.inf}]
        assert math.isnan(back.costs["c"]) and back.info == {"i": [math.inf]}

    def test_cli_json_output_is_strict(self, bench_home):
        Store().record(fake_result("r1", metrics=dict(self.VALUES)))

        def refuse(name):
            raise ValueError(f"bare {name} in JSON output")

        rows = json.loads(invoke("runs", "--json").stdout, parse_constant=refuse)
        assert rows[0]["metrics"]["inf"] == {"$float": "inf"}

    def test_an_earlier_stores_bare_nan_is_re_encoded_on_upgrade(self, tmp_path):
        from privbench.store import TABLES

        path = tmp_path / "old.sqlite"
        with sqlite3.connect(path) as conn:  # an earlier privbench wrote json.dumps' bare NaN / Infinity
            conn.executescript(TABLES)
            values = Store._row_values(fake_result("r1"))
            values["metrics_json"] = json.dumps({"psnr": math.inf, "ssim": math.nan})
            conn.execute(f"INSERT INTO runs ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
                         tuple(values.values()))
        assert Store(path, create=False).get("r1").metrics["psnr"] == math.inf  # read as it is
        store = Store(path)  # upgraded by a writer
        with sqlite3.connect(path) as conn:
            assert conn.execute("SELECT json_valid(metrics_json) FROM runs").fetchone() == (1,)
        back = store.get("r1").metrics
        assert back["psnr"] == math.inf and math.isnan(back["ssim"])

    def test_dumps_and_loads_round_trip(self):
        text = dumps({"a": math.inf, "b": [math.nan, -math.inf], "c": "inf"})
        assert "Infinity" not in text and "NaN" not in text
        back = loads(text)
        assert back["a"] == math.inf and math.isnan(back["b"][0]) and back["c"] == "inf"


# -- (6) a damaged row or artifact is skipped with a warning naming it ------------------------------


DAMAGE = {
    "garbage json": "UPDATE runs SET metrics_json = '{\"psnr\": 3' || char(0) || 'zz' WHERE run_id = ?",
    "config without a defense": "UPDATE runs SET config_json = '{\"seed\": 0}' WHERE run_id = ?",
    "unknown status": "UPDATE runs SET status = 'weird[/i]' WHERE run_id = ?",
    "text wall time": "UPDATE runs SET wall_time_s = 'abc' WHERE run_id = ?",
    "json that is a list": "UPDATE runs SET info_json = '[1, 2]' WHERE run_id = ?",
}


class TestDamagedRowsAreSkipped:
    @pytest.mark.parametrize("case", list(DAMAGE))
    def test_bench_runs_lists_the_rest_and_names_the_damaged_row(self, bench_home, case):
        store = Store()
        for i, key in enumerate(("a", "b", "c")):
            store.record(fake_result(f"run-{key}", key=key, created=f"2026-01-0{i + 1}T00:00:00"))
        with sqlite3.connect(store.path) as conn:
            conn.execute(DAMAGE[case], ("run-b",))
        for args in (["runs"], ["runs", "--json"], ["runs", "--status", "ok"]):
            result = invoke(*args)
            assert result.exit_code == 0, result.output
            assert "run-a" in result.output and "run-c" in result.output and "Traceback" not in result.output
            if not (case == "unknown status" and "--status" in args):  # a filtered-out row is not read at all
                assert "skipping stored run 'run-b'" in flat(result.output)
        listed = invoke("ledger", "verify", "run-b")
        assert listed.exit_code == 2 and "damaged" in listed.output

    @pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
    def test_bench_score_skips_missing_and_hostile_reconstructions(self, bench_home, tmp_path, monkeypatch):
        import functools
        import pickle

        from privbench import scoring

        monkeypatch.setattr(scoring.eval_classifier, "EvalClassifierSpec", functools.partial(
            scoring.eval_classifier.EvalClassifierSpec, width=4, feature_dim=4, epochs=1))
        store = Store()
        rows = [run(RunConfig(**TINY_CONFIG, seed=seed), store) for seed in range(3)]
        marker = tmp_path / "marker"

        class Payload:
            def __reduce__(self):
                return exec, (f"open({str(marker)!r}, 'w').write('ran')",)

        (bench_home / rows[0].artifacts / "reconstruction.pt").unlink()
        (bench_home / rows[1].artifacts / "reconstruction.pt").write_bytes(pickle.dumps(Payload()))
        result = invoke("score", "--json")
        assert result.exit_code == 0, result.output
        assert not marker.exists()
        text = flat(result.output)
        assert f"skipping run {rows[0].run_id}: its reconstruction file" in text and "is missing" in text
        assert f"skipping run {rows[1].run_id}" in text and "unreadable" in text
        report = json.loads(result.stdout)
        assert [r["n_runs"] for r in report] == [1]


# -- (8) exit codes and messages of the reading commands --------------------------------------------


class TestReadingCommands:
    def test_runs_with_a_bogus_status_or_limit_exits_2(self, bench_home):
        for args, message in ((["--status", "bogus"], "--status must be one of ok, failed, unsupported"),
                              (["--limit", "0"], "--limit"), (["--limit", "-5"], "--limit")):
            result = invoke("runs", *args)
            assert result.exit_code == 2 and message in flat(result.output), result.output

    @pytest.mark.parametrize("command", [["runs"], ["score"], ["ledger", "verify", "some-run"]])
    def test_a_named_store_that_does_not_exist_is_an_error_and_is_not_created(self, tmp_path, command):
        path = tmp_path / "new" / "store.sqlite"
        result = invoke(*command, "--store", path)
        assert result.exit_code == 2 and "no results store at" in flat(result.output), result.output
        assert not path.exists() and not path.parent.exists()

    def test_the_default_store_is_not_created_by_reading_it(self, bench_home):
        result = invoke("runs")
        assert result.exit_code == 0 and "no runs stored yet" in result.output
        assert invoke("score").exit_code == 0
        assert not bench_home.exists()


class TestOptionalCachesAreOptional:
    @pytest.mark.parametrize("cache", ["targets", "datasets"])
    def test_a_cache_that_cannot_be_written_is_a_warning(self, bench_home, cache):
        (bench_home / "cache").mkdir(parents=True)
        (bench_home / "cache" / cache).write_text("a file where the cache folder should be")
        result = invoke("run", *TINY)
        assert result.exit_code == 0, result.output
        assert "warning" in result.output and "continuing without" in flat(result.output)
        assert "Traceback" not in result.output
        shutil.rmtree(bench_home / "cache")


def test_store_error_messages_name_the_path(tmp_path):
    path = tmp_path / "x.sqlite"
    _garbage(path)
    with pytest.raises(StoreError, match="corrupt or not a SQLite database") as info:
        Store(path)
    assert str(path) in str(info.value)
