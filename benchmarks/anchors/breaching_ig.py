"""Inverting Gradients side by side: breaching 0.1.2's ``invertinggradients`` and privbench's ``invgrad``.

Both attack the IDENTICAL target model, victims and shared gradient, at the same budget of gradient
evaluations, and both reconstructions are scored by privbench's reconstruction scorer (per-image PSNR and
SSIM, Hungarian matching within a batch, the auxiliary split's mean image as the baseline). Issue 19,
acceptance 3.

breaching is never a dependency of privbench: it lives in its own virtual environment, which holds torch,
breaching 0.1.2 (and what it installs: hydra-core, omegaconf, lpips, scipy) and this checkout installed
with ``--no-deps`` (for ``privbench.models`` only). Create it once (``--setup-venv`` runs exactly these)::

    python -m venv /work/venv-breaching
    /work/venv-breaching/bin/pip install torch==2.14.1 torchvision==0.29.1   # the versions of privbench's venv
    /work/venv-breaching/bin/pip install breaching==0.1.2
    /work/venv-breaching/bin/pip install --no-deps -e .                       # this checkout

Run (in privbench's environment, from the checkout's root; one torch thread everywhere)::

    PRIVBENCH_DATA_DIR=../shared/datasets PRIVBENCH_HOME=/tmp/h-anchor PRIVBENCH_THREADS=1 \\
        python benchmarks/anchors/breaching_ig.py --setup-venv --venv /work/venv-breaching --out anchor.json
    python benchmarks/anchors/breaching_ig.py --quick          # smoke: 1 victim per setting, 20 evaluations
    python benchmarks/anchors/breaching_ig.py --settings convnet-b1 --victims 5 --evals 4000

How one case (setting x seed) runs. The privbench side (this process) runs ``bench run --defense none
--attack invgrad --dataset brain-tumor-mri --image-size 32 --channels 1 --model M --seed S --victim-batch B
--max-grad-evals E --force`` through ``privbench.runner.run`` (a row in ``$PRIVBENCH_HOME``), then builds
the same run's GRADIENTS observation again with ``runner.prepare`` (same resolved config: same cached
target, same victims, same gradient; the victim ids are checked against the row's) and exports what the
server and the client share to ``<work>/<case>/observation.pt``: the model's name, constructor arguments
and parameters, the shared gradients, the BatchNorm mode and buffers, the auxiliary split's per-channel
mean and std, the shape and the number of classes. The victim images stay in this process (and in
``truth.pt`` beside it, for inspection); the breaching side never reads them.

The breaching side (``<venv>/bin/python`` on this file with ``--breaching-worker``) rebuilds the model from
``privbench.models``, hands breaching a model that takes normalised inputs (the privbench model after
``x * std + mean``: breaching optimises "inside the network normalisation", as with its own datasets; the
wrapper has no parameters or buffers, so the parameter gradients are the shared ones), builds its
``server_payload`` / ``shared_data`` (labels withheld: breaching recovers them by its default
``bias-corrected`` rule), runs ``invertinggradients`` with ``max_iterations`` = the budget (one trial, the
config's default), and writes its reconstruction in pixels back.

The BatchNorm protocol is privbench's (``RunConfig.bn_mode``, ``bn_buffers``; defaults train / shared, as
``bench run``): the privbench side takes it from the observation (``GradientUpdate.bn_mode``, ``buffers``)
and the breaching side reproduces it. In train mode the client's forward pass uses the batch's statistics;
breaching models this when neither the server nor the user sends buffers (train mode, running statistics
off). Given buffers, breaching switches its model to eval mode, which would misstate a train-mode update,
and ``invertinggradients`` has no use for them: so in train mode the shared buffers are not given to
breaching. In eval mode the global model's buffers go in the server payload (what the client computed
with; an eval-mode step leaves them unchanged). Before the attack the worker checks that breaching's model
gives privbench's client gradient on a probe batch of auxiliary images (``probe_gradient_check``: cosine
distance ~ 1e-8), so both sides provably attack the same function with the same parameters.

What was configured on breaching's side, and why:

- the shipped ``invertinggradients`` config unchanged (cosine objective, TV 0.2, Adam lr 0.1 on the sign
  of the gradient, boxed to [0, 1] pixels, step-lr x0.1 at 3/8, 5/8 and 7/8 of ``max_iterations``, start
  N(0, 1) in normalised units, best iterate by the objective, one trial scored by cosine similarity)
  except ``optim.max_iterations`` = the budget (its one trial spends all of it: one evaluation per
  iteration) and the log interval;
- labels withheld (``metadata.labels`` None): breaching recovers them with its default rule
  (``bias-corrected``); privbench uses its own (``label=auto``: iDLG for B = 1, count-based for B > 1);
- data metadata: shape, the auxiliary split's per-channel mean and std (what privbench's attacker also
  uses), the number of classes; the model wrapped to take normalised inputs, as above;
- breaching 0.1.2's ``TotalVariation`` hard-codes three channels (a grouped convolution with groups=3) and
  fails on gray images; the worker rebuilds its difference filters for the images' channel count (same
  kernels, same formula, ``scale`` 0.2 as configured) and says so in the output. Its TV acts on the
  normalised values, so on data with pixel std s it weighs 1/s times privbench's TV 0.2 on pixels
  (brain-tumor-mri 32x32: s = 0.166, about 6x);
- the seed: ``torch.manual_seed(seed)`` before ``reconstruct`` (breaching draws its start from torch's
  global generator).

privbench's ``invgrad`` runs with its defaults at ``--max-grad-evals`` = the budget: 2 restarts of half the
budget each, its lr drops placed on ``steps`` = 2,000 (so a restart of 1,000 evaluations gets the first drop
only), the better restart by its objective.

Measured (main 2716bbd, whose invgrad is the final one; 3 seeds, 2,000 evaluations, round init, BatchNorm
buffers shared; medians over victim images; one torch thread on a shared 2-core machine)::

    | setting                       | privbench PSNR / SSIM | breaching PSNR / SSIM | mean image | cosine p / b  | labels p / b |
    | ResNet-8, BN train, B=1 (n=3) | 13.2 / 0.04           | 17.4 / 0.15           | 19.1 / 0.28 | 0.230 / 0.230 | 1.00 / 1.00 |
    | ResNet-8, BN eval, B=1 (n=3)  | 17.1 / 0.15           | 17.4 / 0.15           | 19.1 / 0.28 | 0.006 / 0.015 | 1.00 / 1.00 |
    | ResNet-8, BN train, B=4 (n=12)| 12.9 / 0.10           | 17.9 / 0.21           | 20.3 / 0.34 | 0.148 / 0.196 | 1.00 / 0.67 |
    | ConvNet, B=1 (n=3)            | 27.8 / 0.75           | 26.5 / 0.68           | 19.1 / 0.28 | 0.004 / 0.025 | 1.00 / 1.00 |

In BatchNorm train mode both match the gradient about equally (B=1: cosine 0.230 each) or privbench better
(B=4), yet breaching's images score higher: its TV prior, on normalised values, is about 6x privbench's in
pixel units and keeps the image flat and near the mean brightness. privbench's invgrad with
``--attack-param tv_weight=1.2`` (0.2 / 0.166) on the same three B=1 victims gives PSNR 19.6 / 16.6 / 16.0
and SSIM 0.19 / 0.12 / 0.15 (breaching 19.2 / 17.4 / 16.2). No ResNet-8 setting beats the mean image
with either library. breaching's ``bias-corrected`` label rule returns four copies of the majority class for
every B=4 batch here (8 of 12 labels); privbench's count rule recovers all 12.

Output: a Markdown table (setting | privbench median PSNR / SSIM | breaching median PSNR / SSIM | mean-image
baseline | final cosine gradient distances) and ``--out`` JSON with every figure, per victim and per case.
Medians are over victim images (B images per seed). The cosine distance is given as each library reports
it (privbench: its chosen restart's distance; breaching: its trial score) and recomputed by the harness
for both reconstructions with one function (privbench's ``cosine_distance`` at the returned images and
labels, the model in the protocol's BatchNorm mode).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VENV = Path(os.environ.get("BREACHING_VENV", "/work/venv-breaching"))
BREACHING_VERSION = "0.1.2"

# setting name -> (model, BatchNorm mode or None for a model without BatchNorm, victim batch, row label)
SETTINGS = {
    "resnet-bntrain-b1": ("resnet", "train", 1, "ResNet-8, BN train mode, B=1"),
    "resnet-bneval-b1": ("resnet", "eval", 1, "ResNet-8, BN eval mode, B=1"),
    "resnet-bntrain-b4": ("resnet", "train", 4, "ResNet-8, BN train mode, B=4"),
    "convnet-b1": ("convnet", None, 1, "ConvNet (no normalisation), B=1"),
}
SETTINGS_BY_MODEL_BN = {model: bn is not None for model, bn, _, _ in SETTINGS.values()}


# --------------------------------------------------------------------------------------------------------------
# breaching side: runs in the breaching venv, imports breaching, torch and privbench.models only
# --------------------------------------------------------------------------------------------------------------
class Denormalized:
    """Factory for the model breaching attacks: ``net(x * std + mean)``, no parameters or buffers of its own."""

    @staticmethod
    def build(net, mean, std):
        import torch

        class _Denormalized(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net = net
                self.pixel = (torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1))

            def forward(self, x):
                return self.net(x * self.pixel[1] + self.pixel[0])

        return _Denormalized()


def patch_total_variation(attacker, channels: int) -> str | None:
    """breaching 0.1.2's TotalVariation convolves with groups=3; rebuild its filters for ``channels``."""
    import torch
    from breaching.attacks.auxiliaries.regularizers import TotalVariation

    for reg in attacker.regularizers:
        if isinstance(reg, TotalVariation) and not reg.double_opponents and reg.groups != channels:
            kernel = torch.tensor([[0, 0, 0], [0, -1, 1], [0, 0, 0]], **reg.setup).unsqueeze(0).unsqueeze(1)
            kernel = torch.cat((torch.transpose(kernel, 2, 3), kernel), 0)
            reg.groups = channels
            reg.weight = torch.cat([kernel] * channels, 0)
            return (f"breaching's TotalVariation filters rebuilt for {channels} channel(s) (it hard-codes groups=3); "
                    f"same kernels and formula, scale {reg.scale}")
    return None


