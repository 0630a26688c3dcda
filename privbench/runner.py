"""One RunConfig -> one stored RunResult: load data, fit the target under the defense,
observe, attack, score against the ground truth the attack never saw, record.

Input errors (unknown names, bad parameters, missing data) raise before anything
is computed and store nothing. Errors while computing are stored as a failed
row with the traceback; an attack that cannot run on what the defense exposes is
stored as ``unsupported``. Ctrl-C stores nothing.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from privbench import __version__, registry
from privbench import config as configlib
from privbench import datasets as datasetlib
from privbench.config import RunConfig
from privbench.provenance import configure_threads, git_commit, versions
from privbench.store import RunResult, Store, home
from privbench.threat import Surface

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class RunOptions:
    """How to run, without changing what is computed (not part of the config hash)."""

    data_root: str | None = None
    force: bool = False  # recompute even if a stored result exists
    allow_download: bool = False
    threads: int | None = None
    cache_dir: Path | None = None  # trained targets and preprocessed data; default <home>/cache


def lookup(config: RunConfig, store: Store, options: RunOptions) -> RunResult | None:
    """A stored ok result for ``config`` as requested, found without importing torch."""
    fingerprint = datasetlib.fingerprint(config.dataset, options.data_root)
    hit = store.find_ok(request_key=config.cache_key(fingerprint))
    if hit:
        hit.cached = True
    return hit


def run(
    config: RunConfig, store: Store, options: RunOptions = RunOptions(), progress: ProgressFn | None = None
) -> RunResult:
    """Return the stored result for ``config``, or compute, store and return it."""
    fingerprint = datasetlib.fingerprint(config.dataset, options.data_root)
    request_key = config.cache_key(fingerprint)
    if not options.force:
        hit = store.find_ok(request_key=request_key)
        if hit:
            hit.cached = True
            return hit
    resolved = configlib.resolve(config)
    cache_key = resolved.cache_key(fingerprint)
    if not options.force:
        hit = store.find_ok(cache_key=cache_key)
        if hit:
            hit.cached = True
            return hit
    threads = configure_threads(options.threads)
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
    result = RunResult(
        run_id=run_id,
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(),
        status="ok",
        config=resolved.to_dict(),
        config_hash=resolved.config_hash(),
        cache_key=cache_key,
        request_key=request_key,
        privbench_version=__version__,
    )
    result.info.update(
        seeds=resolved.derived_seeds(),
        versions=versions(_plugin_versions(resolved)),
        git=git_commit(),
        threads=threads,
        data_fingerprint=fingerprint,
    )
    staging = store.staging_dir(run_id)
    start = time.perf_counter()
    try:
        _execute(resolved, options, result, staging, progress)
    except (configlib.ConfigError, datasetlib.DatasetError, registry.RegistryError, KeyboardInterrupt):
        _discard(staging)  # bad input or Ctrl-C: nothing is stored
        raise
    except Exception as exc:
        from privbench.threat import AttackError

        result.status = "unsupported" if isinstance(exc, AttackError) else "failed"
        result.error = f"{type(exc).__name__}: {exc}"
        result.traceback = traceback.format_exc()
    result.wall_time_s = time.perf_counter() - start
    return store.record(result, staging)


def _discard(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _plugin_versions(config: RunConfig) -> dict[str, str]:
    """Versions of the distributions any named plugin component came from."""
    out = {}
    for reg, name in (
        (registry.defenses, config.defense),
        (registry.attacks, config.attack),
        (registry.models, config.model),
        (registry.datasets, config.dataset.split(":", 1)[0]),
    ):
        origin = reg.entry(name).origin
        if origin.source == "plugin" and origin.distribution:
            out[f"plugin:{origin.distribution}"] = origin.version or "?"
    return out


def _execute(cfg: RunConfig, options: RunOptions, result: RunResult, staging: Path, progress) -> None:
    import torch

    from privbench.datasets import splits as splitlib
    from privbench.defenses.base import FitContext
    from privbench.models import build_model

    seeds = cfg.derived_seeds()
    cache_dir = options.cache_dir or home() / "cache"
    data = datasetlib.load(
        cfg.dataset, cfg.image_size, cfg.channels, root=options.data_root,
        allow_download=options.allow_download, cache_dir=cache_dir / "datasets",
    )
    parts = splitlib.make(data, cfg.split, seeds["split"])
    result.info["data"] = data.provenance
    result.info["splits"] = parts.describe()

    defense_cls = registry.defenses.get(cfg.defense)
    attack_cls = registry.attacks.get(cfg.attack)
    defense = defense_cls(defense_cls.Params(**dict(cfg.defense_params)))
    attack = attack_cls(attack_cls.Params(**dict(cfg.attack_params)), seed=seeds["attack"])

    def fresh_model() -> torch.nn.Module:
        return build_model(
            cfg.model, dict(cfg.model_params), cfg.channels, cfg.image_size, data.num_classes, seeds["init"]
        )

    data_identity = {
        "dataset": cfg.dataset, "data_fingerprint": result.info["data_fingerprint"], "split_seed": cfg.split_seed,
        "split": cfg.to_dict()["split"], "image_size": cfg.image_size, "channels": cfg.channels,
    }
    ctx = FitContext(config=cfg, build_model=fresh_model, nonmembers=parts.nonmembers, seeds=seeds, progress=progress,
                     members=parts.members, data_identity=data_identity)
    target, target_info = _load_or_fit(defense, fresh_model, parts.members, ctx, cache_dir / "targets", result)
    _stage_defense_artifacts(target_info, staging)
    result.info["target"] = target_info
    result.metrics["target_accuracy"] = target.utility.get("accuracy")
    result.costs.update(target.costs)
    twin = defense.utility_twin()
    if twin is not None:
        twin_target, twin_info = _load_or_fit(twin, fresh_model, parts.members, ctx, cache_dir / "targets", result)
        _stage_defense_artifacts(twin_info, staging, prefix="twin-")
        result.info["twin"] = twin_info
        result.metrics["twin_accuracy"] = twin_target.utility.get("accuracy")
        result.metrics["accuracy_drop"] = result.metrics["twin_accuracy"] - result.metrics["target_accuracy"]
        result.costs["twin_train_time_s"] = twin_target.costs.get("train_time_s")

    if attack.surface in (Surface.GRADIENTS, Surface.SHARED_DATA):
        victim = _choose_victim(parts.members, cfg.victim_batch, seeds["victim"])
        result.info["victim_ids"] = list(victim.ids)
        observation = defense.observe(attack.surface, target, victim, ctx)
        if attack.surface is Surface.SHARED_DATA:  # the service provider also holds population data
            import dataclasses

            observation = dataclasses.replace(observation, auxiliary=parts.auxiliary)
    else:
        observation, is_member = _model_observation(defense, attack.surface, target, parts, ctx, data.num_classes)
    result.info["observation"] = {"surface": observation.surface.value, **observation.notes}

    attack_progress = (lambda done, total: progress("attack", done, total)) if progress else None
    t0 = time.perf_counter()
    output = attack.run(observation, cfg.budget, attack_progress)
    result.costs["attack_time_s"] = time.perf_counter() - t0
    result.grad_evals = output.grad_evals
    result.info["attack"] = output.info

    if attack.family == "reconstruction":
        # A gradient attack recovers a batch in no particular order; shared-data attacks keep the sent order.
        _score_reconstruction(output, victim, parts.auxiliary, result, staging, options,
                              match=attack.surface is Surface.GRADIENTS)
    elif attack.family == "membership":
        _score_membership(output, is_member, result, staging)
    else:  # pragma: no cover - later families add their scorers here
        raise NotImplementedError(f"no scorer for attack family {attack.family!r}")


def _stage_defense_artifacts(target_info: dict, staging: Path, prefix: str = "") -> None:
    """Write the files a defense put in its training record (``training["artifacts"]``: name -> text; and
    ``training["artifact_files"]``: name -> path, copied) as run artifacts named ``prefix + name``."""
    import shutil

    training = target_info.get("training") or {}
    for name, source in (training.get("artifact_files") or {}).items():  # files the defense wrote elsewhere
        if Path(source).is_file():
            shutil.copyfile(source, staging / (prefix + Path(name).name))
    files = training.get("artifacts")
    if not isinstance(files, dict):
        return
    for name, text in files.items():
        (staging / (prefix + Path(name).name)).write_text(text)
    target_info["training"] = {**training, "artifacts": sorted(prefix + Path(name).name for name in files)}


def _model_observation(defense, surface, target, parts, ctx, num_classes):
    """The released-model observation plus what a membership attacker holds: candidates and auxiliary data.

    Candidates are every member and every nonmember (unique images: the split
    dropped duplicates), shuffled; which is which stays with the runner. ROC
    metrics are rates within each class, so the two need not be equal in number.
    """
    import dataclasses

    import numpy as np
    import torch

    from privbench.datasets import ImageDataset
    from privbench.defenses.base import FitContext
    from privbench.models import build_model

    cfg = ctx.config
    if len(parts.nonmembers) == 0 or len(parts.members) == 0:
        raise configlib.ConfigError("membership scoring needs non-empty members and nonmembers splits")
    rng = np.random.default_rng(ctx.seeds["victim"])
    members, nonmembers = parts.members, parts.nonmembers
    n = len(members)
    order = rng.permutation(n + len(nonmembers))
    pooled = ImageDataset(
        torch.cat([members.images, nonmembers.images]), torch.cat([members.labels, nonmembers.labels]),
        members.class_names, members.ids + nonmembers.ids, members.provenance,
    )
    candidates = pooled.subset(order)
    is_member = (order < n)

    def model_from_seed(seed: int):
        return build_model(cfg.model, dict(cfg.model_params), cfg.channels, cfg.image_size, num_classes, seed)

    def shadow_trainer(data, seed: int):
        shadow_ctx = FitContext(cfg, lambda: model_from_seed(seed), data, {**ctx.seeds, "train": seed})
        return defense.fit(model_from_seed(seed), data, shadow_ctx).model

    observation = defense.observe(surface, target, None, ctx)
    notes = {
        **observation.notes,
        "target_train_time_s": target.costs.get("train_time_s"),
        "n_members": len(parts.members),
        "n_candidates": len(order),
        "training_recipe": defense.plain_training_recipe(),
    }
    observation = dataclasses.replace(
        observation, auxiliary=parts.auxiliary, candidates=candidates, shadow_trainer=shadow_trainer,
        build_model=model_from_seed, notes=notes,
    )
    return observation, is_member


def _score_membership(output, is_member, result: RunResult, staging: Path) -> None:
    import numpy as np

    from privbench.metrics.membership import dp_bound_check, membership_metrics

    if output.scores is None or len(output.scores) != len(is_member):
        raise RuntimeError(f"membership attack returned {None if output.scores is None else len(output.scores)} "
                           f"scores for {len(is_member)} candidates")
    metrics, reasons, roc = membership_metrics(output.scores, is_member, output.decisions)
    epsilon, delta = result.costs.get("epsilon_spent"), result.costs.get("delta")
    if isinstance(epsilon, (int, float)) and isinstance(delta, (int, float)):
        n_in = int(np.sum(is_member))
        metrics.update(dp_bound_check(roc, float(epsilon), float(delta), n_in, len(is_member) - n_in))
    result.metrics.update(metrics)
    if reasons:
        result.info.setdefault("unavailable_metrics", {}).update(reasons)
    (staging / "roc.json").write_text(json.dumps(roc))
    (staging / "scores.json").write_text(json.dumps({"scores": [float(x) for x in output.scores],
                                                     "is_member": [bool(x) for x in is_member]}))


def _load_or_fit(defense, fresh_model, members, ctx, cache_dir: Path, result: RunResult):
    """Train the target under the defense, or load it from the cache keyed by everything that shaped it."""
    import torch

    from privbench.config import digest
    from privbench.defenses.base import Target

    cfg = ctx.config
    key = digest(
        {
            "defense": defense.identity(), "model": cfg.model,
            "model_params": dict(cfg.model_params), "dataset": cfg.dataset, "data": result.info["data_fingerprint"],
            "image_size": cfg.image_size, "channels": cfg.channels, "seed": cfg.trained_target_seed, "split_seed": cfg.split_seed,
            "split": cfg.to_dict()["split"], "privbench": __version__,
        }
    )
    weights, meta = cache_dir / f"{key}.pt", cache_dir / f"{key}.json"
    if weights.exists() and meta.exists():
        try:
            state = torch.load(weights, weights_only=True)
            record = json.loads(meta.read_text())
            model = defense.released_architecture(fresh_model())
            model.load_state_dict(state["trained"])
            target = Target(model.eval(), state["initial"], record["training"], record["utility"], record["costs"])
            return target, {"cache_key": key, "cached": True, **record}
        except Exception:  # a corrupt cache entry is rebuilt, never fatal
            weights.unlink(missing_ok=True)
            meta.unlink(missing_ok=True)
    target = defense.fit(fresh_model(), members, ctx)
    record = {"training": target.training, "utility": target.utility, "costs": target.costs}
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".tmp")
    torch.save({"trained": target.model.state_dict(), "initial": target.initial_state}, tmp)
    tmp.replace(weights)
    meta.write_text(json.dumps(record, default=str))
    return target, {"cache_key": key, "cached": False, **record}


def _choose_victim(members, batch: int, seed: int):
    import numpy as np

    from privbench.threat import Victim

    if batch > len(members):
        raise configlib.ConfigError(f"victim_batch={batch} exceeds the {len(members)} members")
    idx = np.random.default_rng(seed).choice(len(members), size=batch, replace=False)
    chosen = members.subset(idx)
    return Victim(images=chosen.images, labels=chosen.labels, ids=chosen.ids)


def _score_lpips(images, baseline_images, truth, result: RunResult, options: RunOptions) -> None:
    """LPIPS[alex] of the reconstruction and of the baseline; no number (with the reason) if weights are missing."""
    from privbench.metrics.perceptual import LPIPS
    from privbench.metrics.weights import WeightsMissing

    metric = LPIPS("alex", allow_download=options.allow_download)
    name = metric.name(truth.shape[-1])
    try:
        result.metrics[name] = float(metric(images, truth).mean())
        result.metrics[f"baseline_{name}"] = float(metric(baseline_images, truth).mean())
    except WeightsMissing as exc:
        result.metrics[name] = result.metrics[f"baseline_{name}"] = None
        result.info.setdefault("unavailable_metrics", {})[name] = str(exc)


def _hungarian_by_psnr(images, truth) -> list[int]:
    """The reconstruction index assigned to each true image, maximising the summed per-image PSNR."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    from privbench.metrics.image import psnr

    b = len(truth)
    table = np.array([[float(psnr(images[j : j + 1], truth[i : i + 1])) for j in range(b)] for i in range(b)])
    table = np.nan_to_num(table, nan=-1e9, posinf=1e9, neginf=-1e9)  # identical images: PSNR inf
    rows, cols = linear_sum_assignment(table, maximize=True)
    return [int(c) for _, c in sorted(zip(rows, cols, strict=True))]


