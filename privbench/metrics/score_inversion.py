"""Scoring of the model-inversion family, the way MIBench and the GMI / KED-MI papers score it.

- **Attack accuracy**: an evaluation classifier of another architecture than the targets (a ResNet body with a
  32-d projection head, width 8), trained on the *members* so that it recognises the private classes, labels
  each inverted image; top-1 accuracy against the class the image stands for, beside the chance level 1/K.
  The classifier's accuracy on the nonmembers is stored with every row (``eval_classifier_heldout_accuracy``):
  an attack accuracy means little above it. It is cached on disk by everything that shaped it.
- **Nearest neighbours** in the evaluation classifier's feature space: from each inversion to the closest
  member of its class and to the closest nonmember of that class (``nn_feature_distance_member`` /
  ``_nonmember``, means over inversions) and the share of inversions closer to a member than to any nonmember
  (``member_closer_fraction``): a leak of the training data, not just of class-typical images, shows as
  inversions closer to members.
- **Nearest member** in pixels (lowest MSE among the class's members): its PSNR and SSIM (does the inversion
  reproduce a specific training image?), beside the same for the nearest nonmember.
- **fd_eval** between the inversions and the members of their classes, in the evaluation classifier's
  features; below 64 inversions (2 x 32 feature dimensions) it has no number, and the reason says so.
- **Baselines**, scored the same way: the auxiliary split's class-mean image (``baseline_class_mean_<metric>``,
  also stored as ``baseline_<metric>``: the trivial baseline boards compare with) and one random auxiliary image
  per class, drawn by a fixed seed (``baseline_random_auxiliary_<metric>``).
- **Instance level** (an output for victims, ``pred-decoder``): PSNR / SSIM of each reconstruction against its
  victim's true image (``victim_psnr``, ``victim_ssim``), beside the class-mean baseline's.

The artifact is ``inversion.png``: per class the inversion, its nearest member and the class mean.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from privbench import cache, registry
from privbench.metrics.family import FamilyScorer, ScoreContext, Scores
from privbench.threat import InversionTruth

if TYPE_CHECKING:
    from privbench.attacks.base import AttackOutput
    from privbench.datasets import ImageDataset

FEATURE_DIM = 32
BASELINE_SEED = 0


@dataclass(frozen=True)
class InversionEvalSpec:
    """Everything that shapes model inversion's evaluation classifier (its cache key)."""

    data: str  # digest of the data identity (dataset, fingerprint, split) and the members' ids
    image_shape: tuple[int, int, int]
    num_classes: int
    depth: int = 8
    width: int = 8
    feature_dim: int = FEATURE_DIM
    epochs: int = 30
    lr: float = 1e-3
    seed: int = 0

    @property
    def architecture(self) -> str:
        return f"resnet{self.depth}-w{self.width}-d{self.feature_dim}"

    def key(self) -> str:
        return cache.cache_key("inversion-eval-classifier", asdict(self))[:24]


def train_or_load(spec: InversionEvalSpec, members: "ImageDataset", nonmembers: "ImageDataset",
                  cache_dir: Path) -> tuple[Any, dict]:
    """The evaluation classifier (``metrics.eval_classifier.EvalNet``) trained on ``members``, or loaded."""
    from privbench.metrics.eval_classifier import EvalNet, load_or_train
    from privbench.training import TrainParams

    def fresh() -> EvalNet:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            return EvalNet(spec.image_shape[0], spec.num_classes, spec.depth, spec.width, spec.feature_dim)

    about = {
        "architecture": spec.architecture,
        "trained_on": f"the target's members ({len(members)} images)",
        "heldout": f"the nonmembers ({len(nonmembers)} images)",
        "spec": asdict(spec),
    }
    files = Path(cache_dir) / f"inv-eval-{spec.key()}.pt", Path(cache_dir) / f"inv-eval-{spec.key()}.json"
    net, info, cached = load_or_train(fresh, members, nonmembers, TrainParams(epochs=spec.epochs, lr=spec.lr),
                                      spec.seed, files, about)
    return net, {**info, "cached": True} if cached else info


