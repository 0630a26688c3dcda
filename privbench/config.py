"""Run configuration: a frozen ``RunConfig``, typed component parameters, stable hashes.

A config exists in two states. As *requested* (from the CLI or a suite file),
component parameters are whatever the user wrote, usually strings. *Resolved*
(:func:`resolve`), every parameter is coerced to the type its component's
``Params`` dataclass declares and every default is filled in; the resolved
config is what is stored with a run and what its ``config_hash`` covers.
Resolving imports the named components (and so torch); the requested form can be
hashed without importing anything heavy, which keeps a cached ``bench run`` fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from privbench import __version__
from privbench.datasets.splits import SplitSpec
from privbench.params import INT64_MAX, bounded, check_instance, check_values

GradientRound = Literal["init", "trained"]
BatchNormMode = Literal["train", "eval"]
BatchNormBuffers = Literal["shared", "private"]


class ConfigError(ValueError):
    """A malformed configuration; the message names the field and the fix."""


Params = tuple[tuple[str, Any], ...]


def freeze_params(params: Mapping[str, Any] | Params | None) -> Params:
    if params is None:
        return ()
    items = params.items() if isinstance(params, Mapping) else params
    return tuple(sorted((str(k), v) for k, v in items))


MAX_IMAGE_SIZE = 1024  # pixels a side; beyond this a decoded dataset no longer fits in memory
MAX_VICTIM_BATCH = 4096
MAX_GRAD_EVALS = 10**12


@dataclass(frozen=True)
class Budget:
    """What the attacker may spend. ``max_grad_evals``: cap on gradient evaluations (None: the attack's own schedule)."""

    max_grad_evals: int | None = bounded(None, ge=1, le=MAX_GRAD_EVALS)

    def __post_init__(self) -> None:
        value = self.max_grad_evals
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 1 <= value <= MAX_GRAD_EVALS):
            raise ConfigError(f"max_grad_evals must be an integer in [1, {MAX_GRAD_EVALS:.0e}] (or none for the "
                              f"attack's own schedule), got {value!r}")


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines one run's result.

    ``seed`` drives the model initialization, training order, victim choice and
    attack; ``split_seed`` the members / nonmembers / auxiliary split, kept
    separate so that runs over many seeds share one split (one target
    population, one auxiliary set for evaluation networks). ``target_seed``,
    when set, takes over everything that shapes the trained target (model
    initialization, training, the defense's own secrets), so that a cell of
    seeds attacks many victims of one released model; None: ``seed`` does both.
    ``model`` None (as requested) resolves to the defense's default architecture.
    ``gradient_round`` is the point at which a GRADIENTS observation is taken:
    ``init`` (the seed's initialization, as in the DLG paper) or ``trained``
    (after the defense's training). ``victim_batch`` is how many member images
    the victim client's update is computed on. ``bn_mode`` and ``bn_buffers`` are the BatchNorm
    protocol of that update: whether the client computes it with BatchNorm in ``train`` mode (batch
    statistics, as a FedAvg client's local step does) or ``eval`` mode (the global running statistics),
    and whether it ``shared`` its updated BatchNorm buffers with the update (FedAvg implementations
    commonly average them with the weights) or kept them ``private``. They are properties of the
    protocol, not of the attack; models without BatchNorm are unaffected.
    """

    defense: str = "none"
    attack: str = "dlg"
    dataset: str = "synthetic-mri"
    model: str | None = None  # None: the defense's default architecture (its ``default_model``)
    image_size: int = 32
    channels: int = 1
    seed: int = 0
    split_seed: int = 0
    target_seed: int | None = None
    defense_params: Params = ()
    attack_params: Params = ()
    model_params: Params = ()
    split: SplitSpec = field(default_factory=SplitSpec)
    gradient_round: GradientRound = "init"
    victim_batch: int = 1
    bn_mode: BatchNormMode = "train"
    bn_buffers: BatchNormBuffers = "shared"
    budget: Budget = field(default_factory=Budget)

    def __post_init__(self) -> None:
        for name in ("defense_params", "attack_params", "model_params"):
            object.__setattr__(self, name, freeze_params(getattr(self, name)))
        if self.gradient_round not in ("init", "trained"):
            raise ConfigError(f"gradient_round must be 'init' or 'trained', got {self.gradient_round!r}")
        if self.bn_mode not in ("train", "eval"):
            raise ConfigError(f"bn_mode must be 'train' or 'eval', got {self.bn_mode!r}")
        if self.bn_buffers not in ("shared", "private"):
            raise ConfigError(f"bn_buffers must be 'shared' or 'private', got {self.bn_buffers!r}")
        for name, low, high in (("image_size", 4, MAX_IMAGE_SIZE), ("victim_batch", 1, MAX_VICTIM_BATCH)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        if isinstance(self.channels, bool) or self.channels not in (1, 3):
            raise ConfigError(f"channels must be 1 (grayscale) or 3 (RGB), got {self.channels!r}")
        for name in ("seed", "split_seed", "target_seed"):
            value = getattr(self, name)
            if name == "target_seed" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= INT64_MAX:
                raise ConfigError(f"{name} must be an integer in [0, 2^63 - 1] (what the results store holds), "
                                  f"got {value!r}")
        if not isinstance(self.budget, Budget):
            raise ConfigError(f"budget must be a Budget, got {self.budget!r}")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("defense_params", "attack_params", "model_params"):
            out[name] = dict(getattr(self, name))
        if out["target_seed"] is None:  # absent rather than null, so configs from before the field keep their hashes
            del out["target_seed"]
        for name, default in (("bn_mode", "train"), ("bn_buffers", "shared")):
            if out[name] == default:  # absent at the default, for the same reason; rows state the protocol in notes
                del out[name]
        return out

    @property
    def trained_target_seed(self) -> int:
        """The seed that shapes the trained target: ``target_seed`` if set, else ``seed``."""
        return self.seed if self.target_seed is None else self.target_seed

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunConfig":
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known fields: {sorted(known)}")
        if "split" in data and isinstance(data["split"], Mapping):
            data["split"] = _build(SplitSpec, data["split"], "split")
        if "budget" in data and isinstance(data["budget"], Mapping):
            data["budget"] = _build(Budget, data["budget"], "budget")
        return cls(**data)

    def config_hash(self) -> str:
        """sha256 of the canonical JSON of this config (stable across processes and dict order)."""
        return digest(self.to_dict())

    def cache_key(self, data_fingerprint: str) -> str:
        """Key under which a result is reused: config + data identity + privbench version."""
        return digest({"config": self.to_dict(), "data": data_fingerprint, "privbench": __version__})

    def derived_seeds(self) -> dict[str, int]:
        """Independent seeds for each random choice of the run, by purpose.

        From ``trained_target_seed``: ``init`` (model initialization), ``train`` (training order, noise),
        ``secrets`` (a defense's own secrets: MpLe's matrix and permutation). From ``seed``: ``victim``
        (which members form the victim batch), ``observe`` (fresh randomness in an observation: DP noise on
        the shared update, an encoder's samples), ``attack`` (the attack's starts). Defenses and attacks
        read these, never ``config.seed``.
        """
        seeds = {p: derive_seed(self.trained_target_seed, p) for p in ("init", "train", "secrets")}
        seeds.update({p: derive_seed(self.seed, p) for p in ("victim", "observe", "attack")})
        return {"split": derive_seed(self.split_seed, "split"), **seeds}


def derive_seed(seed: int, purpose: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{purpose}".encode()).digest()[:4], "big") & 0x7FFFFFFF


def _canonical(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # JSON has no inf/nan; keep them distinguishable
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def digest(obj: Any) -> str:
    text = json.dumps(_canonical(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# -- typed component parameters ------------------------------------------------


def parse_assignments(items: list[str] | None, what: str) -> dict[str, str]:
    """``["steps=300", "lr=0.1"]`` -> ``{"steps": "300", "lr": "0.1"}``."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what}: expected key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def coerce_params(params_cls: type, given: Mapping[str, Any], component: str) -> dict[str, Any]:
    """Validate ``given`` against the dataclass ``params_cls``; return every field, typed.

    Every value must lie in its field's declared range (``privbench.params``: finite, within a signed
    64-bit integer, within the bounds the dataclass declares), checked before the dataclass is built
    and again on the built instance (whose ``__post_init__`` may fill values in).

    Raises ConfigError naming the parameter and its expected type or range.
    """
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    hints = typing.get_type_hints(params_cls)
    values: dict[str, Any] = {}
    for key, raw in given.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(
                f"{component} has no parameter {key!r}.{hint} Its parameters: {', '.join(fields) or '(none)'}."
            )
        try:
            values[key] = _coerce(raw, hints[key])
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"{component} parameter {key!r} expects {_type_name(hints[key])}, got {raw!r} ({exc})"
            ) from None
    try:
        check_values(params_cls, values)
        instance = params_cls(**values)
        check_instance(instance)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{component} parameters invalid: {exc}") from None
    return dataclasses.asdict(instance)


def _build(cls: type, data: Mapping[str, Any], what: str) -> Any:
    return cls(**coerce_params(cls, data, what))


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _coerce(raw: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if raw == choice or (isinstance(raw, str) and str(choice) == raw):
                return choice
        raise ValueError(f"not one of {list(choices)}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null", ""))):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(raw, arg)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors))
    if origin is tuple:
        args = typing.get_args(tp)
        parts = raw if isinstance(raw, (list, tuple)) else [p for p in str(raw).split(",") if p.strip()]
        inner = args[0] if args else str
        return tuple(_coerce(p.strip() if isinstance(p, str) else p, inner) for p in parts)
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in _TRUE | _FALSE:
            return raw.lower() in _TRUE
        raise ValueError("not a boolean (true/false)")
    if tp is int:
        if isinstance(raw, bool):
            raise ValueError("not an integer")
        if isinstance(raw, int):
            return raw
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
        return int(str(raw))
    if tp is float:
        if isinstance(raw, bool):
            raise ValueError("not a number")
        return float(raw)
    if tp is str:
        if not isinstance(raw, str):
            raise ValueError("not a string")
        return raw
    raise TypeError(f"unsupported parameter type {tp}")


FALLBACK_MODEL = "lenet"  # the DLG paper's network: the default of a defense that names none


def default_model(defense_cls: type) -> str:
    """The architecture ``defense_cls`` runs on when the user names none."""
    return getattr(defense_cls, "default_model", None) or FALLBACK_MODEL


def resolve(config: RunConfig) -> RunConfig:
    """Type-check and complete the component parameters of ``config`` (imports the components)."""
    from privbench import registry

    defense_cls = registry.defenses.get(config.defense)
    attack_cls = registry.attacks.get(config.attack)
    model = config.model or default_model(defense_cls)
    model_cls = registry.models.get(model)
    if isinstance(defense_cls, type):
        from privbench.defenses.base import Defense, check_model

        if issubclass(defense_cls, Defense):
            check_model(defense_cls, model)
    return dataclasses.replace(
        config,
        model=model,
        defense_params=coerce_params(defense_cls.Params, dict(config.defense_params), f"defense {config.defense!r}"),
        attack_params=coerce_params(attack_cls.Params, dict(config.attack_params), f"attack {config.attack!r}"),
        model_params=coerce_params(model_cls.Params, dict(config.model_params), f"model {model!r}"),
    )
