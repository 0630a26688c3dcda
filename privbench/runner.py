"""One RunConfig -> one stored RunResult. ``run`` only sequences the steps, top to bottom:

1. the stored result, if there is one (``lookup``);
2. data and splits; the attack checks the run's shape (input errors raise here, before training);
3. the target and its utility twin (``targets``);
4. the observation the attack's surface gives, from the defense's release (``observe``);
5. the attack, within its budget;
6. the attack family's scorer from the metrics registry, against the truth the attack never saw;
7. one row in the store.

Input errors (unknown names, bad parameters, missing data, a setting the attack cannot support, a
store that could not take the result) raise before anything is computed and store nothing. Errors
while computing are stored as a failed row with the traceback; an attack that cannot run on what the
defense exposes is stored as ``unsupported``. Ctrl-C stores nothing. A final write that fails all the
same raises ``ResultNotStored``, naming where the result is kept (``bench import``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from privbench import __version__, registry, stages
from privbench import config as configlib
from privbench import datasets as datasetlib
from privbench.config import RunConfig
from privbench.provenance import (
    batch_threads,
    configure_threads,
    git_commit,
    plugin_versions,
    resolve_threads,
    versions,
)
from privbench.store import RunResult, Store
from privbench.threat import AttackError, AttackSetting, InversionTruth, MembershipTruth, Observation, Victim

if TYPE_CHECKING:
    from privbench.attacks.base import Attack
    from privbench.datasets import ImageDataset
    from privbench.metrics.family import FamilyScorer
    from privbench.targets import FittedTargets

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)
INPUT_ERRORS = (configlib.ConfigError, datasetlib.DatasetError, registry.RegistryError)


@dataclass(frozen=True)
class RunOptions:
    """How to run, without changing what is computed (not part of the config hash)."""

    data_root: str | None = None
    force: bool = False  # recompute even if a stored result exists
    allow_download: bool = False
    threads: int | None = None
    cache_dir: Path | None = None  # trained targets and preprocessed data; default <home>/cache
    # a cell's victims attacked together, at most this many per batched job; 0: one run after another
    batch_victims: int = 64
    # how a batched job solves its victims: "auto" (vectorised where a calibration finds it faster) or
    # "batched" (vectorised wherever possible; what benchmarks and equivalence tests force)
    cell_engine: str = "auto"


def data_fingerprint(config: RunConfig, options: RunOptions) -> str:
    """The fingerprint of ``config``'s dataset at its image size (what the row and cache keys include)."""
    return datasetlib.fingerprint(config.dataset, options.data_root, config.image_size, options.allow_download)


def lookup(config: RunConfig, store: Store, options: RunOptions, resolved: RunConfig | None = None,
           fingerprint: str | None = None) -> RunResult | None:
    """A stored ok result for ``config`` as requested (found without importing torch), or as ``resolved``.
    ``fingerprint``: the data's, when the caller has it already (a cell looks up many configs of one dataset)."""
    for reg, name in registry.named_by(config):  # a name two origins declare is refused, stored row or not
        reg.check_clash(name)
    if fingerprint is None:
        fingerprint = data_fingerprint(config, options)
    hit = store.find_ok(request_key=config.cache_key(fingerprint))
    if hit is None and resolved is not None:
        hit = store.find_ok(cache_key=resolved.cache_key(fingerprint))
    if hit:
        hit.cached = True
    return hit


