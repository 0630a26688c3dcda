"""Run one reconstruction pair (gradient inversion, MpLe attacks) over several seeds; summarise PSNR/SSIM.

Example (the foundation issue's acceptance runs, on the real data):

    PRIVBENCH_DATA_DIR=../shared/datasets python benchmarks/gradient_inversion_seeds.py \
        --attack dlg --dataset brain-tumor-mri --model lenet --seeds 0-9

Every run goes through ``bench run`` semantics (stored rows, cached results reused).
"""

from __future__ import annotations

import argparse
import statistics

from privbench.config import Budget, RunConfig, parse_assignments
from privbench.runner import RunOptions, run
from privbench.store import Store


def seed_range(text: str) -> list[int]:
    if "-" in text:
        low, high = text.split("-")
        return list(range(int(low), int(high) + 1))
    return [int(s) for s in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--defense", default="none")
    parser.add_argument("--attack", default="dlg")
    parser.add_argument("--dataset", default="brain-tumor-mri")
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--seeds", default="0-9")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--target-seed", type=int, default=None,
                        help="one trained target for every seed (the seeds then pick victims and attack starts)")
    parser.add_argument("--attack-param", action="append", default=[])
    parser.add_argument("--defense-param", action="append", default=[])
    parser.add_argument("--model-param", action="append", default=[])
    parser.add_argument("--victim-batch", type=int, default=1)
    parser.add_argument("--max-grad-evals", type=int, default=None, help="the attack's budget (same for every cell)")
    parser.add_argument("--round", default="init", choices=["init", "trained"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--store", default=None)
    args = parser.parse_args()

    store = Store(args.store)
    rows = []
    for seed in seed_range(args.seeds):
        config = RunConfig(
            defense=args.defense, attack=args.attack, dataset=args.dataset, model=args.model,
            image_size=args.image_size, channels=args.channels, seed=seed, split_seed=args.split_seed, target_seed=args.target_seed,
            attack_params=parse_assignments(args.attack_param, "--attack-param"),
            defense_params=parse_assignments(args.defense_param, "--defense-param"),
            model_params=parse_assignments(args.model_param, "--model-param"), victim_batch=args.victim_batch,
            budget=Budget(max_grad_evals=args.max_grad_evals), gradient_round=args.round,
        )
        result = run(config, store, RunOptions(threads=args.threads))
        m = result.metrics
        rows.append(result)
        print(
            f"seed {seed}: status {result.status} psnr {m.get('psnr', float('nan')):.2f} dB "
            f"ssim {m.get('ssim', float('nan')):.4f} label_acc {m.get('label_accuracy', float('nan')):.0f} "
            f"baseline psnr {m.get('baseline_psnr', float('nan')):.2f} evals {result.grad_evals} "
            f"time {result.wall_time_s:.0f}s run {result.run_id}",
            flush=True,
        )
    ok = [r for r in rows if r.status == "ok"]
    if ok:
        psnrs = [r.metrics["psnr"] for r in ok]
        print(f"{args.defense} x {args.attack} ({args.model}, {args.dataset} {args.image_size}px): "
              f"{len(ok)}/{len(rows)} ok; PSNR median {statistics.median(psnrs):.2f} dB, "
              f"all: {', '.join(f'{p:.1f}' for p in psnrs)}; SSIM median "
              f"{statistics.median(r.metrics['ssim'] for r in ok):.4f}; labels right "
              f"{sum(r.metrics.get('label_accuracy', 0) == 1 for r in ok)}/{len(ok)}; baseline PSNR median "
              f"{statistics.median(r.metrics['baseline_psnr'] for r in ok):.2f} dB")


if __name__ == "__main__":
    main()
