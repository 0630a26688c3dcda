"""Synthetic stored rows for the views' tests and speed benchmarks (no training, no attack: numbers made up
from a stated leakage strength, written with ``Store.record`` as the runner would write them)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from privbench import __version__
from privbench.store import RunResult, Store

BASE_CONFIG: dict[str, Any] = {
    "defense": "none", "attack": "dlg", "dataset": "synthetic-mri", "model": "lenet", "image_size": 32,
    "channels": 1, "seed": 0, "split_seed": 0, "target_seed": 0, "defense_params": {}, "attack_params": {},
    "model_params": {}, "split": {"members_fraction": 0.5, "nonmembers_fraction": 0.25},
    "gradient_round": "init", "victim_batch": 1, "budget": {"max_grad_evals": 100},
}
FAMILY = {"loss-threshold": "membership", "lira": "membership", "shadow": "membership"}
SURFACE = {"mple-view": "shared_data", "mple-feature-leak": "shared_data", "mple-known-plaintext": "shared_data"}
ADAPTIVE = {"dlg-mple": ["mple"], "invgrad-mple": ["mple"], "mple-feature-leak": ["mple"],
            "mple-known-plaintext": ["mple"], "dlg-snn": ["gascnn"], "invgrad-snn": ["gascnn"],
            "dlg-gradprune": ["gradprune"]}
NOT_DIFFERENTIABLE = {"gradprune"}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def make_row(defense: str, attack: str, seed: int, *, strength: float = 0.5, status: str = "ok",
             dataset: str = "synthetic-mri", model: str = "lenet", defense_params: dict | None = None,
             attack_params: dict | None = None, accuracy: float = 0.8, twin_accuracy: float | None = 0.82,
             costs: dict | None = None, batch: int = 1, created: int = 0, metrics: dict | None = None,
             info: dict | None = None, error: str | None = None, target_seed: int | None = 0,
             artifacts: str | None = None, request_salt: str = "", request_key: str | None = None) -> RunResult:
    """One row. ``strength`` in [0, 1] sets the leakage: reconstruction SSIM ~ 0.05 + 0.9 s (baseline 0.2),
    PSNR ~ 10 + 30 s (baseline 14); membership AUC ~ 0.5 + 0.45 s."""
    config = {**BASE_CONFIG, "defense": defense, "attack": attack, "seed": seed, "dataset": dataset, "model": model,
              "defense_params": dict(defense_params or {}), "attack_params": dict(attack_params or {}),
              "target_seed": target_seed}
    family = FAMILY.get(attack, "reconstruction")
    key = request_key or _hash({"config": config, "salt": request_salt})
    rng = np.random.default_rng(int(_hash([key, status, created])[:8], 16))
    when = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=created)
    row = RunResult(run_id=f"r{key[:12]}-{status[:2]}{created}", created_at=when.isoformat(), status=status,
                    config=config, config_hash=_hash(config)[:16], cache_key=key, request_key=key,
                    privbench_version=__version__, wall_time_s=1.0, error=error, artifacts=artifacts)
    row.info = {"family": family, "components": {
        "attack_adaptive_for": ADAPTIVE.get(attack, []),
        "attack_surface": SURFACE.get(attack, "model_queries" if family == "membership" else "gradients"),
        "defense_differentiable": defense not in NOT_DIFFERENTIABLE, "defense_paper_claims": []}}
    if status != "ok":
        row.error = error or "RuntimeError: synthetic failure"
        row.metrics, row.costs = {}, {}
        return row
    m: dict[str, Any] = {"target_accuracy": accuracy}
    if twin_accuracy is not None:
        m["twin_accuracy"] = twin_accuracy
        m["accuracy_drop"] = twin_accuracy - accuracy
    if family == "reconstruction":
        ssim = np.clip(0.05 + 0.9 * strength + rng.normal(0, 0.03, batch), -1, 1)
        psnr = 10 + 30 * strength + rng.normal(0, 1.0, batch)
        m.update(psnr=float(psnr.mean()), ssim=float(ssim.mean()), mse=float(10 ** (-psnr.mean() / 10)),
                 label_accuracy=1.0, baseline_psnr=14.0 + rng.normal(0, 0.2), baseline_ssim=0.2 + rng.normal(0, 0.01),
                 baseline_mse=0.04, baseline_label_accuracy=0.25)
        row.info["per_image"] = {"psnr": psnr.tolist(), "ssim": ssim.tolist(), "mse": (10 ** (-psnr / 10)).tolist()}
    else:
        auc = float(np.clip(0.5 + 0.45 * strength + rng.normal(0, 0.01), 0, 1))
        m.update(auc=auc, auc_ci=[auc - 0.03, auc + 0.03], advantage=2 * (auc - 0.5),
                 balanced_accuracy=auc, **{"tpr_at_0.01_fpr": max(0.0, 0.01 + 0.5 * strength * strength),
                                           "tpr_at_0.001_fpr": None})
        row.info["unavailable_metrics"] = {"tpr_at_0.001_fpr": "needs 10,000 nonmembers scored, got 500"}
    m.update(metrics or {})
    row.metrics = m
    row.costs = {"train_time_s": 10.0, "twin_train_time_s": 5.0, "attack_time_s": 1.0, **(costs or {})}
    if twin_accuracy is None:
        row.costs.pop("twin_train_time_s")
    row.info.update(info or {})
    return row


def fill(store_path: Path, n: int = 1000, seed: int = 0) -> Store:
    """A store of about ``n`` rows over a grid like the medical-mri suite's (for speed benchmarks)."""
    store = Store(store_path)
    defenses = [("none", {}, 0.0), ("dp", {"epsilon": 1.0}, 0.6), ("dp", {"epsilon": 8.0}, 0.4),
                ("dp", {"epsilon": 32.0}, 0.2), ("mple", {}, 0.3), ("gascnn", {}, 0.35), ("he", {}, 0.0)]
    attacks = ["dlg", "idlg", "invgrad", "dlg-mple", "dlg-snn", "loss-threshold", "lira"]
    seeds = max(1, n // (len(defenses) * len(attacks)))
    rng = np.random.default_rng(seed)
    k = 0
    for d, params, protection in defenses:
        for a in attacks:
            for s in range(seeds):
                strength = max(0.0, 0.9 - protection + rng.normal(0, 0.05))
                status = "failed" if rng.random() < 0.03 else "ok"
                costs = {"epsilon_spent": params["epsilon"]} if d == "dp" else {}
                store.record(make_row(d, a, s, strength=strength, status=status, defense_params=params,
                                      costs=costs, created=k, batch=4))
                k += 1
    return store
