"""The attack contract: ``run(observation, budget) -> AttackOutput``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal

from privbench.threat import AttackError, AttackSetting, Observation, Surface, UnsupportedPair

if TYPE_CHECKING:
    import numpy as np
    import torch

    from privbench.config import Budget

Family = Literal["reconstruction", "model_inversion", "membership"]
Progress = Callable[[int, int], None]  # (done, total) in the attack's own units
__all__ = ["Attack", "AttackError", "AttackOutput", "Family", "Progress", "UnsupportedPair", "substage"]


def substage(progress: Progress | None, name: str, offset: int = 0, total: int | None = None) -> Progress | None:
    """The progress of one named part of an attack (a restart, the shadow models).

    Where the caller's ``progress`` shows stages (the runner's has ``sub``), the part is a stage of its
    own, ``"attack: <name>"``, counting its own (done, total). Otherwise the part reports into
    ``progress`` itself, at ``offset + done`` of ``total`` (e.g. restart r of R with S steps each:
    ``offset=r * S, total=R * S``; without ``total``, unshifted).
    """
    if progress is None:
        return None
    sub = getattr(progress, "sub", None)
    if callable(sub):
        return sub(name)
    if total is None:
        return progress
    return lambda done, _total: progress(offset + done, total)


@dataclass
class AttackOutput:
    """What an attack produces.

    reconstruction: ``images`` float [B, C, H, W] in [0, 1] and ``labels`` int64 [B].
    model_inversion: ``images`` float [N, C, H, W] in [0, 1], one or more per class inverted, and ``labels`` int64 [N],
    the class each represents.
    membership: ``scores`` float [N] over the observation's candidates (and optional ``decisions`` bool [N]).
    ``grad_evals``: gradient evaluations of the target model spent.
    ``info``: attacker-side diagnostics (e.g. the final gradient distance of each restart).
    """

    images: "torch.Tensor | None" = None
    labels: "torch.Tensor | None" = None
    scores: "np.ndarray | None" = None  # membership: one score per candidate, higher = member
    decisions: "np.ndarray | None" = None  # membership: the attack's own member / non-member calls
    grad_evals: int = 0
    info: dict[str, Any] = field(default_factory=dict)


class Attack(ABC):
    """Base class of every attack. Subclasses set the class attributes and a ``Params`` dataclass."""

    Params: ClassVar[type]
    description: ClassVar[str] = ""
    surface: ClassVar[Surface]
    family: ClassVar[Family]
    stochastic: ClassVar[bool] = False  # does the output depend on the attack's seed (random starts, shadow draws)?
    # The registered defenses this attack was designed against (an adaptive attack: it models what the defense
    # does, e.g. a surrogate gradient or the morphing); empty for a naive attack. Leaderboards read it for their
    # `adaptive` and `unreliable` flags.
    adaptive_for: ClassVar[tuple[str, ...]] = ()
    # For the conformance kit (privbench.testing): parameters for its tiny problem, and the registered defense whose
    # tiny target it attacks (one that exposes ``surface``; ``none`` passes every surface but SHARED_DATA through).
    tiny_params: ClassVar[dict[str, Any]] = {}
    tiny_defense: ClassVar[str | type] = "none"  # a registered name, or the defense class itself
    tiny_model: ClassVar[str | None] = None  # the model that defense fits for the kit (None: its default model)

    def __init__(self, params: Any, seed: int):
        self.params = params
        self.seed = seed

    def check_setting(self, setting: AttackSetting) -> None:
        """Raise ``ConfigError`` if this attack cannot run on a run of this shape (e.g. too little auxiliary
        data for its shadows). Called before any training; the default accepts every setting."""
        return None

    @abstractmethod
    def run(self, observation: Observation, budget: "Budget", progress: Progress | None = None) -> AttackOutput:
        """Attack what ``observation`` holds, within ``budget``."""

    @classmethod
    def cell_batches(cls, params: dict) -> bool:
        """Whether ``run_cell`` solves the victims of one target together with these (resolved) parameters, so
        that a suite runs them as one job; False: one job per victim (the default ``run_cell`` would only run
        them one after another)."""
        return False

    @classmethod
    def run_cell(cls, attacks: "list[Attack]", observations: list[Observation], budget: "Budget",
                 progress: Progress | None = None, engine: str = "auto") -> "list[AttackOutput | Exception]":
        """Attack V victims of one target: ``attacks[v]`` (same parameters, each victim's own seed) on
        ``observations[v]``. Returns one output per victim, or the exception that victim's attack raised (one
        victim's failure never stops the others). This default runs them one after another; an attack
        family that can batch victims (gradient inversion) overrides it (``engine``: ``auto`` lets it batch
        where that measures faster, ``batched`` makes it batch wherever it can)."""
        outputs: list[AttackOutput | Exception] = []
        for i, (attack, observation) in enumerate(zip(attacks, observations, strict=True)):
            part = substage(progress, f"victim {i + 1}/{len(attacks)}", i, len(attacks))
            try:
                outputs.append(attack.run(observation, budget, part))
            except Exception as exc:  # noqa: BLE001 - stored as that victim's failed / unsupported row
                outputs.append(exc)
        return outputs
