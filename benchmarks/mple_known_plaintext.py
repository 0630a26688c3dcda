"""The known-plaintext curve against MpLe: PSNR of the unmorphed victims vs the number n of known
(image, morphed) pairs, and the smallest n with median PSNR >= 30 dB.

    PRIVBENCH_DATA_DIR=../shared/datasets python benchmarks/mple_known_plaintext.py \
        --pairs 16,64,256,512,768,1024,1156,1300 --estimator minnorm --victim-batch 16

Each point is a stored ``bench run --defense mple --attack mple-known-plaintext`` row (cached
rows are reused); the median is over the victim batch's images and the seeds.
"""

from __future__ import annotations

import argparse
import statistics

from privbench.config import RunConfig
from privbench.runner import RunOptions, run
from privbench.store import Store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="16,64,256,512,768,1024,1156,1300")
    parser.add_argument("--estimator", default="minnorm", choices=["minnorm", "ridge"])
    parser.add_argument("--ridge", type=float, default=1e-3)
    parser.add_argument("--dataset", default="brain-tumor-mri")
    parser.add_argument("--model", default="convnet")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--victim-batch", type=int, default=16)
    args = parser.parse_args()

    store = Store()
    print(f"{'n pairs':>8} {'median PSNR':>12} {'median SSIM':>12} {'images':>7}")
    first_ok = None
    for n in (int(x) for x in args.pairs.split(",")):
        psnrs, ssims = [], []
        for seed in (int(s) for s in args.seeds.split(",")):
            config = RunConfig(
                defense="mple", attack="mple-known-plaintext", dataset=args.dataset, model=args.model,
                image_size=args.image_size, channels=1, seed=seed, victim_batch=args.victim_batch,
                attack_params={"pairs": n, "estimator": args.estimator, "ridge": args.ridge},
            )
            result = run(config, store, RunOptions())
            if result.status != "ok":
                raise SystemExit(f"n={n} seed={seed}: {result.status}: {result.error}")
            p, s = result.info["per_image"]["psnr"], result.info["per_image"]["ssim"]
            psnrs += p
            ssims += s
        median = statistics.median(psnrs)
        if first_ok is None and median >= 30:
            first_ok = n
        print(f"{n:>8} {median:>12.2f} {statistics.median(ssims):>12.4f} {len(psnrs):>7}", flush=True)
    print(f"smallest n with median PSNR >= 30 dB ({args.estimator}): {first_ok if first_ok else 'none in the list'}")


if __name__ == "__main__":
    main()
