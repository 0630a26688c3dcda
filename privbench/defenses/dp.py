"""Differential privacy: DP-SGD with Opacus (Abadi et al., 2016).

Training: the model first passes through ``opacus.validators.ModuleValidator.fix``
(BatchNorm -> GroupNorm; the changes are recorded), then Opacus's
``PrivacyEngine.make_private`` trains it with Poisson sampling (each member joins
a step's batch with probability ``sample_rate``, as the accountant assumes),
per-sample gradients clipped to ``max_grad_norm`` and Gaussian noise of std
``noise_multiplier * max_grad_norm`` added to their sum, divided by the expected
batch size. The noise multiplier is calibrated by Opacus's
``get_noise_multiplier`` so that the whole run reaches ``epsilon`` at ``delta``
under the named accountant; the epsilon actually spent is read back from the
engine's accountant after training. ``epsilon=inf`` means clipping only (noise
multiplier 0, no finite guarantee).

GRADIENTS surface: the update a client shares for the victim batch under one
DP-SGD step with that noise multiplier, computed by Opacus's GradSampleModule and
DPOptimizer (clip, sum, noise, divide by the training's expected batch size).

Opacus's ``gdp`` accountant is a central-limit approximation, not an upper bound
on epsilon, so it is not offered. Noise comes from seeded PRNGs (not Opacus's
``secure_mode``) so that every number is reproducible from the run seed; that is
right for a benchmark and wrong for a deployment.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from privbench import registry
from privbench.config import ConfigError, derive_seed
from privbench.defenses.base import (
    Defense,
    FitContext,
    Target,
    client_gradients,
    fit_plainly,
    gradient_observation,
    model_at_round,
    released_model_observation,
)
from privbench.deps import require
from privbench.params import bounded
from privbench.threat import Observation, Surface, UpdateRule, Victim
from privbench.training import TrainParams, accuracy, make_optimizer

if TYPE_CHECKING:
    from privbench.datasets import ImageDataset

Accountant = Literal["prv", "rdp"]


@dataclass(frozen=True)
class DPParams(TrainParams):
    """DP-SGD: the training parameters of ``TrainParams`` plus the privacy target.

    ``epsilon`` > 0 is the target for the whole run (``inf``: clipping only, no
    noise); ``delta`` should be below 1/N (N members; a warning is recorded if
    not); ``max_grad_norm`` is the per-sample L2 clipping bound; ``batch_size``
    the expected (Poisson) batch size; ``accountant`` ``prv`` (Gopi et al. 2021)
    or ``rdp`` (Mironov 2017), both upper bounds.
    """

    epsilon: float = bounded(8.0, gt=0, le=1e6, allow_inf=True)
    delta: float = bounded(1e-5, gt=0, lt=1)
    max_grad_norm: float = bounded(1.0, gt=0, le=1e6)
    accountant: Accountant = "prv"

    def __post_init__(self) -> None:
        super().__post_init__()
        if math.isnan(self.epsilon) or self.epsilon <= 0:
            raise ValueError(f"epsilon must be > 0 (inf: clipping only, no noise), got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {self.max_grad_norm}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1 for DP-SGD (the privacy cost is counted per step), got {self.epochs}")
        if self.accountant not in ("prv", "rdp"):
            raise ValueError(f"accountant must be 'prv' or 'rdp', got {self.accountant!r}")


@dataclass(frozen=True)
class DPPlan:
    """The DP-SGD schedule: Poisson ``sample_rate`` per step, ``steps`` in all, the
    ``expected_batch_size`` the noised sum is divided by, and the calibrated ``noise_multiplier``."""

    sample_rate: float
    steps: int
    expected_batch_size: int
    noise_multiplier: float


# -- Opacus building blocks ------------------------------------------------------


def fix_model(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """``ModuleValidator.fix`` ``model`` (train mode); returns the fixed copy and what was replaced.

    Raises ConfigError with Opacus's messages if the fixed model still cannot be
    trained with per-sample gradients.
    """
    from opacus.grad_sample import GradSampleModule
    from opacus.validators import ModuleValidator

    try:
        fixed = ModuleValidator.fix(model.train())
    except Exception as exc:  # e.g. parametrized modules, which Opacus's clone (torch.save) refuses
        raise ConfigError(f"Opacus's ModuleValidator.fix failed on this model: {type(exc).__name__}: {exc}") from exc
    errors = ModuleValidator.validate(fixed, strict=False) + GradSampleModule.validate(fixed, strict=False)
    if errors:
        raise ConfigError(
            f"Opacus cannot train this model with DP-SGD even after ModuleValidator.fix: "
            f"{'; '.join(str(e) for e in errors)}. Use a model without such layers (e.g. lenet or convnet)."
        )
    before = dict(model.named_modules())
    changes = [
        f"{name}: {type(before[name]).__name__} -> {type(module).__name__}"
        for name, module in fixed.named_modules()
        if name in before and type(before[name]) is not type(module)
    ]
    return fixed.train(), changes


@functools.lru_cache(maxsize=64)  # a pure function; PRV's bisection takes seconds to a minute per call
def calibrate_noise(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Opacus's noise multiplier reaching ``epsilon`` after ``steps`` Poisson steps; 0 for ``epsilon=inf``."""
    if math.isinf(epsilon):
        return 0.0
    from opacus.accountants.utils import get_noise_multiplier

    with _quiet_alpha_grid():
        return get_noise_multiplier(
            target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant
        )