def breaching_worker(in_path: Path, out_path: Path) -> None:
    import logging

    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    import breaching
    from omegaconf import OmegaConf

    from privbench.models import build_model

    case = torch.load(in_path, weights_only=True)
    c, h, w = case["input_shape"]
    net = build_model(case["model"], case["model_params"], c, case["image_size"], case["num_classes"], 0)
    model = Denormalized.build(net, case["mean"], case["std"])
    overrides = [f"optim.max_iterations={case['evals']}", f"optim.callback={max(1, case['evals'] // 4)}"]
    cfg = breaching.get_attack_config("invertinggradients", overrides=overrides)
    loss = torch.nn.CrossEntropyLoss()
    attacker = breaching.attacks.prepare_attack(model, loss, cfg)
    notes = [n for n in [patch_total_variation(attacker, c)] if n]

    eval_mode = case["bn_mode"] == "eval"
    metadata = OmegaConf.create({"modality": "vision", "shape": [c, h, w], "mean": case["mean"], "std": case["std"],
                                 "classes": case["num_classes"], "size": None})
    server_payload = [{"parameters": list(case["parameters"]),
                       "buffers": list(case["global_buffers"]) if eval_mode else None, "metadata": metadata}]

    def shared():
        return [{"gradients": [g.clone() for g in case["gradients"]], "buffers": None,
                 "metadata": {"num_data_points": case["batch_size"], "labels": None, "local_hyperparams": None}}]

    # Same function check: breaching's reconstruction model, fed the true batch (normalised), must give back the
    # shared gradient. The true batch is not in the case file; the privbench side sends its own dummy check
    # instead: a fixed probe batch and the gradient privbench's client code computes for it.
    rec_models = attacker._construct_models_from_payload_and_buffers(server_payload, shared())
    probe = (case["probe_images"] - model.pixel[0]) / model.pixel[1]
    grads = torch.autograd.grad(loss(rec_models[0](probe), case["probe_labels"]), rec_models[0].parameters())
    dot = sum((a * b).sum() for a, b in zip(grads, case["probe_gradients"], strict=True))
    norms = (sum(a.pow(2).sum() for a in grads) * sum(b.pow(2).sum() for b in case["probe_gradients"])).sqrt()
    probe_check = float(1 - dot / norms)
    mode = "eval" if not rec_models[0].training else "train"

    torch.manual_seed(case["seed"])
    t0 = time.perf_counter()
    output, stats = attacker.reconstruct(server_payload, shared(), {}, dryrun=False)
    seconds = time.perf_counter() - t0
    images = (output["data"].detach() * model.pixel[1] + model.pixel[0]).clamp(0, 1)
    trace = stats.get("Trial_0_Val", [])
    torch.save({
        "images": images, "labels": output["labels"].detach().long().view(-1),
        "opt_value": float(stats.get("opt_value", float("nan"))), "trace_first": trace[:1], "trace_last": trace[-1:],
        "iterations": len(trace), "attack_time_s": seconds, "probe_gradient_check": probe_check,
        "breaching_model_mode": mode, "notes": notes, "config": OmegaConf.to_yaml(cfg),
        "versions": {"breaching": _version("breaching"), "torch": str(torch.__version__),
                     "hydra-core": _version("hydra-core"), "omegaconf": _version("omegaconf")},
    }, out_path)


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------------------------
# the breaching environment
# --------------------------------------------------------------------------------------------------------------
def setup_venv(venv: Path) -> None:
    """Create ``venv`` with torch (privbench's versions), breaching 0.1.2 and this checkout (no deps)."""
    import torch
    import torchvision

    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    plain = [v.split("+")[0] for v in (torch.__version__, torchvision.__version__)]
    subprocess.run([*pip, f"torch=={plain[0]}", f"torchvision=={plain[1]}"], check=True)
    subprocess.run([*pip, f"breaching=={BREACHING_VERSION}"], check=True)
    subprocess.run([*pip, "--no-deps", "-e", str(ROOT)], check=True)


