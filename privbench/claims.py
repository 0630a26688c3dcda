"""Figures a seed paper states about its own defense, as typed metadata on the defense class.

A leaderboard line of that defense shows the paper's figure beside the one privbench measured (the
``claim`` footnote). This module does not import torch: the views read it without loading components.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# What a claim is about, and where the board finds privbench's own figure:
#   accuracy_drop           mean accuracy drop against the utility twin (fraction, 0.03 = 3 points)
#   energy_ratio            costs["energy_ratio_ann_over_snn"]: ANN energy per inference over the defense's
#   reconstruction_fd_ratio a set Frechet distance (bench score: fid..., else fd_eval...) of the reconstructions
#                           against the defense over the same attack's against the undefended model
Quantity = Literal["accuracy_drop", "energy_ratio", "reconstruction_fd_ratio"]
Relation = Literal["<=", ">=", "~="]


@dataclass(frozen=True)
class PaperClaim:
    """One figure from a defense's seed paper: ``quantity relation value`` (e.g. accuracy_drop <= 0.03)."""

    quantity: Quantity
    relation: Relation
    value: float
    text: str  # the claim in the paper's words, short
    source: str  # the paper

    def holds(self, ours: float) -> bool:
        if self.relation == "<=":
            return ours <= self.value
        if self.relation == ">=":
            return ours >= self.value
        return abs(ours - self.value) <= 0.1 * max(abs(self.value), 1e-12)

    def to_dict(self) -> dict:
        return {"quantity": self.quantity, "relation": self.relation, "value": self.value, "text": self.text,
                "source": self.source}


GASCNN_PAPER = "GASCNN (gradient-attack-resistant spiking CNN, the gascnn seed paper)"
MPLE_PAPER = "MpLe / MoLe (morphed learning, the mple seed paper)"

GASCNN_CLAIMS: tuple[PaperClaim, ...] = (
    PaperClaim("reconstruction_fd_ratio", ">=", 1.75,
               "gradient-inversion reconstructions 1.75x further (FID) than against the undefended ResNet",
               GASCNN_PAPER),
    PaperClaim("accuracy_drop", "<=", 0.03, "accuracy drop under 3%", GASCNN_PAPER),
    PaperClaim("energy_ratio", ">=", 52.0, "52x less energy per inference than the ANN", GASCNN_PAPER),
)
MPLE_CLAIMS: tuple[PaperClaim, ...] = (
    PaperClaim("accuracy_drop", "~=", 0.0, "no accuracy loss from morphing", MPLE_PAPER),
)
