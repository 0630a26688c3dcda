"""A suite's two-stage plan: which jobs are stored already, which targets must be trained first, and
which attack jobs wait for which target.

Stage 1 trains each distinct target (the defense's fit and its utility twin) once, in a fit job; stage 2
runs the attack jobs, each released only when its target's fit job has finished (the dependency graph
below, kept by the coordinator). A target already in the cache needs no fit job. A file lock on the
target's cache entry (``targets.fit_or_load``) also keeps separate processes from training it twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from privbench import datasets as datasetlib
from privbench import registry, targets
from privbench.config import RunConfig, resolve
from privbench.store import Store
from privbench.suite.spec import Job, SuiteSpec


@dataclass(frozen=True)
class FitJob:
    """Train one target (and its twin): ``config`` is the first job's resolved config that uses it."""

    key: str
    config: RunConfig
    fingerprint: str

    @property
    def name(self) -> str:
        c = self.config
        params = ",".join(f"{k}={v}" for k, v in sorted(_varied(c).items()))
        return f"fit {c.defense}{f'[{params}]' if params else ''} {c.dataset}/{c.model} target seed " \
               f"{c.trained_target_seed}"


@dataclass(frozen=True)
class AttackJob:
    """One row to compute: the job as requested, resolved, its request key and its target's key."""

    job: Job
    resolved: RunConfig
    request_key: str
    target: str
    fingerprint: str

    @property
    def name(self) -> str:
        return self.job.name


@dataclass
class Plan:
    """What a suite run does: ``stored`` rows (request key -> run id) are served as they are."""

    spec: SuiteSpec
    stored: dict[str, str] = field(default_factory=dict)
    fits: list[FitJob] = field(default_factory=list)
    attacks: list[AttackJob] = field(default_factory=list)
    targets: int = 0  # distinct targets the grid uses (cached or not)

    def describe(self) -> dict[str, int]:
        return {"jobs": len(self.spec.jobs), "stored": len(self.stored), "to_run": len(self.attacks),
                "targets": self.targets, "targets_to_train": len(self.fits)}


def _varied(config: RunConfig) -> dict[str, object]:
    """The defense parameters that differ from the defense's defaults (for short job names)."""
    defaults = resolve(RunConfig(defense=config.defense, attack=config.attack, model=config.model)).defense_params
    return {k: v for k, v in config.defense_params if dict(defaults).get(k) != v}


def make(spec: SuiteSpec, store: Store, data_root: str | None, cache_dir: Path) -> Plan:
    """The plan for ``spec`` against what ``store`` and the target cache hold now.

    Raises DatasetError when a dataset of the grid cannot be found (nothing has run).
    """
    plan = Plan(spec)
    settled = store.settled()
    prints: dict[tuple[str, int], str] = {}
    fits: dict[str, FitJob] = {}
    seen_targets: set[str] = set()
    resolved_cache: dict[RunConfig, RunConfig] = {}
    for job in spec.jobs:
        c = job.config
        if (c.dataset, c.image_size) not in prints:
            prints[(c.dataset, c.image_size)] = datasetlib.fingerprint(c.dataset, data_root, c.image_size)
        fingerprint = prints[(c.dataset, c.image_size)]
        request_key = c.cache_key(fingerprint)
        resolved = resolved_cache.get(c) or resolve(c)
        resolved_cache[c] = resolved
        target = _target_key(resolved, fingerprint)
        seen_targets.add(target)
        hit = settled.get(request_key) or settled.get(resolved.cache_key(fingerprint))
        if hit is not None:
            plan.stored[request_key] = hit[1]
            continue
        plan.attacks.append(AttackJob(job, resolved, request_key, target, fingerprint))
        if target not in fits and not _cached(resolved, fingerprint, cache_dir / "targets"):
            fits[target] = FitJob(target, resolved, fingerprint)
    plan.fits = list(fits.values())
    plan.targets = len(seen_targets)
    return plan


def _defense(config: RunConfig):
    cls = registry.defenses.get(config.defense)
    return cls(cls.Params(**dict(config.defense_params)))


def _target_key(config: RunConfig, fingerprint: str) -> str:
    return targets.key_for(_defense(config), config, targets.data_identity(config, fingerprint),
                           config.derived_seeds())


def _cached(config: RunConfig, fingerprint: str, cache_dir: Path) -> bool:
    """Whether the target of ``config`` and its twin are both in the cache."""
    defense = _defense(config)
    data, seeds = targets.data_identity(config, fingerprint), config.derived_seeds()
    keys = [targets.key_for(defense, config, data, seeds)]
    twin = defense.utility_twin()
    if twin is not None:
        keys.append(targets.key_for(twin, config, data, seeds))
    return all(targets.is_cached(cache_dir, key) for key in keys)
