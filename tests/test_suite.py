"""bench suite: spec checks, the two-stage plan, resume after SIGKILL, Dask, concurrent writers, failures."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from privbench.cli import app
from privbench.suite import spec as speclib

runner = CliRunner()
BENCH = [sys.executable, "-c", "from privbench.cli import entrypoint; entrypoint()"]

TINY = """
[suite]
name = "tiny"
seeds = "0-3"

[run]
dataset = "synthetic-mri"
image_size = 16
target_seed = 0
split = {{ members = 64, nonmembers = 64, auxiliary = 64 }}
[run.budget]
max_grad_evals = {evals}

[[defenses]]
name = "none"
models = ["lenet"]
params = {{ epochs = 1 }}

[[defenses]]
name = "dp"
models = ["lenet"]
params = {{ epochs = 1 }}
grid = {{ epsilon = [8.0, inf] }}

[[attacks]]
name = "dlg"

[[attacks]]
name = "loss-threshold"
"""
GRID = 3 * 2 * 4  # defense configurations x attacks x seeds


def _spec(tmp_path: Path, text: str = TINY, evals: int = 20, name: str = "tiny.toml") -> Path:
    path = tmp_path / name
    path.write_text(text.format(evals=evals))
    return path


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "PRIVBENCH_HOME": str(home), "PRIVBENCH_THREADS": "1"}


def _rows(home: Path) -> list[sqlite3.Row]:
    conn = sqlite3.connect(home / "privbench.sqlite")
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("SELECT * FROM runs").fetchall()
    finally:
        conn.close()


def _bench(*args: str, home: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*BENCH, *args], env=_env(home), capture_output=True,
                          text=True, timeout=600, **kwargs)


# -- specs ---------------------------------------------------------------------------------------------


def test_spec_expands_grid_with_rules_and_seed_ranges(tmp_path):
    text = TINY + """
[[attacks]]
name = "dlg-mple"

[[exclude]]
defense = "dp"
attack = "loss-threshold"

[[only]]
attack = "dlg-mple"
defense = "mple"
"""
    spec = speclib.load(_spec(tmp_path, text))
    pairs = {(j.config.defense, j.config.attack) for j in spec.jobs}
    assert pairs == {("none", "dlg"), ("none", "loss-threshold"), ("dp", "dlg")}
    assert sorted({j.config.seed for j in spec.jobs}) == [0, 1, 2, 3]
    assert len(spec.jobs) == (1 * 2 + 2 * 1) * 4
    assert speclib.parse_seeds(["0-2", 5, "7"]) == [0, 1, 2, 5, 7]


def test_run_grid_crosses_protocol_settings_and_rules_can_name_them(tmp_path):
    text = TINY.replace("[run.budget]", "[run.grid]\nvictim_batch = [1, 4]\nbn_mode = [\"train\", \"eval\"]\n"
                        "[run.budget]") + """
