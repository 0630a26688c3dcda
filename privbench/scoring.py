"""Set metrics over cells (``bench score``): FID, KID and fd_eval of all reconstructions of a cell.

A cell is every successful reconstruction run that shares its resolved config
except the run ``seed`` (and the privbench version). Its reconstructions are
read from the runs' artifacts; the originals are re-derived from the dataset by
the stored victim ids. The baseline of a set metric is n images drawn at random
from auxiliary data (other patients), scored the same way.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import numpy as np
import torch

from privbench import datasets as datasetlib
from privbench.config import RunConfig, digest
from privbench.datasets import splits as splitlib
from privbench.metrics import eval_classifier, sets, weights
from privbench.metrics.perceptual import InceptionFeatures
from privbench.store import RunResult, Store, home


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
) -> CellReport:
    """Compute and store fd_eval, FID and KID (each with its baseline) for one cell."""
    key = cell_key(rows[0])
    cfg = RunConfig.from_dict({k: v for k, v in rows[0].config.items()})
    recon, victim_ids = [], []
    for row in rows:
        saved = torch.load(store.root / row.artifacts / "reconstruction.pt", map_location="cpu", weights_only=True)
        recon.append(saved["reconstruction"])
        victim_ids.extend(saved["victim_ids"])
    reconstructions = torch.cat(recon)
    data = datasetlib.load(cfg.dataset, cfg.image_size, cfg.channels, root=data_root,
                           cache_dir=home() / "cache" / "datasets")
    index = {image_id: i for i, image_id in enumerate(data.ids)}
    originals = data.images[torch.tensor([index[i] for i in victim_ids])]
    parts = splitlib.make(data, cfg.split, cfg.derived_seeds()["split"])
    n = len(originals)
    report = CellReport(
        key, cfg.to_dict(), len(rows),
        {m: _median([r.metrics.get(m) for r in rows]) for m in _per_run_metric_names(rows)},
    )

    spec = eval_classifier.EvalClassifierSpec(
        dataset=cfg.dataset, data_fingerprint=data.provenance.get("fingerprint", ""),
        image_size=cfg.image_size, channels=cfg.channels, split_seed=cfg.split_seed, split=cfg.split,
    )
    classifier = eval_classifier.train_or_load(spec, parts.auxiliary, home() / "cache" / "eval")
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


def _per_run_metric_names(rows: list[RunResult]) -> list[str]:
    names = {k for r in rows for k in r.metrics}
    return sorted(n for n in names if n in ("psnr", "ssim", "label_accuracy", "baseline_psnr", "baseline_ssim")
                  or n.startswith("lpips") or n.startswith("baseline_lpips"))


def _median(values: list) -> float | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(values) if values else None

