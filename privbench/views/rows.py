"""Which stored rows a view shows, how they group into defense configurations and attacks, and the
components' declared metadata (adaptive_for, differentiable, paper claims).

Selection: every ``ok``, ``failed`` and ``unsupported`` row of the store (``superseded`` never), or with a
suite spec exactly the rows whose ``request_key`` is one of the spec's jobs. Of a request stored several
times, the ok row counts; a request with no ok row counts once, as its newest failed / unsupported row
(earlier attempts are history).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privbench.metrics.family import HEADLINE, family_of
from privbench.store import RunResult, Store

log = logging.getLogger(__name__)

VIEW_STATUSES = ("ok", "failed", "unsupported")
# Config fields that vary inside one defense configuration (a line of a board): the attack and its
# parameters and budget, and the seed (victims / attack starts).
ATTACK_FIELDS = ("attack", "attack_params", "budget")
PER_SEED_FIELDS = ("seed",)


class SelectionError(ValueError):
    """The selection is empty or cannot be made (exit 2)."""


@dataclass
class Selection:
    rows: list[RunResult]
    store_path: Path
    suite: dict[str, Any] | None = None  # name, spec_hash, path, jobs, missing (jobs with no row)
    counts: dict[str, int] = field(default_factory=dict)


def select(store: Store, suite_path: str | Path | None = None, data_root: str | None = None) -> Selection:
    """The rows a view shows (see the module doc).

    Raises:
        SelectionError: nothing to show (no row, or no row of the suite's jobs).
        SpecError / DatasetError / StoreError: the spec or the store cannot be read.
    """
    raw = store._rows("SELECT * FROM runs WHERE status IN ('ok', 'failed', 'unsupported') "
                      "ORDER BY created_at DESC, rowid DESC", ())
    suite = None
    if suite_path is not None:
        from privbench.suite import spec as speclib

        # Names are checked; parameter types are not re-checked (that imports every component, and torch): the
        # jobs and their request keys are the same either way.
        spec = speclib.load(suite_path, resolve_components=False)
        keys = spec.request_keys(data_root)
        # a job the suite served with a row stored under another request key (e.g. by 'bench run' with the
        # parameters written differently, found by its resolved config) is recorded in suite_runs
        served = set(store.suite_run_ids(spec.spec_hash))
        raw = [r for r in raw if r.request_key in keys or r.run_id in served]
        suite = {"name": spec.name, "spec_hash": spec.spec_hash, "path": str(suite_path), "jobs": len(keys)}
    ok_keys: set[str] = set()
    rows: list[RunResult] = []
    for r in raw:  # newest first
        if r.status == "ok" and r.request_key not in ok_keys and r.cache_key not in ok_keys:
            ok_keys.update((r.request_key, r.cache_key))
            rows.append(r)
    done = set(ok_keys)
    for r in raw:
        if r.status != "ok" and r.request_key not in done:
            done.add(r.request_key)
            rows.append(r)
    rows.sort(key=lambda r: (r.created_at, r.run_id))
    if suite is not None:
        suite["missing"] = max(0, suite["jobs"] - len(rows))
    counts = {s: sum(r.status == s for r in rows) for s in VIEW_STATUSES}
    if not rows:
        where = f"of the suite {suite['name']!r} ({suite_path})" if suite else "ok, failed or unsupported"
        raise SelectionError(f"the results store {store.path} holds no rows {where}; run the suite first "
                             f"(bench suite SPEC) or pass --store PATH")
    return Selection(rows=rows, store_path=store.path, suite=suite, counts=counts)


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def line_key(row: RunResult) -> str:
    """The defense configuration of a row: its config without the attack, its parameters, budget and seed."""
    return canonical({k: v for k, v in row.config.items() if k not in ATTACK_FIELDS + PER_SEED_FIELDS})


def control_key(row: RunResult) -> str:
    """The cell of a row without its defense: the same attack on the same data and model, any defense."""
    drop = ("defense", "defense_params") + PER_SEED_FIELDS
    return canonical({k: v for k, v in row.config.items() if k not in drop})


def attack_key(row: RunResult) -> str:
    return canonical({k: row.config.get(k) for k in ATTACK_FIELDS})


def params_label(name: str, params: dict[str, Any], keys: list[str] | None = None) -> str:
    shown = {k: params[k] for k in (keys if keys is not None else sorted(params)) if k in params}
    return f"{name}[{', '.join(f'{k}={v}' for k, v in shown.items())}]" if shown else name


class Components:
    """Declared metadata of the components named by rows: from the rows themselves where a run recorded it
    (``info["components"]``), else from the registry (the class's attributes)."""

    def __init__(self, rows: list[RunResult]):
        self._attack: dict[str, dict[str, Any]] = {}
        self._defense: dict[str, dict[str, Any]] = {}
        self._family: dict[str, str] = {}
        for r in rows:
            comp = r.info.get("components") if isinstance(r.info.get("components"), dict) else None
            attack, defense = r.config["attack"], r.config["defense"]
            if comp:
                self._attack.setdefault(attack, {"adaptive_for": tuple(comp.get("attack_adaptive_for") or ()),
                                                 "surface": comp.get("attack_surface")})
                self._defense.setdefault(defense, {"differentiable": bool(comp.get("defense_differentiable", True)),
                                                   "paper_claims": list(comp.get("defense_paper_claims") or [])})
            if r.status == "ok":
                fam = family_of(r.metrics, r.info)
                if fam:
                    self._family.setdefault(attack, fam)
                surface = (r.info.get("observation") or {}).get("surface")
                if surface and attack in self._attack and not self._attack[attack].get("surface"):
                    self._attack[attack]["surface"] = surface

    def _registry_attack(self, name: str) -> dict[str, Any]:
        from privbench import registry

        try:
            cls = registry.attacks.get(name)
        except Exception as exc:  # a plugin not installed here: the rows still show, without its metadata
            log.warning("attack %r: no metadata (%s)", name, exc)
            return {"adaptive_for": (), "surface": None, "family": None}
        surface = getattr(cls, "surface", None)
        return {"adaptive_for": tuple(getattr(cls, "adaptive_for", ())), "family": getattr(cls, "family", None),
                "surface": getattr(surface, "value", surface)}

    def attack(self, name: str) -> dict[str, Any]:
        if name not in self._attack:
            self._attack[name] = self._registry_attack(name)
        return self._attack[name]

    def family(self, name: str) -> str | None:
        if name not in self._family:
            fam = self.attack(name).get("family") or self._registry_attack(name).get("family")
            self._family[name] = fam
        return self._family[name]

    def defense(self, name: str) -> dict[str, Any]:
        if name not in self._defense:
            from privbench import registry

            try:
                cls = registry.defenses.get(name)
                self._defense[name] = {"differentiable": bool(getattr(cls, "differentiable", True)),
                                       "paper_claims": [c.to_dict() for c in getattr(cls, "paper_claims", ())]}
            except Exception as exc:
                log.warning("defense %r: no metadata (%s)", name, exc)
                self._defense[name] = {"differentiable": True, "paper_claims": []}
        return self._defense[name]


def families_in_order(found: set[str]) -> list[str]:
    """HEADLINE's families first (its order), then any other family a row names."""
    return [f for f in HEADLINE if f in found] + sorted(found - set(HEADLINE))
