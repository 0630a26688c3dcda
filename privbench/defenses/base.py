"""The defense contract: ``fit`` builds the released target, ``observe`` answers an attacker's surface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from privbench.claims import PaperClaim
from privbench.threat import GradientUpdate, Observation, Surface, UpdateRule, Victim

if TYPE_CHECKING:
    from privbench.config import RunConfig
    from privbench.datasets import ImageDataset


@dataclass
class Target:
    """A model trained under a defense.

    ``model`` is the released model (eval mode); ``initial_state`` its weights
    at the seed's initialization (the ``round=init`` point); ``training`` the
    training record; ``utility`` accuracy on nonmembers; ``costs`` what the
    defense cost (``train_time_s``, and defense-specific entries).
    """

    model: nn.Module
    initial_state: dict[str, torch.Tensor]
    training: dict[str, Any] = field(default_factory=dict)
    utility: dict[str, float] = field(default_factory=dict)
    costs: dict[str, float] = field(default_factory=dict)


@dataclass
class FitContext:
    """What a defense may use besides the members: a model factory, held-out data for utility, seeds.

    ``seeds`` are ``RunConfig.derived_seeds()`` (by purpose: init, train, secrets, victim, observe, attack).
    ``data_identity`` names the data the target is fitted on (dataset, data fingerprint, split seed and
    spec, image size, channels): part of every cache key of a defense's own stages.
    """

    config: "RunConfig"
    build_model: Callable[[], nn.Module]  # a fresh model at the seed's initialization
    nonmembers: "ImageDataset"
    seeds: dict[str, int]
    progress: Callable[[str, int, int], None] | None = None
    members: "ImageDataset | None" = None  # the training set, for observations of a party that receives it
    data_identity: dict[str, Any] = field(default_factory=dict)


class Defense(ABC):
    """Base class of every defense. Subclasses set the class attributes and a ``Params`` dataclass."""

    Params: ClassVar[type]
    description: ClassVar[str] = ""
    protects: ClassVar[frozenset[Surface]] = frozenset()
    differentiable: ClassVar[bool] = True  # can an attacker backpropagate through what it exposes?
    # Figures the defense's seed paper states (privbench.claims.PaperClaim); a leaderboard shows each beside ours.
    paper_claims: ClassVar[tuple[PaperClaim, ...]] = ()
    stochastic: ClassVar[bool] = False  # does the exposed quantity involve fresh randomness?
    # can a gradient-inversion cell against this defense solve its victims together (False: the released
    # model cannot be vectorised over victims, e.g. a spiking network; a suite then runs one job per victim)
    batchable_gradients: ClassVar[bool] = True
    # The registered model names the defense runs on (None: any registered model), the one it runs on when
    # the user names none, and why a model outside ``models`` cannot work (for the error; see check_model).
    models: ClassVar[tuple[str, ...] | None] = None
    default_model: ClassVar[str] = "lenet"
    models_reason: ClassVar[str] = ""
    # Parameters for the conformance kit's tiny problem (privbench.testing: 1x16x16 images, a few dozen of them):
    # the fastest settings that still run every stage of the defense.
    tiny_params: ClassVar[dict[str, Any]] = {}

    def __init__(self, params: Any):
        self.params = params

    @abstractmethod
    def fit(self, model: nn.Module, members: "ImageDataset", ctx: FitContext) -> Target:
        """Train ``model`` (fresh, at the seed's initialization) on ``members`` under the defense."""

    @abstractmethod
    def observe(self, surface: Surface, target: Target, victim: Victim | None, ctx: FitContext) -> Observation:
        """What an attacker on ``surface`` sees; ``victim`` is the client's data (None for model surfaces)."""

    def utility_twin(self) -> "Defense | None":
        """The same training without this defense's protection (same architecture, data and seeds).

        The runner fits it (cached) and stores ``twin_accuracy`` and
        ``accuracy_drop`` = twin accuracy - target accuracy on nonmembers, so the
        utility cost comes from the same config. None: the defense has no twin
        (``none`` is its own baseline).
        """
        return None

    def released_architecture(self, model: nn.Module) -> nn.Module:
        """The architecture the defense actually trains and releases, given a fresh model.

        The runner loads cached weights into it, so a defense that changes the
        architecture (dp: BatchNorm -> GroupNorm) must say so here.
        """
        return model

    def audit_secrets(self, surface: Surface, target: Target, ctx: FitContext) -> dict[str, Any]:
        """What must never be reachable from ``surface``'s observation besides the victim's data and the
        members: name -> tensor (a secret value) or predicate (``obj -> bool``, e.g. "is a secret key").
        The threat-model tests walk every observation for these (``privbench.reachability``)."""
        return {}

    def plain_training_recipe(self) -> dict[str, Any] | None:
        """The TrainParams (as a dict) if this defense is plain training, so shadows can mimic it cheaply; else None."""
        return None

    def identity(self) -> dict[str, Any]:
        """What distinguishes this defense's trained target in the target cache."""
        import dataclasses

        return {"class": f"{type(self).__module__}.{type(self).__qualname__}", "params": dataclasses.asdict(self.params)}


def check_model(defense_cls: type[Defense], model_name: str) -> None:
    """Refuse a model the defense cannot run on, saying why and which model to use.

    Args:
        defense_cls: a Defense subclass (its ``models``, ``default_model`` and ``models_reason``).
        model_name: a registered model name.

    Raises:
        ConfigError: ``model_name`` is not among ``defense_cls.models`` (None accepts every model).

    Example:
        >>> check_model(registry.defenses.get("gascnn"), "lenet")  # doctest: +SKIP
        ConfigError: defense 'gascnn' cannot run on model 'lenet': ... Use --model resnet (its default) ...
    """
    from privbench.config import ConfigError

    supported = defense_cls.models
    if supported is None or model_name in supported:
        return
    name = getattr(defense_cls, "registry_name", defense_cls.__name__)
    options = [f"--model {defense_cls.default_model} (its default)"]
    options += [f"--model {m}" for m in supported if m != defense_cls.default_model]
    use = options[0] if len(options) == 1 else f"{', '.join(options[:-1])} or {options[-1]}"
    why = defense_cls.models_reason or f"it supports the models {', '.join(supported)} only"
    raise ConfigError(f"defense {name!r} cannot run on model {model_name!r}: {why}. Use {use}.")


def fit_plainly(model: nn.Module, members: "ImageDataset", params: Any, ctx: FitContext, stage: str = "train",
                before_step: Callable[[nn.Module], None] | None = None) -> Target:
    """Plain supervised training of ``model`` under ``params`` (TrainParams), as a Target with its utility.

    ``before_step(model)`` runs between each step's backward pass and the optimizer step (see
    ``privbench.training.train_classifier``): the place for a defense that transforms training gradients.
    """
    import copy

    from privbench.training import accuracy, train_classifier

    initial_state = copy.deepcopy(model.state_dict())
    progress = (lambda done, total: ctx.progress(stage, done, total)) if ctx.progress else None
    record = train_classifier(model, members, params, ctx.seeds["train"], progress, before_step=before_step)
    return Target(
        model=model.eval(),
        initial_state=initial_state,
        training=record,
        utility={"accuracy": accuracy(model, ctx.nonmembers)},
        costs={"train_time_s": record["train_time_s"]},
    )


def model_at_round(target: Target, build_model: Callable[[], nn.Module], round_: str) -> nn.Module:
    """A copy of the global model at ``round_`` (``init`` or ``trained``), in train mode."""
    model = build_model()
    state = target.initial_state if round_ == "init" else target.model.state_dict()
    model.load_state_dict(state)
    return model.train()


def client_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     bn_mode: str = "train") -> tuple[torch.Tensor, ...]:
    """The plain client update: d(mean cross-entropy)/d(param) with BatchNorm in ``bn_mode``, per parameter.

    ``images`` float [B, C, H, W] in [0, 1], ``labels`` int64 [B]. This is the
    single definition of the GRADIENTS quantity that defenses then transform.
    Computed on a copy: ``model``'s BatchNorm running statistics never see the batch.
    """
    import copy

    work = copy.deepcopy(model).train(bn_mode == "train")
    params = [p for p in work.parameters() if p.requires_grad]
    loss = F.cross_entropy(work(images), labels)
    return tuple(g.detach() for g in torch.autograd.grad(loss, params))


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def shared_bn_buffers(model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every buffer of ``model`` after one train-mode forward pass on ``inputs`` (a client's local step):
    the BatchNorm running statistics then mix in the batch's per-channel mean and unbiased variance."""
    import copy

    work = copy.deepcopy(model).train()
    with torch.no_grad():
        work(inputs)
    return tuple(b.detach().clone() for b in work.buffers())


def gradient_protocol_note(config: Any, model: nn.Module) -> str:
    """The BatchNorm protocol of a gradient observation, as the row states it."""
    if not has_batchnorm(model):
        return f"no BatchNorm in the model (bn_mode={config.bn_mode}, bn_buffers={config.bn_buffers} do not apply)"
    mode = ("train mode (the victim batch's statistics)" if config.bn_mode == "train"
            else "eval mode (the global running statistics)")
    shared = ("shared with the update" if config.bn_buffers == "shared" and config.bn_mode == "train"
              else "unchanged by an eval-mode step, so they reveal nothing" if config.bn_mode == "eval"
              else "kept private by the client")
    return f"BatchNorm in {mode}; the client's updated buffers {shared}"


def gradient_observation(
    model: nn.Module, gradients: tuple[torch.Tensor, ...], victim: Victim, ctx: FitContext,
    rule: UpdateRule | None = None, inputs: torch.Tensor | None = None, **notes: Any
) -> Observation:
    """The GRADIENTS observation of ``gradients`` shared under ``model`` by the update ``rule`` (default: the
    plain mean gradient), under the run's BatchNorm protocol (``ctx.config.bn_mode``, ``bn_buffers``): the
    model is handed over as a fresh copy in that mode, with the client's updated buffers when they are
    shared (computed from ``inputs``, the batch as the model takes it; default the victim's images).
    ``notes`` go to the row."""
    import copy

    config = ctx.config
    bn_mode = getattr(config, "bn_mode", "train")
    buffers: tuple[torch.Tensor, ...] = ()
    if has_batchnorm(model) and bn_mode == "train" and getattr(config, "bn_buffers", "shared") == "shared":
        buffers = shared_bn_buffers(model, victim.images if inputs is None else inputs)
    notes = {"gradient_protocol": gradient_protocol_note(config, model), **notes}
    update = GradientUpdate(
        model=copy.deepcopy(model).train(bn_mode == "train"),
        gradients=tuple(g.detach().clone() for g in gradients),
        batch_size=len(victim.labels),
        input_shape=tuple(victim.images.shape[1:]),
        num_classes=ctx.nonmembers.num_classes,
        round=ctx.config.gradient_round,
        rule=rule or UpdateRule(),
        buffers=buffers,
        bn_mode=bn_mode,
    )
    return Observation(surface=Surface.GRADIENTS, gradient_update=update, notes=dict(notes))


def released_model_observation(surface: Surface, target: Target, defense: str) -> Observation:
    """MODEL_WHITEBOX (a copy of the released model) or MODEL_QUERIES (its logits) for a defense that passes them through.

    SHARED_DATA is refused: such a defense sends no transformed training data to a service.
    """
    import copy

    from privbench.threat import AttackError

    if surface is Surface.SHARED_DATA:
        raise AttackError(
            f"defense {defense!r} does not send transformed training data to a service, so there is no "
            f"shared_data surface to attack (data-transforming defenses such as mple expose it)"
        )
    released = copy.deepcopy(target.model).eval()
    if surface is Surface.MODEL_WHITEBOX:
        return Observation(surface=surface, model=released)
    return Observation(surface=surface, query=lambda x: released(x).detach())
