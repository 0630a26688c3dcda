"""SQLite results store (one row per run) and the per-run artifacts folder.

Location: ``--store PATH``, else ``$PRIVBENCH_HOME/privbench.sqlite``, else
``./runs/privbench.sqlite``. Artifacts live beside it in ``artifacts/<run_id>/``.
This module does not import torch.

What the store guarantees:

- **Checked before computing.** :meth:`Store.check_writable` (called by the runner before a run
  computes anything) fails with :class:`StoreError` if the folder, the artifacts folder or the
  database cannot be written, or if the disk has less free space than a margin
  (``$PRIVBENCH_STORE_MIN_FREE_MB``, default 100 MB). Opening a store checks its schema: a file that
  is not a SQLite database, a ``runs`` table of another layout, or a schema newer than this privbench
  reads is a StoreError naming the cause (nothing is modified).
- **Nothing finished is lost.** A run's artifacts are staged in ``artifacts/.staging-<run_id>/``
  together with ``result.json`` (the whole row). The row is inserted and the folder moved into place
  in one transaction. If that fails, :class:`ResultNotStored` says where the staged result is kept;
  ``bench import PATH`` (:meth:`Store.import_run`) stores it later. A staging folder holds a lock
  while its process lives; :meth:`Store.recover` (run before computing) imports the ones left with a
  complete ``result.json`` and removes those of runs killed before they finished.
- **One ok row per request.** A unique index allows one ``ok`` row per request key and per cache
  key. A run that finds an identical ok row stored meanwhile (a concurrent run of the same config)
  returns that row; ``--force`` (``replace=True``) marks the old row ``superseded`` and inserts the
  new one, so history is kept. Readers also count distinct keys.
- **Strict JSON.** Config, metrics, costs and info are stored as JSON without bare ``NaN`` or
  ``Infinity`` (SQLite's JSON functions work on every row): a non-finite float is stored as
  ``{"$float": "nan" | "inf" | "-inf"}`` and decoded back.
- **Damaged rows are skipped.** A row whose JSON or fields cannot be read is left out of every
  listing with a warning naming it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import sqlite3
import tempfile
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

Status = Literal["ok", "failed", "unsupported", "superseded"]
STATUSES: tuple[str, ...] = ("ok", "failed", "unsupported", "superseded")
SCHEMA_VERSION = 3  # PRAGMA user_version; 0: a store of an earlier privbench (same columns, no unique index); 3: suite_runs
RESULT_FILE = "result.json"
MIN_FREE_ENV = "PRIVBENCH_STORE_MIN_FREE_MB"
DEFAULT_MIN_FREE_MB = 100
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

RUN_COLUMNS = (
    "run_id", "created_at", "status", "defense", "attack", "dataset", "model", "seed", "config_hash", "cache_key",
    "request_key", "privbench_version", "config_json", "metrics_json", "costs_json", "info_json", "wall_time_s",
    "grad_evals", "error", "traceback", "artifacts",
)
SUITE_COLUMNS = ("spec_hash", "suite", "run_id", "created_at")
CELL_COLUMNS = ("cell_key", "metric", "created_at", "privbench_version", "cell_json", "score_json", "baseline_json",
                "run_ids_json")

TABLES = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    status TEXT NOT NULL,
    defense TEXT NOT NULL,
    attack TEXT NOT NULL,
    dataset TEXT NOT NULL,
    model TEXT NOT NULL,
    seed INTEGER NOT NULL,
    config_hash TEXT NOT NULL,
    cache_key TEXT NOT NULL,
    request_key TEXT NOT NULL,
    privbench_version TEXT NOT NULL,
    config_json TEXT NOT NULL,
    metrics_json TEXT NOT NULL,
    costs_json TEXT NOT NULL,
    info_json TEXT NOT NULL,
    wall_time_s REAL NOT NULL,
    grad_evals INTEGER NOT NULL,
    error TEXT,
    traceback TEXT,
    artifacts TEXT
);
CREATE INDEX IF NOT EXISTS runs_cache_key ON runs (cache_key, status);
CREATE INDEX IF NOT EXISTS runs_request_key ON runs (request_key, status);
CREATE TABLE IF NOT EXISTS cell_scores (
    cell_key TEXT NOT NULL,
    metric TEXT NOT NULL,
    created_at TEXT NOT NULL,
    privbench_version TEXT NOT NULL,
    cell_json TEXT NOT NULL,
    score_json TEXT NOT NULL,
    baseline_json TEXT,
    run_ids_json TEXT NOT NULL,
    PRIMARY KEY (cell_key, metric)
);
CREATE TABLE IF NOT EXISTS suite_runs (
    spec_hash TEXT NOT NULL,
    suite TEXT NOT NULL,
    run_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (spec_hash, run_id)
);
"""
UNIQUE_OK = """
CREATE UNIQUE INDEX IF NOT EXISTS runs_one_ok_per_request ON runs (request_key) WHERE status = 'ok';
CREATE UNIQUE INDEX IF NOT EXISTS runs_one_ok_per_cache_key ON runs (cache_key) WHERE status = 'ok';
"""