[[exclude]]
bn_mode = "eval"
victim_batch = 4
"""
    spec = speclib.load(_spec(tmp_path, text))
    settings = {(j.config.victim_batch, j.config.bn_mode) for j in spec.jobs}
    assert settings == {(1, "train"), (4, "train"), (1, "eval")}
    assert len(spec.jobs) == GRID * 3
    bad = text.replace("bn_mode = [", "bn_mod = [")
    with pytest.raises(speclib.SpecError, match="Did you mean 'bn_mode'"):
        speclib.load(_spec(tmp_path, bad, name="bad.toml"))


BAD_SPECS = {
    "unknown defense": (('name = "dp"\nmodels', 'name = "dpp"\nmodels'), "'dp'"),
    "unknown parameter": (("params = { epochs = 1 }\n\n[[defenses]]", "params = { epocs = 1 }\n\n[[defenses]]"),
                          "Did you mean 'epochs'"),
    "ill-typed value": (("grid = { epsilon = [8.0, inf] }", 'grid = { epsilon = [8.0, "lots"] }'), "epsilon"),
    "empty grid": (('[[attacks]]\nname = "dlg"\n\n[[attacks]]\nname = "loss-threshold"\n', ""), "grid is empty"),
    "bad seed range": (('seeds = "0-3"', 'seeds = "5-2"'), "runs backwards"),
    "TOML syntax error": (('seeds = "0-3"', 'seeds = "0-3'), "not valid TOML"),
    "unknown key": (("target_seed = 0", "target_sed = 0"), "Did you mean 'target_seed'"),
    "empty list": (('seeds = "0-3"', "seeds = []"), "seeds is empty"),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_malformed_spec_exits_2_naming_file_and_fault_and_runs_nothing(case, tmp_path, bench_home):
    (old, new), message = BAD_SPECS[case]
    text = TINY.format(evals=20)
    assert old in text
    path = tmp_path / "bad.toml"
    path.write_text(text.replace(old, new))
    result = runner.invoke(app, ["suite", str(path), "--jobs", "1"])
    output = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert str(path) in output and message in output, output
    assert not (bench_home / "privbench.sqlite").exists()  # nothing ran, nothing was stored


def test_line_of_the_fault_is_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(TINY.format(evals=20).replace('name = "dlg"', 'name = "dgl"'))
    with pytest.raises(speclib.SpecError, match=r"bad\.toml, line \d+: .*'dgl'.*Did you mean 'dlg'"):
        speclib.load(path)


def test_jobs_times_threads_may_not_oversubscribe(tmp_path, bench_home):
    result = runner.invoke(app, ["suite", str(_spec(tmp_path)), "--jobs", str(os.cpu_count() or 1),
                                 "--threads", "2"])
    assert result.exit_code == 2 and "oversubscribe" in result.output


# -- running ---------------------------------------------------------------------------------------------


def test_dry_run_counts_jobs_stored_and_targets(tmp_path, bench_home):
    result = runner.invoke(app, ["suite", str(_spec(tmp_path)), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"{GRID} jobs, 0 stored, {GRID} to run (12 of them in 3 cell jobs); 3 distinct targets, 3 to train" \
        in result.output
    assert not _rows(bench_home)  # the store exists, holding nothing


@pytest.mark.slow
def test_sigkill_of_the_coordinator_then_rerun_completes_the_grid_once(tmp_path):
    """Kill -9 mid-suite, rerun: every job stored once, no staging folder left, no target trained twice."""
    home = tmp_path / "home"
    spec = _spec(tmp_path, evals=300)
    process = subprocess.Popen([*BENCH, "suite", str(spec), "--jobs", "2"],
                               env=_env(home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        stored = len(_rows(home)) if (home / "privbench.sqlite").exists() else 0
        if stored >= 4:
            break
        assert process.poll() is None, "the suite ended before it could be killed"
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = len(_rows(home))
    assert 4 <= killed_at < GRID
    time.sleep(2.5)  # the workers notice their coordinator is gone and exit
    cache = home / "cache" / "targets"
    trained = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.glob("*.pt")}

    again = _bench("suite", str(spec), "--jobs", "2", "--json", home=home)
    assert again.returncode == 0, again.stderr
    rows = _rows(home)
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == GRID == len(rows)  # no lost and no duplicated row
    assert len({r["request_key"] for r in ok}) == GRID
    leftovers = [p.name for p in (home / "artifacts").iterdir() if p.name.startswith((".staging-", ".new-"))]
    assert leftovers == []
    for name, identity in trained.items():  # a target trained before the kill is not trained again
        path = cache / name
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == identity
    import json

    for row in ok:  # every attack job loaded its target: the fit jobs alone trained them
        assert json.loads(row["info_json"])["target"]["cached"] is True
    rerun = _bench("suite", str(spec), "--jobs", "2", "--json", home=home)
    assert rerun.returncode == 0 and f'"stored_before": {GRID}' in rerun.stdout and '"ok": 0' in rerun.stdout


def _metrics(home: Path) -> dict[str, dict]:
    import json

    volatile = ("time", "seconds")
    return {r["request_key"]: {k: v for k, v in json.loads(r["metrics_json"]).items()
                               if not any(word in k for word in volatile)} for r in _rows(home)}


@pytest.mark.slow
def test_dask_cluster_gives_the_rows_of_local_workers(tmp_path):
    distributed = pytest.importorskip("distributed")
    spec = _spec(tmp_path, evals=40)
    local = tmp_path / "local"
    done = _bench("suite", str(spec), "--jobs", "2", home=local)
    assert done.returncode == 0, done.stderr
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  env={"PRIVBENCH_HOME": str(tmp_path / "dask"), "PRIVBENCH_THREADS": "1"}) as cluster:
        remote = _bench("suite", str(spec), "--scheduler", cluster.scheduler_address, home=tmp_path / "dask")
    assert remote.returncode == 0, remote.stderr
    ours, theirs = _metrics(local), _metrics(tmp_path / "dask")
    assert len(ours) == GRID and ours.keys() == theirs.keys()
    for key, metrics in ours.items():
        assert metrics.keys() == theirs[key].keys()
        for name, value in metrics.items():
            other = theirs[key][name]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert value == pytest.approx(other, rel=1e-6, abs=1e-9, nan_ok=True), (key, name)
            else:
                assert value == other, (key, name)
    artifacts = [p for p in (tmp_path / "dask" / "artifacts").iterdir() if not p.name.startswith(".")]
    assert len(artifacts) == GRID and all(any(p.iterdir()) for p in artifacts)  # artifact files came back too


@pytest.mark.slow
def test_four_concurrent_bench_runs_lose_no_row(tmp_path):
    home = tmp_path / "home"
    common = ["run", "--dataset", "synthetic-mri", "--image-size", "16", "--model", "lenet", "--attack", "dlg",
              "--max-grad-evals", "30", "--members", "64", "--nonmembers", "64", "--auxiliary", "64", "--quiet"]
    processes = [subprocess.Popen([*BENCH, *common, "--seed", str(seed)],
                                  env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for seed in range(4)]
    for process in processes:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
    rows = _rows(home)
    assert sorted(r["seed"] for r in rows if r["status"] == "ok") == [0, 1, 2, 3]


def test_a_failing_job_is_stored_as_failed_and_the_suite_goes_on(tmp_path, bench_home):
    text = TINY.replace('[[attacks]]\nname = "loss-threshold"', '[[attacks]]\nname = "shadow"\nparams = {{ shadows = 8 }}')
    text = text.replace('grid = {{ epsilon = [8.0, inf] }}', 'grid = {{ epsilon = [inf] }}').replace('"0-3"', '"0"')
    spec = _spec(tmp_path, text)
    result = runner.invoke(app, ["suite", str(spec), "--jobs", "1"])
    assert result.exit_code == 1, result.output
    rows = _rows(bench_home)
    statuses = sorted((r["attack"], r["status"]) for r in rows)
    assert statuses == [("dlg", "ok"), ("dlg", "ok"), ("shadow", "failed"), ("shadow", "failed")]
    assert "8 shadows need at least" in " ".join(result.output.split())  # the first error line, in the summary
    again = runner.invoke(app, ["suite", str(spec), "--jobs", "1", "--json"])
    assert again.exit_code == 1 and '"stored_before": 2' in again.output  # failed jobs are retried, ok ones not


def test_rows_record_the_suites_they_serve(tmp_path, bench_home):
    from privbench.store import Store

    spec = _spec(tmp_path, TINY.replace('"0-3"', '"0"').replace("grid = {{ epsilon = [8.0, inf] }}",
                                                                 "grid = {{ epsilon = [inf] }}"))
    assert runner.invoke(app, ["suite", str(spec), "--jobs", "1"]).exit_code == 0
    other = _spec(tmp_path, TINY.replace('name = "tiny"', 'name = "other"').replace('"0-3"', '"0"')
                  .replace("grid = {{ epsilon = [8.0, inf] }}", "grid = {{ epsilon = [inf] }}"), name="other.toml")
    assert runner.invoke(app, ["suite", str(other), "--jobs", "1"]).exit_code == 0
    store = Store(bench_home / "privbench.sqlite")
    first, second = speclib.load(spec), speclib.load(other)
    assert first.spec_hash != second.spec_hash
    ids = store.suite_run_ids(first.spec_hash)
    assert len(ids) == 4 and sorted(ids) == sorted(store.suite_run_ids(second.spec_hash))  # shared, not rerun
    assert all(store.get(i).info["suite"]["name"] == "tiny" for i in ids)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _wait_for_rows(home: Path, process: subprocess.Popen, count: int) -> None:
    deadline = time.time() + 300
    while time.time() < deadline:
        if (home / "privbench.sqlite").exists() and len(_rows(home)) >= count:
            return
        assert process.poll() is None, "the suite ended before the test could interrupt it"
        time.sleep(0.2)
    raise AssertionError("the suite stored too few rows in time")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds worker processes through /proc")
def test_sigkill_of_a_worker_reruns_its_job_and_the_suite_completes(tmp_path):
    home = tmp_path / "home"
    process = subprocess.Popen([*BENCH, "suite", str(_spec(tmp_path, evals=300)), "--jobs", "2", "--json"],
                               env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_rows(home, process, 3)
    workers = [pid for pid in _children(process.pid) if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert workers
    os.kill(workers[0], signal.SIGKILL)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err  # the lost job ran again on a fresh worker
    rows = _rows(home)
    assert len(rows) == GRID and all(r["status"] == "ok" for r in rows)


@pytest.mark.slow
def test_ctrl_c_lets_running_jobs_finish_and_keeps_the_store_consistent(tmp_path):
    home = tmp_path / "home"
    spec = _spec(tmp_path, evals=300)
    process = subprocess.Popen([*BENCH, "suite", str(spec), "--jobs", "2"], env=_env(home),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_rows(home, process, 3)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 130, err
    assert "rerun the same command" in err
    stored = _rows(home)
    assert 3 <= len(stored) < GRID and all(r["status"] == "ok" for r in stored)
    assert not [p for p in (home / "artifacts").iterdir() if p.name.startswith((".staging-", ".new-"))]
    again = _bench("suite", str(spec), "--jobs", "2", home=home)
    assert again.returncode == 0 and len(_rows(home)) == GRID


@pytest.mark.slow
def test_sigterm_stops_a_background_suite_as_ctrl_c_does(tmp_path):
    home = tmp_path / "home"
    spec = _spec(tmp_path, evals=300)
    # started as a shell's background job is: SIGINT ignored, so only SIGTERM can stop it gracefully
    process = subprocess.Popen([*BENCH, "suite", str(spec), "--jobs", "2", "--batch-victims", "0"], env=_env(home),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    _wait_for_rows(home, process, 3)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 130, err
    stored = _rows(home)
    assert 3 <= len(stored) < GRID and all(r["status"] == "ok" for r in stored)
    assert not [p for p in (home / "artifacts").iterdir() if p.name.startswith((".staging-", ".new-"))]
    again = _bench("suite", str(spec), "--jobs", "2", home=home)
    assert again.returncode == 0 and len(_rows(home)) == GRID


def test_rules_about_models_see_the_defense_default_architecture(tmp_path):
    text = TINY.replace('models = ["lenet"]\nparams = {{ epochs = 1 }}\n\n[[defenses]]\nname = "dp"\nmodels = ["lenet"]',
                        'models = ["lenet"]\nparams = {{ epochs = 1 }}\n\n[[defenses]]\nname = "dp"')
    assert 'name = "dp"\nparams' in text
    spec = speclib.load(_spec(tmp_path, text + '\n[[only]]\nattack = "dlg"\nmodel = "lenet"\n'))
    assert {(j.config.defense, j.config.attack) for j in spec.jobs} >= {("dp", "dlg")}  # dp's default is lenet


# -- cells: the victims of one target in one batched job ----------------------------------------------------

CELLS = TINY.replace('name = "tiny"', 'name = "cells"').replace('"0-3"', '"0-5"').replace("""[[defenses]]
name = "dp"
models = ["lenet"]
params = {{ epochs = 1 }}
grid = {{ epsilon = [8.0, inf] }}