@torch.no_grad()
def _features(net: Any, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([net.features(images[i : i + batch]) for i in range(0, len(images), batch)]).double()


@torch.no_grad()
def _predict(net: Any, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([net(images[i : i + 256]).argmax(1) for i in range(0, len(images), 256)])


class _Reference:
    """The members and nonmembers per class, with their evaluation features (computed once per scoring)."""

    def __init__(self, net: Any, members: "ImageDataset", nonmembers: "ImageDataset"):
        self.net = net
        self.sets = {}
        for name, data in (("member", members), ("nonmember", nonmembers)):
            self.sets[name] = (data.images, data.labels, _features(net, data.images))

    def nearest(self, image: torch.Tensor, feature: torch.Tensor, label: int, which: str) -> dict[str, Any]:
        from privbench.metrics.image import psnr, ssim

        images, labels, feats = self.sets[which]
        mask = labels == label
        if not bool(mask.any()):
            return {"feature_distance": None, "psnr": None, "ssim": None, "index": None}
        idx = torch.nonzero(mask).flatten()
        distance = float((feats[idx] - feature).norm(dim=1).min())
        mse = ((images[idx] - image).flatten(1) ** 2).mean(1)
        j = int(idx[mse.argmin()])
        near = images[j : j + 1]
        return {"feature_distance": distance, "psnr": float(psnr(image[None], near).reshape(-1)[0]),
                "ssim": float(ssim(image[None], near).reshape(-1)[0]), "index": j}


def score_set(images: torch.Tensor, labels: torch.Tensor, reference: _Reference) -> tuple[dict[str, Any], list]:
    """Attack accuracy, nearest-neighbour distances and nearest-member PSNR / SSIM of ``images`` [N, C, H, W]
    standing for classes ``labels`` [N]; also returns the nearest member's index per image (for the grid)."""
    predicted = _predict(reference.net, images)
    feats = _features(reference.net, images)
    near_m = [reference.nearest(images[i], feats[i], int(labels[i]), "member") for i in range(len(images))]
    near_n = [reference.nearest(images[i], feats[i], int(labels[i]), "nonmember") for i in range(len(images))]

    def mean(values: list) -> float | None:
        values = [v for v in values if v is not None and np.isfinite(v)]
        return float(np.mean(values)) if values else None

    pairs = [(m["feature_distance"], n["feature_distance"]) for m, n in zip(near_m, near_n, strict=True)
             if m["feature_distance"] is not None and n["feature_distance"] is not None]
    metrics = {
        "attack_accuracy": float((predicted == labels).double().mean()),
        "nn_feature_distance_member": mean([m["feature_distance"] for m in near_m]),
        "nn_feature_distance_nonmember": mean([n["feature_distance"] for n in near_n]),
        "member_closer_fraction": float(np.mean([a < b for a, b in pairs])) if pairs else None,
        "nearest_member_psnr": mean([m["psnr"] for m in near_m]),
        "nearest_member_ssim": mean([m["ssim"] for m in near_m]),
        "nearest_nonmember_psnr": mean([n["psnr"] for n in near_n]),
        "nearest_nonmember_ssim": mean([n["ssim"] for n in near_n]),
    }
    return metrics, [m["index"] for m in near_m], predicted


def class_means(auxiliary: "ImageDataset", labels: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """The auxiliary split's mean image of each class in ``labels`` (its overall mean for a class it lacks)."""
    out = []
    for k in labels.tolist():
        mask = auxiliary.labels == k
        out.append(auxiliary.images[mask].mean(0) if bool(mask.any()) else fallback)
    return torch.stack(out)


def random_auxiliary(auxiliary: "ImageDataset", labels: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """One random auxiliary image of each class in ``labels`` (seeded by ``BASELINE_SEED``)."""
    rng = np.random.default_rng(BASELINE_SEED)
    out = []
    for k in labels.tolist():
        idx = np.flatnonzero(auxiliary.labels.numpy() == k)
        out.append(auxiliary.images[int(rng.choice(idx))] if len(idx) else fallback)
    return torch.stack(out)


@registry.metrics.register("model_inversion")
class InversionScorer(FamilyScorer):
    family = "model_inversion"
    description = ("Model inversion: attack accuracy of an evaluation classifier trained on the members (its held-out "
                   "accuracy and the chance level beside it), nearest member vs nonmember in its features, nearest "
                   "member's PSNR/SSIM, fd_eval; the auxiliary class mean and random auxiliary images as baselines.")

    def score(self, output: "AttackOutput", truth: InversionTruth, context: ScoreContext) -> Scores:
        from privbench.artifacts import save_grid
        from privbench.metrics.image import psnr, ssim
        from privbench.metrics.sets import frechet_score
        from privbench.store import home

        images, labels = output.images, output.labels
        if images is None or labels is None or images.ndim != 4 or len(labels) != len(images):
            raise RuntimeError("a model inversion attack must return images [N, C, H, W] and one label per image")
        members, nonmembers, auxiliary = truth.members, truth.nonmembers, context.auxiliary
        if tuple(images.shape[1:]) != tuple(members.image_shape):
            raise RuntimeError(f"inverted images have shape {tuple(images.shape[1:])}, the data "
                               f"{tuple(members.image_shape)}")
        images = images.detach().float().clamp(0, 1)
        labels = labels.long()
        spec = InversionEvalSpec(
            data=cache.cache_key("inversion-eval-data", {"identity": truth.identity, "members": members.ids_digest()}),
            image_shape=tuple(members.image_shape), num_classes=members.num_classes,
        )
        net, eval_info = train_or_load(spec, members, nonmembers,
                                       (context.cache_dir or home() / "cache") / "eval-classifiers")
        reference = _Reference(net, members, nonmembers)
        scores = Scores()
        own, nearest, predicted = score_set(images, labels, reference)
        scores.metrics.update(own)
        scores.metrics["chance_level"] = 1.0 / members.num_classes
        scores.metrics["eval_classifier_heldout_accuracy"] = eval_info["heldout_accuracy"]
        scores.metrics["n_inversions"] = len(images)
        scores.info["eval_classifier"] = eval_info
        scores.info["per_image"] = {"label": labels.tolist(), "eval_prediction": predicted.tolist(),
                                    "nearest_member_id": [None if j is None else members.ids[j] for j in nearest]}

        overall = auxiliary.images.mean(0)
        means = class_means(auxiliary, labels, overall)
        baselines = {"class_mean": means, "random_auxiliary": random_auxiliary(auxiliary, labels, overall)}
        for name, baseline in baselines.items():
            metrics, _, _ = score_set(baseline, labels, reference)
            scores.metrics.update({f"baseline_{name}_{k}": v for k, v in metrics.items()})
            if name == "class_mean":  # the trivial baseline boards compare with (baseline_<metric>)
                scores.metrics.update({f"baseline_{k}": v for k, v in metrics.items()})
        scores.info["baselines"] = {"class_mean": "the auxiliary split's mean image of the class",
                                    "random_auxiliary": f"one random auxiliary image of the class (seed {BASELINE_SEED})"}

        fd_name = f"fd_eval[{spec.architecture}@members]"
        member_feats = reference.sets["member"][2]
        member_labels = reference.sets["member"][1]
        # each inversion paired with a member of its class (the first members of each class in order)
        paired = []
        used: dict[int, int] = {}
        for k in labels.tolist():
            idx = torch.nonzero(member_labels == k).flatten()
            paired.append(int(idx[used.get(k, 0) % len(idx)]) if len(idx) else 0)
            used[k] = used.get(k, 0) + 1
        fd = frechet_score(fd_name, _features(net, images).numpy(), member_feats[paired].numpy())
        scores.metrics[fd_name] = fd.value
        if fd.value is None:
            scores.unavailable[fd_name] = fd.reason
        else:
            scores.info["fd_eval"] = fd.to_dict()

        if truth.victims is not None and len(truth.victims.labels) == len(images):  # instance level: paired scores
            victims = truth.victims.images
            scores.metrics["victim_psnr"] = float(psnr(images, victims).mean())
            scores.metrics["victim_ssim"] = float(ssim(images, victims).mean())
            base = class_means(auxiliary, truth.victims.labels, overall)
            scores.metrics["baseline_class_mean_victim_psnr"] = float(psnr(base, victims).mean())
            scores.metrics["baseline_class_mean_victim_ssim"] = float(ssim(base, victims).mean())
            scores.metrics["victim_label_accuracy"] = float((labels == truth.victims.labels).double().mean())

        nearest_images = torch.stack([members.images[j] if j is not None else torch.zeros_like(images[0])
                                      for j in nearest])
        columns, titles = [images, nearest_images, means], ["inversion", "nearest member", "class mean"]
        if truth.victims is not None and len(truth.victims.labels) == len(images):
            columns.insert(0, truth.victims.images)
            titles.insert(0, "victim")
        save_grid(context.staging / "inversion.png", columns, titles)
        torch.save({"inversion": images, "labels": labels}, context.staging / "inversion.pt")
        return scores