def run(config: RunConfig, store: Store, options: RunOptions = RunOptions(), progress: ProgressFn | None = None
        ) -> RunResult:
    """Return the stored result for ``config``, or compute, store and return it.

    Raises ConfigError, DatasetError, RegistryError or StoreError on bad input (nothing computed or
    stored) and ResultNotStored when the final write failed (the result is kept on disk).
    """
    resolve_threads(options.threads)  # a bad --threads or $PRIVBENCH_THREADS is an input error, found first
    store.recover()  # results that earlier processes kept are stored first, so the lookup can find them
    if not options.force and (hit := lookup(config, store, options)):
        return hit
    resolved = configlib.resolve(config)
    if not options.force and (hit := lookup(config, store, options, resolved)):
        return hit
    store.check_writable()
    result = new_result(config, resolved, options)
    staging = store.staging_dir(result.run_id)
    start = time.perf_counter()
    try:
        execute(resolved, options, result, staging, progress)
    except (*INPUT_ERRORS, KeyboardInterrupt):
        store.release(staging, remove=True)  # bad input or Ctrl-C: nothing is stored
        raise
    except Exception as exc:
        result.status = "unsupported" if isinstance(exc, AttackError) else "failed"
        result.error = f"{type(exc).__name__}: {exc}"
        result.traceback = traceback.format_exc()
    result.wall_time_s = time.perf_counter() - start
    return store.record(result, staging, replace=options.force)


def new_result(config: RunConfig, resolved: RunConfig, options: RunOptions, fingerprint: str | None = None
               ) -> RunResult:
    """An empty ``ok`` row for ``resolved``, with its keys, seeds, versions and provenance (``fingerprint``: the
    data's, if the caller has it)."""
    if fingerprint is None:
        fingerprint = data_fingerprint(config, options)
    now = dt.datetime.now(dt.timezone.utc)
    result = RunResult(
        run_id=now.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8], created_at=now.isoformat(), status="ok",
        config=resolved.to_dict(), config_hash=resolved.config_hash(), cache_key=resolved.cache_key(fingerprint),
        request_key=config.cache_key(fingerprint), privbench_version=__version__,
    )
    result.info.update(seeds=resolved.derived_seeds(), versions=versions(plugin_versions(resolved)), git=git_commit(),
                       threads=configure_threads(options.threads), data_fingerprint=fingerprint)
    return result


@dataclass
class Prepared:
    """A run up to the attack: the attack and its family's scorer, the fitted targets, the observation, the
    truth kept for scoring (``Victim``, ``MembershipTruth`` or ``InversionTruth``), the auxiliary split and the row info."""

    attack: "Attack"
    scorer: "FamilyScorer"
    fitted: "FittedTargets"
    observation: Observation
    truth: "Victim | MembershipTruth | InversionTruth"
    auxiliary: "ImageDataset"
    info: dict[str, Any]


def prepare(cfg: RunConfig, options: RunOptions, staging: Path, data_fingerprint: str,
            progress: ProgressFn | None = None) -> Prepared:
    """Steps 2-4 for a resolved ``cfg``: data, splits, the attack's checks, targets and the observation."""
    from privbench import observe, targets
    from privbench.run_setup import cache_dir, setup

    run_setup = setup(cfg, options, data_fingerprint, progress)
    parts, defense, ctx, info = run_setup.parts, run_setup.defense, run_setup.ctx, run_setup.info
    attack_cls = registry.attacks.get(cfg.attack)
    attack = attack_cls(attack_cls.Params(**dict(cfg.attack_params)), seed=ctx.seeds["attack"])
    attack.check_setting(_setting(cfg, run_setup))
    scorer = registry.metrics.get(attack.family)()
    fitted = targets.fit_with_twin(defense, ctx.build_model, parts.members, ctx, cache_dir(options) / "targets",
                                   staging)
    _note_components(info, attack, defense, fitted)
    stages.begin(progress, "observation")
    observation, truth = observe.for_attack(attack, defense, fitted.target, parts, ctx)
    if isinstance(truth, Victim):
        info["victim_ids"] = list(truth.ids)
    elif isinstance(truth, InversionTruth) and truth.victims is not None:
        info["victim_ids"] = list(truth.victims.ids)
    info["observation"] = {"surface": observation.surface.value, **observation.notes}
    stages.end(progress, "observation")
    return Prepared(attack, scorer, fitted, observation, truth, parts.auxiliary, info)


def _setting(cfg: RunConfig, run_setup: Any) -> AttackSetting:
    """What the attack's ``check_setting`` is shown: split sizes, victim batch, classes, image shape."""
    parts, data = run_setup.parts, run_setup.data
    return AttackSetting(len(parts.members), len(parts.nonmembers), len(parts.auxiliary), cfg.victim_batch,
                         data.num_classes, data.image_shape)