""", "")  # none x {dlg, loss-threshold} x seeds 0-5


def test_a_cells_victims_run_as_one_job_with_the_rows_of_bench_run_seeds(tmp_path, bench_home):
    spec = _spec(tmp_path, CELLS, evals=30)
    dry = runner.invoke(app, ["suite", str(spec), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "12 jobs, 0 stored, 12 to run (6 of them in 1 cell jobs)" in dry.output
    assert "none[epochs=1] x dlg synthetic-mri/lenet seeds 0-5 (cell of 6)" in dry.output
    result = runner.invoke(app, ["suite", str(spec), "--jobs", "1", "--json"])
    assert result.exit_code == 0, result.output
    rows = [r for r in _rows(bench_home) if r["attack"] == "dlg"]
    assert sorted(r["seed"] for r in rows) == list(range(6)) and all(r["status"] == "ok" for r in rows)
    cells = [json.loads(r["info_json"])["cell"] for r in rows]
    assert len({c["id"] for c in cells}) == 1 and sorted(c["index"] for c in cells) == list(range(6))
    assert all(c["batch_size"] == 6 and c["cell_size"] == 6 for c in cells)
    assert all(json.loads(r["info_json"])["suite"]["name"] == "cells" for r in rows)
    # the rows are the ones bench run --seeds computes: same request keys, so it serves them from the store
    served = runner.invoke(app, ["run", "--dataset", "synthetic-mri", "--image-size", "16", "--model", "lenet",
                                 "--attack", "dlg", "--defense-param", "epochs=1", "--members", "64",
                                 "--nonmembers", "64", "--auxiliary", "64", "--max-grad-evals", "30",
                                 "--target-seed", "0", "--seeds", "0-5"])
    assert served.exit_code == 0, served.output
    assert "6 served from the store" in served.output
    again = runner.invoke(app, ["suite", str(spec), "--jobs", "1", "--json"])
    assert again.exit_code == 0 and '"stored_before": 12' in again.output


def test_without_batching_or_for_other_attacks_there_is_one_job_per_row(tmp_path, bench_home):
    spec = _spec(tmp_path, CELLS, evals=30)
    off = runner.invoke(app, ["suite", str(spec), "--dry-run", "--batch-victims", "0"])
    assert off.exit_code == 0 and "12 jobs, 0 stored, 12 to run;" in off.output
    assert "seeds 0-5" not in off.output and "dlg synthetic-mri/lenet seed 3" in off.output
    on = runner.invoke(app, ["suite", str(spec), "--dry-run"])
    assert "loss-threshold synthetic-mri/lenet seed 3" in on.output  # membership attacks do not batch victims
    bad = runner.invoke(app, ["suite", str(spec), "--batch-victims", "-1"])
    assert bad.exit_code == 2 and "--batch-victims" in bad.output


def test_fewer_cells_than_workers_are_split_so_every_worker_has_a_share(tmp_path, bench_home):
    from privbench.store import Store
    from privbench.suite import plan as planlib

    spec = speclib.load(_spec(tmp_path, CELLS, evals=30))
    store = Store(bench_home / "privbench.sqlite")
    one = planlib.make(spec, store, None, bench_home / "cache", batch_victims=64, workers=1)
    two = planlib.make(spec, store, None, bench_home / "cache", batch_victims=64, workers=2)
    small = planlib.make(spec, store, None, bench_home / "cache", batch_victims=4, workers=1)
    assert [len(c.jobs) for c in one.cells] == [6] and [len(c.jobs) for c in two.cells] == [3, 3]
    assert [c.indices for c in two.cells] == [(0, 1, 2), (3, 4, 5)] and len({c.cell_id for c in two.cells}) == 1
    assert [len(c.jobs) for c in small.cells] == [4, 2]
    assert len(one.attacks) == len(two.attacks) == 6  # loss-threshold: one job per row
