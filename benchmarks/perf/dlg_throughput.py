"""DLG throughput: privbench's ``dlg`` attack against a minimal hand-written PyTorch DLG loop.

Measures gradient evaluations per second (one evaluation = one L-BFGS closure call: forward,
first-order gradients with ``create_graph=True``, L2 gradient distance, backward to the dummy
image and label) of both, on the same model, victim image, seed and thread setting, in one
process. After one untimed warm-up of each, the two sides alternate (privbench, handwritten,
privbench, ...) for ``--repeats`` rounds; the medians and their ratio privbench/handwritten are
reported. The privbench side times the whole public ``attack.run(observation, budget)`` call,
framework overhead included. Both sides start from the same random dummy image and label, so
they follow the same L-BFGS trajectory and do the same work. Target: ratio >= 0.90.

Run from the repository root:

    python benchmarks/perf/dlg_throughput.py
    python benchmarks/perf/dlg_throughput.py --threads 2 --evals 500 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
from torch.nn import functional as F

from privbench import datasets, registry
from privbench.config import Budget
from privbench.defenses.base import client_gradients
from privbench.models import build_model
from privbench.provenance import configure_threads
from privbench.threat import GradientUpdate, Observation, Surface

TARGET = 0.90


class _Done(Exception):
    """Raised from the hand-written closure once it has made the requested number of evaluations."""


def victim_setup(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, int]:
    """The model at the seed, one synthetic-mri image [1, C, H, W], its label [1], the number of classes."""
    with tempfile.TemporaryDirectory() as cache_dir:  # leave no dataset cache behind
        data = datasets.load("synthetic-mri:4", args.image_size, args.channels, cache_dir=cache_dir)
    model = build_model(args.model, {}, args.channels, args.image_size, data.num_classes, args.seed)
    return model.train(), data.images[:1].clone(), data.labels[:1].clone(), data.num_classes


def run_privbench(attack, observation: Observation, evals: int) -> tuple[float, int, torch.Tensor]:
    """Seconds for the whole ``attack.run`` call, the evaluations it reports, its images."""
    start = time.perf_counter()
    output = attack.run(observation, Budget(max_grad_evals=evals))
    seconds = time.perf_counter() - start
    return seconds, output.grad_evals, output.images


def run_handwritten(
    model: torch.nn.Module, target: tuple[torch.Tensor, ...], shape: tuple[int, ...], num_classes: int,
    seed: int, evals: int,
) -> tuple[float, int, torch.Tensor]:
    """The DLG loop of Zhu et al.'s reference code, stopped after exactly ``evals`` closure calls."""
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)  # same draws, in the same order, as privbench
    start = time.perf_counter()
    x = torch.randn(shape, generator=generator).requires_grad_(True)
    y = torch.randn((shape[0], num_classes), generator=generator).requires_grad_(True)
    opt = torch.optim.LBFGS([x, y], lr=1, line_search_fn="strong_wolfe")
    count = 0

    def closure() -> torch.Tensor:
        nonlocal count
        if count >= evals:
            raise _Done
        count += 1
        opt.zero_grad()
        loss = torch.mean(torch.sum(-F.softmax(y, -1) * F.log_softmax(model(x), -1), 1))
        dummy = torch.autograd.grad(loss, params, create_graph=True)
        diff = sum(((d - t) ** 2).sum() for d, t in zip(dummy, target, strict=True))
        diff.backward()
        return diff

    try:
        while True:
            opt.step(closure)
    except _Done:
        pass
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)  # .backward() also filled the model's .grad; drop it
    return seconds, count, x.detach().clamp(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=1, choices=(1, 3))
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--evals", type=int, default=300, help="gradient evaluations per measurement")
    parser.add_argument("--repeats", type=int, default=7, help="alternating timed rounds (>= 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads, shared by both sides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON instead of a table")
    args = parser.parse_args()
    if args.repeats < 5:
        parser.error("--repeats must be at least 5")
    if args.evals < 1:
        parser.error("--evals must be at least 1")

    threads = configure_threads(args.threads)
    model, images, labels, num_classes = victim_setup(args)
    gradients = client_gradients(model, images, labels)
    update = GradientUpdate(
        model=model, gradients=gradients, batch_size=1, input_shape=tuple(images.shape[1:]),
        num_classes=num_classes, round="init",
    )
    observation = Observation(surface=Surface.GRADIENTS, gradient_update=update)
    dlg = registry.attacks.get("dlg")
    attack = dlg(dlg.Params(restarts=1, steps=10**9), seed=args.seed)
    shape = tuple(images.shape)

    def side_a() -> tuple[float, int, torch.Tensor]:
        return run_privbench(attack, observation, args.evals)

    def side_b() -> tuple[float, int, torch.Tensor]:
        return run_handwritten(model, gradients, shape, num_classes, args.seed, args.evals)

    load_before = os.getloadavg()
    _, evals_a, images_a = side_a()  # warm-up, untimed
    _, evals_b, images_b = side_b()
    same_path = evals_a == evals_b and torch.equal(images_a, images_b)
    rates: dict[str, list[float]] = {"privbench": [], "handwritten": []}
    counts: dict[str, list[int]] = {"privbench": [], "handwritten": []}
    for _ in range(args.repeats):
        for name, side in (("privbench", side_a), ("handwritten", side_b)):
            seconds, n, _ = side()
            rates[name].append(n / seconds)
            counts[name].append(n)
    load_after = os.getloadavg()

    median = {name: statistics.median(values) for name, values in rates.items()}
    ratio = median["privbench"] / median["handwritten"]
    result = {
        "model": args.model,
        "image_size": args.image_size,
        "channels": args.channels,
        "threads": threads,
        "torch": torch.__version__,
        "seed": args.seed,
        "evals_requested": args.evals,
        "repeats": args.repeats,
        "grad_evals": counts,
        "same_trajectory": same_path,
        "evals_per_s": rates,
        "median_evals_per_s": median,
        "ratio": ratio,
        "target": TARGET,
        "loadavg_1m_before_after": [load_before[0], load_after[0]],
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return

    print(
        f"DLG throughput: model {args.model}, image {args.channels}x{args.image_size}x{args.image_size}, "
        f"threads {threads}, torch {torch.__version__}, seed {args.seed}"
    )
    print(
        f"{args.evals} gradient evaluations per measurement, {args.repeats} alternating repeats after one warm-up; "
        f"same L-BFGS trajectory on both sides: {'yes' if same_path else 'no'}; "
        f"load average (1 min) {load_before[0]:.2f} -> {load_after[0]:.2f}"
    )
    print()
    print(f"{'side':<12} {'median evals/s':>15} {'min':>9} {'max':>9}  evals per run")
    for name, values in rates.items():
        runs = sorted(set(counts[name]))
        print(
            f"{name:<12} {median[name]:>15.1f} {min(values):>9.1f} {max(values):>9.1f}  "
            f"{', '.join(str(c) for c in runs)}"
        )
    print()
    print(f"ratio privbench/handwritten = {ratio:.2f} (target >= {TARGET:.2f})")


if __name__ == "__main__":
    main()
