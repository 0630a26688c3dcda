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


PROTECTION = {"none": 0.0, "dp": 0.4, "mple": 0.3, "gascnn": 0.35, "he": 0.0, "gradprune": 0.5}
SUITE_TOML = """# a grid like the medical-mri suite's, on the built-in synthetic data (benchmarks/perf/views.py)
[suite]
name = "views-perf"
seeds = "0-{last_seed}"

[run]
dataset = "synthetic-mri"
target_seed = 0

[[defenses]]
name = "none"

[[defenses]]
name = "dp"
grid = {{ epsilon = [1.0, 8.0, 32.0] }}

[[defenses]]
name = "mple"

[[defenses]]
name = "gascnn"

[[defenses]]
name = "he"

[[attacks]]
name = "dlg"

[[attacks]]
name = "idlg"

[[attacks]]
name = "invgrad"

[[attacks]]
name = "loss-threshold"

[[attacks]]
name = "lira"
"""


def fill_suite(store_path: Path, spec_path: Path, n: int = 1000, seed: int = 0) -> Store:
    """Write a suite spec of about ``n`` jobs to ``spec_path`` and one synthetic row per job (its request key),
    about 3% of them failed, into a store at ``store_path``."""
    from privbench import registry
    from privbench.suite import spec as speclib

    spec_path.write_text(SUITE_TOML.format(last_seed=max(1, -(-n // 35)) - 1))
    spec = speclib.load(spec_path)
    store = Store(store_path)
    rng = np.random.default_rng(seed)
    for k, (key, job) in enumerate(spec.request_keys().items()):
        c = job.config
        params = dict(c.defense_params)
        eps = params.get("epsilon")
        protection = PROTECTION.get(c.defense, 0.2) * (1.5 if eps == 1.0 else 1.0 if eps == 8.0 else 0.6)
        strength = max(0.0, 0.9 - protection + rng.normal(0, 0.05))
        model = c.model or registry.defenses.get(c.defense).default_model
        store.record(make_row(c.defense, c.attack, c.seed, strength=strength, defense_params=params, model=model,
                              status="failed" if rng.random() < 0.03 else "ok", request_key=key, created=k, batch=4,
                              costs={"epsilon_spent": eps} if eps else {},
                              twin_accuracy=None if c.defense == "none" else 0.82,
                              accuracy=0.82 - protection * 0.1))
    return store


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
