"""Does the shared gradient pin the victim's image down? A diagnostic for the leakage map (issue 19).

For each stored gradient-inversion row of a suite (default: benchmarks/suites/leakage-map.toml), the
run's observation is rebuilt from its stored config and the gradient distance the attack minimises
(cosine, over all parameters, as ``invgrad`` and ``gradinversion`` use) is evaluated at:

- the attack's reconstruction (read from the run's artifacts);
- the true images with Gaussian pixel noise of std sigma (0.02, 0.05, 0.1; clipped to [0, 1]), with the
  SSIM each noisy copy keeps: images a good attack could settle for;
- the auxiliary split's mean image (the trivial baseline).

If the reconstruction matches the gradient as closely as (or more closely than) a noisy copy of the
truth while its SSIM is far lower, the gradient does not identify the image at this size: more budget or
a better optimiser cannot close the gap, only a prior can. This script is a diagnostic and reads the
victim's truth on purpose; no attack does.

    python benchmarks/gradient_identifiability.py [--suite SPEC] [--model resnet] [--attack invgrad]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from privbench import datasets as datasetlib
from privbench.attacks.gradient_inversion import cosine_distance, dummy_update, mean_scale
from privbench.config import RunConfig
from privbench.metrics.image import ssim
from privbench.runner import RunOptions, prepare
from privbench.scoring import _reconstruction
from privbench.store import Store
from privbench.views.rows import select

SUITE = Path(__file__).parent / "suites" / "leakage-map.toml"
SIGMAS = (0.02, 0.05, 0.1)


def distance(update, images: torch.Tensor, labels: torch.Tensor) -> float:
    params = [q for q in update.model.parameters() if q.requires_grad]
    dummy = dummy_update(update.model, params, images, labels, update.rule, create_graph=False)
    return float(cosine_distance(dummy, mean_scale(update)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default=str(SUITE))
    parser.add_argument("--store", default=None)
    parser.add_argument("--model", default=None, help="only rows of this model")
    parser.add_argument("--attack", default="invgrad")
    args = parser.parse_args()
    torch.manual_seed(0)
    store = Store(args.store)
    rows = [r for r in select(store, args.suite).rows
            if r.status == "ok" and r.config["attack"] == args.attack and (args.model in (None, r.config.get("model")))]
    table = defaultdict(list)
    for row in rows:
        cfg = RunConfig.from_dict(row.config)
        fingerprint = datasetlib.fingerprint(cfg.dataset, None, cfg.image_size)
        prepared = prepare(cfg, RunOptions(), Path(tempfile.mkdtemp()), fingerprint)
        update, truth = prepared.observation.gradient_update, prepared.truth
        index = {image_id: i for i, image_id in enumerate(truth.ids)}
        loaded = _reconstruction(store, row, tuple(truth.images.shape[1:]), index)
        if loaded is None:
            continue
        recon = loaded[0]
        out = {"reconstruction": (distance(update, recon, truth.labels), float(ssim(recon, truth.images).mean()))}
        for sigma in SIGMAS:
            noisy = (truth.images + sigma * torch.randn_like(truth.images)).clamp(0, 1)
            out[f"truth + N(0, {sigma}^2)"] = (distance(update, noisy, truth.labels),
                                               float(ssim(noisy, truth.images).mean()))
        mean_image = prepared.auxiliary.images.mean(0, keepdim=True).expand_as(truth.images)
        out["mean image"] = (distance(update, mean_image, truth.labels), float(ssim(mean_image, truth.images).mean()))
        key = (cfg.model, cfg.bn_mode, cfg.bn_buffers, cfg.victim_batch, cfg.gradient_round)
        table[key].append(out)
        print(key, row.run_id, {k: (round(d, 4), round(s, 3)) for k, (d, s) in out.items()}, flush=True)
    print()
    print("| model | BatchNorm | B | round | point | median cosine gradient distance | median SSIM | n |")
    print("|---|---|---|---|---|---|---|---|")
    for (model, mode, buffers, batch, rnd), outs in sorted(table.items()):
        for point in outs[0]:
            d = statistics.median(o[point][0] for o in outs)
            s = statistics.median(o[point][1] for o in outs)
            print(f"| {model} | {mode}/{buffers} | {batch} | {rnd} | {point} | {d:.4f} | {s:.3f} | {len(outs)} |")


if __name__ == "__main__":
    main()
