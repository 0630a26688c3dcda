"""SQLite results store (one row per run) and the per-run artifacts folder.

Location: ``--store PATH``, else ``$PRIVBENCH_HOME/privbench.sqlite``, else
``./runs/privbench.sqlite``. Artifacts live beside it in ``artifacts/<run_id>/``.
A row is written in one transaction after the run's artifacts are complete, so
an interrupted run leaves no half-written row. This module does not import torch.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

Status = Literal["ok", "failed", "unsupported"]

SCHEMA = """
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


class Store:
    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else default_store_path()
        self.root = self.path.parent
        self.artifacts_root = self.root / "artifacts"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._connect().executescript(SCHEMA)
        except (OSError, sqlite3.DatabaseError) as exc:
            raise StoreError(
                f"cannot open the results store at {self.path}: {exc}. Pass --store PATH or set PRIVBENCH_HOME "
                f"to a writable folder."
            ) from None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=60)
        conn.row_factory = sqlite3.Row
        return conn

    # -- artifacts ------------------------------------------------------------
    def staging_dir(self, run_id: str) -> Path:
        """A scratch folder for a run's artifacts; ``record`` moves it into place."""
        path = self.artifacts_root / f".staging-{run_id}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    # -- writing ----------------------------------------------------------------
    def record(self, result: RunResult, staging: Path | None = None) -> RunResult:
        """Insert ``result`` (and move its staged artifacts into place) atomically."""
        if staging is not None and staging.exists():
            final = self.artifacts_root / result.run_id
            result.artifacts = str(final.relative_to(self.root))
        conn = self._connect()
        try:
            with conn:
                conn.execute(
                    "INSERT INTO runs VALUES (:run_id, :created_at, :status, :defense, :attack, :dataset, :model, "
                    ":seed, :config_hash, :cache_key, :request_key, :privbench_version, :config_json, "
                    ":metrics_json, :costs_json, :info_json, :wall_time_s, :grad_evals, :error, :traceback, "
                    ":artifacts)",
                    {
                        **{k: getattr(result, k) for k in (
                            "run_id", "created_at", "status", "config_hash", "cache_key", "request_key",
                            "privbench_version", "wall_time_s", "grad_evals", "error", "traceback", "artifacts",
                        )},
                        **{k: result.config[k] for k in ("defense", "attack", "dataset", "model", "seed")},
                        "config_json": _dumps(result.config),
                        "metrics_json": _dumps(result.metrics),
                        "costs_json": _dumps(result.costs),
                        "info_json": _dumps(result.info),
                    },
                )
                if staging is not None and staging.exists():
                    staging.rename(self.artifacts_root / result.run_id)
        finally:
            conn.close()
        return result

    def record_cell_score(
        self, cell_key: str, cell: dict, score: dict, baseline: dict | None, run_ids: list[str], version: str
    ) -> None:
        """Store (replacing any earlier value) one set metric of a cell and its baseline."""
        import datetime as dt

        conn = self._connect()
        try:
            with conn:
                conn.execute(
                    "INSERT OR REPLACE INTO cell_scores VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        cell_key, score["name"], dt.datetime.now(dt.timezone.utc).isoformat(), version,
                        _dumps(cell), _dumps(score), _dumps(baseline) if baseline else None, _dumps(run_ids),
                    ),
                )
        finally:
            conn.close()

    def cell_scores(self, cell_key: str | None = None) -> list[dict]:
        conn = self._connect()
        try:
            sql = "SELECT * FROM cell_scores" + (" WHERE cell_key = ?" if cell_key else "") + " ORDER BY cell_key, metric"
            rows = conn.execute(sql, (cell_key,) if cell_key else ()).fetchall()
        finally:
            conn.close()
        return [
            {
                "cell_key": r["cell_key"], "metric": r["metric"], "created_at": r["created_at"],
                "privbench_version": r["privbench_version"], "cell": json.loads(r["cell_json"]),
                "score": json.loads(r["score_json"]),
                "baseline": json.loads(r["baseline_json"]) if r["baseline_json"] else None,
                "run_ids": json.loads(r["run_ids_json"]),
            }
            for r in rows
        ]

    def all_ok(self) -> list[RunResult]:
        return self._query("SELECT * FROM runs WHERE status = 'ok' ORDER BY created_at", ())

    # -- reading ----------------------------------------------------------------
    def find_ok(self, *, cache_key: str | None = None, request_key: str | None = None) -> RunResult | None:
        """The newest successful run stored under ``cache_key`` or ``request_key``."""
        column, key = ("cache_key", cache_key) if cache_key else ("request_key", request_key)
        rows = self._query(
            f"SELECT * FROM runs WHERE {column} = ? AND status = 'ok' ORDER BY created_at DESC LIMIT 1", (key,)
        )
        return rows[0] if rows else None

    def get(self, run_id: str) -> RunResult | None:
        rows = self._query("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        return rows[0] if rows else None

    def recent(self, limit: int = 20, status: str | None = None) -> list[RunResult]:
        if status:
            return self._query("SELECT * FROM runs WHERE status = ? ORDER BY created_at DESC LIMIT ?", (status, limit))
        return self._query("SELECT * FROM runs ORDER BY created_at DESC LIMIT ?", (limit,))

    def counts(self) -> dict[str, int]:
        conn = self._connect()
        try:
            return {r[0]: r[1] for r in conn.execute("SELECT status, COUNT(*) FROM runs GROUP BY status")}
        finally:
            conn.close()

    def _query(self, sql: str, args: tuple) -> list[RunResult]:
        conn = self._connect()
        try:
            return [_from_row(r) for r in conn.execute(sql, args)]
        finally:
            conn.close()


class StoreError(RuntimeError):
    pass


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _from_row(row: sqlite3.Row) -> RunResult:
    return RunResult(
        run_id=row["run_id"],
        created_at=row["created_at"],
        status=row["status"],
        config=json.loads(row["config_json"]),
        config_hash=row["config_hash"],
        cache_key=row["cache_key"],
        request_key=row["request_key"],
        privbench_version=row["privbench_version"],
        metrics=json.loads(row["metrics_json"]),
        costs=json.loads(row["costs_json"]),
        info=json.loads(row["info_json"]),
        wall_time_s=row["wall_time_s"],
        grad_evals=row["grad_evals"],
        error=row["error"],
        traceback=row["traceback"],
        artifacts=row["artifacts"],
    )