def home() -> Path:
    return Path(os.environ.get("PRIVBENCH_HOME") or Path.cwd() / "runs")


def default_store_path() -> Path:
    return home() / "privbench.sqlite"


@dataclass
class RunResult:
    """One stored run. ``config`` is the resolved config as a dict; metric values may be None (n/a)."""

    run_id: str
    created_at: str
    status: Status
    config: dict[str, Any]
    config_hash: str
    cache_key: str
    request_key: str
    privbench_version: str
    metrics: dict[str, Any] = field(default_factory=dict)
    costs: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float = 0.0
    grad_evals: int = 0
    error: str | None = None
    traceback: str | None = None
    artifacts: str | None = None  # folder, relative to the store's folder
    cached: bool = False  # served from the store rather than computed now (not stored)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StoreError(RuntimeError):
    """The store cannot be used as asked; the message names the cause and the way out (exit 2)."""


class StoreMissing(StoreError):
    """A store opened for reading does not exist (nothing was created)."""


class ResultNotStored(StoreError):
    """A finished run could not be written; ``kept`` is where its result is (``bench import`` it), or None."""

    def __init__(self, message: str, result: RunResult, kept: Path | None):
        super().__init__(message)
        self.result = result
        self.kept = kept


# -- strict JSON -------------------------------------------------------------------------------

_FLOAT_TAG = "$float"


def _encode(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return {_FLOAT_TAG: "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")}
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, str) else k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    return obj


