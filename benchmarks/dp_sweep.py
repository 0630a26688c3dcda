"""Run a defenses x attacks x seeds suite spec (e.g. benchmarks/dp-sweep.toml) and print its summary table.

Until ``bench suite`` exists this is the way to run a spec: every cell goes
through ``privbench.runner.run`` (rows stored, cached rows reused), so the table
is computed from stored results only. Example:

    PRIVBENCH_DATA_DIR=../shared/datasets python benchmarks/dp_sweep.py benchmarks/dp-sweep.toml \
        --max-grad-evals 4000

Table columns, per (defense parameters, attack), medians over the seeds: PSNR
and SSIM of the reconstruction, PSNR of the mean-image baseline, the noise
multiplier, the epsilon spent, and nonmember accuracy of the target and of its
undefended twin. Then, per attack, the largest epsilon at which the median PSNR
is within 2 dB of the median baseline PSNR (the attack recovers no more than the
population mean image does).
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from privbench.config import Budget, RunConfig
from privbench.runner import RunOptions, run
from privbench.store import Store

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

BASELINE_MARGIN_DB = 2.0


def expand(spec: dict[str, Any], max_grad_evals: int | None = None) -> list[RunConfig]:
    """Every cell of the spec: each defense's grid combinations x attacks x seeds."""
    base = dict(spec.get("run", {}))
    budget = dict(base.pop("budget", {}))
    if max_grad_evals is not None:
        budget["max_grad_evals"] = max_grad_evals
    configs = []
    for defense in spec["defenses"]:
        grid = defense.get("grid", {})
        for values in itertools.product(*grid.values()):
            defense_params = {**defense.get("params", {}), **dict(zip(grid, values, strict=True))}
            for attack in spec["attacks"]:
                for seed in spec["suite"]["seeds"]:
                    configs.append(
                        RunConfig(
                            **base, defense=defense["name"], defense_params=defense_params,
                            attack=attack["name"], attack_params=attack.get("params", {}), seed=seed,
                            budget=Budget(**budget),
                        )
                    )
    return configs


def _median(rows, get) -> float:
    values = [v for v in (get(r) for r in rows) if v is not None]
    return statistics.median(values) if values else math.nan


def _grid_label(spec: dict[str, Any], config: RunConfig) -> str:
    params = dict(config.defense_params)
    varied = [k for d in spec["defenses"] for k in d.get("grid", {}) if k in params]  # a defense without the grid key
    return " ".join(f"{k}={params[k]:g}" if isinstance(params[k], float) else f"{k}={params[k]}" for k in varied)


def _attack_label(config: RunConfig) -> str:
    """The attack and the parameters the spec set (as requested, not resolved), e.g. ``dlg distance=cosine``."""
    return " ".join([config.attack, *(f"{k}={v}" for k, v in config.attack_params)])


def summarise(spec: dict[str, Any], cells: list[tuple[RunConfig, Any]]) -> list[dict[str, Any]]:
    """One row per (defense parameters, attack) over the seeds; ``cells`` are (requested config, result)."""
    groups: dict[tuple[str, str, str], list] = {}
    epsilons: dict[tuple[str, str, str], Any] = {}
    for config, result in cells:
        key = (config.defense, _grid_label(spec, config), _attack_label(config))
        groups.setdefault(key, []).append(result)
        epsilons[key] = dict(config.defense_params).get("epsilon")
    table = []
    for (defense, label, attack), rows in groups.items():
        ok = [r for r in rows if r.status == "ok"]
        table.append(
            {
                "defense": defense, "params": label, "attack": attack, "ok": len(ok), "runs": len(rows),
                "psnr": _median(ok, lambda r: r.metrics.get("psnr")),
                "ssim": _median(ok, lambda r: r.metrics.get("ssim")),
                "baseline_psnr": _median(ok, lambda r: r.metrics.get("baseline_psnr")),
                "noise_multiplier": _median(ok, lambda r: r.costs.get("noise_multiplier")),
                "epsilon_spent": _median(ok, lambda r: r.costs.get("epsilon_spent")),
                "target_accuracy": _median(ok, lambda r: r.metrics.get("target_accuracy")),
                "twin_accuracy": _median(ok, lambda r: r.metrics.get("twin_accuracy")),
                "psnr_all": [round(r.metrics["psnr"], 2) for r in ok],
                "epsilon": epsilons[(defense, label, attack)],
            }
        )
    return table


def largest_epsilon_near_baseline(table: list[dict[str, Any]], attack: str) -> tuple[float | None, bool]:
    """Largest epsilon whose median PSNR is within BASELINE_MARGIN_DB of the baseline, and whether every
    smaller epsilon is too (False: the curve is not monotone at that margin)."""
    rows = sorted((r for r in table if r["attack"] == attack and r["epsilon"] is not None), key=lambda r: r["epsilon"])
    near = [r["psnr"] - r["baseline_psnr"] <= BASELINE_MARGIN_DB for r in rows]
    if not any(near):
        return None, True
    last = max(i for i, n in enumerate(near) if n)
    return rows[last]["epsilon"], all(near[: last + 1])


