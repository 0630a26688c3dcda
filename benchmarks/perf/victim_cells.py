"""Victim cells: victim-evaluations per second of the sequential attack and of the batched cell.

A victim-evaluation is one gradient evaluation of one victim's objective (forward, first-order gradients with
``create_graph=True``, gradient distance, backward to the dummy input), as the attacks count them. For each
configuration (``dlg`` on lenet, ``invgrad`` on convnet and resnet; 32x32 gray, synthetic-mri images, the
model at its initialisation, batch size 1, one restart, ``--evals`` evaluations per victim: 300 for L-BFGS, 40
for Adam by default, see ``DEFAULT_EVALS``) and each thread
count, one process alternates, for ``--repeats`` rounds: the sequential attack (``attack.run`` per victim, on
``--sequential-victims`` victims: its rate does not depend on V) and the batched cell (``run_cell``) at every
V in ``--victims``. Both sides time the whole public call (starts, optimisation, restart choice, output).
Reported: the median rates, the speed-up batched / sequential, and a fit of the batched time per round of
evaluations t(V) = a + b V over the V sweep: ``a`` is what a round costs whatever its size (per-operation
overhead: dispatch, vmap, Python), ``b`` what each victim adds (arithmetic); 1 / b bounds the batched rate and
(sequential time per evaluation) / b the speed-up at large V.

Targets (issue 22, 2 cores): >= 8x for dlg/lenet at V=64, >= 3x for invgrad/resnet at V=16.

Run from the repository root:

    python benchmarks/perf/victim_cells.py                      # the full table (minutes)
    python benchmarks/perf/victim_cells.py --quick              # a smoke run
    python benchmarks/perf/victim_cells.py --configs dlg/lenet --threads 1 --json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from dataclasses import dataclass

from privbench import datasets, registry
from privbench.config import Budget
from privbench.defenses.base import client_gradients
from privbench.models import build_model
from privbench.provenance import configure_threads
from privbench.threat import GradientUpdate, Observation, Surface

CONFIGS = {"dlg/lenet": ("dlg", "lenet"), "invgrad/convnet": ("invgrad", "convnet"),
           "invgrad/resnet": ("invgrad", "resnet")}
TARGETS = {("dlg/lenet", 64): 8.0, ("invgrad/resnet", 16): 3.0}


@dataclass(frozen=True)
class Cell:
    """V victims of one target: attack class, per-victim attacks and observations."""

    attack_cls: type
    attacks: list
    observations: list


def make_cell(attack: str, model_name: str, victims: int, image_size: int, evals: int, seed: int = 0) -> Cell:
    """``victims`` observations of one model at its initialisation, each victim one synthetic-mri image."""
    with tempfile.TemporaryDirectory() as cache_dir:
        data = datasets.load("synthetic-mri", image_size, 1, cache_dir=cache_dir)
    model = build_model(model_name, {}, 1, image_size, data.num_classes, seed).train()
    auxiliary = data.subset(list(range(victims, min(len(data), victims + 256))))
    cls = registry.attacks.get(attack)
    params = {"restarts": 1, "steps": evals} if attack != "dlg" else {"restarts": 1, "steps": 10 * evals}
    attacks, observations = [], []
    for v in range(victims):
        image, label = data.images[v : v + 1].clone(), data.labels[v : v + 1].clone()
        update = GradientUpdate(model=copy.deepcopy(model), gradients=client_gradients(model, image, label),
                                batch_size=1, input_shape=tuple(image.shape[1:]), num_classes=data.num_classes,
                                round="init")
        observations.append(Observation(surface=Surface.GRADIENTS, gradient_update=update, auxiliary=auxiliary))
        attacks.append(cls(cls.Params(**params), seed=1000 + v))
    return Cell(cls, attacks, observations)


def time_sequential(cell: Cell, evals: int) -> tuple[float, int]:
    start = time.perf_counter()
    total = sum(a.run(o, Budget(max_grad_evals=evals)).grad_evals for a, o in zip(cell.attacks, cell.observations,
                                                                                     strict=True))
    return time.perf_counter() - start, total


def time_batched(cell: Cell, evals: int) -> tuple[float, int]:
    start = time.perf_counter()
    outputs = cell.attack_cls.run_cell(cell.attacks, cell.observations, Budget(max_grad_evals=evals), engine="batched")
    seconds = time.perf_counter() - start
    for output in outputs:
        if isinstance(output, Exception):
            raise output
        if not output.info.get("cell", {}).get("batched"):
            raise RuntimeError(f"the cell ran sequentially: {output.info.get('cell')}")
    return seconds, sum(o.grad_evals for o in outputs)


# L-BFGS keeps 100 (s, y) pairs, filled after ~100 iterations: its per-evaluation cost (sequential: a Python
# loop over the pairs; batched: reading every problem's history) is only representative once the history is
# full, and a run of the acceptance command spends ~700 evaluations per restart. Adam's cost per evaluation
# does not change along a run.
DEFAULT_EVALS = {"dlg": 300, "invgrad": 40}


def measure(name: str, threads: int, args: argparse.Namespace) -> dict:
    configure_threads(threads)
    attack, model = CONFIGS[name]
    args = argparse.Namespace(**{**vars(args), "evals": args.evals or DEFAULT_EVALS[attack]})
    cells = {v: make_cell(attack, model, v, args.image_size, args.evals) for v in args.victims}
    sequential = make_cell(attack, model, args.sequential_victims, args.image_size, args.evals)
    time_sequential(make_cell(attack, model, 1, args.image_size, 2), 2)  # warm-up (untimed)
    time_batched(make_cell(attack, model, 2, args.image_size, 2), 2)
    rates: dict[str, list[float]] = {"sequential": [], **{f"V={v}": [] for v in args.victims}}
    rounds: dict[int, list[float]] = {v: [] for v in args.victims}
    for _ in range(args.repeats):  # alternating: sequential, V=1, V=4, ... in every repeat
        seconds, total = time_sequential(sequential, args.evals)
        rates["sequential"].append(total / seconds)
        for v, cell in cells.items():
            seconds, total = time_batched(cell, args.evals)
            rates[f"V={v}"].append(total / seconds)
            rounds[v].append(seconds / (total / v))  # seconds per round of V evaluations
    medians = {k: statistics.median(x) for k, x in rates.items()}
    per_round = {v: statistics.median(x) for v, x in rounds.items()}
    vs = list(per_round)
    b, a = _fit(vs, [per_round[v] for v in vs])
    seq_eval = 1.0 / medians["sequential"]
    return {"config": name, "threads": threads, "evals_per_victim": args.evals, "repeats": args.repeats,
            "victim_evals_per_s": medians,
            "speedup": {f"V={v}": medians[f"V={v}"] / medians["sequential"] for v in args.victims},
            "round_fit": {"a_overhead_ms": 1e3 * a, "b_per_victim_ms": 1e3 * b,
                          "sequential_ms_per_eval": 1e3 * seq_eval,
                          "speedup_bound": seq_eval / b if b > 0 else None}}


def _fit(x: list[int], y: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x: (b, a)."""
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxx = sum((xi - mx) ** 2 for xi in x)
    b = sum((xi - mx) * (yi - my) for xi, yi in zip(x, y, strict=True)) / sxx if sxx else 0.0
    return b, my - b * mx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--victims", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--sequential-victims", type=int, default=4)
    parser.add_argument("--evals", type=int, default=None,
                        help="gradient evaluations per victim (default: 300 for L-BFGS attacks, 40 for Adam ones)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="V in {1, 4}, 2 repeats, 6 evaluations")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.victims, args.repeats, args.evals, args.sequential_victims = [1, 4], 2, 6, 2
    results = [measure(name, threads, args) for name in args.configs for threads in args.threads]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    header = ["config", "threads", "evals/victim", "sequential"] + [f"V={v}" for v in args.victims]
    print(f"victim-evaluations per second (median of {args.repeats} alternating repeats); speed-up over "
          f"sequential in ()")
    print(" | ".join(header))
    for r in results:
        cells = [r["config"], str(r["threads"]), str(r["evals_per_victim"]),
                 f"{r['victim_evals_per_s']['sequential']:.0f}"]
        for v in args.victims:
            key = f"V={v}"
            target = TARGETS.get((r["config"], v))
            flag = "" if target is None else (" ok" if r["speedup"][key] >= target else f" < {target:g}x")
            cells.append(f"{r['victim_evals_per_s'][key]:.0f} ({r['speedup'][key]:.1f}x{flag})")
        print(" | ".join(cells))
    print("\nbatched time per round t(V) = a + b V (fit over the V sweep):")
    for r in results:
        f = r["round_fit"]
        print(f"  {r['config']} threads {r['threads']}: a = {f['a_overhead_ms']:.1f} ms (per-round overhead), "
              f"b = {f['b_per_victim_ms']:.2f} ms per victim (arithmetic); sequential "
              f"{f['sequential_ms_per_eval']:.2f} ms per evaluation -> speed-up bound "
              f"{f['speedup_bound']:.1f}x" if f["speedup_bound"] else "")


if __name__ == "__main__":
    main()