def _note_components(info: dict[str, Any], attack: "Attack", defense: Any, fitted: Any) -> None:
    """The row's notes on its target (and twin) and on its components."""
    info["target"] = fitted.info
    info["components"] = {  # what leaderboards flag by (adaptive, unreliable, claim), kept with the row
        "attack_adaptive_for": list(getattr(type(attack), "adaptive_for", ())),
        "attack_surface": attack.surface.value,
        "defense_differentiable": bool(getattr(type(defense), "differentiable", True)),
        "defense_paper_claims": [c.to_dict() for c in getattr(type(defense), "paper_claims", ())],
    }
    if fitted.twin is not None:
        info["twin"] = fitted.twin_info


def _record_scores(result: RunResult, scores: Any) -> None:
    """A family scorer's metrics and notes into the row (and which metrics could not be computed, why)."""
    result.metrics.update(scores.metrics)
    result.info.update(scores.info)
    if scores.unavailable:
        result.info.setdefault("unavailable_metrics", {}).update(scores.unavailable)


def execute(cfg: RunConfig, options: RunOptions, result: RunResult, staging: Path, progress: ProgressFn | None
            ) -> None:
    """Compute one run into ``result`` (metrics, costs, info) and ``staging`` (artifacts)."""
    from privbench.metrics.family import ScoreContext

    prepared = prepare(cfg, options, staging, result.info["data_fingerprint"], progress)
    result.info.update(prepared.info)
    result.metrics.update(prepared.fitted.metrics())
    result.costs.update(prepared.fitted.costs())
    attack = prepared.attack
    t0 = time.perf_counter()
    output = attack.run(prepared.observation, cfg.budget, stages.attack_progress(progress))
    result.costs["attack_time_s"] = time.perf_counter() - t0
    result.grad_evals = output.grad_evals
    result.info.update(attack=output.info, family=attack.family)
    queried = getattr(prepared.observation.query, "images_queried", None)
    if queried is not None:
        result.info["images_queried"] = queried

    stages.begin(progress, "scoring")  # ends when the run returns
    from privbench.run_setup import cache_dir

    context = ScoreContext(prepared.auxiliary, result.costs, staging, attack.surface, options.allow_download,
                           cache_dir=cache_dir(options))
    _record_scores(result, prepared.scorer.score(output, prepared.truth, context))


# -- cells: many victims of one target ------------------------------------------------------------------------