def check_venv(venv: Path) -> None:
    python = venv / "bin" / "python"
    code = "import breaching, privbench.models, sys; print(privbench.models.__file__)"
    if not python.exists():
        sys.exit(f"error: no breaching environment at {venv}; create it with --setup-venv (see the docstring)")
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"error: {python} cannot import breaching and privbench.models:\n{done.stderr[-2000:]}\n"
                 f"recreate it with --setup-venv")
    where = Path(done.stdout.strip()).resolve()
    if ROOT not in where.parents:
        print(f"warning: the breaching environment imports privbench from {where}, not from this checkout {ROOT}; "
              f"rerun --setup-venv to install this checkout there", file=sys.stderr)


# --------------------------------------------------------------------------------------------------------------
# privbench side
# --------------------------------------------------------------------------------------------------------------
class SettingUnavailable(RuntimeError):
    """This privbench cannot state the setting's protocol: the row is n/a with the reason."""


def run_config(setting: str, seed: int, evals: int, gradient_round: str | None):
    from privbench.config import Budget, RunConfig

    model, bn_mode, batch, _ = SETTINGS[setting]
    fields = {"defense": "none", "attack": "invgrad", "dataset": "brain-tumor-mri", "model": model, "image_size": 32,
              "channels": 1, "seed": seed, "victim_batch": batch, "budget": Budget(max_grad_evals=evals)}
    if gradient_round is not None:
        fields["gradient_round"] = gradient_round
    if bn_mode is not None:
        if "bn_mode" in RunConfig.__dataclass_fields__:
            fields["bn_mode"] = bn_mode
        elif bn_mode != "train":
            raise SettingUnavailable("this privbench has no RunConfig.bn_mode: only the train-mode protocol exists")
    return RunConfig(**fields)