def epsilon_for(accountant: str, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon the Opacus ``accountant`` gives ``steps`` Poisson-subsampled Gaussian steps; inf without noise."""
    if noise_multiplier == 0:
        return math.inf
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    with _quiet_alpha_grid():
        return float(acc.get_epsilon(delta=delta))


@contextlib.contextmanager
def _quiet_alpha_grid():
    """Silence RDP's note that the optimal order sits at the edge of its alpha grid.

    The bound stays a valid upper bound (only possibly loose); the bisection in
    get_noise_multiplier probes noise levels far from the answer where this always
    fires, and PRV uses RDP internally to choose its discretisation domain.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        yield


def dp_update(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, ...]:
    """One DP-SGD update of ``model`` on a batch, as Opacus's DPOptimizer forms it; ``model`` is untouched.

    Per-sample gradients of the cross-entropy (``images`` float [B, C, H, W],
    ``labels`` int64 [B]) are clipped to L2 norm ``max_grad_norm``, summed, given
    Gaussian noise of std ``noise_multiplier * max_grad_norm`` per coordinate and
    divided by ``expected_batch_size``. Returns one tensor per parameter of
    ``model`` in ``model.parameters()`` order.
    """
    from opacus.grad_sample import GradSampleModule
    from opacus.optimizers import DPOptimizer

    work = copy.deepcopy(model).train()
    gsm = GradSampleModule(work, loss_reduction="mean")
    params = [p for p in work.parameters() if p.requires_grad]  # as client_gradients defines the update
    # The inner optimizer never steps: the update is p.grad after pre_step (clip, noise, scale).
    optimizer = DPOptimizer(
        torch.optim.SGD(params, lr=0.0),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=generator,
    )
    optimizer.zero_grad(set_to_none=True)
    with _quiet_hooks():
        F.cross_entropy(gsm(images), labels).backward()
    optimizer.pre_step()
    update = tuple(p.grad.detach().clone() for p in params)
    gsm.to_standard_module()
    return update


@contextlib.contextmanager
def _quiet_hooks():
    """Silence torch's note that Opacus's backward hooks fire on a first layer whose input needs no gradient."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        yield


def train_dp(
    model: nn.Module, members: "ImageDataset", params: DPParams, seed: int, progress=None
) -> tuple[nn.Module, DPPlan, dict[str, Any]]:
    """Train the fixed ``model`` with Opacus DP-SGD; returns the plain trained module, the plan and a record."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(members.images, members.labels)
    sampling = torch.Generator().manual_seed(derive_seed(seed, "dp-sampling"))
    noise = torch.Generator().manual_seed(derive_seed(seed, "dp-noise"))
    loader = DataLoader(data, batch_size=params.batch_size, generator=sampling)
    # What make_private derives from this loader: q = 1/len(loader), and a Poisson
    # sampler of int(1/q) batches per epoch. Checked against the real objects below.
    sample_rate = 1 / len(loader)
    steps = params.epochs * int(1 / sample_rate)
    sigma = calibrate_noise(params.epsilon, params.delta, sample_rate, steps, params.accountant)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")  # seeded on purpose, see module doc
        engine = PrivacyEngine(accountant=params.accountant)
    gsm, optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=make_optimizer(params, model),
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=params.max_grad_norm,
        poisson_sampling=True,
        noise_generator=noise,
    )
    if dp_loader.sample_rate != sample_rate or params.epochs * len(dp_loader) != steps:
        raise RuntimeError(
            f"Opacus's schedule (q={dp_loader.sample_rate}, {len(dp_loader)} steps/epoch) differs from the "
            f"calibrated one (q={sample_rate}, {steps} steps): the noise would not match the epsilon"
        )
    plan = DPPlan(sample_rate, steps, int(optimizer.expected_batch_size), sigma)

    losses: list[float] = []
    batch_sizes: list[int] = []
    start = time.perf_counter()
    gsm.train()
    if progress:
        progress(0, params.epochs)
    for epoch in range(params.epochs):
        total, seen = 0.0, 0
        for x, y in dp_loader:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(gsm(x), y)
            with _quiet_hooks():
                loss.backward()
            optimizer.step()  # an empty Poisson batch still steps: noise only, and the accountant counts it
            if len(y):
                total += loss.item() * len(y)
                seen += len(y)
            batch_sizes.append(len(y))
        losses.append(total / max(seen, 1))
        if progress:
            progress(epoch + 1, params.epochs)
    train_time = time.perf_counter() - start
    with _quiet_alpha_grid():
        spent = math.inf if sigma == 0 else float(engine.get_epsilon(params.delta))
    history = [list(h) for h in engine.accountant.history]
    trained = gsm.to_standard_module().eval()
    record = {
        "epochs": params.epochs,
        "epoch_losses": losses,
        "train_time_s": train_time,
        "epsilon_spent": spent,
        "accountant": params.accountant,
        "accountant_history": history,  # [noise_multiplier, sample_rate, steps]
        "batch_size_mean": sum(batch_sizes) / max(len(batch_sizes), 1),
        "empty_batches": sum(1 for b in batch_sizes if b == 0),
        "sampling": "Poisson (opacus DPDataLoader)",
        "noise_rng": "torch.Generator seeded from the run seed (secure_mode off, for reproducibility)",
    }
    return trained, plan, record


