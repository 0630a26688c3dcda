"""Fit or load a target and its utility twin: one cache, keyed by everything that shaped the target.

A cached target is two files in ``<cache>/targets``: ``<key>.pt`` (state dicts, read with
``weights_only=True``) and ``<key>.json`` (training record, utility, costs), each written
atomically. An unreadable entry is a cache miss, never an error.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import filelock

from privbench import cache

if TYPE_CHECKING:
    from torch import nn

    from privbench.config import RunConfig
    from privbench.datasets import ImageDataset
    from privbench.defenses.base import Defense, FitContext, Target


@dataclass
class FittedTargets:
    """The target, its training info for the row, and the twin's (None for a defense without one)."""

    target: "Target"
    info: dict[str, Any]
    twin: "Target | None" = None
    twin_info: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> dict[str, Any]:
        """Utility on nonmembers: the target's accuracy and, with a twin, the twin's and the drop."""
        out = {"target_accuracy": self.target.utility.get("accuracy")}
        if self.twin is not None:
            out["twin_accuracy"] = self.twin.utility.get("accuracy")
            if out["twin_accuracy"] is not None and out["target_accuracy"] is not None:
                out["accuracy_drop"] = out["twin_accuracy"] - out["target_accuracy"]
        return out

    def costs(self) -> dict[str, Any]:
        out = dict(self.target.costs)
        if self.twin is not None:
            out["twin_train_time_s"] = self.twin.costs.get("train_time_s")
        return out


def data_identity(cfg: "RunConfig", data_fingerprint: str) -> dict[str, Any]:
    """What identifies the data a target of ``cfg`` is trained on: the source, its split and its shape."""
    return {"dataset": cfg.dataset, "data_fingerprint": data_fingerprint, "split_seed": cfg.split_seed,
            "split": cfg.to_dict()["split"], "image_size": cfg.image_size, "channels": cfg.channels}


def target_key(defense: "Defense", ctx: "FitContext") -> str:
    """The cache key of ``defense``'s target: its identity, the model, the data and the target's seeds."""
    return key_for(defense, ctx.config, ctx.data_identity, ctx.seeds)


def key_for(defense: "Defense", cfg: "RunConfig", data: dict[str, Any], seeds: dict[str, int]) -> str:
    """:func:`target_key` from its parts (a suite plans with it before anything is built)."""
    return cache.cache_key("target", {
        "defense": defense.identity(), "model": cfg.model, "model_params": dict(cfg.model_params),
        "data": data, "seeds": {p: seeds[p] for p in ("init", "train", "secrets")},
    })


def fit_or_load(defense: "Defense", build_model: Callable[[], "nn.Module"], members: "ImageDataset",
                ctx: "FitContext", cache_dir: Path) -> tuple["Target", dict[str, Any]]:
    """Train the target under ``defense``, or load it from ``cache_dir``; returns it and its info for the row."""
    key = target_key(defense, ctx)
    # one process trains a given target at a time; the others wait and then load what it cached
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(cache_dir / f"{key}.lock"))
        lock.acquire()
    except OSError as exc:  # a cache that cannot be written is optional: train without it
        cache.log.warning("cannot lock the target cache entry in %s (%s); training without it", cache_dir, exc)
        return _fit_or_load(defense, build_model, members, ctx, cache_dir, key)
    try:
        return _fit_or_load(defense, build_model, members, ctx, cache_dir, key)
    finally:
        lock.release()


def is_cached(cache_dir: Path, key: str) -> bool:
    """Whether the target ``key`` has both of its cache files (it may still fail to load)."""
    return (cache_dir / f"{key}.pt").is_file() and (cache_dir / f"{key}.json").is_file()


def _fit_or_load(defense: "Defense", build_model: Callable[[], "nn.Module"], members: "ImageDataset",
                 ctx: "FitContext", cache_dir: Path, key: str) -> tuple["Target", dict[str, Any]]:
    from privbench.defenses.base import Target

    weights, meta = cache_dir / f"{key}.pt", cache_dir / f"{key}.json"
    state, record = cache.load_torch(weights), cache.load_json(meta)
    if state is not None and record is not None:
        try:
            model = defense.released_architecture(build_model())
            model.load_state_dict(state["trained"])
            target = Target(model.eval(), state["initial"], record["training"], record["utility"], record["costs"])
            return target, {"cache_key": key, "cached": True, **record}
        except (KeyError, IndexError, AttributeError, RuntimeError, TypeError, ValueError) as exc:  # refit
            # an entry of another architecture, or one that is not what this cache writes
            cache.log.warning("target cache entry %s does not fit this model (%s); refitting", weights, exc)
    target = defense.fit(build_model(), members, ctx)
    record = {"training": target.training, "utility": target.utility, "costs": target.costs}
    try:
        cache.save_torch(weights, {"trained": target.model.state_dict(), "initial": target.initial_state})
        cache.save_json(meta, record)
    except (OSError, TypeError, ValueError) as exc:  # the cache is optional, as the dataset cache is
        cache.log.warning("could not write the target cache %s (%s); continuing without it", weights, exc)
    return target, {"cache_key": key, "cached": False, **record}


def fit_with_twin(defense: "Defense", build_model: Callable[[], "nn.Module"], members: "ImageDataset",
                  ctx: "FitContext", cache_dir: Path, staging: Path) -> FittedTargets:
    """The target and, if the defense names one, its utility twin (same data and seeds), with their
    defense-written artifacts copied into ``staging``."""
    target, info = fit_or_load(defense, build_model, members, ctx, cache_dir)
    stage_defense_artifacts(info, staging)
    fitted = FittedTargets(target, info)
    twin = defense.utility_twin()
    if twin is not None:
        fitted.twin, fitted.twin_info = fit_or_load(twin, build_model, members, ctx, cache_dir)
        stage_defense_artifacts(fitted.twin_info, staging, prefix="twin-")
    return fitted


def stage_defense_artifacts(target_info: dict, staging: Path, prefix: str = "") -> None:
    """Write the files a defense put in its training record (``training["artifacts"]``: name -> text; and
    ``training["artifact_files"]``: name -> path, copied) as run artifacts named ``prefix + name``."""
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
