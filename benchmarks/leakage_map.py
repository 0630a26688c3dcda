"""The leakage map of undefended models (issue 19): median PSNR, SSIM and a perceptual feature distance of
each gradient attack's reconstructions, beside the mean-image baseline, by model, BatchNorm protocol and
batch size, from the stored rows of a suite (default: benchmarks/suites/leakage-map.toml).

The feature distance is per image: the L2 distance between the evaluation classifier's features
(``privbench.metrics.eval_classifier``, the network behind fd_eval, trained on the auxiliary split) of the
reconstruction and of the original; the baseline's is the mean image's. fd_eval itself is a set metric
that needs at least 64 victims (``bench score``); a five-victim cell calls for a per-image distance.

    PRIVBENCH_DATA_DIR=../shared/datasets bench suite benchmarks/suites/leakage-map.toml --jobs 2
    python benchmarks/leakage_map.py [--suite SPEC] [--store PATH] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from privbench.config import RunConfig
from privbench.scoring import _reconstruction, data_and_splits, evaluation_classifier
from privbench.store import Store
from privbench.views.rows import select

SUITE = Path(__file__).parent / "suites" / "leakage-map.toml"


def protocol(config: dict) -> str:
    if config.get("model") == "convnet":
        return "no BatchNorm"
    mode, buffers = config.get("bn_mode", "train"), config.get("bn_buffers", "shared")
    return "eval" if mode == "eval" else f"train, buffers {buffers}"


def feature_distances(store: Store, rows, data_root: str | None) -> dict[str, tuple[float, float]]:
    """run id -> (median feature distance of its reconstructions, of the mean image) to the originals."""
    out: dict[str, tuple[float, float]] = {}
    if not rows:
        return out
    cfg = RunConfig.from_dict(rows[0].config)
    data, parts = data_and_splits(cfg, data_root)
    spec, classifier = evaluation_classifier(cfg, data, parts)
    index = {image_id: i for i, image_id in enumerate(data.ids)}
    mean_image = parts.auxiliary.images.mean(0, keepdim=True)
    f_mean = classifier.features(mean_image)
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    for row in rows:
        loaded = _reconstruction(store, row, shape, index)
        if loaded is None:
            continue
        images, ids = loaded
        originals = data.images[torch.tensor([index[i] for i in ids])]
        f_rec, f_orig = classifier.features(images), classifier.features(originals)
        out[row.run_id] = (float(np.median(np.linalg.norm(f_rec - f_orig, axis=1))),
                           float(np.median(np.linalg.norm(f_mean - f_orig, axis=1))))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default=str(SUITE))
    parser.add_argument("--store", default=None, help="results store (default: $PRIVBENCH_HOME/privbench.sqlite)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--json", default=None, help="write the table as JSON here")
    args = parser.parse_args()
    store = Store(args.store)
    rows = [r for r in select(store, args.suite, args.data_root).rows if r.status == "ok" and "ssim" in r.metrics]
    distances = feature_distances(store, rows, args.data_root)
    groups = defaultdict(list)
    for r in rows:
        c = r.config
        groups[(c.get("model"), protocol(c), c.get("victim_batch", 1), c.get("attack"))].append(r)

    def med(values):
        values = [v for v in values if isinstance(v, (int, float))]
        return statistics.median(values) if values else None

    table = []
    for (model, proto, batch, attack), members in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        m = {k: med([r.metrics.get(k) for r in members]) for k in ("psnr", "ssim", "baseline_psnr", "baseline_ssim",
                                                                  "label_accuracy")}
        fd = [distances[r.run_id] for r in members if r.run_id in distances]
        table.append({"model": model, "protocol": proto, "batch": batch, "attack": attack, "n": len(members),
                      **m, "feature_distance": med([d[0] for d in fd]), "baseline_feature_distance": med([d[1] for d in fd]),
                      "grad_evals": med([r.grad_evals for r in members]),
                      "beats_baseline_ssim": m["ssim"] is not None and m["ssim"] > m["baseline_ssim"],
                      "run_ids": [r.run_id for r in members]})
    print("| model | BatchNorm protocol | B | attack | n | PSNR dB | SSIM | feature dist. | baseline PSNR | "
          "baseline SSIM | baseline feature dist. | label acc. | beats baseline (SSIM) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for t in table:
        def f(v, d=2):
            return "-" if v is None else f"{v:.{d}f}"
        print(f"| {t['model']} | {t['protocol']} | {t['batch']} | {t['attack']} | {t['n']} | {f(t['psnr'])} | "
              f"{f(t['ssim'], 3)} | {f(t['feature_distance'])} | {f(t['baseline_psnr'])} | {f(t['baseline_ssim'], 3)} | "
              f"{f(t['baseline_feature_distance'])} | {f(t['label_accuracy'])} | "
              f"{'yes' if t['beats_baseline_ssim'] else 'no'} |")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