def _decode_object(obj: dict) -> Any:
    if len(obj) == 1 and obj.get(_FLOAT_TAG) in ("nan", "inf", "-inf"):
        return float(obj[_FLOAT_TAG])
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON (no bare NaN / Infinity): non-finite floats become ``{"$float": "inf"}`` etc.; other
    values JSON cannot hold are written as their ``str``."""
    kwargs.setdefault("sort_keys", True)
    return json.dumps(_encode(obj), default=str, allow_nan=False, **kwargs)


def loads(text: str | bytes) -> Any:
    """The inverse of :func:`dumps` (also reads bare NaN / Infinity written by earlier versions)."""
    return json.loads(text, object_hook=_decode_object)



# -- validation of rows and result files -------------------------------------------------------

_TEXT = ("run_id", "created_at", "status", "config_hash", "cache_key", "request_key", "privbench_version")


def result_from_dict(data: Any) -> RunResult:
    """A RunResult from a dict (``result.json`` or a decoded row), checked field by field.

    Raises:
        ValueError: naming the first missing or ill-typed field.
    """
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    known = {f.name for f in fields(RunResult)}
    values = {k: v for k, v in data.items() if k in known and k != "cached"}
    for name in _TEXT:
        if not isinstance(values.get(name), str):
            raise ValueError(f"field {name!r} is missing or not text")
    if not RUN_ID.match(values["run_id"]):
        raise ValueError(f"run_id {values['run_id']!r} is not a run id (letters, digits, '.', '_', '-')")
    if values["status"] not in STATUSES:
        raise ValueError(f"status {values['status']!r} is not one of {', '.join(STATUSES)}")
    for name in ("config", "metrics", "costs", "info"):
        values.setdefault(name, {})
        if not isinstance(values[name], dict):
            raise ValueError(f"field {name!r} is not a JSON object")
    config = values["config"]
    for name in ("defense", "attack", "dataset", "model"):
        if not isinstance(config.get(name), str):
            raise ValueError(f"config field {name!r} is missing or not text")
    if isinstance(config.get("seed"), bool) or not isinstance(config.get("seed"), int):
        raise ValueError("config field 'seed' is missing or not an integer")
    wall = values.setdefault("wall_time_s", 0.0)
    if isinstance(wall, bool) or not isinstance(wall, (int, float)):
        raise ValueError(f"wall_time_s {wall!r} is not a number")
    values["wall_time_s"] = float(wall)
    evals = values.setdefault("grad_evals", 0)
    if isinstance(evals, bool) or not isinstance(evals, int):
        raise ValueError(f"grad_evals {evals!r} is not an integer")
    for name in ("error", "traceback", "artifacts"):
        if values.get(name) is not None and not isinstance(values[name], str):
            raise ValueError(f"field {name!r} is not text")
    return RunResult(**values)


def _from_row(row: sqlite3.Row) -> RunResult:
    data = {k: row[k] for k in RUN_COLUMNS if not k.endswith("_json")}
    for name in ("config", "metrics", "costs", "info"):
        text = row[f"{name}_json"]
        try:
            data[name] = loads(text)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"its {name}_json is not valid JSON ({exc})") from None
    return result_from_dict(data)


def _describe_row(row: sqlite3.Row) -> str:
    try:
        return f"run {row['run_id']!r}"
    except (IndexError, KeyError):
        return "a run"


# -- staging locks ---------------------------------------------------------------------------

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: staging folders are never removed automatically
    fcntl = None  # type: ignore[assignment]

_LOCK_FILE = ".lock"


def _try_lock(folder: Path) -> Any | None:
    """An exclusive lock on ``folder/.lock`` held by this process (a file object), or None if another holds it."""
    if fcntl is None:
        return None
    handle = open(folder / _LOCK_FILE, "a+b")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


def make_staging(artifacts_root: Path, run_id: str) -> tuple[Path, Any | None]:
    """``artifacts_root/.staging-<run_id>``, new and locked by this process (the lock, a file object, is
    returned; closing it or the process ending releases it). A suite's workers stage here without opening
    the store; a folder whose lock is free and that holds no ``result.json`` is removed by ``recover``."""
    path = artifacts_root / f".staging-{run_id}"
    shutil.rmtree(path, ignore_errors=True)
    # locked before it gets its name, so another process's recover() never sees it unlocked
    fresh = artifacts_root / f".new-{run_id}"
    fresh.mkdir(parents=True)
    lock = _try_lock(fresh)
    os.rename(fresh, path)
    return path, lock


def min_free_bytes() -> int:
    """The free-space margin checked before a run: ``$PRIVBENCH_STORE_MIN_FREE_MB`` (default 100) MB."""
    raw = os.environ.get(MIN_FREE_ENV, "").strip()
    if not raw:
        return DEFAULT_MIN_FREE_MB * 2**20
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise StoreError(f"{MIN_FREE_ENV}={raw!r} is not a number of megabytes >= 0")
    return int(value * 2**20)


class Store:
    """The results store at ``path`` (default :func:`default_store_path`).

    Args:
        path: the SQLite file.
        create: create the file (and its folder) if missing. Readers pass False: a missing store is then
            a :class:`StoreMissing` error and nothing is created.

    Raises:
        StoreError: the file is corrupt or not a SQLite database, holds a foreign or newer schema, or
            (creating) cannot be created.
    """

    def __init__(self, path: str | Path | None = None, *, create: bool = True):
        self.path = Path(path) if path else default_store_path()
        self.root = self.path.parent
        self.artifacts_root = self.root / "artifacts"
        self._locks: dict[Path, Any] = {}
        self._empty = False
        if self.path.is_dir():
            raise StoreError(f"the results store path {self.path} is a folder; --store takes a SQLite file "
                             f"(e.g. {self.path / 'privbench.sqlite'})")
        if not self.path.exists():
            if not create:
                raise StoreMissing(f"there is no results store at {self.path} (nothing has been stored there); "
                                   f"check --store or PRIVBENCH_HOME")
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise self._unwritable(exc) from None
        self._open(create)

    # -- opening and checks ----------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            conn.execute("PRAGMA user_version").fetchone()
        except sqlite3.OperationalError as exc:
            # a WAL store in a folder this process cannot write: SQLite cannot make its shared-memory file,
            # so the file is read as immutable (nothing can write there to change it under us)
            if os.access(self.root, os.W_OK) or not self.path.exists():
                raise self._error(exc) from None
            try:
                conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?immutable=1", uri=True, timeout=60,
                                       isolation_level=None)
            except sqlite3.Error as again:
                raise self._error(again) from None
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        conn.row_factory = sqlite3.Row
        return conn

    def _error(self, exc: BaseException) -> StoreError:
        """A StoreError naming what ``exc`` (from sqlite3 or the OS) means for this store."""
        text = str(exc)
        low = text.lower()
        if "not a database" in low or "malformed" in low or "file is encrypted" in low:
            return StoreError(
                f"the results store {self.path} is corrupt or not a SQLite database (sqlite: {text}). privbench "
                f"leaves it as it is: move it aside to start a new store there, or pass --store PATH to use another "
                f"file")
        if "readonly" in low or "read-only" in low or "unable to open" in low or isinstance(exc, PermissionError):
            return self._unwritable(exc)
        if "disk is full" in low or getattr(exc, "errno", None) == 28:
            return StoreError(f"the disk of the results store {self.path} is full ({text}); free space or pass "
                              f"--store PATH on another disk")
        if "locked" in low or "busy" in low:
            return StoreError(f"the results store {self.path} stayed locked by another process for 60 s ({text}); "
                              f"retry when it has finished")
        return StoreError(f"the results store {self.path} cannot be used: {type(exc).__name__}: {text}")

    def _unwritable(self, exc: BaseException) -> StoreError:
        return StoreError(
            f"the results store {self.path} cannot be written ({exc}). Make {self.root} and the file writable, or "
            f"pass --store PATH (or set PRIVBENCH_HOME) to a writable folder")

    def _open(self, create: bool) -> None:
        conn = self._connect()
        try:
            try:
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                version = conn.execute("PRAGMA user_version").fetchone()[0]
            except sqlite3.Error as exc:
                raise self._error(exc) from None
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"the results store {self.path} was written by a newer privbench (schema {version}; this one "
                    f"reads up to {SCHEMA_VERSION}); upgrade privbench or pass --store PATH to use another file")
            if "runs" in tables:
                self._check_columns(conn, "runs", RUN_COLUMNS)
            elif tables:
                raise StoreError(
                    f"{self.path} is a SQLite database but not a privbench results store (its tables: "
                    f"{', '.join(sorted(tables))}); pass --store PATH to use another file")
            if "cell_scores" in tables:
                self._check_columns(conn, "cell_scores", CELL_COLUMNS)
            if "suite_runs" in tables:
                self._check_columns(conn, "suite_runs", SUITE_COLUMNS)
            if not create:
                self._empty = "runs" not in tables
                return
            if "runs" not in tables or "suite_runs" not in tables or version < SCHEMA_VERSION:
                try:
                    self._create_or_migrate(conn, fresh="runs" not in tables)
                except sqlite3.Error as exc:
                    if "runs" not in tables:
                        raise self._error(exc) from None
                    # a read-only store of an earlier version stays readable; writing is checked before a run
                    log.debug("could not upgrade the schema of %s: %s", self.path, exc)
            self._use_wal(conn)
        finally:
            conn.close()

    def _use_wal(self, conn: sqlite3.Connection) -> None:
        """Write-ahead logging: readers never block the one writer and a commit is one append. Only the
        process that owns the store writes it (a suite's coordinator, or ``bench run``): SQLite's locks are
        unreliable on network filesystems, so workers on other machines never open it."""
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as exc:  # a read-only file or folder keeps its journal mode
            log.debug("could not switch %s to WAL: %s", self.path, exc)

    def _check_columns(self, conn: sqlite3.Connection, table: str, expected: tuple[str, ...]) -> None:
        found = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
        if set(found) != set(expected):
            missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
            detail = "; ".join(part for part in (f"missing {', '.join(missing)}" if missing else "",
                                                 f"unexpected {', '.join(extra)}" if extra else "") if part)
            raise StoreError(
                f"the results store {self.path} has a '{table}' table of another layout ({detail}): it was written "
                f"by another program or an incompatible privbench. Nothing was changed; pass --store PATH to use "
                f"another file")

    def _create_or_migrate(self, conn: sqlite3.Connection, fresh: bool) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in TABLES.split(";"):
                if statement.strip():
                    conn.execute(statement)
            if not fresh:  # an earlier privbench's store may hold several ok rows per key: keep the newest
                seen: set[str] = set()
                superseded = []
                for r in conn.execute("SELECT run_id, request_key, cache_key FROM runs WHERE status = 'ok' "
                                      "ORDER BY created_at DESC, rowid DESC"):
                    if r["request_key"] in seen or r["cache_key"] in seen:
                        superseded.append(r["run_id"])
                    seen.update((r["request_key"], r["cache_key"]))
                conn.executemany("UPDATE runs SET status = 'superseded' WHERE run_id = ?", [(i,) for i in superseded])
                if superseded:
                    log.warning("results store %s: %d duplicate ok row(s) of earlier runs marked superseded",
                                self.path, len(superseded))
                self._strict_json(conn)
            for statement in UNIQUE_OK.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _strict_json(conn: sqlite3.Connection) -> None:
        """Re-encode JSON that earlier versions wrote with bare NaN / Infinity (invalid for SQLite's JSON
        functions); text that is not JSON at all is left for the readers to skip."""
        for table, key, columns in (("runs", "run_id", ("config_json", "metrics_json", "costs_json", "info_json")),
                                    ("cell_scores", "rowid", ("cell_json", "score_json", "baseline_json"))):
            for column in columns:
                try:
                    rows = conn.execute(f"SELECT {key}, {column} FROM {table} WHERE {column} IS NOT NULL AND "
                                        f"NOT json_valid({column})").fetchall()
                except sqlite3.OperationalError:  # an SQLite without JSON functions: nothing to keep working
                    return
                for row_key, text in rows:
                    try:
                        fixed = dumps(loads(text))
                    except (TypeError, ValueError):
                        continue
                    conn.execute(f"UPDATE {table} SET {column} = ? WHERE {key} = ?", (fixed, row_key))

    def check_writable(self) -> None:
        """Check, before a run computes, that its result can be stored here.

        The store's folder and ``artifacts/`` must accept new files, the database must accept a write
        transaction, and the disk must have at least :func:`min_free_bytes` free.

        Raises:
            StoreError: naming which of these fails and the way out.
        """
        for folder in (self.root, self.artifacts_root):
            probe = folder / f".probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                folder.mkdir(parents=True, exist_ok=True)
                with open(probe, "xb"):
                    pass
                probe.unlink()
            except OSError as exc:
                raise StoreError(
                    f"the results store folder {folder} is not writable ({exc}); a run's result could not be "
                    f"stored there. Make it writable, or pass --store PATH (or set PRIVBENCH_HOME) to a writable "
                    f"folder") from None
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")  # a real write into the journal, rolled back
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            conn.close()
        need = min_free_bytes()
        try:
            free = shutil.disk_usage(self.root).free
        except OSError as exc:
            raise StoreError(f"cannot read the free space of {self.root}: {exc}") from None
        if free < need:
            raise StoreError(
                f"only {free / 2**20:.1f} MB free on the disk of the results store {self.root}; privbench keeps a "
                f"margin of {need / 2**20:.0f} MB so that a finished run can be stored. Free space, pass --store PATH "
                f"on another disk, or lower the margin with {MIN_FREE_ENV}")

    # -- artifacts and staging ---------------------------------------------------------------------
    def staging_dir(self, run_id: str) -> Path:
        """A scratch folder for a run's artifacts, locked while this process lives; ``record`` moves it into place."""
        path, lock = make_staging(self.artifacts_root, run_id)
        if lock is not None:
            self._locks[path] = lock
        return path

    def release(self, staging: Path | None, *, remove: bool = False) -> None:
        """Release this process's lock on ``staging`` (and remove the folder if ``remove``)."""
        if staging is None:
            return
        lock = self._locks.pop(Path(staging), None)
        if remove:
            shutil.rmtree(staging, ignore_errors=True)
        if lock is not None:
            lock.close()

    def recover(self) -> list[str]:
        """Deal with the staging folders of processes that ended without finishing their write.

        A folder whose process still lives (it holds the folder's lock) is left alone. A folder with a
        complete ``result.json`` (the run finished but its write failed or was killed) is imported; one
        without (the run was killed while computing) is removed. Returns one line per folder handled;
        each is also logged as a warning.
        """
        done: list[str] = []
        try:
            folders = sorted(p for p in self.artifacts_root.glob(".staging-*") if p.is_dir() and not p.is_symlink())
        except OSError:
            return done
        folders = [f for f in folders if f not in self._locks]
        if not folders:
            return done
        try:
            self.check_writable()
        except StoreError as exc:  # a read-only store: its staging folders wait for a writable one
            log.debug("not recovering staging folders in %s: %s", self.artifacts_root, exc)
            return done
        for folder in folders:
            try:
                lock = _try_lock(folder)
            except OSError as exc:
                log.warning("cannot inspect staging folder %s (%s); left in place", folder, exc)
                continue
            if lock is None:
                continue  # its process is still running (or locks are unavailable here)
            try:
                if (folder / RESULT_FILE).is_file():
                    row = self.import_run(folder)
                    done.append(f"stored the result of run {row.run_id} that an earlier process left in {folder}")
                else:
                    shutil.rmtree(folder)
                    done.append(f"removed {folder}: the staging folder of a run stopped before it finished "
                                f"(nothing of it was stored)")
            except (StoreError, OSError) as exc:
                log.warning("could not recover staging folder %s (%s); it is left in place", folder, exc)
            finally:
                lock.close()
        for line in done:
            log.warning("%s", line)
        return done

    # -- writing -----------------------------------------------------------------------------------
    def record(self, result: RunResult, staging: Path | None = None, *, replace: bool = False) -> RunResult:
        """Insert ``result`` and move its staged artifacts into place, in one transaction.

        Before the insert the whole row is written to ``staging/result.json``, so a failed or killed
        write leaves an importable result. For an ok ``result``: if an ok row with the same request or
        cache key is stored already (a concurrent run of the same config), that row is returned (with
        ``cached`` set) and the new one dropped, unless ``replace`` (``--force``), which marks the old
        row ``superseded``.

        Raises:
            ResultNotStored: the write failed; the message says where the result is kept and how to import it.
        """
        staged = staging is not None and Path(staging).is_dir()
        folder = Path(staging) if staged else None
        if folder is not None:
            result.artifacts = str((self.artifacts_root / result.run_id).relative_to(self.root))
            self._keep(result, folder / RESULT_FILE)
        try:
            stored = self._commit(result, folder, move=True, on_conflict="supersede" if replace else "keep-old")
        except (sqlite3.Error, OSError, ValueError, StoreError) as exc:
            kept: Path | None = folder
            if folder is None or not (folder / RESULT_FILE).is_file():  # the staging folder took nothing: a temp file
                fallback = Path(tempfile.gettempdir()) / f"privbench-unstored-{result.run_id}.json"
                kept = fallback if self._keep(result, fallback) else None
            self.release(staging)  # unlocked: 'bench import' or the next run's recover() may take it now
            raise self._not_stored(result, kept, exc) from None
        if stored is not result:  # an identical ok row was stored first: it stands, this copy goes
            log.info("an identical run (%s) was stored while this one computed; keeping that row", stored.run_id)
            self.release(staging, remove=True)
        else:
            self.release(staging)
        return stored

    @staticmethod
    def _keep(result: RunResult, path: Path) -> bool:
        """Write the row to ``path`` (``result.json``) atomically; False (with a warning) if that fails."""
        from privbench.cache import atomic_write

        data = dumps(result.to_dict(), indent=1).encode()
        try:
            atomic_write(path, lambda f: f.write(data))
        except OSError as exc:
            log.warning("could not write %s (%s)", path, exc)
            return False
        return True

    def _not_stored(self, result: RunResult, kept: Path | None, exc: BaseException) -> ResultNotStored:
        cause = self._error(exc) if not isinstance(exc, StoreError) else exc
        store_opt = "" if self.path == default_store_path() else f" --store {self.path}"
        if kept is not None:
            where = (f"Nothing is lost: the result is kept in {kept}. Store it with: bench import {kept}{store_opt} "
                     f"(the next 'bench run' on this store also imports it)")
        else:
            where = "It could not be kept on disk either (see the warnings above)"
        return ResultNotStored(
            f"run {result.run_id} finished ({result.status}) but could not be stored: {cause}. {where}", result, kept)

    def _commit(self, result: RunResult, folder: Path | None, *, move: bool, on_conflict: str) -> RunResult:
        """Insert ``result`` (and put ``folder`` at ``artifacts/<run_id>``, moved or copied) in one transaction.

        ``on_conflict`` (an ok row with the same request or cache key exists): ``keep-old`` returns that row
        and stores nothing; ``supersede`` marks it superseded; ``store-superseded`` inserts ``result`` as
        superseded.
        """
        final = self.artifacts_root / result.run_id
        placed = False
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            if result.status == "ok":
                clash = conn.execute("SELECT * FROM runs WHERE status = 'ok' AND (request_key = ? OR cache_key = ?) "
                                     "ORDER BY created_at DESC", (result.request_key, result.cache_key)).fetchall()
                readable = []
                for row in clash:
                    try:
                        readable.append(_from_row(row))
                    except ValueError as exc:
                        log.warning("stored %s in %s is damaged (%s); marking it superseded", _describe_row(row),
                                    self.path, exc)
                        conn.execute("UPDATE runs SET status = 'superseded' WHERE run_id = ?", (row["run_id"],))
                if readable and on_conflict == "keep-old":
                    conn.execute("ROLLBACK")
                    readable[0].cached = True
                    return readable[0]
                if readable and on_conflict == "supersede":
                    conn.executemany("UPDATE runs SET status = 'superseded' WHERE run_id = ?",
                                     [(r.run_id,) for r in readable])
                elif readable:
                    result.status = "superseded"
            if folder is not None:
                if move:
                    os.rename(folder, final)
                else:
                    shutil.copytree(folder, final, ignore=shutil.ignore_patterns(_LOCK_FILE))
                placed = True
                result.artifacts = str(final.relative_to(self.root))
            conn.execute(
                f"INSERT INTO runs ({', '.join(RUN_COLUMNS)}) VALUES ({', '.join(':' + c for c in RUN_COLUMNS)})",
                self._row_values(result))
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            if placed:
                with contextlib.suppress(OSError):
                    if move:
                        os.rename(final, folder)
                    else:
                        shutil.rmtree(final)
            raise
        finally:
            conn.close()
        if placed:
            with contextlib.suppress(OSError):
                (final / _LOCK_FILE).unlink(missing_ok=True)
        return result

    @staticmethod
    def _row_values(result: RunResult) -> dict[str, Any]:
        values = {k: getattr(result, k) for k in RUN_COLUMNS if hasattr(result, k)}
        values.update({k: result.config[k] for k in ("defense", "attack", "dataset", "model", "seed")})
        for name in ("config", "metrics", "costs", "info"):
            values[f"{name}_json"] = dumps(getattr(result, name))
        return values

    def import_run(self, source: str | Path, *, replace: bool = False) -> RunResult:
        """Store a result that a run kept on disk: a folder holding ``result.json`` (and the run's artifacts),
        or such a JSON file.

        A row with the same run id already stored is returned as it is (a folder of this store's staging
        area is then removed). If another ok row holds the same request or cache key, the imported row is
        stored as ``superseded`` beside it, unless ``replace``, which supersedes the old one instead. A
        folder inside this store's ``artifacts/`` is moved into place; one elsewhere is copied.

        Raises:
            StoreError: the file is missing or not a privbench result, or the store cannot take it.
        """
        source = Path(source)
        folder = source if source.is_dir() else None
        path = source / RESULT_FILE if folder is not None else source
        if not path.is_file():
            raise StoreError(f"{source} holds no {RESULT_FILE}: 'bench import' takes a folder that a run kept (it "
                             f"holds {RESULT_FILE} and the run's artifacts) or such a JSON file")
        try:
            result = result_from_dict(loads(path.read_bytes()))
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path} is not a readable privbench result ({exc})") from None
        result.cached = False
        inside = folder is not None and folder.resolve().parent == self.artifacts_root.resolve()
        existing = self._rows("SELECT * FROM runs WHERE run_id = ?", (result.run_id,))
        if existing:
            if inside and folder.name.startswith(".staging-") and (self.artifacts_root / result.run_id).is_dir():
                shutil.rmtree(folder, ignore_errors=True)  # a second copy of an already stored run
            existing[0].cached = True
            return existing[0]
        if folder is not None and (self.artifacts_root / result.run_id).exists():
            raise StoreError(f"{self.artifacts_root / result.run_id} exists but run {result.run_id} is not in "
                             f"{self.path}; move that folder aside and import again")
        try:
            return self._commit(result, folder, move=inside,
                                on_conflict="supersede" if replace else "store-superseded")
        except (sqlite3.Error, OSError) as exc:
            raise self._error(exc) from None

    def record_cell_score(
        self, cell_key: str, cell: dict, score: dict, baseline: dict | None, run_ids: list[str], version: str
    ) -> None:
        """Store (replacing any earlier value) one set metric of a cell and its baseline."""
        import datetime as dt

        conn = self._connect()
        try:
            conn.execute(
                "INSERT OR REPLACE INTO cell_scores VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    cell_key, score["name"], dt.datetime.now(dt.timezone.utc).isoformat(), version,
                    dumps(cell), dumps(score), dumps(baseline) if baseline else None, dumps(run_ids),
                ),
            )
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        finally:
            conn.close()

    def tag_suite(self, suite: str, spec_hash: str, run_ids: list[str]) -> None:
        """Record that the rows ``run_ids`` serve the suite ``suite`` (spec hash ``spec_hash``); a row may
        serve several suites."""
        import datetime as dt

        now = dt.datetime.now(dt.timezone.utc).isoformat()
        conn = self._connect()
        try:
            conn.executemany("INSERT OR IGNORE INTO suite_runs VALUES (?, ?, ?, ?)",
                             [(spec_hash, suite, run_id, now) for run_id in run_ids])
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        finally:
            conn.close()

    # -- reading -----------------------------------------------------------------------------------
    def settled(self) -> dict[str, tuple[str, str]]:
        """request key (and cache key) -> (status, run id) of the newest ok or unsupported row under it: the
        jobs a suite does not run again (failed rows are retried)."""
        rows = self._fetch("SELECT request_key, cache_key, status, run_id FROM runs WHERE status IN "
                           "('ok', 'unsupported') ORDER BY created_at", ())
        out = {r["cache_key"]: (r["status"], r["run_id"]) for r in rows}
        out.update({r["request_key"]: (r["status"], r["run_id"]) for r in rows})
        return out

    def suite_run_ids(self, spec_hash: str) -> list[str]:
        """The run ids recorded for the suite whose spec hash is ``spec_hash``."""
        if not self._fetch("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'suite_runs'", ()):
            return []  # a store of an earlier privbench, opened read-only
        rows = self._fetch("SELECT run_id FROM suite_runs WHERE spec_hash = ? ORDER BY created_at", (spec_hash,),
                           table="suite_runs")
        return [r["run_id"] for r in rows]

    def cell_scores(self, cell_key: str | None = None) -> list[dict]:
        sql = "SELECT * FROM cell_scores" + (" WHERE cell_key = ?" if cell_key else "") + " ORDER BY cell_key, metric"
        out = []
        for r in self._fetch(sql, (cell_key,) if cell_key else (), table="cell_scores"):
            try:
                out.append({
                    "cell_key": r["cell_key"], "metric": r["metric"], "created_at": r["created_at"],
                    "privbench_version": r["privbench_version"], "cell": loads(r["cell_json"]),
                    "score": loads(r["score_json"]),
                    "baseline": loads(r["baseline_json"]) if r["baseline_json"] else None,
                    "run_ids": loads(r["run_ids_json"]),
                })
            except (TypeError, ValueError) as exc:
                log.warning("skipping the stored score %r of cell %r in %s: it is damaged (%s)", r["metric"],
                            r["cell_key"], self.path, exc)
        return out

    def all_ok(self) -> list[RunResult]:
        """Every readable ok row, oldest first, one per request key and per cache key (the newest)."""
        rows = self._rows("SELECT * FROM runs WHERE status = 'ok' ORDER BY created_at DESC, rowid DESC", ())
        seen: set[str] = set()
        distinct = []
        for row in rows:
            if row.request_key in seen or row.cache_key in seen:
                continue
            seen.update((row.request_key, row.cache_key))
            distinct.append(row)
        return distinct[::-1]

    def find_ok(self, *, cache_key: str | None = None, request_key: str | None = None) -> RunResult | None:
        """The newest readable successful run stored under ``cache_key`` or ``request_key``."""
        column, key = ("cache_key", cache_key) if cache_key else ("request_key", request_key)
        rows = self._rows(f"SELECT * FROM runs WHERE {column} = ? AND status = 'ok' ORDER BY created_at DESC", (key,))
        return rows[0] if rows else None

    def get(self, run_id: str) -> RunResult | None:
        """The run ``run_id``, or None if it is not stored.

        Raises:
            StoreError: the row is stored but damaged.
        """
        raw = self._fetch("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        if not raw:
            return None
        try:
            return _from_row(raw[0])
        except ValueError as exc:
            raise StoreError(f"stored run {run_id!r} in {self.path} is damaged: {exc}") from None

    def recent(self, limit: int = 20, status: str | None = None) -> list[RunResult]:
        if status:
            return self._rows("SELECT * FROM runs WHERE status = ? ORDER BY created_at DESC LIMIT ?", (status, limit))
        return self._rows("SELECT * FROM runs ORDER BY created_at DESC LIMIT ?", (limit,))

    def counts(self) -> dict[str, int]:
        """Rows by status; ok rows are counted once per distinct cache key."""
        sql = ("SELECT status, CASE WHEN status = 'ok' THEN COUNT(DISTINCT cache_key) ELSE COUNT(*) END "
               "FROM runs GROUP BY status")
        return {r[0]: r[1] for r in self._fetch(sql, ())}

    def _fetch(self, sql: str, args: tuple, table: str = "runs") -> list[sqlite3.Row]:
        if self._empty:
            return []
        conn = self._connect()
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        finally:
            conn.close()

    def _rows(self, sql: str, args: tuple) -> list[RunResult]:
        out = []
        for row in self._fetch(sql, args):
            try:
                out.append(_from_row(row))
            except ValueError as exc:
                log.warning("skipping stored %s in %s: it is damaged (%s)", _describe_row(row), self.path, exc)
        return out
