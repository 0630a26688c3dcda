"""A suite's two-stage plan: which jobs are stored already, which targets must be trained first, and
which attack jobs wait for which target.

Stage 1 trains each distinct target (the defense's fit and its utility twin) once, in a fit job; stage 2
runs the attack jobs, each released only when its target's fit job has finished (the dependency graph
below, kept by the coordinator). A target already in the cache needs no fit job. A file lock on the
target's cache entry (``targets.fit_or_load``) also keeps separate processes from training it twice.

Cells: the jobs that attack one target with one attack and differ only in their seed (the victims of a
cell, e.g. seeds 0-63 with one ``target_seed``) are run together, ``batch_victims`` per cell job, when the
attack batches victims (gradient inversion: one vectorised optimisation, ``Attack.cell_batches``). A cell
job yields one row per victim, exactly the rows ``bench run --seeds`` stores. When a grid has fewer cells
than workers, each cell is split so that every worker gets a share.
"""

from __future__ import annotations

import dataclasses
import math
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


@dataclass(frozen=True)
class CellJob:
    """Victims of one target attacked together in one worker job: ``jobs`` in seed order, their indices in
    the whole cell (``indices``), the cell's id and size (all its victims, over every cell job)."""

    jobs: tuple[AttackJob, ...]
    indices: tuple[int, ...]
    cell_id: str
    cell_size: int

    @property
    def target(self) -> str:
        return self.jobs[0].target

    @property
    def fingerprint(self) -> str:
        return self.jobs[0].fingerprint

    @property
    def name(self) -> str:
        first = self.jobs[0].name
        stem = first[: first.rfind(" seed ")]
        return f"{stem} seeds {_seed_ranges([j.job.config.seed for j in self.jobs])} (cell of {len(self.jobs)})"


def _seed_ranges(seeds: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8"."""
    parts, start = [], None
    for i, seed in enumerate(seeds):
        if start is None:
            start = seed
        if i + 1 == len(seeds) or seeds[i + 1] != seed + 1:
            parts.append(str(start) if start == seed else f"{start}-{seed}")
            start = None
    return ",".join(parts)


@dataclass
class Plan:
    """What a suite run does: ``stored`` rows (request key -> run id) are served as they are; ``attacks`` run
    one job per row, ``cells`` one job per group of victims."""

    spec: SuiteSpec
    stored: dict[str, str] = field(default_factory=dict)
    fits: list[FitJob] = field(default_factory=list)
    attacks: list[AttackJob] = field(default_factory=list)
    cells: list[CellJob] = field(default_factory=list)
    targets: int = 0  # distinct targets the grid uses (cached or not)

    def describe(self) -> dict[str, int]:
        in_cells = sum(len(c.jobs) for c in self.cells)
        return {"jobs": len(self.spec.jobs), "stored": len(self.stored), "to_run": len(self.attacks) + in_cells,
                "in_cells": in_cells, "cell_jobs": len(self.cells), "targets": self.targets,
                "targets_to_train": len(self.fits)}

    def job_names(self) -> list[str]:
        """The jobs to run, in order: single jobs, then cell jobs."""
        return [job.name for job in self.attacks] + [cell.name for cell in self.cells]


def _varied(config: RunConfig) -> dict[str, object]:
    """The defense parameters that differ from the defense's defaults (for short job names)."""
    defaults = resolve(RunConfig(defense=config.defense, attack=config.attack, model=config.model)).defense_params
    return {k: v for k, v in config.defense_params if dict(defaults).get(k) != v}


def make(spec: SuiteSpec, store: Store, data_root: str | None, cache_dir: Path, batch_victims: int = 0,
         workers: int = 1) -> Plan:
    """The plan for ``spec`` against what ``store`` and the target cache hold now; with ``batch_victims`` >= 2,
    the victims of one target are grouped into cell jobs of at most that many (``workers``: to spread cells).

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
    if batch_victims >= 2:
        _group_cells(plan, batch_victims, workers)
    return plan


def _group_cells(plan: Plan, batch_victims: int, workers: int) -> None:
    """Move the attack jobs that form cells (same target, same resolved config but for the seed, an attack
    and defense that batch victims) from ``plan.attacks`` into ``plan.cells``."""
    from privbench.runner import new_cell_id

    groups: dict[tuple, list[AttackJob]] = {}
    for job in plan.attacks:
        key = (job.target, dataclasses.replace(job.resolved, seed=0), dataclasses.replace(job.job.config, seed=0))
        groups.setdefault(key, []).append(job)
    cells = [sorted(members, key=lambda j: j.resolved.seed) for members in groups.values()
             if len(members) >= 2 and _batches(members[0].resolved)]
    if not cells:
        return
    shares = max(1, workers // len(cells))  # fewer cells than workers: split each so every worker gets a share
    grouped = set()
    for members in cells:
        size = min(batch_victims, math.ceil(len(members) / shares))
        if size < 2:
            continue
        cell_id = new_cell_id()
        for start in range(0, len(members), size):
            chunk = members[start : start + size]
            plan.cells.append(CellJob(tuple(chunk), tuple(range(start, start + len(chunk))), cell_id, len(members)))
        grouped.update(id(job) for job in members)
    plan.attacks = [job for job in plan.attacks if id(job) not in grouped]


def _batches(config: RunConfig) -> bool:
    """Whether the victims of ``config``'s cell are solved together (else a cell job would only run them one
    after another in one worker, and lose the other workers' parallelism)."""
    attack_cls = registry.attacks.get(config.attack)
    defense_cls = registry.defenses.get(config.defense)
    return attack_cls.cell_batches(dict(config.attack_params)) and getattr(defense_cls, "batchable_gradients", True)


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