def cell_configs(config: RunConfig, seeds: list[int]) -> list[RunConfig]:
    """The configs of a cell: ``config`` once per victim seed, all attacking one target (``config.target_seed``,
    or the first seed when unset). Each is the config ``bench run --seed S --target-seed T`` would run."""
    if not seeds:
        raise configlib.ConfigError("a cell needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise configlib.ConfigError(f"a cell's seeds must be distinct, got {seeds}")
    target = seeds[0] if config.target_seed is None else config.target_seed
    return [dataclasses.replace(config, seed=seed, target_seed=target) for seed in seeds]


def run_cell(configs: list[RunConfig], store: Store, options: RunOptions = RunOptions(),
             progress: ProgressFn | None = None) -> list[RunResult]:
    """Return the stored or computed row of every config of one cell (configs equal but for ``seed``).

    Stored rows are served as they are; the others are computed together, ``options.batch_victims`` victims
    per job: data, splits and the target once, one observation per victim (its own seeds), the attack's
    ``run_cell`` (gradient inversion: one batched optimisation), then each victim scored and stored as its
    own row, with the provenance of a single run plus ``info.cell`` (the cell's id, the job's size, the
    victim's index). A failure of one victim fails its row only. ``batch_victims=0`` runs the configs one
    after another through :func:`run`, exactly as separate runs.

    Raises ConfigError when the configs do not form a cell, and what :func:`run` raises on bad input.
    """
    resolve_threads(options.threads)
    if options.threads is None and options.batch_victims > 0:
        options = dataclasses.replace(options, threads=batch_threads())
    if not configs:
        raise configlib.ConfigError("a cell needs at least one config")
    base = dataclasses.replace(configs[0], seed=0)
    for config in configs[1:]:
        if dataclasses.replace(config, seed=0) != base:
            raise configlib.ConfigError("the configs of a cell may differ in their seed only")
    if configs[0].target_seed is None and len(configs) > 1:
        raise configlib.ConfigError("a cell attacks one target: set target_seed (runner.cell_configs does)")
    if options.batch_victims < 0:
        raise configlib.ConfigError(f"batch_victims must be >= 0 (0: sequential), got {options.batch_victims}")
    if options.cell_engine not in ("auto", "batched"):
        raise configlib.ConfigError(f"cell_engine must be 'auto' or 'batched', got {options.cell_engine!r}")
    if options.batch_victims == 0:
        return [run(config, store, options, progress) for config in configs]
    store.recover()
    results: list[RunResult | None] = [None] * len(configs)
    resolved_base = configlib.resolve(configs[0])
    fingerprint = data_fingerprint(configs[0], options)  # one dataset for the whole cell: its fingerprint once
    todo = []
    for i, config in enumerate(configs):
        resolved = dataclasses.replace(resolved_base, seed=config.seed)
        hit = None if options.force else lookup(config, store, options, resolved, fingerprint)
        if hit is not None:
            results[i] = hit
        else:
            todo.append((i, config, resolved))
    if todo:
        store.check_writable()
    cell_id = new_cell_id()
    for start in range(0, len(todo), options.batch_victims):
        chunk = todo[start : start + options.batch_victims]
        batch = _run_batch(chunk, store, options, progress, cell_id, len(configs), fingerprint)
        for (i, _, _), result in zip(chunk, batch, strict=True):
            results[i] = result
    return results  # type: ignore[return-value]


def _run_batch(chunk: list[tuple[int, RunConfig, RunConfig]], store: Store, options: RunOptions,
               progress: ProgressFn | None, cell_id: str, cell_size: int, fingerprint: str) -> list[RunResult]:
    """Compute and store one batched job of a cell: ``chunk`` holds (index, requested, resolved) per victim."""
    rows = [new_result(requested, resolved, options, fingerprint) for _, requested, resolved in chunk]
    stagings = [store.staging_dir(row.run_id) for row in rows]
    try:
        compute_batch(chunk, options, rows, stagings, progress, cell_id, cell_size)
    except (*INPUT_ERRORS, KeyboardInterrupt):
        for staging in stagings:
            store.release(staging, remove=True)
        raise
    return [store.record(row, staging, replace=options.force) for row, staging in zip(rows, stagings, strict=True)]


def compute_batch(chunk: list[tuple[int, RunConfig, RunConfig]], options: RunOptions, rows: list[RunResult],
                  stagings: list[Path], progress: ProgressFn | None, cell_id: str, cell_size: int) -> None:
    """Compute one batched job of a cell into ``rows`` (made by :func:`new_result`, one per victim) and their
    ``stagings``, without touching a store (a suite's worker stages them for its coordinator). ``chunk`` holds
    (index in the cell, requested, resolved) per victim. A victim's failure is its row's status; an error
    before any victim's attack (data, target) fails every row; input errors and Ctrl-C are raised."""
    for k, ((index, _, _resolved), row) in enumerate(zip(chunk, rows, strict=True)):
        row.info["cell"] = {"id": cell_id, "batch_size": len(chunk), "cell_size": cell_size, "index": index,
                            "batch_index": k, "seeds": [r.seed for _, _, r in chunk]}
    start = time.perf_counter()
    try:
        failures = _execute_batch([r for _, _, r in chunk], options, rows, stagings, progress)
    except (*INPUT_ERRORS, KeyboardInterrupt):
        raise
    except Exception as exc:  # before any victim's attack (data, target): every row of the job fails with it
        failures = {k: exc for k in range(len(rows))}
    elapsed = time.perf_counter() - start
    for k, row in enumerate(rows):
        if k in failures:
            exc = failures[k]
            row.status = "unsupported" if isinstance(exc, AttackError) else "failed"
            row.error = f"{type(exc).__name__}: {exc}"
            row.traceback = "".join(traceback.format_exception(exc))
        row.info["cell"]["batch_wall_time_s"] = elapsed
        row.wall_time_s = elapsed / len(rows)  # this victim's share of the job


def new_cell_id() -> str:
    """A cell's id: its rows share it (``info.cell.id``)."""
    return "cell-" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


def _execute_batch(cfgs: list[RunConfig], options: RunOptions, rows: list[RunResult], stagings: list[Path],
                   progress: ProgressFn | None) -> dict[int, Exception]:
    """Steps 2-6 for the victims of one job into ``rows`` and ``stagings``; returns the victims that failed
    (index -> exception). Data, splits, the defense and the target are shared (they do not depend on the seed)."""
    import copy
    import shutil

    from privbench import observe, targets
    from privbench.metrics.family import ScoreContext
    from privbench.run_setup import cache_dir, setup

    first = cfgs[0]
    run_setup = setup(first, options, rows[0].info["data_fingerprint"], progress)
    parts, defense, ctx, shared_info = run_setup.parts, run_setup.defense, run_setup.ctx, run_setup.info
    attack_cls = registry.attacks.get(first.attack)
    attacks = [attack_cls(attack_cls.Params(**dict(cfg.attack_params)), seed=cfg.derived_seeds()["attack"])
               for cfg in cfgs]
    attacks[0].check_setting(_setting(first, run_setup))
    scorer = registry.metrics.get(attacks[0].family)()
    fitted = targets.fit_with_twin(defense, ctx.build_model, parts.members, ctx, cache_dir(options) / "targets",
                                   stagings[0])
    for staging in stagings[1:]:  # the defense's artifacts, as each single run would stage them
        for path in stagings[0].iterdir():
            if path.is_file():
                shutil.copyfile(path, staging / path.name)
    _note_components(shared_info, attacks[0], defense, fitted)
    failures: dict[int, Exception] = {}
    observed, observations, truths = [], [], []
    stages.begin(progress, "observation")
    for k, (cfg, attack, row) in enumerate(zip(cfgs, attacks, rows, strict=True)):
        row.info.update(copy.deepcopy(shared_info))
        row.metrics.update(fitted.metrics())
        row.costs.update(fitted.costs())
        victim_ctx = dataclasses.replace(ctx, config=cfg, seeds=cfg.derived_seeds())
        try:
            observation, truth = observe.for_attack(attack, defense, fitted.target, parts, victim_ctx)
        except Exception as exc:  # noqa: BLE001 - this victim's row only
            failures[k] = exc
            continue
        if isinstance(truth, Victim):
            row.info["victim_ids"] = list(truth.ids)
        row.info["observation"] = {"surface": observation.surface.value, **observation.notes}
        observed.append(k)
        observations.append(observation)
        truths.append(truth)
    stages.end(progress, "observation")
    t0 = time.perf_counter()
    outputs = attack_cls.run_cell([attacks[k] for k in observed], observations, first.budget,
                                  stages.attack_progress(progress), engine=options.cell_engine)
    attack_time = time.perf_counter() - t0
    stages.begin(progress, "scoring")
    for k, truth, output in zip(observed, truths, outputs, strict=True):
        row = rows[k]
        row.costs["attack_time_s"] = attack_time / len(observed)  # this victim's share of the batched attack
        row.costs["cell_attack_time_s"] = attack_time
        if isinstance(output, Exception):
            failures[k] = output
            continue
        try:
            row.grad_evals = output.grad_evals
            row.info.update(attack=output.info, family=attacks[k].family)
            context = ScoreContext(run_setup.parts.auxiliary, row.costs, stagings[k], attacks[k].surface,
                                   options.allow_download, cache_dir=cache_dir(options))
            _record_scores(row, scorer.score(output, truth, context))
        except Exception as exc:  # noqa: BLE001 - this victim's row only
            failures[k] = exc
    stages.end(progress, "scoring")
    return failures