def multiset_accuracy(predicted: list[int], true: list[int]) -> float:
    """Fraction of the batch's labels recovered, as a multiset (order-free: a label rule returns no pairing)."""
    from collections import Counter

    hits = Counter(predicted) & Counter(true)
    return sum(hits.values()) / len(true)


def bench_command(cfg) -> str:
    parts = ["bench run --defense none --attack invgrad --dataset brain-tumor-mri --image-size 32 --channels 1",
             f"--model {cfg.model} --seed {cfg.seed} --victim-batch {cfg.victim_batch}",
             f"--max-grad-evals {cfg.budget.max_grad_evals} --round {cfg.gradient_round}"]
    if SETTINGS_BY_MODEL_BN.get(cfg.model):
        parts.append(f"--bn-mode {cfg.bn_mode} --bn-buffers {cfg.bn_buffers}")
    return " ".join(parts) + " --force"


def update_protocol(update) -> tuple[str, tuple]:
    """(BatchNorm mode of the client's forward pass, the buffers the update shares) from the observation."""
    mode = getattr(update, "bn_mode", None) or ("train" if update.model.training else "eval")
    return mode, tuple(update.buffers)


def cosine_at(update, images, labels) -> float:
    """privbench's cosine gradient distance of (images, labels) against the shared update, in the protocol's mode."""
    from privbench.attacks.gradient_inversion import cosine_distance, dummy_update, mean_scale

    model = update.model
    params = [p for p in model.parameters() if p.requires_grad]
    dummy = dummy_update(model, params, images, labels, update.rule, create_graph=False)
    return float(cosine_distance(dummy, mean_scale(update)))


