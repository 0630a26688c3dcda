"""Fault injection over the ``bench`` command line: bad input, hostile and damaged files, read-only and full
disks, concurrent writers, killed runs, hostile names.

Every case runs ``python -m privbench.cli ...`` in a subprocess with its own ``PRIVBENCH_HOME`` (a copy of a
home that already holds one stored run) and tiny settings, then checks what a user would: the exit code,
whether a traceback was printed, and whether anything was lost (stored rows still readable, a finished
result stored or kept where the message says, no orphan staging folder, a file it refused left as it was,
outside text printed whole). It prints one table row per case and exits 1 if any row is not as expected.

    python benchmarks/faults/run_faults.py [--only SUBSTRING] [--keep]

Read-only files are made with ``chattr +i`` when running as root (``chmod`` does not stop root), else
``chmod``; a full disk at the final write is a file-size limit (``RLIMIT_FSIZE``) on the run's process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

TINY = ["--image-size", "16", "--attack-param", "steps=3", "--attack-param", "restarts=1",
        "--defense-param", "epochs=1"]
HOSTILE_TEXT = ["[/i]", "[red]x[/red]", ":smile:", "end\\"]


@dataclass
class Outcome:
    code: int
    output: str
    nothing_lost: bool
    note: str = ""


class Home:
    """One case's PRIVBENCH_HOME (a copy of the baseline home) and how to run ``bench`` in it."""

    def __init__(self, root: Path, baseline: Path, baseline_id: str):
        self.root = root
        self.path = root / "home"
        shutil.copytree(baseline, self.path, symlinks=True)
        self.baseline_id = baseline_id
        self.store = self.path / "privbench.sqlite"

    def env(self, **extra: str) -> dict[str, str]:
        env = {**os.environ, "PRIVBENCH_HOME": str(self.path), "PRIVBENCH_THREADS": "1", "COLUMNS": "250"}
        env.pop("PRIVBENCH_STORE_MIN_FREE_MB", None)
        env.update(extra)
        return env

    def bench(self, *args: object, env: dict[str, str] | None = None, preexec: Callable[[], None] | None = None,
              timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "privbench.cli", *map(str, args)], capture_output=True,
                              text=True, env=env or self.env(), preexec_fn=preexec, timeout=timeout,
                              cwd=self.root)

    def popen(self, *args: object) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "privbench.cli", *map(str, args)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=self.env(), cwd=self.root)

    # -- what "nothing lost" checks --------------------------------------------------------------------
    def rows(self, status: str | None = None) -> list[dict]:
        with contextlib.closing(sqlite3.connect(self.store)) as conn:
            conn.row_factory = sqlite3.Row
            sql = "SELECT run_id, status, request_key, artifacts FROM runs" + (" WHERE status = ?" if status else "")
            return [dict(r) for r in conn.execute(sql, (status,) if status else ())]

    def staging(self) -> list[Path]:
        return sorted((self.path / "artifacts").glob(".staging-*"))

    def intact(self) -> bool:
        """The baseline run is still stored, ok and readable, with its artifacts, and no staging folder is left."""
        try:
            rows = {r["run_id"]: r for r in self.rows()}
        except sqlite3.Error:
            return False
        base = rows.get(self.baseline_id)
        return bool(base and base["status"] == "ok" and (self.path / base["artifacts"]).is_dir()
                    and not self.staging())


def _out(proc: subprocess.CompletedProcess) -> str:
    return (proc.stdout or "") + (proc.stderr or "")


def _flat(text: str) -> str:
    return " ".join(text.split())


@contextlib.contextmanager
def read_only(path: Path):
    mode = path.stat().st_mode
    immutable = os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
    if not immutable:
        path.chmod(mode & ~0o222)
    try:
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        else:
            path.chmod(mode)


EnvFor = Callable[["Home"], dict[str, str]]


