"""MpLe's overheads: morphing time and bytes per image, C_ac vs C_r size, training time per epoch
of the service network on morphed data vs the same network on plain images (frozen C_r, and a
learned first layer), all in one process on the same members.

    PRIVBENCH_DATA_DIR=../shared/datasets python benchmarks/perf/mple_overhead.py \
        --dataset brain-tumor-mri --image-size 32 --epochs 2

Without PRIVBENCH_DATA_DIR use ``--dataset synthetic-mri:4000``.
"""

from __future__ import annotations

import argparse
import time

import torch

from privbench.config import RunConfig
from privbench.datasets import load
from privbench.datasets import splits as splitlib
from privbench.defenses.base import FitContext, fit_plainly
from privbench.defenses.mple import MpLe, MpLeParams
from privbench.models import build_model
from privbench.provenance import configure_threads
from privbench.training import TrainParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="brain-tumor-mri")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--model", default="convnet")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    threads = configure_threads(args.threads)
    data = load(args.dataset, args.image_size, args.channels)  # brain-tumor-mri is found via $PRIVBENCH_DATA_DIR
    parts = splitlib.make(data, splitlib.SplitSpec(), seed=0)
    cfg = RunConfig(defense="mple", dataset=args.dataset, model=args.model, image_size=args.image_size,
                    channels=args.channels)
    seeds = cfg.derived_seeds()

    def fresh():
        return build_model(args.model, {}, args.channels, args.image_size, data.num_classes, seeds["init"])

    ctx = FitContext(config=cfg, build_model=fresh, nonmembers=parts.nonmembers, seeds=seeds)
    mple = MpLe(MpLeParams(epochs=args.epochs))
    target = mple.fit(fresh(), parts.members, ctx)
    twin = mple.utility_twin().fit(fresh(), parts.members, ctx)
    learned = fit_plainly(fresh(), parts.members, TrainParams(epochs=args.epochs), ctx)
    c = target.costs
    per_epoch = {name: t.costs["train_time_s"] / args.epochs for name, t in
                 (("mple", target), ("plain, frozen C_r", twin), ("plain, learned first layer", learned))}
    print(f"{args.dataset} {args.channels}x{args.image_size}x{args.image_size}, {args.model}, "
          f"{len(parts.members)} members, {args.epochs} epochs, {threads} threads, torch {torch.__version__}")
    print(f"geometry: {target.training['geometry']}; condition number of M {c['condition_number']:.6f}")
    print(f"setup (M, M^-1, C_ac): {c['setup_time_s']:.2f} s once per provider")
    print(f"morphing: {c['morph_time_per_image_s'] * 1e6:.1f} us per image")
    print(f"bytes per image sent: morphed {c['bytes_per_image_morphed']} (float32) vs plain "
          f"{c['bytes_per_image_plain_float32']} (float32) / {c['bytes_per_image_plain_uint8']} (uint8): "
          f"{c['bytes_per_image_morphed'] / c['bytes_per_image_plain_uint8']:.1f}x the uint8 image")
    print(f"first layer: C_ac {c['cac_parameters']:,} parameters, {c['cac_bytes'] / 1e6:.1f} MB vs C_r "
          f"{c['cr_parameters']:,} parameters, {c['cr_bytes'] / 1e3:.2f} kB ({c['cac_parameters'] / c['cr_parameters']:,.0f}x)")
    for name, seconds in per_epoch.items():
        print(f"train time per epoch, {name}: {seconds:.2f} s ({seconds / per_epoch['plain, frozen C_r']:.2f}x frozen)")
    print(f"accuracy on nonmembers: mple {target.utility['accuracy']:.4f}, plain frozen C_r "
          f"{twin.utility['accuracy']:.4f}, plain learned {learned.utility['accuracy']:.4f} "
          f"(after {args.epochs} epochs; not the utility figure)")
    start = time.perf_counter()
    mple.morph(parts.nonmembers.images, mple.secrets(target.model[0].conv, data.image_shape, cfg.seed))
    print(f"(morphing {len(parts.nonmembers)} nonmembers again with the secrets rebuilt: "
          f"{time.perf_counter() - start:.2f} s)")


if __name__ == "__main__":
    main()
