"""Set metrics over cells (``bench score``): FID, KID and fd_eval of all reconstructions of a cell.

A cell is every successful reconstruction run that shares its resolved config
except the run ``seed`` (and the privbench version). Its reconstructions are
read from the runs' artifacts; the originals are re-derived from the dataset by
the stored victim ids. The baseline of a set metric is n images drawn at random
from auxiliary data (other patients), scored the same way.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from privbench import datasets as datasetlib
from privbench.config import RunConfig, digest
from privbench.datasets import splits as splitlib
from privbench.metrics import eval_classifier, sets, weights
from privbench.metrics.perceptual import InceptionFeatures
from privbench.store import RunResult, Store, home

log = logging.getLogger(__name__)
RECONSTRUCTION_FILE = "reconstruction.pt"


def cell_of(row: RunResult) -> dict:
    """The cell a run belongs to: its config without the seed, plus the privbench version."""
    cell = {k: v for k, v in row.config.items() if k != "seed"}
    return {"config": cell, "privbench": row.privbench_version}


def cell_key(row: RunResult) -> str:
    return digest(cell_of(row))[:16]


@dataclass
class CellReport:
    cell_key: str
    config: dict
    n_runs: int
    per_run_medians: dict[str, float | None]
    scores: list[dict] = field(default_factory=list)  # {"score": SetScore dict, "baseline": SetScore dict | None}
    eval_classifier: dict | None = None


def reconstruction_cells(store: Store, filters: dict[str, str] | None = None) -> dict[str, list[RunResult]]:
    """The ok reconstruction runs by cell, one row per request key (``Store.all_ok``); damaged rows are skipped."""
    cells: dict[str, list[RunResult]] = {}
    for row in store.all_ok():
        if "psnr" not in row.metrics or not row.artifacts:
            continue
        if any(str(row.config.get(k)) != str(v) for k, v in (filters or {}).items()):
            continue
        cells.setdefault(cell_key(row), []).append(row)
    return cells


def score_cell(
    store: Store, rows: list[RunResult], data_root: str | None = None, allow_download: bool = False
) -> CellReport | None:
    """Compute and store fd_eval, FID and KID (each with its baseline) for one cell.

    A run whose reconstruction file is missing, unreadable or inconsistent, or whose victims are not in
    the dataset, is skipped with a warning naming it; a cell left without runs (or whose stored config
    cannot be read) is skipped the same way (None).
    """
    key = cell_key(rows[0])
    try:
        cfg = RunConfig.from_dict({k: v for k, v in rows[0].config.items()})
    except (ValueError, TypeError) as exc:
        log.warning("skipping cell %s (runs %s): its stored config cannot be read (%s)", key,
                    ", ".join(r.run_id for r in rows), exc)
        return None
    data, parts = data_and_splits(cfg, data_root)
    index = {image_id: i for i, image_id in enumerate(data.ids)}
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    recon, victim_ids, used = [], [], []
    for row in rows:
        loaded = _reconstruction(store, row, shape, index)
        if loaded is not None:
            recon.append(loaded[0])
            victim_ids.extend(loaded[1])
            used.append(row)
    if not used:
        log.warning("skipping cell %s: none of its %d run(s) has a readable reconstruction", key, len(rows))
        return None
    rows = used
    reconstructions = torch.cat(recon)
    originals = data.images[torch.tensor([index[i] for i in victim_ids])]
    n = len(originals)
    report = CellReport(
        key, cfg.to_dict(), len(rows),
        {m: _median([r.metrics.get(m) for r in rows]) for m in _per_run_metric_names(rows)},
    )

    spec, classifier = evaluation_classifier(cfg, data, parts)
    report.eval_classifier = classifier.info
    rng = np.random.default_rng(0)
    pool = classifier.heldout if len(classifier.heldout) >= n else parts.auxiliary
    baseline_images = pool.images[torch.from_numpy(rng.choice(len(pool), size=min(n, len(pool)), replace=False))]
    f_orig, f_recon, f_base = (classifier.features(x) for x in (originals, reconstructions, baseline_images))
    name = spec.metric_name
    report.scores.append(
        {
            "score": sets.frechet_score(name, f_recon, f_orig).to_dict(),
            "baseline": sets.frechet_score(name, f_base, f_orig[: len(f_base)]).to_dict(),
        }
    )

    inception = InceptionFeatures(allow_download=allow_download)
    fid_name, kid_name = f"fid[{inception.name}]", f"kid[{inception.name}]"
    try:
        i_orig, i_recon, i_base = (inception(x) for x in (originals, reconstructions, baseline_images))
    except weights.WeightsMissing as exc:
        for metric in (fid_name, kid_name):
            report.scores.append({"score": sets.SetScore(metric, None, n, reason=str(exc)).to_dict(), "baseline": None})
    else:
        report.scores.append({"score": sets.frechet_score(fid_name, i_recon, i_orig).to_dict(),
                              "baseline": sets.frechet_score(fid_name, i_base, i_orig[: len(i_base)]).to_dict()})
        report.scores.append({"score": sets.kid_score(kid_name, i_recon, i_orig).to_dict(),
                              "baseline": sets.kid_score(kid_name, i_base, i_orig).to_dict()})

    run_ids = [r.run_id for r in rows]
    for entry in report.scores:
        store.record_cell_score(
            key, {**cell_of(rows[0]), "eval_classifier": classifier.info, "per_run_medians": report.per_run_medians},
            entry["score"], entry["baseline"], run_ids, rows[0].privbench_version,
        )
    return report


def data_and_splits(cfg: RunConfig, data_root: str | None = None) -> tuple["datasetlib.ImageDataset", "splitlib.Splits"]:
    """The dataset of a stored config (from the cache of this home) and its members / nonmembers / auxiliary split."""
    data = datasetlib.load(cfg.dataset, cfg.image_size, cfg.channels, root=data_root,
                           cache_dir=home() / "cache" / "datasets")
    return data, splitlib.make(data, cfg.split, cfg.derived_seeds()["split"])


def evaluation_classifier(cfg: RunConfig, data, parts) -> tuple[eval_classifier.EvalClassifierSpec,
                                                                 eval_classifier.EvalClassifier]:
    """fd_eval's evaluation classifier for a stored config's data (trained on its auxiliary split, or cached)."""
    spec = eval_classifier.EvalClassifierSpec(
        dataset=cfg.dataset, data_fingerprint=data.provenance.get("fingerprint", ""),
        image_size=cfg.image_size, channels=cfg.channels, split_seed=cfg.split_seed, split=cfg.split,
    )
    return spec, eval_classifier.train_or_load(spec, parts.auxiliary, home() / "cache" / "eval")


def _reconstruction(store: Store, row: RunResult, shape: tuple[int, int, int], index: dict[str, int]
                    ) -> tuple[torch.Tensor, list[str]] | None:
    """A run's reconstructions [B, C, H, W] and victim ids from its artifacts, or None (with a warning naming
    the file) if they are missing, unreadable or do not fit the cell."""
    artifacts = Path(store.root, row.artifacts or "")
    path = artifacts / RECONSTRUCTION_FILE
    try:
        inside = artifacts.resolve().is_relative_to(store.artifacts_root.resolve())
    except OSError:
        inside = False
    if not row.artifacts or not inside:
        log.warning("skipping run %s: its artifacts folder %r is not inside %s", row.run_id, row.artifacts,
                    store.artifacts_root)
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        images, ids = saved["reconstruction"], [str(i) for i in saved["victim_ids"]]
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != shape:
            raise ValueError(f"reconstruction is not a [B, {', '.join(map(str, shape))}] tensor")
        if len(ids) != len(images):
            raise ValueError(f"{len(images)} images but {len(ids)} victim ids")
        if not torch.isfinite(images).all():
            raise ValueError("reconstruction holds non-finite values")
    except FileNotFoundError:
        log.warning("skipping run %s: its reconstruction file %s is missing", row.run_id, path)
        return None
    except Exception as exc:  # truncated, foreign or unsafe (refused by weights_only): skip the run, never fatal
        log.warning("skipping run %s: its reconstruction file %s is unreadable (%s: %s)", row.run_id, path,
                    type(exc).__name__, exc)
        return None
    missing = [i for i in ids if i not in index]
    if missing:
        log.warning("skipping run %s: its victims %s are not in the dataset as loaded now", row.run_id,
                    ", ".join(missing[:3]) + ("..." if len(missing) > 3 else ""))
        return None
    return images.float(), ids


def _per_run_metric_names(rows: list[RunResult]) -> list[str]:
    names = {k for r in rows for k in r.metrics}
    return sorted(n for n in names if n in ("psnr", "ssim", "label_accuracy", "baseline_psnr", "baseline_ssim")
                  or n.startswith("lpips") or n.startswith("baseline_lpips"))


def _median(values: list) -> float | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(values) if values else None