def bad_input(*args: object, env: dict[str, str] | EnvFor | None = None, expect_text: str = ""
              ) -> Callable[[Home], Outcome]:
    """A command that stores nothing (it exits 2 before computing, unless ``EXPECTED_EXIT`` says otherwise):
    the baseline intact and ``expect_text`` in its output. ``env``: extra variables, or a function of the
    case's home that gives them."""
    def case(home: Home) -> Outcome:
        before = len(home.rows())
        extra = env(home) if callable(env) else (env or {})
        proc = home.bench(*args, env=home.env(**extra))
        text = _out(proc)
        named = expect_text in _flat(text)
        return Outcome(proc.returncode, text, home.intact() and len(home.rows()) == before and named,
                       "" if named else f"message lacks {expect_text!r}")
    return case


# -- (4) parameters -----------------------------------------------------------------------------------

PARAMETER_CASES = {
    "attack lr=inf": bad_input("run", *TINY, "--attack-param", "lr=inf", expect_text="'lr' must be finite"),
    "attack tv_weight=nan": bad_input("run", *TINY, "--attack-param", "tv_weight=nan", expect_text="not NaN"),
    "attack lr=nan": bad_input("run", *TINY, "--attack-param", "lr=nan", expect_text="'lr' must be a number"),
    "attack lr=1e400 (overflows to inf)": bad_input("run", *TINY, "--attack-param", "lr=1e400",
                                                    expect_text="'lr' must be finite"),
    "attack steps=0": bad_input("run", *TINY, "--attack-param", "steps=0", expect_text="'steps' must be in"),
    "defense epochs=-1": bad_input("run", *TINY, "--defense-param", "epochs=-1", expect_text="'epochs'"),
    "dp epsilon=nan": bad_input("run", "--defense", "dp", *TINY, "--defense-param", "epsilon=nan",
                                expect_text="'epsilon'"),
    "he clients=0": bad_input("run", "--defense", "he", "--defense-param", "clients=0", expect_text="'clients'"),
    "model width=1e30": bad_input("run", *TINY, "--model-param", "width=" + "1" + "0" * 30, expect_text="'width'"),
    "--image-size 100000": bad_input("run", *TINY[2:], "--image-size", "100000", expect_text="image_size"),
    "--max-grad-evals 0": bad_input("run", *TINY, "--max-grad-evals", "0", expect_text="max_grad_evals"),
    "--seed 99999999999999999999": bad_input("run", *TINY, "--seed", "99999999999999999999",
                                             expect_text="seed must be an integer in [0, 2^63 - 1]"),
    "--victim-batch 0": bad_input("run", *TINY, "--victim-batch", "0", expect_text="victim_batch"),
    "--members 0": bad_input("run", *TINY, "--members", "0", expect_text="members"),
    "--threads 0": bad_input("run", *TINY, "--threads", "0", expect_text="--threads"),
    "--threads -2": bad_input("run", *TINY, "--threads", "-2", expect_text="--threads"),
    "PRIVBENCH_THREADS=abc": bad_input("run", *TINY, env={"PRIVBENCH_THREADS": "abc"},
                                       expect_text="PRIVBENCH_THREADS='abc'"),
}


# -- (2) (3) (8) the store ---------------------------------------------------------------------------------


def _hostile_store(plant: Callable[[Path], None], text: str) -> Callable[[Home], Outcome]:
    def case(home: Home) -> Outcome:
        store = home.root / "other.sqlite"
        plant(store)
        before = store.read_bytes()
        proc = home.bench("run", *TINY, "--seed", 5, "--store", store)
        named = text in _flat(_out(proc))
        return Outcome(proc.returncode, _out(proc), store.read_bytes() == before and named and home.intact(),
                       "" if named else f"message lacks {text!r}")
    return case


def _foreign(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, payload TEXT)")
        conn.commit()