def export_case(prepared, cfg, seed: int, evals: int, case_dir: Path) -> dict:
    """Write what breaching gets (observation.pt) and the truth kept apart (truth.pt); returns the former."""
    import torch

    from privbench.defenses.base import client_gradients

    update = prepared.observation.gradient_update
    mode, shared_buffers = update_protocol(update)
    aux = prepared.auxiliary.images
    mean = aux.mean(dim=(0, 2, 3)).tolist()
    std = aux.std(dim=(0, 2, 3)).tolist()
    # a probe batch (auxiliary images, not the victim's) and its gradient by privbench's client code in the
    # protocol's mode: the worker checks that breaching's model reproduces it (the same function, parameters)
    probe_images, probe_labels = aux[: update.batch_size].clone(), prepared.auxiliary.labels[: update.batch_size]
    probe_gradients = client_gradients(update.model, probe_images, probe_labels, mode)
    gradients = tuple(g.detach().clone() for g in update.gradients)
    if update.rule.divisor is not None or update.rule.clip_norm is not None:
        raise RuntimeError("the anchor compares plain gradients (defense none); this update has another rule")
    case = {
        "model": cfg.model, "model_params": dict(cfg.model_params), "image_size": cfg.image_size,
        "input_shape": list(update.input_shape), "num_classes": update.num_classes, "batch_size": update.batch_size,
        "parameters": [p.detach().clone() for p in update.model.parameters()],
        "global_buffers": [b.detach().clone() for b in update.model.buffers()],
        "shared_buffers": [b.detach().clone() for b in shared_buffers], "bn_mode": mode,
        "gradients": list(gradients), "mean": mean, "std": std, "seed": seed, "evals": evals,
        "gradient_round": update.round, "probe_images": probe_images, "probe_labels": probe_labels,
        "probe_gradients": list(probe_gradients),
    }
    case_dir.mkdir(parents=True, exist_ok=True)
    torch.save(case, case_dir / "observation.pt")
    torch.save({"images": prepared.truth.images, "labels": prepared.truth.labels, "ids": list(prepared.truth.ids)},
               case_dir / "truth.pt")
    return case


def score(prepared, images, labels, staging: Path) -> dict:
    """privbench's reconstruction scorer on one output: matched per-image PSNR / SSIM, label accuracy, baseline."""
    from privbench.attacks.base import AttackOutput
    from privbench.metrics.family import ScoreContext
    from privbench.threat import Surface

    staging.mkdir(parents=True, exist_ok=True)
    context = ScoreContext(prepared.auxiliary, {}, staging, Surface.GRADIENTS, False)
    scores = prepared.scorer.score(AttackOutput(images=images, labels=labels), prepared.truth, context)
    return {"metrics": scores.metrics, "per_image": scores.info["per_image"]}


def baseline_per_image(prepared) -> dict:
    from privbench.metrics.image import psnr, ssim

    truth = prepared.truth.images
    mean_image = prepared.auxiliary.images.mean(0, keepdim=True).expand_as(truth)
    return {"psnr": [float(v) for v in psnr(mean_image, truth)], "ssim": [float(v) for v in ssim(mean_image, truth)]}


