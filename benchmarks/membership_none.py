"""Membership inference against `none` (issue 7, acceptance 2): our three attacks beside ART used the ART way.

One split, one normally trained target (convnet, brain-tumor-mri 32x32 gray,
1,000 members, 2,000 nonmembers by default, the rest auxiliary), one table:

- ``loss-threshold``, ``shadow`` and ``lira`` (16 shadows, online) as privbench
  runs them: the attacker never sees a labelled member. loss-threshold and
  shadow use the auxiliary split only; online lira puts the unlabelled
  candidates in its shadows' pools (by design).
- ``ART-native``: ART's ``MembershipInferenceBlackBox`` with its own attack
  model, fit the ART way on the target's own outputs for a *labelled* part of
  the members and nonmembers (``--labelled`` of each), then scored on the rest.
  That attacker knows real members of this very model, so it is stronger than
  ours; it is scored on the held-out part only, and our attacks are shown on
  the same held-out part too.

TPR at a FPR is printed only where the nonmembers number at least 10 / FPR.

    PRIVBENCH_DATA_DIR=... python benchmarks/membership_none.py
    python benchmarks/membership_none.py --dataset synthetic-mri --members 300 --nonmembers 300 --shadows 4  # smoke
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from privbench import config as configlib
from privbench import datasets as datasetlib
from privbench import registry, runner
from privbench.config import RunConfig
from privbench.datasets.splits import SplitSpec
from privbench.metrics.membership import FPR_TARGETS, membership_metrics
from privbench.provenance import configure_threads


def membership_setup(cfg: RunConfig):
    """(observation, is_member [N] bool, target, target info) exactly as the runner builds them for ``cfg``."""
    import tempfile
    from pathlib import Path

    cfg = configlib.resolve(cfg)  # the loss-threshold config: its attack never shapes the observation
    options = runner.RunOptions()
    with tempfile.TemporaryDirectory() as staging:
        prepared = runner.prepare(cfg, options, Path(staging), datasetlib.fingerprint(cfg.dataset, None))
    target = prepared.fitted.target
    return (prepared.observation, np.asarray(prepared.truth.is_member, dtype=bool), target,
            {"splits": prepared.info["splits"], **prepared.fitted.info})


def art_native(observation, is_member: np.ndarray, labelled: np.ndarray, attack_model: str) -> np.ndarray:
    """ART's MembershipInferenceBlackBox fit on the target's outputs for the labelled candidates; scores for all."""
    from art.attacks.inference.membership_inference import MembershipInferenceBlackBox
    from art.estimators.classification import PyTorchClassifier

    from privbench.attacks.membership import query_logits

    cand = observation.candidates
    k = cand.num_classes
    probs = torch.softmax(query_logits(observation, cand.images, False), 1).numpy().astype(np.float32)
    onehot = np.eye(k, dtype=np.float32)[cand.labels.numpy()]
    estimator = PyTorchClassifier(torch.nn.Identity(), loss=torch.nn.CrossEntropyLoss(), input_shape=cand.image_shape,
                                  nb_classes=k)  # only its type and class count are used with input_type=prediction
    art = MembershipInferenceBlackBox(estimator, input_type="prediction", attack_model_type=attack_model)
    fit_in, fit_out = labelled & is_member, labelled & ~is_member
    art.fit(y=onehot[fit_in], pred=probs[fit_in], test_y=onehot[fit_out], test_pred=probs[fit_out])
    scores = art.infer(None, onehot, pred=probs, probabilities=True)
    return np.asarray(scores, dtype=np.float64).reshape(len(cand), -1)[:, -1]


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="brain-tumor-mri")
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--nonmembers", type=int, default=2000)
    parser.add_argument("--shadows", type=int, default=16, help="lira shadows")
    parser.add_argument("--shadow-models", type=int, default=4, help="shadow-attack shadows (ShadowParams default)")
    parser.add_argument("--labelled", type=float, default=0.5, help="ART-native: labelled fraction of each class")
    parser.add_argument("--art-model", default="nn", help="ART attack model type (ART's default: nn)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the table as JSON here")
    args = parser.parse_args()

    configure_threads(args.threads)
    cfg = RunConfig(defense="none", attack="loss-threshold", dataset=args.dataset, model="convnet", image_size=32,
                    channels=1, seed=args.seed, split=SplitSpec(members=args.members, nonmembers=args.nonmembers))
    observation, is_member, target, info = membership_setup(cfg)
    print(f"target: convnet on {info['splits']['members']} members, accuracy on nonmembers "
          f"{target.utility.get('accuracy'):.3f}, train accuracy {info['training'].get('train_accuracy')}; "
          f"split {info['splits']['members']}/{info['splits']['nonmembers']}/{info['splits']['auxiliary']} "
          "(members/nonmembers/auxiliary)")
    seeds = configlib.resolve(cfg).derived_seeds()
    rng = np.random.default_rng(seeds["attack"])
    labelled = np.zeros(len(is_member), dtype=bool)
    for group in (np.flatnonzero(is_member), np.flatnonzero(~is_member)):
        labelled[rng.choice(group, int(round(args.labelled * len(group))), replace=False)] = True
    held_out = ~labelled

    ours = {
        "loss-threshold": ({}, "auxiliary only (threshold)"),
        "shadow": ({"shadows": args.shadow_models}, "auxiliary only (shadows), ART BB attack model on shadow outputs"),
        "lira": ({"shadows": args.shadows}, "unlabelled candidates in shadow pools (online) + auxiliary"),
    }
    rows, scores = [], {}
    for name, (params, data) in ours.items():
        attack_cls = registry.attacks.get(name)
        attack = attack_cls(attack_cls.Params(**params), seed=seeds["attack"])
        start = time.perf_counter()
        out = attack.run(observation, cfg.budget)
        scores[name] = (np.asarray(out.scores, dtype=np.float64), data, time.perf_counter() - start, params)
    start = time.perf_counter()
    art_scores = art_native(observation, is_member, labelled, args.art_model)
    art_time = time.perf_counter() - start

    def row(label, s, mask, data, seconds):
        metrics, _, _ = membership_metrics(s[mask], is_member[mask], bootstrap=200, seed=args.seed)
        rows.append({"attack": label, "scored_on": "all candidates" if mask.all() else "held-out part",
                     "members": metrics["n_members_scored"], "nonmembers": metrics["n_nonmembers_scored"],
                     "auc": metrics["auc"], "auc_ci": metrics["auc_ci"],
                     **{f"tpr_at_{t:g}_fpr": metrics[f"tpr_at_{t:g}_fpr"] for t in FPR_TARGETS},
                     "attacker_data": data, "seconds": seconds})

    everything = np.ones(len(is_member), dtype=bool)
    for name, (s, data, seconds, params) in scores.items():
        label = name + "".join(f" {k}={v}" for k, v in params.items())
        row(label, s, everything, data, seconds)
    for name, (s, data, seconds, params) in scores.items():
        label = name + "".join(f" {k}={v}" for k, v in params.items())
        row(label, s, held_out, data, seconds)
    row(f"ART-native MembershipInferenceBlackBox({args.art_model})", art_scores, held_out,
        f"LABELLED target outputs: {int((labelled & is_member).sum())} members + "
        f"{int((labelled & ~is_member).sum())} nonmembers of this target (stronger attacker)", art_time)

    header = f"{'attack':52s} {'scored on':15s} {'in':>5s} {'out':>5s} {'AUC [95% CI]':>22s} {'TPR@1%':>7s} {'TPR@0.1%':>8s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        ci = f"{r['auc']:.3f} [{r['auc_ci'][0]:.3f}, {r['auc_ci'][1]:.3f}]"
        print(f"{r['attack']:52s} {r['scored_on']:15s} {r['members']:5d} {r['nonmembers']:5d} {ci:>22s} "
              f"{_fmt(r['tpr_at_0.01_fpr']):>7s} {_fmt(r['tpr_at_0.001_fpr']):>8s}")
    print("\nattacker data per attack:")
    for r in rows[: len(scores)] + rows[-1:]:
        print(f"  {r['attack']}: {r['attacker_data']} ({r['seconds']:.0f} s)")
    print("TPR@FPR is n/a where the scored nonmembers are fewer than 10/FPR (1,000 for 1%, 10,000 for 0.1%).")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "target_accuracy": target.utility.get("accuracy"), "splits": info["splits"]},
                      fh, indent=2)


if __name__ == "__main__":
    main()
