"""Scoring of the membership family: ROC metrics, the DP audit where the target spent an epsilon, artifacts."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np

from privbench import registry
from privbench.metrics.family import FamilyScorer, ScoreContext, Scores
from privbench.threat import MembershipTruth

if TYPE_CHECKING:
    from privbench.attacks.base import AttackOutput


@registry.metrics.register("membership")
class MembershipScorer(FamilyScorer):
    family = "membership"
    description = ("Membership family: ROC AUC, advantage, balanced accuracy, TPR at 1% / 0.1% FPR with bootstrap "
                   "intervals, and the (epsilon, delta) audit when the target spent an epsilon.")

    def score(self, output: "AttackOutput", truth: MembershipTruth, context: ScoreContext) -> Scores:
        from privbench.metrics.membership import dp_bound_check, membership_metrics

        is_member = truth.is_member
        if output.scores is None or len(output.scores) != len(is_member):
            raise RuntimeError(f"membership attack returned {None if output.scores is None else len(output.scores)} "
                               f"scores for {len(is_member)} candidates")
        metrics, reasons, roc = membership_metrics(output.scores, is_member, output.decisions)
        scores = Scores(metrics=metrics, unavailable=dict(reasons))
        epsilon, delta = context.costs.get("epsilon_spent"), context.costs.get("delta")
        if isinstance(epsilon, (int, float)) and isinstance(delta, (int, float)):
            n_in = int(np.sum(is_member))
            scores.metrics.update(dp_bound_check(roc, float(epsilon), float(delta), n_in, len(is_member) - n_in))
        (context.staging / "roc.json").write_text(json.dumps(roc))
        (context.staging / "scores.json").write_text(json.dumps({"scores": [float(x) for x in output.scores],
                                                                 "is_member": [bool(x) for x in is_member]}))
        return scores