def _matches(value: Any, wanted: list[str]) -> bool:
    """``value`` equals one of ``wanted`` (strings from the command line; numbers compared as numbers)."""
    for text in wanted:
        try:
            if isinstance(value, (int, float)) and float(text) == value:
                return True
        except ValueError:
            pass
        if str(value) == text:
            return True
    return False


def _num(value: Any) -> float:
    return math.nan if value is None else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", default=str(Path(__file__).with_name("dp-sweep.toml")))
    parser.add_argument("--max-grad-evals", type=int, default=None, help="cap on each attack run (overrides the spec)")
    parser.add_argument("--seeds", default=None, help="override the spec's seeds, e.g. 0-4 or 0,3")
    parser.add_argument("--only", action="append", default=[],
                        help="keep cells whose defense parameter k is one of the values: k=v1,v2 (repeatable)")
    parser.add_argument("--attacks", default=None, help="comma-separated subset of the spec's attacks")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--store", default=None)
    args = parser.parse_args()

    spec = tomllib.loads(Path(args.spec).read_text())
    if args.seeds:
        low, _, high = args.seeds.partition("-")
        spec["suite"]["seeds"] = list(range(int(low), int(high) + 1)) if high else [int(s) for s in low.split(",")]
    if args.attacks:
        keep = set(args.attacks.split(","))
        spec["attacks"] = [a for a in spec["attacks"] if a["name"] in keep]
    configs = expand(spec, args.max_grad_evals)
    for item in args.only:
        key, _, values = item.partition("=")
        configs = [c for c in configs if _matches(dict(c.defense_params).get(key), values.split(","))]

    cap = configs[0].budget.max_grad_evals if configs else None
    print(f"suite {spec['suite']['name']}: {len(configs)} runs; attack budget: "
          + (f"capped at {cap} gradient evaluations per run" if cap else "uncapped (each attack's own schedule)"),
          flush=True)
    store = Store(args.store)
    options = RunOptions(data_root=args.data_root, threads=args.threads)
    cells = []
    for config in configs:
        result = run(config, store, options)
        cells.append((config, result))
        m, c = result.metrics, result.costs
        print(
            f"{config.defense} {_grid_label(spec, config)} x {_attack_label(config)} seed {config.seed}: {result.status} "
            f"psnr {m.get('psnr', math.nan):.2f} baseline {m.get('baseline_psnr', math.nan):.2f} "
            f"noise {c.get('noise_multiplier', math.nan):.4g} eps_spent {c.get('epsilon_spent', math.nan):.4g} "
            f"acc {_num(m.get('target_accuracy')):.4f} twin {_num(m.get('twin_accuracy')):.4f} "
            f"evals {result.grad_evals} {'cached' if result.cached else f'{result.wall_time_s:.0f}s'} "
            f"{result.run_id}" + (f" error: {result.error}" if result.error else ""),
            flush=True,
        )

    table = summarise(spec, cells)
    print(f"\nmedians over seeds {spec['suite']['seeds']}; attack budget "
          + (f"capped at {cap} gradient evaluations per run" if cap else "uncapped"))
    header = ("params", "attack", "ok", "PSNR", "SSIM", "base PSNR", "noise mult", "eps spent", "acc", "twin acc")
    widths = (14, 22, 5, 7, 7, 9, 10, 9, 7, 8)
    print("  ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True)))
    for r in table:
        row = (r["params"] or r["defense"], r["attack"], f"{r['ok']}/{r['runs']}", f"{r['psnr']:.2f}", f"{r['ssim']:.4f}",
               f"{r['baseline_psnr']:.2f}", f"{r['noise_multiplier']:.4g}", f"{r['epsilon_spent']:.4g}",
               f"{r['target_accuracy']:.4f}", f"{r['twin_accuracy']:.4f}")
        print("  ".join(f"{c:>{w}}" for c, w in zip(row, widths, strict=True)) + f"   PSNR per seed {r['psnr_all']}")
    for attack in dict.fromkeys(r["attack"] for r in table if r["epsilon"] is not None):  # a sweep over epsilon
        eps, monotone = largest_epsilon_near_baseline(table, attack)
        if eps is None:
            print(f"{attack}: at no epsilon is the median PSNR within {BASELINE_MARGIN_DB:g} dB of the baseline")
        else:
            print(f"{attack}: largest epsilon with median PSNR within {BASELINE_MARGIN_DB:g} dB of the baseline: "
                  f"{eps:g}" + ("" if monotone else " (some smaller epsilon is not: the curve is not monotone)"))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
