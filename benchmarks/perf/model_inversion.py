"""Time per inversion and per GAN training of the model-inversion attacks, at 32x32 gray, 4 classes, on CPU.

    PYTHONPATH=. python benchmarks/perf/model_inversion.py [--threads 1] [--gan-steps 2000] [--quick]

For each attack at its default settings (``--quick``: a tenth of the steps, extrapolated and labelled so)
against convnet and resnet (seeded, untrained: the cost does not depend on the weights; resnet's BatchNorm
statistics are its initial ones), the wall time of one run (every class inverted), the time per inverted class,
and the gradient evaluations per class. gmi's GAN is trained once on random auxiliary images (its cost does
not depend on the data either) and timed separately: the first gmi run pays it, later runs on the same
auxiliary split load it from the cache. Data are uniform noise; nothing is read from disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import torch

from privbench.attacks import model_inversion as mi
from privbench.config import Budget
from privbench.datasets import ImageDataset
from privbench.models import build_model
from privbench.threat import Observation, Surface

SIZE, CLASSES = 32, 4


def auxiliary(n: int = 512) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    return ImageDataset(torch.rand((n, 1, SIZE, SIZE), generator=g), torch.arange(n) % CLASSES,
                        tuple(f"c{k}" for k in range(CLASSES)), tuple(f"aux/{i}" for i in range(n)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gan-steps", type=int, default=mi.GMIParams().gan_steps)
    parser.add_argument("--quick", action="store_true", help="a tenth of each attack's steps, extrapolated")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    aux = auxiliary()
    scale = 10 if args.quick else 1
    import os

    os.environ["PRIVBENCH_HOME"] = tempfile.mkdtemp(prefix="mi-perf-")  # a fresh GAN cache

    gan_params = dataclasses.replace(mi.GMIParams(), gan_steps=max(1, args.gan_steps // scale))
    t0 = time.perf_counter()
    mi.train_gan(aux, gan_params)
    gan_s = (time.perf_counter() - t0) * (args.gan_steps / gan_params.gan_steps)
    print(f"gmi GAN training: {args.gan_steps} steps, batch {gan_params.gan_batch}, width {gan_params.width}: "
          f"{gan_s:.1f} s{' (extrapolated)' if args.quick else ''} on {args.threads} thread(s)")

    attacks = {
        "mi-face": (mi.MIFace, mi.MIFaceParams(), "steps"),
        "mi-face-art": (mi.MIFaceART, mi.MIFaceARTParams(), "max_iter"),
        "deepinversion": (mi.DeepInversion, mi.DeepInversionParams(), "steps"),
        "gmi (GAN cached)": (mi.GMI, gan_params, "steps"),
        "pred-decoder": (mi.PredictionDecoder, mi.PredDecoderParams(), "steps"),
    }
    print("\n| attack | model | run s | s per class | evals per class | note |\n|---|---|---|---|---|---|")
    for model_name in ("convnet", "resnet"):
        model = build_model(model_name, {}, 1, SIZE, CLASSES, seed=0).eval()
        for name, (cls, params, field) in attacks.items():
            if name == "deepinversion" and model_name != "resnet":
                continue
            full = getattr(params, field)
            params = dataclasses.replace(params, **{field: max(1, full // scale)})
            if cls is mi.PredictionDecoder:
                released = model
                observation = Observation(surface=Surface.MODEL_QUERIES, query=lambda x, m=released: m(x).detach(),
                                          auxiliary=aux, victim_outputs=released(aux.images[:CLASSES]).detach())
            else:
                observation = Observation(surface=Surface.MODEL_WHITEBOX, model=model, auxiliary=aux)
            t0 = time.perf_counter()
            out = cls(params, seed=0).run(observation, Budget())
            seconds = (time.perf_counter() - t0) * (full / getattr(params, field))
            evals = out.grad_evals * (full / getattr(params, field)) if cls is not mi.PredictionDecoder else out.grad_evals
            note = f"extrapolated x{scale}" if args.quick else ""
            if cls is mi.PredictionDecoder:
                note = (note + "; " if note else "") + "evals = images queried; run time includes decoder training"
            print(f"| {name} | {model_name} | {seconds:.1f} | {seconds / CLASSES:.2f} | {evals / CLASSES:.0f} | {note} |")


if __name__ == "__main__":
    main()
