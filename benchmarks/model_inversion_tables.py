"""The model-inversion tables of issue 18 from stored rows (acceptance 1 and 2), and GASCNN's class-leakage verdict.

    PRIVBENCH_DATA_DIR=... bench suite benchmarks/suites/model-inversion.toml --jobs 1    # the rows
    PRIVBENCH_DATA_DIR=... python benchmarks/model_inversion_tables.py --suite benchmarks/suites/model-inversion.toml

One line per defense configuration, model and attack: the evaluation classifier's attack accuracy (mean and sd
over the stored seeds), the chance level, the same accuracy for the two baselines (the auxiliary class-mean image
and a random auxiliary image of the class), the evaluation classifier's held-out accuracy (the ceiling), the share
of inversions closer to a member than to any nonmember in its features (and the class mean's), and the nearest
member's SSIM. Unsupported and failed rows are counted, with the first reason, never averaged in. The GASCNN
verdict compares gmi and mi-face against the released SNN with the same attacks against ``none`` on resnet (the
teacher's architecture, trained on the same members): class leakage is resisted only if the SNN's attack accuracy
falls to the baselines while the undefended ResNet's does not.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np

from privbench.store import Store
from privbench.views.rows import select

COLUMNS = [
    ("attack_accuracy", "attack acc"),
    ("baseline_class_mean_attack_accuracy", "class-mean acc"),
    ("baseline_random_auxiliary_attack_accuracy", "random-aux acc"),
    ("eval_classifier_heldout_accuracy", "eval ceiling"),
    ("member_closer_fraction", "closer to member"),
    ("baseline_class_mean_member_closer_fraction", "class-mean closer"),
    ("nearest_member_ssim", "nearest-member SSIM"),
]


def label(config: dict) -> str:
    params = config.get("defense_params") or {}
    shown = {k: v for k, v in params.items() if k in ("epsilon", "observer", "profile")}
    extra = ",".join(f"{k}={v}" for k, v in sorted(shown.items()))
    return f"{config['defense']}{'(' + extra + ')' if extra else ''}"


def stat(values: list) -> str:
    xs = [float(v) for v in values if isinstance(v, (int, float)) and np.isfinite(v)]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{np.mean(xs):.3f} ± {np.std(xs, ddof=1):.3f}"


def mean(values: list) -> float | None:
    xs = [float(v) for v in values if isinstance(v, (int, float)) and np.isfinite(v)]
    return float(np.mean(xs)) if xs else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="benchmarks/suites/model-inversion.toml")
    parser.add_argument("--store", default=None)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--json", action="store_true", help="print the grouped values as JSON too")
    args = parser.parse_args()
    store = Store(args.store) if args.store else Store()
    rows = [r for r in select(store, args.suite, args.data_root).rows if r.info.get("family") == "model_inversion"
            or r.config.get("attack") in ("mi-face", "mi-face-art", "deepinversion", "gmi", "pred-decoder")]
    groups: dict[tuple, list] = defaultdict(list)
    for r in rows:
        groups[(label(r.config), r.config.get("model"), r.config["attack"])].append(r)
    print("| defense | model | attack | n ok | " + " | ".join(name for _, name in COLUMNS) + " | chance | not ok |")
    print("|---" * (len(COLUMNS) + 6) + "|")
    summary = {}
    for (defense, model, attack), rs in sorted(groups.items()):
        ok = [r for r in rs if r.status == "ok"]
        bad = [r for r in rs if r.status != "ok"]
        cells = [stat([r.metrics.get(key) for r in ok]) for key, _ in COLUMNS]
        chance = stat([r.metrics.get("chance_level") for r in ok])
        why = f"{len(bad)} {bad[0].status}: {(bad[0].error or '').splitlines()[0][:90]}" if bad else ""
        print(f"| {defense} | {model} | {attack} | {len(ok)} | " + " | ".join(cells) + f" | {chance} | {why} |")
        summary[f"{defense}/{model}/{attack}"] = {key: mean([r.metrics.get(key) for r in ok]) for key, _ in COLUMNS}
        summary[f"{defense}/{model}/{attack}"]["n_ok"] = len(ok)
    print("\nGASCNN class-leakage claim (attack accuracy, mean over seeds):")
    for attack in ("gmi", "mi-face"):
        snn = summary.get(f"gascnn/resnet/{attack}", {})
        ann = summary.get(f"none/resnet/{attack}", {})
        a, b = snn.get("attack_accuracy"), ann.get("attack_accuracy")
        base = snn.get("baseline_class_mean_attack_accuracy")
        if a is None or b is None:
            print(f"  {attack}: n/a (rows missing: SNN {snn.get('n_ok', 0)} ok, undefended ResNet {ann.get('n_ok', 0)} ok)")
            continue
        verdict = ("resists" if a <= 0.25 + 1e-9 < b else
                   "leaks as much as the undefended ResNet" if a >= b else "leaks less than the undefended ResNet")
        print(f"  {attack}: SNN {a:.3f} vs undefended ResNet {b:.3f} (class-mean baseline {base:.3f}, chance 0.25): "
              f"the SNN {verdict}")
    if args.json:
        print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