def _old(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE runs (run_id TEXT PRIMARY KEY, created_at TEXT, status TEXT, config_json TEXT)")
        conn.commit()


def _newer(home_store: Path) -> Callable[[Path], None]:
    def plant(path: Path) -> None:
        shutil.copyfile(home_store, path)
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute("PRAGMA user_version = 99")
    return plant


def _corrupt(path: Path) -> None:
    path.write_bytes(b"SQLite format 3\x00" + os.urandom(8192))


def read_only_db(home: Home) -> Outcome:
    with read_only(home.store):
        proc = home.bench("run", *TINY, "--seed", 5)
    named = "cannot be written" in _flat(_out(proc))
    return Outcome(proc.returncode, _out(proc), home.intact() and len(home.rows()) == 1 and named)


def read_only_dir(home: Home) -> Outcome:
    with read_only(home.path):
        proc = home.bench("run", *TINY, "--seed", 5)
    named = "not writable" in _flat(_out(proc))
    return Outcome(proc.returncode, _out(proc), home.intact() and len(home.rows()) == 1 and named)


def read_only_artifacts(home: Home) -> Outcome:
    with read_only(home.path / "artifacts"):
        proc = home.bench("run", *TINY, "--seed", 5)
    named = f"{home.path / 'artifacts'} is not writable" in _flat(_out(proc))
    return Outcome(proc.returncode, _out(proc), home.intact() and len(home.rows()) == 1 and named)


def hostile_import(home: Home) -> Outcome:
    row = json.loads(home.bench("runs", "--json").stdout)[0]
    folder = home.root / "kept"
    folder.mkdir()
    (folder / "result.json").write_text(json.dumps({**row, "run_id": "../../outside"}))
    proc = home.bench("import", folder)
    named = "not a run id" in _flat(_out(proc))
    return Outcome(proc.returncode, _out(proc), named and home.intact() and len(home.rows()) == 1
                   and (folder / "result.json").is_file())


def low_free_space(home: Home) -> Outcome:
    free_mb = shutil.disk_usage(home.path).free // 2**20
    proc = home.bench("run", *TINY, "--seed", 5, env=home.env(PRIVBENCH_STORE_MIN_FREE_MB=str(free_mb + 1024)))
    named = "privbench keeps a margin" in _flat(_out(proc))
    return Outcome(proc.returncode, _out(proc), home.intact() and len(home.rows()) == 1 and named)


def _limit_file_size(limit: int) -> Callable[[], None]:
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def disk_full_at_final_write(home: Home) -> Outcome:
    """The database cannot grow when the row is inserted: the result must be kept and importable."""
    proc = home.bench("run", *TINY, "--seed", 6, preexec=_limit_file_size(home.store.stat().st_size))
    text = _flat(_out(proc))
    kept = home.staging()
    ok = (len(kept) == 1 and (kept[0] / "result.json").is_file() and f"bench import {kept[0]}" in text
          and len(home.rows()) == 1)
    return Outcome(proc.returncode, _out(proc), ok, "" if ok else "result not kept where the message says")


def import_kept_result(home: Home) -> Outcome:
    first = home.bench("run", *TINY, "--seed", 6, preexec=_limit_file_size(home.store.stat().st_size))
    kept = home.staging()
    if first.returncode != 2 or len(kept) != 1:
        return Outcome(first.returncode, _out(first), False, "setup: the write did not fail as planned")
    proc = home.bench("import", kept[0])
    rows = home.rows("ok")
    return Outcome(proc.returncode, _out(proc), home.intact() and len(rows) == 2
                   and all((home.path / r["artifacts"] / "reconstruction.png").is_file() for r in rows))


def next_run_imports_kept_result(home: Home) -> Outcome:
    first = home.bench("run", *TINY, "--seed", 6, preexec=_limit_file_size(home.store.stat().st_size))
    if first.returncode != 2 or len(home.staging()) != 1:
        return Outcome(first.returncode, _out(first), False, "setup: the write did not fail as planned")
    proc = home.bench("run", *TINY, "--seed", 6, "--json")
    cached = proc.returncode == 0 and json.loads(proc.stdout)["cached"]  # stored from the kept result, not recomputed
    return Outcome(proc.returncode, _out(proc), home.intact() and len(home.rows("ok")) == 2 and cached)


def killed_mid_run(home: Home) -> Outcome:
    """SIGKILL while the attack runs (its staging folder is orphaned), then the next run cleans up and stores."""
    victim = home.popen("run", *TINY[:2], "--attack-param", "steps=300", "--attack-param", "restarts=4",
                        "--defense-param", "epochs=1", "--seed", 7)
    deadline = time.time() + 300
    while time.time() < deadline:
        line = victim.stderr.readline()
        if "stage 'attack" in line or not line:
            break
    time.sleep(0.5)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    orphaned = len(home.staging()) == 1
    proc = home.bench("run", *TINY, "--seed", 8)
    cleaned = "staging folder of a run stopped before it finished" in _flat(_out(proc))
    return Outcome(proc.returncode, _out(proc), orphaned and cleaned and home.intact() and len(home.rows("ok")) == 2,
                   "" if orphaned else "setup: no orphan staging folder")


def concurrent_same_config(home: Home) -> Outcome:
    procs = [home.popen("run", *TINY, "--seed", 9, "--json") for _ in range(3)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = [p.returncode for p in procs]
    ids = {json.loads(o[0])["run_id"] for o, c in zip(outs, codes, strict=True) if c == 0}
    rows = home.rows("ok")
    output = "\n".join(o[0] + o[1] for o in outs)
    return Outcome(max(codes), output, home.intact() and len(rows) == 2 and len(ids) == 1,
                   f"exit codes {codes}")


def force_supersedes(home: Home) -> Outcome:
    proc = home.bench("run", *TINY, "--force")
    statuses = sorted(r["status"] for r in home.rows())
    return Outcome(proc.returncode, _out(proc), statuses == ["ok", "superseded"] and not home.staging())


STORE_CASES = {
    "read-only database file": read_only_db,
    "read-only store folder": read_only_dir,
    "read-only artifacts folder": read_only_artifacts,
    "free space below the margin": low_free_space,
    "disk full at the final write": disk_full_at_final_write,
    "bench import of the kept result": import_kept_result,
    "next run after a failed write": next_run_imports_kept_result,
    "killed mid-run, then the next run": killed_mid_run,
    "3 concurrent runs of one config": concurrent_same_config,
    "--force recomputes": force_supersedes,
    "bench import of a hostile result.json": hostile_import,
    "--store that is a folder": bad_input("run", *TINY, "--store", ".", expect_text="is a folder"),
    "store of a foreign schema": _hostile_store(_foreign, "has a 'runs' table of another layout"),
    "store of an old schema": _hostile_store(_old, "missing"),
    "corrupt database": _hostile_store(_corrupt, "is corrupt or not a SQLite database"),
}


def _newer_case(home: Home) -> Outcome:
    return _hostile_store(_newer(home.store), "written by a newer privbench")(home)


STORE_CASES["store of a newer schema"] = _newer_case


# -- (5) hostile names -------------------------------------------------------------------------------------


def _image_folder(root: Path) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(root / label / f"{i}.png")
    return root


def markup_folder(text: str) -> Callable[[Home], Outcome]:
    def case(home: Home) -> Outcome:
        root = _image_folder(home.root / f"data-{text}")
        proc = home.bench("run", "--dataset", f"imagefolder:{root}", *TINY)
        listing = home.bench("runs")
        literal = str(root) in _out(proc) and str(root) in listing.stdout
        code = proc.returncode or listing.returncode
        return Outcome(code, _out(proc) + _out(listing), literal and home.intact() and len(home.rows("ok")) == 2)
    return case


def markup_in_stored_error(home: Home) -> Outcome:
    from privbench.config import RunConfig
    from privbench.store import RunResult, Store

    error = "RuntimeError: [/i] boom [red]x[/red] :smile: end\\"
    Store(home.store).record(RunResult(
        run_id="20260101T000000-failed01", created_at="2026-01-01T00:00:00", status="failed",
        config=RunConfig(model="lenet").to_dict(), config_hash="h", cache_key="c-f", request_key="q-f",
        privbench_version="0", error=error))
    proc = home.bench("runs", "--status", "failed", "--json")
    again = home.bench("runs")
    return Outcome(proc.returncode or again.returncode, _out(proc) + _out(again),
                   error in json.loads(proc.stdout)[0]["error"] and "failed: 1" in again.stdout and home.intact())


MARKUP_CASES = {f"data folder named {t!r}": markup_folder(t) for t in HOSTILE_TEXT}
MARKUP_CASES.update({
    "--defense '[/x]'": bad_input("run", "--defense", "[/x]", expect_text="unknown defense '[/x]'"),
    "--attack '[red]x[/red]'": bad_input("run", "--attack", "[red]x[/red]", expect_text="'[red]x[/red]'"),
    "--store path with markup": bad_input("runs", "--store", "no/[/i]/[red]s[/red].sqlite",
                                          expect_text="no/[/i]/[red]s[/red].sqlite"),
    "markup in a stored error": markup_in_stored_error,
})


# -- (6) damaged rows and artifacts ------------------------------------------------------------------------


def garbage_row(home: Home) -> Outcome:
    second = home.bench("run", *TINY, "--seed", 3, "--json")
    second_id = json.loads(second.stdout)["run_id"]
    with contextlib.closing(sqlite3.connect(home.store)) as conn:
        conn.execute("UPDATE runs SET metrics_json = '{\"psnr\": \x01\x02garbage' WHERE run_id = ?", (second_id,))
        conn.commit()
    proc = home.bench("runs")
    named = f"skipping stored run '{second_id}'" in _flat(proc.stderr)
    return Outcome(proc.returncode, _out(proc), named and home.baseline_id in proc.stdout and home.intact())


def missing_artifact(home: Home) -> Outcome:
    second = home.bench("run", *TINY, "--seed", 3, "--json")
    second_id = json.loads(second.stdout)["run_id"]
    (home.path / "artifacts" / home.baseline_id / "reconstruction.pt").unlink()
    proc = home.bench("score", "--json")
    named = f"skipping run {home.baseline_id}" in _flat(proc.stderr)
    scored = proc.returncode == 0 and [r["n_runs"] for r in json.loads(proc.stdout)] == [1]
    with contextlib.closing(sqlite3.connect(home.store)) as conn:  # the other run's cell was scored and stored
        stored = {json.dumps(json.loads(r[0])) for r in conn.execute("SELECT run_ids_json FROM cell_scores")}
    return Outcome(proc.returncode, _out(proc), named and scored and stored == {json.dumps([second_id])})


def damaged_row_by_id(home: Home) -> Outcome:
    with contextlib.closing(sqlite3.connect(home.store)) as conn:
        conn.execute("UPDATE runs SET info_json = '[1, 2]' WHERE run_id = ?", (home.baseline_id,))
        conn.commit()
    proc = home.bench("ledger", "verify", home.baseline_id)
    named = f"stored run '{home.baseline_id}'" in _flat(_out(proc)) and "is damaged" in _flat(_out(proc))
    listing = home.bench("runs")
    return Outcome(proc.returncode, _out(proc) + _out(listing), named and listing.returncode == 0
                   and not home.staging())


DAMAGE_CASES = {
    "garbage bytes in one row": garbage_row,
    "a damaged row asked for by id": damaged_row_by_id,
    "one reconstruction.pt missing (bench score)": missing_artifact,
}


# -- (7) data folders --------------------------------------------------------------------------------------


def symlink_loop(home: Home) -> Outcome:
    root = _image_folder(home.root / "data")
    os.symlink("loop.png", root / "a" / "loop.png")
    return bad_input("run", "--dataset", f"imagefolder:{root}", *TINY, expect_text=f"{root}/a/loop.png is a "
                     "symbolic link that loops")(home)


def folder_link_loop(home: Home) -> Outcome:
    root = _image_folder(home.root / "data")
    os.symlink("..", root / "b" / "up")
    return bad_input("run", "--dataset", f"imagefolder:{root}", *TINY,
                     expect_text=f"{root}/b/up is a symbolic link to {root}")(home)


def linked_class_folder(home: Home) -> Outcome:
    source = _image_folder(home.root / "source")
    root = home.root / "data"
    root.mkdir()
    for label in ("a", "b"):
        os.symlink(source / label, root / label)
    proc = home.bench("run", "--dataset", f"imagefolder:{root}", *TINY)
    return Outcome(proc.returncode, _out(proc), home.intact() and len(home.rows("ok")) == 2)


DATA_CASES = {
    "symlink loop in a class folder": symlink_loop,
    "folder link to its own parent": folder_link_loop,
    "class folders that are links": linked_class_folder,
}


# -- (8) reading commands and optional caches ---------------------------------------------------------------


def new_store_path(home: Home) -> Outcome:
    path = home.root / "typo" / "store.sqlite"
    proc = home.bench("runs", "--store", path)
    return Outcome(proc.returncode, _out(proc), not path.parent.exists() and "no results store at" in _out(proc))


def unwritable_cache(folder: str) -> Callable[[Home], Outcome]:
    def case(home: Home) -> Outcome:
        shutil.rmtree(home.path / "cache" / folder, ignore_errors=True)
        (home.path / "cache" / folder).write_text("a file where the cache folder should be")
        proc = home.bench("run", *TINY, "--seed", 4)
        warned = "continuing without" in _flat(proc.stderr)
        return Outcome(proc.returncode, _out(proc), warned and home.intact() and len(home.rows("ok")) == 2)
    return case


def hostile_pickles_in_every_cache(home: Home) -> Outcome:
    marker = home.root / "payload-ran"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('ran')",)

    planted = [p for p in (home.path / "cache").rglob("*") if p.is_file()]
    for path in planted:
        path.write_bytes(pickle.dumps(Payload()))
    proc = home.bench("run", *TINY, "--force")
    return Outcome(proc.returncode, _out(proc), not marker.exists() and bool(planted) and not home.staging(),
                   f"{len(planted)} files planted")


MESSAGE_CASES = {
    "runs --status bogus": bad_input("runs", "--status", "bogus", expect_text="--status must be one of"),
    "runs --store NEWPATH": new_store_path,
    "runs --limit 0": bad_input("runs", "--limit", "0", expect_text="--limit"),
    "score --store NEWPATH": bad_input("score", "--store", "typo.sqlite", expect_text="no results store at"),
    "target cache not writable": unwritable_cache("targets"),
    "dataset cache not writable": unwritable_cache("datasets"),
    "malicious pickle in every cache": hostile_pickles_in_every_cache,
}

# -- (9) plugins -------------------------------------------------------------------------------------------


def _installed_plugin(root: Path, module_source: str, entry_points: dict[str, str]) -> dict[str, str]:
    """A plugin module ``broken_plugin`` installed as pip would (``privbench.testing.write_plugin_distribution``)
    in a folder of its own; returns the environment that puts it on the path. ``entry_points``: the
    ``privbench.defenses`` name -> object of the module."""
    from privbench.testing import write_plugin_distribution

    site = root / "site"
    write_plugin_distribution(site, "privbench-broken", "0.1", {"privbench.defenses": entry_points},
                              {"broken_plugin.py": module_source})
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH", "")]))}


RAISES_ON_IMPORT = "raise RuntimeError('plugin broken at import')\n"
TAKES_A_BUILT_IN_NAME = "from privbench.defenses.none import NoDefense as Impostor\n"


def plugin_case(source: str, entry_points: dict[str, str], args: list[str], expect_text: str) -> Callable[[Home], Outcome]:
    """``bad_input`` with a plugin of ``source`` and ``entry_points`` installed for the command."""
    return bad_input(*args, env=lambda home: _installed_plugin(home.root, source, entry_points),
                     expect_text=expect_text)


PLUGIN_CASES = {
    "plugin that raises on import, named": plugin_case(
        RAISES_ON_IMPORT, {"broken": "broken_plugin:Thing"},
        ["run", *TINY, "--defense", "broken"], "privbench-broken"),
    "plugin that raises on import: bench list": plugin_case(
        RAISES_ON_IMPORT, {"broken": "broken_plugin:Thing"}, ["list", "defenses"],
        "plugin broken at import"),
    "plugin that takes a built-in's name": plugin_case(
        TAKES_A_BUILT_IN_NAME, {"none": "broken_plugin:Impostor"},
        ["run", *TINY, "--defense", "none"], "privbench-broken"),
    "--no-plugins past a clashing plugin": plugin_case(
        TAKES_A_BUILT_IN_NAME, {"none": "broken_plugin:Impostor"},
        ["--no-plugins", "runs"], ""),
}


EXPECTED_EXIT = {  # everything else is bad input: exit 2
    **{name: 0 for name in ("bench import of the kept result", "next run after a failed write",
                            "killed mid-run, then the next run", "3 concurrent runs of one config", "--force recomputes",
                            "markup in a stored error", "garbage bytes in one row",
                            "one reconstruction.pt missing (bench score)", "class folders that are links",
                            "target cache not writable", "dataset cache not writable",
                            "malicious pickle in every cache", "plugin that raises on import: bench list",
                            "--no-plugins past a clashing plugin")},
    **{name: 0 for name in MARKUP_CASES if name.startswith("data folder named")},
}

GROUPS = [("parameters", PARAMETER_CASES), ("store", STORE_CASES), ("markup", MARKUP_CASES),
          ("damaged rows and artifacts", DAMAGE_CASES), ("data folders", DATA_CASES),
          ("messages and optional caches", MESSAGE_CASES), ("plugins", PLUGIN_CASES)]


def baseline_home(root: Path) -> tuple[Path, str]:
    home = root / "baseline"
    env = {**os.environ, "PRIVBENCH_HOME": str(home), "PRIVBENCH_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "privbench.cli", "run", *TINY, "--json"], capture_output=True,
                          text=True, env=env, check=False, cwd=root)
    if proc.returncode != 0:
        raise SystemExit(f"baseline run failed:\n{proc.stdout}\n{proc.stderr}")
    return home, json.loads(proc.stdout)["run_id"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run only the cases whose name contains this")
    parser.add_argument("--keep", action="store_true", help="keep the temporary homes (printed) for inspection")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="privbench-faults-"))
    rows: list[tuple[str, str, int, int, bool, bool, str]] = []
    try:
        baseline, baseline_id = baseline_home(tmp)
        n = 0
        for group, cases in GROUPS:
            for name, case in cases.items():
                if args.only and args.only not in name:
                    continue
                n += 1
                root = tmp / f"case-{n:02d}"
                root.mkdir()
                start = time.time()
                try:
                    outcome = case(Home(root, baseline, baseline_id))
                except Exception as exc:  # the harness itself failed: shown as a failed row
                    outcome = Outcome(-1, f"harness error: {type(exc).__name__}: {exc}", False)
                expect = EXPECTED_EXIT.get(name, 2)
                traceback = "Traceback (most recent call last)" in outcome.output
                rows.append((group, name, expect, outcome.code, traceback, outcome.nothing_lost, outcome.note))
                print(f"  {name}: exit {outcome.code} in {time.time() - start:.1f} s", file=sys.stderr, flush=True)
                if outcome.code != expect or traceback or not outcome.nothing_lost:
                    print(outcome.output[-3000:], file=sys.stderr)
    finally:
        if args.keep:
            print(f"homes kept in {tmp}", file=sys.stderr)
        else:
            if os.geteuid() == 0:  # in case a case stopped between chattr +i and -i
                subprocess.run(["chattr", "-R", "-i", str(tmp)], capture_output=True)
            shutil.rmtree(tmp, ignore_errors=True)
    width = max(len(r[1]) for r in rows)
    header = f"| {'case'.ljust(width)} | expected | exit | traceback | nothing lost | as expected |"
    print(header)
    print("|" + "-" * (width + 2) + "|----------|------|-----------|--------------|-------------|")
    failures = 0
    for _group, name, expect, code, traceback, lost_nothing, note in rows:
        good = code == expect and not traceback and lost_nothing
        failures += not good
        print(f"| {name.ljust(width)} | {expect:>8} | {code:>4} | {'yes' if traceback else 'no':>9} | "
              f"{'yes' if lost_nothing else 'NO':>12} | {'yes' if good else 'NO':>11} |"
              + (f"  {note}" if note and not good else ""))
    print(f"\n{len(rows)} cases, {failures} not as expected")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
