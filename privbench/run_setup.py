"""A run's data, splits and defense before anything is trained, and the fit-only job a suite schedules
first (one per distinct target, so no two workers train the same target)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from privbench import datasets as datasetlib
from privbench import registry, stages
from privbench.config import RunConfig
from privbench.store import home

if TYPE_CHECKING:
    from privbench.datasets import ImageDataset
    from privbench.runner import RunOptions
    from privbench.targets import FittedTargets

ProgressFn = Callable[[str, int, int], None]


@dataclass
class Setup:
    """A run's data and defense, before anything is trained: the splits, the defense, its fit context and
    the row info so far."""

    data: "ImageDataset"
    parts: Any  # datasets.splits.Splits
    defense: Any  # defenses.base.Defense
    ctx: Any  # defenses.base.FitContext
    info: dict[str, Any]


def setup(cfg: RunConfig, options: "RunOptions", data_fingerprint: str, progress: ProgressFn | None = None) -> Setup:
    """Step 2 for a resolved ``cfg``: data, splits, the defense and the context its fit runs in."""
    from privbench import observe, targets
    from privbench.datasets import splits as splitlib
    from privbench.defenses.base import FitContext

    seeds = cfg.derived_seeds()
    stages.begin(progress, "data")
    data = datasetlib.load(cfg.dataset, cfg.image_size, cfg.channels, root=options.data_root,
                           allow_download=options.allow_download, cache_dir=cache_dir(options) / "datasets")
    parts = splitlib.make(data, cfg.split, seeds["split"])
    stages.begin(progress, "setup")  # components, checks, a cached target; ends when training or observing starts
    defense_cls = registry.defenses.get(cfg.defense)
    defense = defense_cls(defense_cls.Params(**dict(cfg.defense_params)))
    architecture = observe.Architecture.of(cfg, data.num_classes)

    def fresh_model():
        return architecture(seeds["init"])

    ctx = FitContext(config=cfg, build_model=fresh_model, nonmembers=parts.nonmembers, seeds=seeds,
                     progress=progress, members=parts.members,
                     data_identity=targets.data_identity(cfg, data_fingerprint))
    return Setup(data, parts, defense, ctx, {"data": data.provenance, "splits": parts.describe()})


def fit_target(cfg: RunConfig, options: "RunOptions", data_fingerprint: str, staging: Path,
               progress: ProgressFn | None = None) -> "FittedTargets":
    """Train (or load from the cache) the target of a resolved ``cfg`` and its utility twin, nothing more."""
    from privbench import targets

    run_setup = setup(cfg, options, data_fingerprint, progress)
    return targets.fit_with_twin(run_setup.defense, run_setup.ctx.build_model, run_setup.parts.members,
                                 run_setup.ctx, cache_dir(options) / "targets", staging)


def cache_dir(options: "RunOptions") -> Path:
    return options.cache_dir or home() / "cache"