def run_case(setting: str, seed: int, args, venv: Path) -> dict:
    import torch

    from privbench import config as configlib
    from privbench import datasets as datasetlib
    from privbench import runner
    from privbench.store import Store

    cfg = run_config(setting, seed, args.evals, args.round)
    options = runner.RunOptions(force=True, threads=1)
    store = Store()
    t0 = time.perf_counter()
    row = runner.run(cfg, store, options)
    if row.status != "ok":
        raise RuntimeError(f"privbench run {row.run_id} {row.status}: {row.error}")
    privbench_time = time.perf_counter() - t0
    resolved = configlib.resolve(cfg)
    case_dir = args.work / f"{setting}-seed{seed}"
    fingerprint = datasetlib.fingerprint(resolved.dataset, None, resolved.image_size)
    (case_dir / "staging").mkdir(parents=True, exist_ok=True)
    prepared = runner.prepare(resolved, options, case_dir / "staging", fingerprint)
    if list(prepared.truth.ids) != list(row.info["victim_ids"]):
        raise RuntimeError(f"victims differ between the stored row and the exported observation for {setting} seed {seed}")
    update = prepared.observation.gradient_update
    export_case(prepared, resolved, seed, args.evals, case_dir)

    out_path = case_dir / "breaching.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    log = case_dir / "breaching.log"
    with open(log, "w") as fh:
        done = subprocess.run([str(venv / "bin" / "python"), str(Path(__file__).resolve()), "--breaching-worker",
                               str(case_dir / "observation.pt"), str(out_path)], stdout=fh, stderr=subprocess.STDOUT,
                              cwd=case_dir, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the breaching worker failed for {setting} seed {seed}: see {log}\n"
                           + log.read_text()[-3000:])
    theirs = torch.load(out_path, weights_only=True)

    ours = torch.load(store.artifacts_root / row.run_id / "reconstruction.pt", weights_only=True)
    privbench_scores = {"metrics": {k: v for k, v in row.metrics.items()}, "per_image": row.info["per_image"]}
    breaching_scores = score(prepared, theirs["images"], theirs["labels"], case_dir / "scoring")
    truth_labels = prepared.truth.labels
    mode, shared_buffers = update_protocol(update)
    return {
        "setting": setting, "seed": seed, "run_id": row.run_id, "bench_command": bench_command(resolved),
        "victim_ids": list(prepared.truth.ids), "true_labels": truth_labels.tolist(),
        "bn_mode": mode if SETTINGS[setting][1] else None, "shared_buffers": len(shared_buffers),
        "gradient_round": update.round, "git": row.info.get("git"),
        "baseline": baseline_per_image(prepared),
        "privbench": {
            **privbench_scores, "labels": ours["labels"].tolist(),
            "label_multiset_accuracy": multiset_accuracy(ours["labels"].tolist(), truth_labels.tolist()),
            "grad_evals": row.grad_evals, "cosine_reported": row.info["attack"].get("gradient_distance"),
            "cosine_harness": cosine_at(update, ours["reconstruction"], ours["labels"]),
            "attack_time_s": row.costs.get("attack_time_s"), "wall_time_s": privbench_time,
            "attack_info": {k: v for k, v in row.info["attack"].items() if k != "gradient_distance"},
        },
        "breaching": {
            **breaching_scores, "labels": theirs["labels"].tolist(), "grad_evals": theirs["iterations"],
            "label_multiset_accuracy": multiset_accuracy(theirs["labels"].tolist(), truth_labels.tolist()),
            "cosine_reported": theirs["opt_value"],
            "cosine_harness": cosine_at(update, theirs["images"], theirs["labels"]),
            "attack_time_s": theirs["attack_time_s"], "objective_first_last": theirs["trace_first"] + theirs["trace_last"],
            "probe_gradient_check": theirs["probe_gradient_check"], "model_mode": theirs["breaching_model_mode"],
            "notes": theirs["notes"], "versions": theirs["versions"],
        },
        "breaching_config": theirs["config"],
    }


# --------------------------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------------------------
def _pooled(rows: list[dict], side: str, metric: str) -> list[float]:
    """Per-image values of ``metric`` over the cases ``rows`` (``side``: privbench, breaching or baseline)."""
    return [v for c in rows for v in (c["baseline"][metric] if side == "baseline" else c[side]["per_image"][metric])]