def _score_reconstruction(output, victim, auxiliary, result: RunResult, staging: Path, options: RunOptions,
                          match: bool = True) -> None:
    import torch

    from privbench.metrics.image import IMAGE_METRICS, score_reconstruction

    if output.images is None or output.images.shape != victim.images.shape:
        raise RuntimeError(
            f"attack returned images of shape {None if output.images is None else tuple(output.images.shape)}, "
            f"expected {tuple(victim.images.shape)}"
        )
    if match and len(victim.labels) > 1:  # a batch: pair each reconstruction with the true image it matches best
        order = _hungarian_by_psnr(output.images, victim.images)
        result.info["matching"] = {
            "method": "Hungarian (scipy linear_sum_assignment) maximising the summed per-image PSNR",
            "reconstruction_for_victim": order,  # victim i is scored against reconstruction order[i]
        }
        output.images = output.images[order]
        output.labels = None if output.labels is None else output.labels[order]
    result.metrics.update(score_reconstruction(output.images, output.labels, victim.images, victim.labels))
    result.info["per_image"] = {  # the metrics above are batch means; medians and spreads need these
        m.name: [float(v) for v in m(output.images, victim.images)] for m in IMAGE_METRICS
    }
    # Trivial baseline: the auxiliary split's mean image and majority label, scored the same way.
    mean_image = auxiliary.images.mean(0, keepdim=True).expand_as(victim.images)
    majority = torch.bincount(auxiliary.labels, minlength=auxiliary.num_classes).argmax()
    baseline = score_reconstruction(mean_image, majority.expand_as(victim.labels), victim.images, victim.labels)
    result.metrics.update({f"baseline_{k}": v for k, v in baseline.items()})
    result.info["baseline"] = "mean image and majority label of the auxiliary split"
    _score_lpips(output.images, mean_image, victim.images, result, options)
    from privbench.artifacts import save_grid

    save_grid(staging / "reconstruction.png", [victim.images, output.images, mean_image],
              ["original", "reconstruction", "baseline"])
    torch.save({"reconstruction": output.images, "labels": output.labels, "victim_ids": list(victim.ids)},
               staging / "reconstruction.pt")