# -- the defense -------------------------------------------------------------------


@registry.defenses.register("dp")
class DPSGD(Defense):
    """DP-SGD (Opacus): clipped, noised per-sample gradients; epsilon read from the accountant."""

    Params = DPParams
    description = (
        "DP-SGD with Opacus (Abadi et al. 2016): Poisson sampling, per-sample clipping, Gaussian noise "
        "calibrated to a target epsilon (prv/rdp accountant); BatchNorm -> GroupNorm."
    )
    protects = frozenset({Surface.GRADIENTS, Surface.MODEL_WHITEBOX, Surface.MODEL_QUERIES})
    stochastic = True
    # Any model: Opacus's own validators decide, after ModuleValidator.fix (BatchNorm -> GroupNorm in resnet and
    # vgg), and fix_model refuses one it cannot train with per-sample gradients before anything is trained.
    models = None
    default_model = "lenet"
    tiny_params = {"epochs": 1, "batch_size": 16, "epsilon": 8.0, "accountant": "rdp"}  # rdp: a faster calibration

    def released_architecture(self, model: nn.Module) -> nn.Module:
        return fix_model(model)[0]

    def __init__(self, params: DPParams):
        require("opacus", "the dp defense")  # checked without importing it
        super().__init__(params)

    def fit(self, model: nn.Module, members, ctx: FitContext) -> Target:
        p: DPParams = self.params
        fixed, changes = fix_model(model)
        initial_state = copy.deepcopy(fixed.state_dict())
        notes: list[str] = []
        if p.delta >= 1 / len(members):
            message = (
                f"dp: delta={p.delta:g} is not below 1/N = {1 / len(members):g} (N={len(members)} members); "
                f"such a delta allows releasing a member's record outright. Pass a smaller delta."
            )
            warnings.warn(message, stacklevel=2)
            notes.append(message)
        progress = (lambda done, total: ctx.progress("train", done, total)) if ctx.progress else None
        trained, plan, record = train_dp(fixed, members, p, ctx.seeds["train"], progress)
        if record["epsilon_spent"] > p.epsilon:  # Opacus's calibration guarantees this; a breach is a bug
            raise RuntimeError(f"epsilon spent {record['epsilon_spent']} exceeds the target {p.epsilon}")
        record.update(
            train_accuracy=accuracy(trained, members),
            module_changes=changes,
            warnings=notes,
            plan=dataclasses.asdict(plan),
        )
        return Target(
            model=trained,
            initial_state=initial_state,
            training=record,
            utility={"accuracy": accuracy(trained, ctx.nonmembers)},
            costs={
                "train_time_s": record["train_time_s"],
                "epsilon_spent": record["epsilon_spent"],
                "epsilon_target": p.epsilon,
                "delta": p.delta,
                "noise_multiplier": plan.noise_multiplier,
                "max_grad_norm": p.max_grad_norm,
                "sample_rate": plan.sample_rate,
                "steps": plan.steps,
                "expected_batch_size": plan.expected_batch_size,
                "modules_replaced": len(changes),
            },
        )

    def observe(self, surface: Surface, target: Target, victim: Victim, ctx: FitContext) -> Observation:
        if surface is Surface.GRADIENTS:
            model = model_at_round(target, lambda: fix_model(ctx.build_model())[0], ctx.config.gradient_round)
            costs = target.costs
            noise = torch.Generator().manual_seed(derive_seed(ctx.seeds["observe"], "dp-observe-noise"))
            update = dp_update(
                model,
                victim.images,
                victim.labels,
                noise_multiplier=costs["noise_multiplier"],
                max_grad_norm=self.params.max_grad_norm,
                expected_batch_size=int(costs["expected_batch_size"]),
                generator=noise,
            )
            rule = UpdateRule(clip_norm=self.params.max_grad_norm, divisor=float(costs["expected_batch_size"]),
                              noise_std=costs["noise_multiplier"] * self.params.max_grad_norm)
            return gradient_observation(
                model,
                update,
                victim,
                ctx,
                rule=rule,
                mechanism="DP-SGD step (opacus GradSampleModule + DPOptimizer): clip, sum, noise, / expected batch",
                noise_multiplier=costs["noise_multiplier"],
                max_grad_norm=self.params.max_grad_norm,
                expected_batch_size=int(costs["expected_batch_size"]),
                epsilon_target=self.params.epsilon,
                epsilon_spent=costs["epsilon_spent"],
            )
        return released_model_observation(surface, target, "dp")

    def utility_twin(self) -> Defense:
        train = {f.name: getattr(self.params, f.name) for f in dataclasses.fields(TrainParams)}
        return FixedArchitectureTraining(TrainParams(**train))


class FixedArchitectureTraining(Defense):
    """The utility twin of ``dp``: plain training of the ModuleValidator-fixed model, same training parameters.

    Not registered: it exists so that ``accuracy_drop`` measures DP-SGD, not GroupNorm.
    """

    Params = TrainParams
    description = "Plain training of the Opacus-fixed architecture (utility twin of dp)."

    def released_architecture(self, model: nn.Module) -> nn.Module:
        return fix_model(model)[0]

    def fit(self, model: nn.Module, members, ctx: FitContext) -> Target:
        fixed, changes = fix_model(model)
        target = fit_plainly(fixed, members, self.params, ctx, stage="train twin")
        target.training["module_changes"] = changes
        return target

    def observe(self, surface: Surface, target: Target, victim: Victim, ctx: FitContext) -> Observation:
        if surface is Surface.GRADIENTS:
            model = model_at_round(target, lambda: fix_model(ctx.build_model())[0], ctx.config.gradient_round)
            return gradient_observation(model, client_gradients(model, victim.images, victim.labels, ctx.config.bn_mode), victim, ctx)
        return released_model_observation(surface, target, "dp")
