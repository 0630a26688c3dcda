"""GASCNN's claim "gradient-inversion reconstructions 1.75x further (FID) than against the undefended model",
measured on a model whose undefended gradient leaks (issue 19), from the stored rows of
benchmarks/suites/gascnn-claim.toml.

For each attack run against the defense, the ratio fd_eval(defended) / fd_eval(undefended, the control
attack) over the SAME victims (paired by victim id), with a 95% paired bootstrap interval (victims
resampled, 2,000 draws). fd_eval is the Frechet distance in the evaluation classifier's 32-d feature
space (``privbench.metrics.eval_classifier``; FID's Inception weights cannot be loaded offline, so no
FID is reported); it needs n >= 64 victims. The verdict:

- ``no verdict`` when the control attack does not beat its trivial baseline against the undefended model
  (its fd_eval interval must lie below the baseline's: random auxiliary images against the same originals),
  since then neither model leaks at this budget and the ratio says nothing;
- ``holds`` when the interval's lower end is at least 1.75; ``does not hold`` when its upper end is below
  1.75; ``inconclusive`` otherwise.

    PRIVBENCH_DATA_DIR=../shared/datasets bench suite benchmarks/suites/gascnn-claim.toml --jobs 2
    python benchmarks/gascnn_fd_claim.py [--suite SPEC] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from privbench.claims import GASCNN_CLAIMS
from privbench.config import RunConfig
from privbench.metrics import sets
from privbench.scoring import _reconstruction, data_and_splits, evaluation_classifier
from privbench.store import Store
from privbench.views.rows import select

SUITE = Path(__file__).parent / "suites" / "gascnn-claim.toml"
CLAIM = next(c for c in GASCNN_CLAIMS if c.quantity == "reconstruction_fd_ratio")
DRAWS = 2000


def _features_by_victim(store: Store, rows, data, index, classifier) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """"seed:victim id" -> (features of its reconstruction, of its original), over the rows' reconstructions.

    Keyed by the run's seed as well: two seeds may draw the same member, and each run counts (as in
    ``bench score``); the same seed draws the same victim against the defense and against ``none``."""
    shape = tuple(data.image_shape)
    out = {}
    for row in rows:
        loaded = _reconstruction(store, row, shape, index)
        if loaded is None:
            continue
        images, ids = loaded
        originals = data.images[torch.tensor([index[i] for i in ids])]
        for vid, f_rec, f_orig in zip(ids, classifier.features(images), classifier.features(originals), strict=True):
            out[f"{row.config['seed']}:{vid}"] = (f_rec, f_orig)
    return out


def paired_ratio(defended: dict, control: dict, seed: int = 0) -> dict:
    """fd(defended) / fd(control) on their common victims, with a paired 95% bootstrap interval."""
    common = sorted(set(defended) & set(control))
    d_rec = np.stack([defended[v][0] for v in common])
    c_rec = np.stack([control[v][0] for v in common])
    orig = np.stack([defended[v][1] for v in common])
    n = len(common)
    value = sets.frechet_distance(d_rec, orig) / sets.frechet_distance(c_rec, orig)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(DRAWS):
        idx = rng.integers(0, n, n)
        draws.append(sets.frechet_distance(d_rec[idx], orig[idx]) / sets.frechet_distance(c_rec[idx], orig[idx]))
    low, high = np.percentile(draws, [2.5, 97.5])
    return {"n": n, "ratio": value, "interval": [float(low), float(high)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default=str(SUITE))
    parser.add_argument("--store", default=None)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--control", default="invgrad", help="the attack against `none` the ratio divides by")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    store = Store(args.store)
    rows = [r for r in select(store, args.suite, args.data_root).rows if r.status == "ok" and "ssim" in r.metrics]
    cfg = RunConfig.from_dict(rows[0].config)
    data, parts = data_and_splits(cfg, args.data_root)
    spec, classifier = evaluation_classifier(cfg, data, parts)
    index = {image_id: i for i, image_id in enumerate(data.ids)}
    cells = defaultdict(list)
    for r in rows:
        cells[(r.config["defense"], r.config["attack"], r.config.get("model"))].append(r)
    features = {key: _features_by_victim(store, members, data, index, classifier) for key, members in cells.items()}

    controls = {k: v for k, v in features.items() if k[0] == "none" and k[1] == args.control}
    if not controls:
        raise SystemExit(f"no rows of none x {args.control} in {args.suite}: run the suite first")
    (_, _, model), control = next(iter(controls.items()))
    # does the control attack leak at all? its fd_eval against the baseline's (random auxiliary images)
    originals = np.stack([f[1] for f in control.values()])
    rng = np.random.default_rng(0)
    pool = parts.auxiliary.images[torch.from_numpy(rng.choice(len(parts.auxiliary), len(originals), replace=False))]
    control_score = sets.frechet_score(spec.metric_name, np.stack([f[0] for f in control.values()]), originals,
                                       bootstrap=DRAWS)
    baseline_score = sets.frechet_score(spec.metric_name, classifier.features(pool), originals, bootstrap=DRAWS)
    leaks = (control_score.interval is not None and baseline_score.interval is not None
             and control_score.interval[1] < baseline_score.interval[0])
    budget = cfg.budget.max_grad_evals
    print(f"model {model}, round {cfg.gradient_round}, budget {budget} gradient evaluations per victim, "
          f"{spec.metric_name}")
    print(f"control none x {args.control}: {spec.metric_name} {control_score.value:.3f} "
          f"[{control_score.interval[0]:.3f}, {control_score.interval[1]:.3f}] vs baseline (random auxiliary images) "
          f"{baseline_score.value:.3f} [{baseline_score.interval[0]:.3f}, {baseline_score.interval[1]:.3f}] "
          f"(n={control_score.n}): {'leaks' if leaks else 'does NOT beat its baseline'}")
    for (defense, attack, m), members in sorted(cells.items()):
        med = {k: float(np.median([r.metrics[k] for r in members])) for k in ("psnr", "ssim", "baseline_psnr",
                                                                             "baseline_ssim")}
        print(f"{defense} x {attack} ({m}), n={len(members)}: median PSNR {med['psnr']:.2f} dB, SSIM {med['ssim']:.3f} "
              f"(mean-image baseline {med['baseline_psnr']:.2f} dB, {med['baseline_ssim']:.3f})")
    out = []
    print("| defense x attack | n | fd_eval defended | fd_eval undefended | ratio | 95% interval | paper | verdict |")
    print("|---|---|---|---|---|---|---|---|")
    for (defense, attack, m), feats in sorted(features.items()):
        if defense == "none":
            continue
        result = paired_ratio(feats, control)
        low, high = result["interval"]
        verdict = ("no verdict: the control attack does not beat its baseline" if not leaks
                   else "holds" if low >= CLAIM.value else "does not hold" if high < CLAIM.value else "inconclusive")
        common = sorted(set(feats) & set(control))
        d = sets.frechet_distance(np.stack([feats[v][0] for v in common]), np.stack([feats[v][1] for v in common]))
        c = sets.frechet_distance(np.stack([control[v][0] for v in common]), np.stack([control[v][1] for v in common]))
        print(f"| {defense} x {attack} ({m}) | {result['n']} | {d:.3f} | {c:.3f} | {result['ratio']:.2f} | "
              f"[{low:.2f}, {high:.2f}] | >= {CLAIM.value} | {verdict} |")
        out.append({"defense": defense, "attack": attack, "model": m, "control": f"none x {args.control}",
                    "budget": budget, "round": cfg.gradient_round, "metric": spec.metric_name, "fd_defended": d,
                    "fd_undefended": c, **result, "claim": CLAIM.to_dict(), "verdict": verdict,
                    "control_fd": control_score.to_dict(), "baseline_fd": baseline_score.to_dict()})
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
