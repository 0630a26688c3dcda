"""LiRA shadow training: 16 shadows vectorized (torch.func vmap) vs one after another.

Same architecture, recipe, epochs, pool and per-shadow subsets on both sides, one
process, the thread setting shared; prints both times (median of --repeats
alternating runs) and the ratio. Target: vectorized at least 2x faster on 2 cores.

    python benchmarks/perf/lira_shadows.py
    python benchmarks/perf/lira_shadows.py --model convnet --image-size 32 --shadows 16 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

import torch

from privbench import datasets
from privbench.attacks.shadow_ensemble import train_sequential, train_vectorized
from privbench.models import build_model
from privbench.provenance import configure_threads
from privbench.training import TrainParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="convnet")
    parser.add_argument("--width", type=int, default=16, help="convnet width (small models show the overhead)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--shadows", type=int, default=16)
    parser.add_argument("--shadow-size", type=int, default=250, help="images per shadow")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    threads = configure_threads(args.threads)
    with tempfile.TemporaryDirectory() as cache:
        data = datasets.load("synthetic-mri", args.image_size, 1, cache_dir=cache)
    generator = torch.Generator().manual_seed(0)
    inside = torch.stack([torch.randperm(len(data), generator=generator) < args.shadow_size
                          for _ in range(args.shadows)])
    params = TrainParams(epochs=args.epochs)

    def factory(seed: int):
        return build_model(args.model, {"width": args.width}, 1, args.image_size, data.num_classes, seed)

    times = {"vectorized": [], "sequential": []}
    for _ in range(args.repeats):
        times["vectorized"].append(train_vectorized(factory, data.images, data.labels, inside, params, 0).seconds)
        times["sequential"].append(train_sequential(factory, data.images, data.labels, inside, params, 0).seconds)
    vec, seq = statistics.median(times["vectorized"]), statistics.median(times["sequential"])
    result = {
        "model": f"{args.model}(width={args.width})", "image_size": args.image_size, "shadows": args.shadows,
        "shadow_size": args.shadow_size, "epochs": args.epochs, "threads": threads, "torch": torch.__version__,
        "load_average": os.getloadavg()[0], "vectorized_s": vec, "sequential_s": seq, "speedup": seq / vec,
        "runs": times,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.shadows} shadows x {args.shadow_size} images x {args.epochs} epochs, {result['model']}, "
          f"{args.image_size}px, threads {threads}, torch {torch.__version__}, load {result['load_average']:.2f}")
    print(f"vectorized (median of {args.repeats}): {vec:.2f} s   one after another: {seq:.2f} s")
    print(f"speedup sequential/vectorized = {seq / vec:.2f} (target >= 2)")


if __name__ == "__main__":
    main()