def summarize(cases: list[dict]) -> dict:
    """Per setting: medians (and ranges) over victim images, mean label accuracy, median final cosine distances."""
    out = {}
    for setting in dict.fromkeys(c["setting"] for c in cases):
        rows = [c for c in cases if c["setting"] == setting]
        entry = {"label": SETTINGS[setting][3], "victims": len(_pooled(rows, "baseline", "psnr")),
                 "seeds": [c["seed"] for c in rows]}
        for side in ("privbench", "breaching", "baseline"):
            entry[side] = {}
            for m in ("psnr", "ssim"):
                values = _pooled(rows, side, m)
                entry[side][m] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        for side in ("privbench", "breaching"):
            entry[side]["labels_recovered"] = statistics.mean(c[side]["label_multiset_accuracy"] for c in rows)
            for key in ("cosine_reported", "cosine_harness"):
                entry[side][key] = statistics.median(c[side][key] for c in rows)
        out[setting] = entry
    return out


def markdown(summary: dict, evals: int, unavailable: dict[str, str]) -> str:
    lines = [f"| setting ({{n}} victims, {evals:,} evals) | privbench median PSNR / SSIM | breaching median PSNR / SSIM "
             f"| mean-image baseline PSNR / SSIM | final cosine distance privbench / breaching | labels recovered "
             f"privbench / breaching |", "|---|---|---|---|---|---|"]
    for entry in summary.values():
        p, b, base = entry["privbench"], entry["breaching"], entry["baseline"]
        lines.append(
            f"| {entry['label']} (n={entry['victims']}) | {p['psnr']['median']:.1f} / {p['ssim']['median']:.2f} "
            f"| {b['psnr']['median']:.1f} / {b['ssim']['median']:.2f} "
            f"| {base['psnr']['median']:.1f} / {base['ssim']['median']:.2f} "
            f"| {p['cosine_harness']:.3f} / {b['cosine_harness']:.3f} "
            f"| {p['labels_recovered']:.2f} / {b['labels_recovered']:.2f} |")
    for setting, reason in unavailable.items():
        lines.append(f"| {SETTINGS[setting][3]} | n/a: {reason} | | | | |")
    lines[0] = lines[0].replace("{n}", "per-setting")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"comma-separated, of: {', '.join(SETTINGS)} (default: all)")
    parser.add_argument("--victims", type=int, default=3, help="seeds 0..N-1, one victim batch each (default 3)")
    parser.add_argument("--evals", type=int, default=2000, help="gradient evaluations per attack (default 2,000)")
    parser.add_argument("--round", choices=("init", "trained"), default=None,
                        help="gradient_round (default: privbench's RunConfig default)")
    parser.add_argument("--out", type=Path, default=None, help="JSON with every figure")
    parser.add_argument("--quick", action="store_true", help="smoke: 1 victim per setting, 20 evaluations")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"breaching's venv (default {DEFAULT_VENV})")
    parser.add_argument("--setup-venv", action="store_true", help="create the breaching venv first if needed")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the exchanged files (default $PRIVBENCH_HOME/anchors/breaching_ig)")
    parser.add_argument("--breaching-worker", nargs=2, type=Path, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.breaching_worker:
        breaching_worker(*args.breaching_worker)
        return 0

    os.environ.setdefault("PRIVBENCH_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from privbench.store import home

    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting(s) {unknown}; known: {', '.join(SETTINGS)}")
    if args.quick:
        args.victims, args.evals = 1, 20
    args.work = args.work or home() / "anchors" / "breaching_ig"
    if args.setup_venv:
        setup_venv(args.venv)
    check_venv(args.venv)

    cases, unavailable = [], {}
    for setting in settings:
        for seed in range(args.victims):
            t0 = time.perf_counter()
            try:
                case = run_case(setting, seed, args, args.venv)
            except SettingUnavailable as exc:
                unavailable[setting] = str(exc)
                print(f"{setting}: n/a ({exc})", file=sys.stderr)
                break
            cases.append(case)
            p, b = case["privbench"], case["breaching"]
            print(f"{setting} seed {seed}: privbench PSNR {statistics.median(p['per_image']['psnr']):.2f} "
                  f"cos {p['cosine_harness']:.4f} | breaching PSNR {statistics.median(b['per_image']['psnr']):.2f} "
                  f"cos {b['cosine_harness']:.4f} (probe check {b['probe_gradient_check']:.1e}) | "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    summary = summarize(cases)
    table = markdown(summary, args.evals, unavailable)
    print(table)
    if args.out:
        from privbench.provenance import git_commit

        args.out.write_text(json.dumps({"evals": args.evals, "victims_per_setting": args.victims, "git": git_commit(),
                                        "summary": summary, "table": table, "unavailable": unavailable,
                                        "cases": cases}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
