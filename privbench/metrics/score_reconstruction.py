"""Scoring of the reconstruction family: paired image metrics, a trivial baseline beside them, artifacts."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from privbench import registry
from privbench.metrics.family import FamilyScorer, ScoreContext, Scores
from privbench.threat import Surface, Victim

if TYPE_CHECKING:
    from privbench.attacks.base import AttackOutput


def hungarian_by_psnr(images: torch.Tensor, truth: torch.Tensor) -> list[int]:
    """The reconstruction index assigned to each true image, maximising the summed per-image PSNR."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    from privbench.metrics.image import psnr

    b = len(truth)
    table = np.array([[float(psnr(images[j : j + 1], truth[i : i + 1])) for j in range(b)] for i in range(b)])
    table = np.nan_to_num(table, nan=-1e9, posinf=1e9, neginf=-1e9)  # identical images: PSNR inf
    rows, cols = linear_sum_assignment(table, maximize=True)
    return [int(c) for _, c in sorted(zip(rows, cols, strict=True))]


def lpips_scores(images: torch.Tensor, baseline: torch.Tensor, truth: torch.Tensor, allow_download: bool,
                 scores: Scores) -> None:
    """LPIPS[alex] of the reconstruction and of the baseline; no number (with the reason) if weights are missing."""
    from privbench.metrics.perceptual import LPIPS
    from privbench.metrics.weights import WeightsMissing

    metric = LPIPS("alex", allow_download=allow_download)
    name = metric.name(truth.shape[-1])
    try:
        scores.metrics[name] = float(metric(images, truth).mean())
        scores.metrics[f"baseline_{name}"] = float(metric(baseline, truth).mean())
    except WeightsMissing as exc:
        scores.metrics[name] = scores.metrics[f"baseline_{name}"] = None
        scores.unavailable[name] = str(exc)


@registry.metrics.register("reconstruction")
class ReconstructionScorer(FamilyScorer):
    family = "reconstruction"
    description = ("Reconstruction family: MSE, PSNR, SSIM, label accuracy, LPIPS per image (Hungarian-matched "
                   "within a gradient batch), each beside the auxiliary mean image's score.")

    def score(self, output: "AttackOutput", truth: Victim, context: ScoreContext) -> Scores:
        from privbench.artifacts import save_grid
        from privbench.metrics.image import IMAGE_METRICS, score_reconstruction

        if output.images is None or output.images.shape != truth.images.shape:
            raise RuntimeError(
                f"attack returned images of shape {None if output.images is None else tuple(output.images.shape)}, "
                f"expected {tuple(truth.images.shape)}"
            )
        scores = Scores()
        images, labels = output.images, output.labels
        # A gradient attack recovers a batch in no particular order; shared-data attacks keep the sent order.
        if context.surface is Surface.GRADIENTS and len(truth.labels) > 1:
            order = hungarian_by_psnr(images, truth.images)
            scores.info["matching"] = {
                "method": "Hungarian (scipy linear_sum_assignment) maximising the summed per-image PSNR",
                "reconstruction_for_victim": order,  # victim i is scored against reconstruction order[i]
            }
            images, labels = images[order], None if labels is None else labels[order]
        scores.metrics.update(score_reconstruction(images, labels, truth.images, truth.labels))
        scores.info["per_image"] = {  # the metrics above are batch means; medians and spreads need these
            m.name: [float(v) for v in m(images, truth.images)] for m in IMAGE_METRICS
        }
        # Trivial baseline: the auxiliary split's mean image and majority label, scored the same way.
        auxiliary = context.auxiliary
        mean_image = auxiliary.images.mean(0, keepdim=True).expand_as(truth.images)
        majority = torch.bincount(auxiliary.labels, minlength=auxiliary.num_classes).argmax()
        baseline = score_reconstruction(mean_image, majority.expand_as(truth.labels), truth.images, truth.labels)
        scores.metrics.update({f"baseline_{k}": v for k, v in baseline.items()})
        scores.info["baseline"] = "mean image and majority label of the auxiliary split"
        lpips_scores(images, mean_image, truth.images, context.allow_download, scores)
        save_grid(context.staging / "reconstruction.png", [truth.images, images, mean_image],
                  ["original", "reconstruction", "baseline"])
        torch.save({"reconstruction": images, "labels": labels, "victim_ids": list(truth.ids)},
                   context.staging / "reconstruction.pt")
        return scores
