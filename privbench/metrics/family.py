"""Per-run scoring by attack family: one scorer per family, registered in the metrics registry.

The runner asks ``registry.metrics.get(attack.family)`` for the scorer and hands it the attack's
output, the ground truth the attack never saw and a ``ScoreContext``; the scorer returns metrics,
row info and the reasons for metrics it could not compute, and writes its artifacts into the
run's staging folder.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from privbench.attacks.base import AttackOutput
    from privbench.datasets import ImageDataset
    from privbench.threat import Surface


# The metrics a person reads first, per family, in order (each beside its baseline where one exists).
HEADLINE: dict[str, tuple[str, ...]] = {
    "reconstruction": ("psnr", "ssim", "mse", "label_accuracy"),
    "model_inversion": ("attack_accuracy", "chance_level", "baseline_random_auxiliary_attack_accuracy",
                        "member_closer_fraction", "nearest_member_ssim", "eval_classifier_heldout_accuracy"),
    "membership": ("auc", "advantage", "balanced_accuracy", "tpr_at_0.01_fpr", "tpr_at_0.001_fpr",
                   "empirical_epsilon_lower_bound", "dp_audit_power"),
}


def family_of(metrics: dict[str, Any], info: dict[str, Any]) -> str | None:
    """The attack family of a stored row: as recorded, or (older rows) read off its metrics."""
    if info.get("family"):
        return info["family"]
    return next((name for name, headline in HEADLINE.items() if headline[0] in metrics), None)


def headline(metrics: dict[str, Any], info: dict[str, Any]) -> list[str]:
    """The headline metric names a stored row has, in order (perceptual metrics after the family's own)."""
    names = list(HEADLINE.get(family_of(metrics, info) or "", ()))
    names += sorted(m for m in metrics if m.startswith(("lpips", "fid", "kid", "fd_eval")))
    return [name for name in names if name in metrics]


@dataclass(frozen=True)
class ScoreContext:
    """What a scorer may use besides the output and the truth.

    ``auxiliary``: the attacker's population data (trivial baselines); ``costs``: the target's costs
    (epsilon for the DP audit); ``staging``: the run's artifact folder; ``surface``: where the
    attack looked (a gradient attack's batch comes back in no particular order); ``cache_dir``: where a scorer
    may cache what it trains (model inversion's evaluation classifier; None: ``<home>/cache``).
    """

    auxiliary: "ImageDataset"
    costs: dict[str, Any]
    staging: Path
    surface: "Surface"
    allow_download: bool = False
    cache_dir: Path | None = None


@dataclass
class Scores:
    metrics: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)  # metric name -> why it has no number


class FamilyScorer(ABC):
    """Scores one attack family's output against its ground truth."""

    family: ClassVar[str]
    description: ClassVar[str] = ""

    @abstractmethod
    def score(self, output: "AttackOutput", truth: Any, context: ScoreContext) -> Scores:
        """Metrics of ``output`` against ``truth`` (a ``Victim``, ``MembershipTruth`` or ``InversionTruth``)."""
