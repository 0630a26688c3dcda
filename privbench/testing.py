"""Conformance kit: the checks every defense, attack, dataset and model passes, built-in or plugin.

A plugin's tests run the same checks as privbench's own built-ins::

    from privbench.testing import parametrize_with_checks
    from my_package import MyDefense

    @parametrize_with_checks([MyDefense])
    def test_conformance(component, check):
        check(component)

Each (component, check) pair is one pytest test with the id ``<component>-<check>`` (``pytest -k
"my-defense and leak"`` selects one). ``check_defense(cls)``, ``check_attack(cls)``,
``check_dataset(cls)`` and ``check_model(cls)`` run every check of one kind at once and raise
``ConformanceError`` listing the failures. A check that fails says which component (with its
origin: built-in module, or plugin distribution, version and entry point), which check, and why.

The tiny problem: ``synthetic-mri:64`` at 1x16x16 (32 members, 16 nonmembers, 16 auxiliary
images, 4 classes), one torch thread, a fresh temporary ``PRIVBENCH_HOME`` for every fit (so no
cache of the user's is read or written). A component runs on it with its ``tiny_params`` class
attribute (the fastest settings that still exercise it); an attack attacks the tiny target of
its ``tiny_defense``. Each fit and each attack run must stay within ``CPU_BUDGET_S`` seconds of
process CPU time. Fitted targets are shared by the checks of one process (``clear_cache()``
drops them).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import pickle
import random
import shutil
import tempfile
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping
from unittest import mock

import numpy as np

if TYPE_CHECKING:
    from privbench.attacks.base import AttackOutput
    from privbench.datasets import ImageDataset
    from privbench.datasets.splits import Splits
    from privbench.defenses.base import Defense, FitContext, Target
    from privbench.threat import Observation, Victim

__all__ = [
    "CPU_BUDGET_S", "ConformanceError", "Spec", "spec", "checks_for", "parametrize_with_checks", "run_checks",
    "check_defense", "check_attack", "check_dataset", "check_model", "write_image_folder", "image_folder_setup",
    "write_plugin_distribution",
    "clear_cache", "tiny_problem", "fit_tiny",
]

CPU_BUDGET_S = 30.0
"""Process CPU seconds one fit, one attack run or one dataset load of the tiny problem may take (one thread)."""
DATASET = "synthetic-mri:64"
IMAGE_SIZE = 16
CHANNELS = 1
SEED, OTHER_SEED = 0, 1
RELATIVE_TOLERANCE = 1e-5  # "the same result": equal within this relative L2 distance (CKKS decryption noise ~1e-9)
DIFFERENTIABLE_TOLERANCE = 1e-3  # the public update rule reproduces a differentiable defense's update this closely
FORWARD_SLACK = 4  # forward passes an attack may spend besides two per gradient evaluation (e.g. scoring restarts)
BAD_TEXT = "kit-not-a-value"


class ConformanceError(AssertionError):
    """A component failed a conformance check; the message names the component, its origin and the check."""


# -- components as the kit sees them -------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """A component as the kit checks it.

    ``obj`` is the class (a dataset source may be an instance), ``kind`` one of defenses, attacks,
    datasets, models; ``name`` its registered name (the test id's first part); ``origin`` where it
    comes from, for messages. ``params`` are its parameters on the tiny problem (default: the class's
    ``tiny_params``). A dataset loads ``arg`` (the text after ':' in its name) from ``root``; ``setup``,
    if given, is called with an empty folder and returns ``(arg, root)`` (e.g. after writing files there).
    """

    obj: Any
    kind: str
    name: str
    origin: str
    params: Mapping[str, Any] = field(default_factory=dict)
    arg: str | None = None
    root: Path | str | None = None
    setup: Callable[[Path], tuple[str | None, Path | str | None]] | None = None
    model: str | None = None  # a defense: the model it fits on the tiny problem (default: its default_model)

    def __str__(self) -> str:
        return f"{self.kind[:-1]} {self.name!r} ({self.origin})"

    @property
    def key(self) -> tuple:
        return (self.obj, self.kind, _canonical_json(dict(self.params)), self.arg, str(self.root), self.model)


def spec(component: Any, *, params: Mapping[str, Any] | None = None, name: str | None = None,
         arg: str | None = None, root: Path | str | None = None,
         setup: Callable[[Path], tuple[str | None, Path | str | None]] | None = None) -> Spec:
    """``component`` (a class, a dataset source instance, a registry ``Entry`` or a ``Spec``) as a ``Spec``.

    Args:
        component: what to check.
        params: parameters on the tiny problem (default: ``component.tiny_params``).
        name: the name in test ids and messages (default: the registered name, else the class name).
        arg, root, setup: for datasets, what to load (see ``Spec``).

    Raises:
        TypeError: ``component`` is none of a defense, attack, dataset source or model.
    """
    from privbench import registry

    if isinstance(component, Spec):
        if params is None and name is None and arg is None and root is None and setup is None:
            return component
        return dataclasses.replace(component, **{k: v for k, v in (("params", params), ("name", name), ("arg", arg),
                                                                     ("root", root), ("setup", setup)) if v is not None})
    origin = None
    if isinstance(component, registry.Entry):
        name = name or component.name
        origin = component.origin.describe()
        component = component.obj
    kind = _kind_of(component)
    if kind is None:
        raise TypeError(f"{component!r} is not a privbench defense, attack, dataset source or model")
    if origin is None:
        found = registry.ALL[kind].origin_of(component)
        module = getattr(component, "__module__", "?")
        qualname = getattr(component, "__qualname__", type(component).__qualname__)
        origin = found.describe() if found else f"{module}.{qualname}, not registered"
    own = vars(component) if isinstance(component, type) else {}  # a subclass does not inherit its parent's name
    name = name or own.get("registry_name") or getattr(component, "__name__", type(component).__name__)
    tiny = dict(getattr(component, "tiny_params", {}) or {}) if params is None else dict(params)
    return Spec(component, kind, name, origin, tiny, arg, root, setup)


def _kind_of(obj: Any) -> str | None:
    from privbench.attacks.base import Attack
    from privbench.datasets.base import DatasetSource
    from privbench.defenses.base import Defense

    if isinstance(obj, type) and issubclass(obj, Defense):
        return "defenses"
    if isinstance(obj, type) and issubclass(obj, Attack):
        return "attacks"
    if isinstance(obj, DatasetSource) or (isinstance(obj, type) and issubclass(obj, DatasetSource)):
        return "datasets"
    if hasattr(obj, "Params") and callable(getattr(obj, "build", None)):
        return "models"
    return None


def _check(kinds: tuple[str, ...]):
    """Make a check: takes any component form, and turns every failure into a ``ConformanceError`` that names
    the component, its origin and the check."""

    def decorate(fn: Callable[[Spec], None]) -> Callable[[Any], None]:
        @functools.wraps(fn)
        def check(component: Any) -> None:
            s = spec(component)
            if s.kind not in kinds:
                raise TypeError(f"{fn.__name__} checks {' and '.join(kinds)}, not {s}")
            try:
                with _quiet_environment():
                    fn(s)
            except ConformanceError:
                raise
            except _Failure as exc:  # keep what the component raised, if anything, as the cause
                raise ConformanceError(f"{s} fails {fn.__name__}: {exc}") from exc.__cause__
            except Exception as exc:
                raise ConformanceError(f"{s} fails {fn.__name__}: {type(exc).__name__}: {exc}") from exc

        check.kinds = kinds  # type: ignore[attr-defined]
        return check

    return decorate


class _Failure(Exception):
    """A check's own finding (as opposed to an exception the component raised)."""


def _require(condition: Any, message: str) -> None:
    if not condition:
        raise _Failure(message)


# -- the shared tiny problem and isolation ---------------------------------------------------------------------

_KIT_DIR: Path | None = None


def _kit_dir() -> Path:
    global _KIT_DIR
    if _KIT_DIR is None:
        _KIT_DIR = Path(tempfile.mkdtemp(prefix="privbench-kit-"))
        atexit.register(shutil.rmtree, _KIT_DIR, True)
    return _KIT_DIR


@contextlib.contextmanager
def _quiet_environment():
    """One torch thread, a fresh empty ``PRIVBENCH_HOME``, and the global RNG states restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    saved_home = os.environ.get("PRIVBENCH_HOME")
    home = Path(tempfile.mkdtemp(prefix="home-", dir=_kit_dir()))
    os.environ["PRIVBENCH_HOME"] = str(home)
    states = (random.getstate(), np.random.get_state())
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(threads)
        random.setstate(states[0])
        np.random.set_state(states[1])
        if saved_home is None:
            os.environ.pop("PRIVBENCH_HOME", None)
        else:
            os.environ["PRIVBENCH_HOME"] = saved_home
        shutil.rmtree(home, ignore_errors=True)


def _scramble_global_rngs(seed: int) -> None:
    """Move every global RNG to an unrelated state: a component that draws from them instead of its seeds
    gives a different result after this."""
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@dataclass(frozen=True)
class TinyProblem:
    """The kit's data: ``DATASET`` at 1x16x16, split by seed 0 into members, nonmembers and auxiliary.

    Components are handed copies (``fresh_parts``), so one that mutates its inputs is caught by comparing them
    with these, and cannot spoil the data of the checks that follow.
    """

    parts: "Splits"

    @property
    def num_classes(self) -> int:
        return self.parts.members.num_classes

    def fresh_parts(self) -> "Splits":
        import copy

        return copy.deepcopy(self.parts)

    @staticmethod
    def defense_victim(parts: "Splits") -> "Victim":
        """Four members of ``parts``, one of each class: distinct labels make a leaked label vector unmistakable."""
        from privbench.threat import Victim

        labels = parts.members.labels
        idx = [int((labels == k).nonzero()[0]) for k in range(parts.members.num_classes) if bool((labels == k).any())]
        chosen = parts.members.subset(idx[:4])
        return Victim(chosen.images, chosen.labels, chosen.ids)


@functools.lru_cache(maxsize=1)
def tiny_problem() -> TinyProblem:
    """The tiny problem every check uses (built once per process; its preprocessed data in a temporary folder)."""
    from privbench.datasets import load
    from privbench.datasets import splits as splitlib

    data = load(DATASET, IMAGE_SIZE, CHANNELS, cache_dir=_kit_dir() / "datasets")
    return TinyProblem(splitlib.make(data, splitlib.SplitSpec(), seed=0))


_FITS: dict[tuple, "_Fit"] = {}
_RUNS: dict[tuple, "_Run"] = {}


def clear_cache() -> None:
    """Forget the targets and attack runs the checks of this process share."""
    _FITS.clear()
    _RUNS.clear()


# -- typed parameters (defenses, attacks, models) ----------------------------------------------------------------


def _params(s: Spec) -> Any:
    """The component's Params instance for the tiny problem (ConfigError, as the CLI would give, if they are bad)."""
    from privbench.config import coerce_params

    return s.obj.Params(**coerce_params(s.obj.Params, dict(s.params), str(s)))


def _cli_text(value: Any) -> str:
    """How a value is written on the command line (``--defense-param k=<text>``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return ",".join(_cli_text(v) for v in value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _canonical_json(value: Any) -> str:
    from privbench.config import _canonical

    return json.dumps(_canonical(value), sort_keys=True)


@_check(("defenses", "attacks", "models"))
def check_params_round_trip(s: Spec) -> None:
    """Guards stored configs: the parameters are a dataclass with a type and a default for every field, and a
    parameter set comes back unchanged from the command line's text, from the stored JSON config (with the
    same config hash) and from pickle (suite workers receive components pickled)."""
    from privbench.config import ConfigError, RunConfig, _type_name, coerce_params

    cls = s.obj
    params_cls = getattr(cls, "Params", None)
    _require(dataclasses.is_dataclass(params_cls), f"Params must be a dataclass, got {params_cls!r}")
    hints = typing.get_type_hints(params_cls)
    for f in dataclasses.fields(params_cls):
        _require(f.name in hints, f"parameter {f.name!r} has no type annotation")
        _require(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING,
                 f"parameter {f.name!r} has no default: every parameter needs one (a run names only what it changes)")
    for label, given in (("defaults", {}), ("tiny_params", dict(s.params))):
        try:
            values = coerce_params(params_cls, given, str(s))
        except ConfigError as exc:
            raise _Failure(f"its {label} are refused: {exc}") from None
        text = {k: _cli_text(v) for k, v in values.items()}
        from_text = coerce_params(params_cls, text, str(s))
        for key, value in values.items():
            _require(_same_value(from_text[key], value),
                     f"{label}: parameter {key!r} = {value!r} written as {text[key]!r} on the command line comes back "
                     f"as {from_text[key]!r} (type {_type_name(hints[key])})")
        field_name = {"defenses": "defense_params", "attacks": "attack_params", "models": "model_params"}[s.kind]
        config = RunConfig(**{field_name: values})
        stored = json.loads(json.dumps(_jsonable(config.to_dict())))
        back = RunConfig.from_dict(stored)
        again = coerce_params(params_cls, dict(getattr(back, field_name)), str(s))
        _require(_canonical_json(again) == _canonical_json(values),
                 f"{label}: the parameters change through the stored JSON config: {values} -> {again}")
        _require(RunConfig(**{field_name: again}).config_hash() == config.config_hash(),
                 f"{label}: the config hash changes when the parameters are read back from the stored config")
        instance = params_cls(**values)
        _require(pickle.loads(pickle.dumps(instance)) == instance, f"{label}: Params do not survive pickle")
        if s.kind == "defenses":
            pickle.loads(pickle.dumps(cls(instance)))
        elif s.kind == "attacks":
            pickle.loads(pickle.dumps(cls(instance, seed=SEED)))


def _jsonable(value: Any) -> Any:
    from privbench.config import _canonical

    return _canonical(value)


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
    return a == b and type(a) is type(b)


@_check(("defenses", "attacks", "models"))
def check_bad_params_raise_config_error(s: Spec) -> None:
    """Guards exit code 2: an unknown parameter, or a value of the wrong type or out of range, raises
    ``privbench.config.ConfigError`` (which the CLI reports as bad input), never a bare exception; and a
    value of the wrong type is refused rather than silently accepted."""
    from privbench.config import ConfigError, coerce_params

    params_cls = s.obj.Params
    base = dict(s.params)
    try:
        coerce_params(params_cls, base, str(s))
    except ConfigError as exc:
        raise _Failure(f"its tiny_params are refused: {exc}") from None
    try:
        coerce_params(params_cls, {**base, "kit_no_such_parameter": 1}, str(s))
    except ConfigError:
        pass
    else:
        raise _Failure("an unknown parameter name is accepted")
    hints = typing.get_type_hints(params_cls)
    for f in dataclasses.fields(params_cls):
        refused_wrong_type = False
        for bad in (BAD_TEXT, "", "-1", "0", "nan", "inf", "-inf", "1e30", None, [], {}):
            try:
                coerce_params(params_cls, {**base, f.name: bad}, str(s))
            except ConfigError:
                refused_wrong_type |= bad == BAD_TEXT
            except Exception as exc:
                raise _Failure(f"{f.name}={bad!r} raises {type(exc).__name__}: {exc} (expected ConfigError)") from exc
        if not _accepts_any_text(hints[f.name]):
            _require(refused_wrong_type, f"{f.name}={BAD_TEXT!r} is accepted for a parameter of type {hints[f.name]}")


def _accepts_any_text(tp: Any) -> bool:
    """Whether any string is a valid value of the type (str, or a union or tuple of str)."""
    import types

    if tp is str:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType, tuple):
        return any(_accepts_any_text(a) for a in typing.get_args(tp) if a is not type(None) and a is not Ellipsis)
    return False


# -- defenses ---------------------------------------------------------------------------------------------


@dataclass
class _Fit:
    """One fit of a defense on the tiny problem, with what the checks want to know about it."""

    defense: "Defense"
    ctx: "FitContext"
    target: "Target | None"
    error: BaseException | None
    cpu_s: float
    changed: list[str]  # the inputs the fit changed

    def require(self) -> "Target":
        if self.error is not None:
            raise _Failure(f"fit on the tiny problem raised {type(self.error).__name__}: {self.error}") from self.error
        return self.target


def _defense_context(s: Spec, seed: int, parts: "Splits") -> tuple["Defense", "FitContext"]:
    from privbench import registry
    from privbench.config import RunConfig, coerce_params
    from privbench.defenses.base import FitContext
    from privbench.models import build_model

    problem = tiny_problem()
    params = _params(s)
    model = s.model or s.obj.default_model
    model_cls = registry.models.get(model)
    model_params = coerce_params(model_cls.Params, dict(getattr(model_cls, "tiny_params", {}) or {}), f"model {model!r}")
    config = RunConfig(defense=s.name, model=model, image_size=IMAGE_SIZE, channels=CHANNELS, seed=seed,
                       defense_params=dataclasses.asdict(params), model_params=model_params, victim_batch=4)
    seeds = config.derived_seeds()
    build = functools.partial(build_model, model, model_params, CHANNELS, IMAGE_SIZE, problem.num_classes, seeds["init"])
    ctx = FitContext(config=config, build_model=build, nonmembers=parts.nonmembers, seeds=seeds, members=parts.members,
                     data_identity={"dataset": DATASET, "image_size": IMAGE_SIZE, "channels": CHANNELS,
                                    "split_seed": 0, "source": "privbench.testing tiny problem"})
    return s.obj(params), ctx


def _fit(s: Spec, seed: int = SEED, fresh: bool = False, scramble: int | None = None) -> _Fit:
    """The defense fitted on the tiny problem (shared between checks unless ``fresh``)."""
    key = (s.key, seed)
    if not fresh and key in _FITS:
        return _FITS[key]
    problem = tiny_problem()
    parts = problem.fresh_parts()
    defense, ctx = _defense_context(s, seed, parts)
    inputs = {"members": parts.members, "nonmembers": parts.nonmembers}
    before = {name: _fingerprint(getattr(problem.parts, name)) for name in inputs}
    target, error = None, None
    with _quiet_environment():
        if scramble is not None:
            _scramble_global_rngs(scramble)
        start = time.process_time()
        try:
            target = defense.fit(ctx.build_model(), parts.members, ctx)
        except Exception as exc:
            error = exc
        cpu = time.process_time() - start
    changed = [name for name, value in inputs.items() if _fingerprint(value) != before[name]]
    record = _Fit(defense, ctx, target, error, cpu, changed)
    if not fresh:
        _FITS[key] = record
    return record


def fit_tiny(component: Any, *, params: Mapping[str, Any] | None = None
             ) -> tuple["Defense", "FitContext", "Target", "Victim"]:
    """A defense fitted on the tiny problem (shared with the checks) and a victim batch of four members, for a
    plugin's own tests: ``defense, ctx, target, victim = fit_tiny(MyDefense)``, then
    ``defense.observe(surface, target, victim, ctx)``. Raises what ``fit`` raised."""
    fit = _fit(spec(component, params=params))
    if fit.error is not None:
        raise fit.error
    return fit.defense, fit.ctx, fit.target, TinyProblem.defense_victim(tiny_problem().fresh_parts())


def _observe(fit: _Fit, surface: Any, gradient_round: str = "init", observe_seed: int | None = None,
             victim: "Victim | None" = None, parts: "Splits | None" = None, family: str | None = None
             ) -> "tuple[Observation | None, Any, str | None]":
    """(observation, the truth kept apart, None) for ``surface``, or (None, None, why) if the defense raises
    AttackError (it exposes no such surface). ``parts`` and ``victim`` default to fresh copies. On a released-model
    surface, ``family`` ``model_inversion`` gives a model-inversion attacker's observation, else a membership one."""
    from privbench import observe
    from privbench.threat import AttackError, Surface

    target = fit.require()
    parts = parts or tiny_problem().fresh_parts()
    config = dataclasses.replace(fit.ctx.config, gradient_round=gradient_round)
    seeds = dict(fit.ctx.seeds)
    if observe_seed is not None:
        seeds["observe"] = observe_seed
    ctx = dataclasses.replace(fit.ctx, config=config, seeds=seeds)
    with _quiet_environment():
        try:
            if surface in (Surface.GRADIENTS, Surface.SHARED_DATA):
                truth = victim or TinyProblem.defense_victim(parts)
                return observe.client_observation(fit.defense, surface, target, truth, parts.auxiliary, ctx), truth, None
            if family == "model_inversion":
                observation, truth = observe.inversion_observation(fit.defense, surface, target, parts, ctx)
            else:
                observation, truth = observe.membership_observation(fit.defense, surface, target, parts, ctx)
            return observation, truth, None
        except AttackError as exc:
            return None, None, str(exc)


@_check(("defenses",))
def check_defense_metadata(s: Spec) -> None:
    """Guards ``bench list``, ``check_model`` and the leaderboard's flags: a description, the surfaces it
    protects (``Surface`` members), boolean ``differentiable`` and ``stochastic`` flags, and registered model
    names with a default among them."""
    from privbench import registry
    from privbench.threat import Surface

    cls = s.obj
    description = getattr(cls, "description", "") or (cls.__doc__ or "")
    _require(isinstance(description, str) and description.strip(), "no description (class attribute or docstring)")
    _require(isinstance(cls.protects, (frozenset, set)) and all(isinstance(x, Surface) for x in cls.protects),
             f"protects must be a frozenset of privbench.threat.Surface, got {cls.protects!r}")
    for flag in ("differentiable", "stochastic"):
        _require(isinstance(getattr(cls, flag), bool), f"{flag} must be a bool, got {getattr(cls, flag)!r}")
    known = registry.models.names()
    _require(cls.default_model in known, f"default_model {cls.default_model!r} is not a registered model ({known})")
    if cls.models is not None:
        _require(cls.default_model in cls.models, f"default_model {cls.default_model!r} is not among models")
        unknown = sorted(set(cls.models) - set(known))
        _require(not unknown, f"models names unregistered models {unknown}")
    _require(isinstance(getattr(cls, "tiny_params", {}), Mapping), "tiny_params must be a dict")
    from privbench.claims import PaperClaim

    claims = getattr(cls, "paper_claims", ())
    _require(isinstance(claims, tuple) and all(isinstance(c, PaperClaim) for c in claims),
             f"paper_claims must be a tuple of privbench.claims.PaperClaim, got {claims!r}")


@_check(("defenses",))
def check_defense_fits_tiny_problem(s: Spec) -> None:
    """Guards the runner: ``fit`` trains a target on the tiny problem within the CPU budget and returns a
    ``Target`` whose released model gives logits for every class, whose initial state loads into the defense's
    architecture, and whose utility is the accuracy on nonmembers, in [0, 1]."""
    import torch
    from torch import nn

    from privbench.defenses.base import Target

    fit = _fit(s)
    target = fit.require()
    _require(fit.cpu_s <= CPU_BUDGET_S, f"the fit took {fit.cpu_s:.1f} s of CPU, over the budget of {CPU_BUDGET_S} s")
    _require(isinstance(target, Target), f"fit returned {type(target).__name__}, not privbench.defenses.base.Target")
    _require(isinstance(target.model, nn.Module), "Target.model is not a torch module")
    problem = tiny_problem()
    with torch.no_grad():
        logits = target.model.eval()(problem.parts.nonmembers.images[:4].clone())
    _require(tuple(logits.shape) == (4, problem.num_classes) and bool(torch.isfinite(logits).all()),
             f"the released model gives {tuple(logits.shape)} outputs for 4 images, expected finite (4, "
             f"{problem.num_classes}) logits")
    accuracy = target.utility.get("accuracy")
    _require(isinstance(accuracy, (int, float)) and 0 <= accuracy <= 1,
             f"Target.utility['accuracy'] must be the accuracy on nonmembers in [0, 1], got {accuracy!r}")
    architecture = fit.defense.released_architecture(fit.ctx.build_model())
    try:
        architecture.load_state_dict(target.initial_state)
    except Exception as exc:
        raise _Failure(f"Target.initial_state does not load into released_architecture(model): {exc}") from exc


@_check(("defenses",))
def check_defense_target_survives_the_cache(s: Spec) -> None:
    """Guards cached runs: the runner stores a target as state dicts (read back with ``weights_only=True``)
    and a JSON record, then loads the weights into ``released_architecture``; the loaded model must compute
    what the fitted one computes."""
    import torch

    from privbench import cache

    fit = _fit(s)
    target = fit.require()
    folder = Path(tempfile.mkdtemp(prefix="target-", dir=_kit_dir()))
    try:
        cache.save_torch(folder / "t.pt", {"trained": target.model.state_dict(), "initial": target.initial_state})
        state = cache.load_torch(folder / "t.pt")
        _require(state is not None, "the target's state dicts cannot be saved and read back with weights_only=True")
        record = {"training": target.training, "utility": target.utility, "costs": target.costs}
        try:
            json.dumps(_jsonable(record), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise _Failure(f"the training record, utility or costs are not JSON-serialisable: {exc}") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    loaded = fit.defense.released_architecture(fit.ctx.build_model())
    try:
        loaded.load_state_dict(state["trained"])
    except Exception as exc:
        raise _Failure(f"the released model's weights do not load into released_architecture(model): {exc}") from exc
    probe = tiny_problem().parts.nonmembers.images[:4].clone()
    with _quiet_environment(), torch.no_grad():
        _scramble_global_rngs(7)
        a = target.model.eval()(probe)
        _scramble_global_rngs(7)
        b = loaded.eval()(probe)
    _require(_close(a, b), "the model loaded from the cached weights computes other logits than the fitted one "
                           f"(relative difference {_distance(a, b):.3g}): released_architecture must say what is released")


@_check(("defenses",))
def check_defense_observes_every_surface(s: Spec) -> None:
    """Guards the attacks' inputs: for every surface ``observe`` returns an ``Observation`` of that surface
    with its field filled (GRADIENTS: one update per model parameter, or an encrypted update; SHARED_DATA: the
    data sent; MODEL_WHITEBOX: a model; MODEL_QUERIES: a query giving one row of logits per image), or raises
    ``AttackError`` for a surface it does not expose (stored as unsupported); any other exception is a bug."""
    import torch

    from privbench.threat import Observation, Surface

    fit = _fit(s)
    problem = tiny_problem()
    exposed = []
    for surface in Surface:
        observation, truth, why = _observe(fit, surface)
        if observation is None:
            continue
        exposed.append(surface.value)
        _require(isinstance(observation, Observation) and observation.surface is surface,
                 f"observe({surface.value}) returned {observation!r}, not an Observation of that surface")
        if surface is Surface.GRADIENTS:
            update = observation.gradient_update
            _require(update is not None, "the GRADIENTS observation has no gradient_update")
            params = [p for p in update.model.parameters() if p.requires_grad]
            if update.encrypted:
                _require(len(update.gradients) == 0, "an encrypted update must carry no plaintext gradients")
            else:
                shapes = [tuple(g.shape) for g in update.gradients]
                _require(shapes == [tuple(p.shape) for p in params],
                         f"the update's gradients {shapes} do not match the handed model's trainable parameters")
                _require(all(bool(torch.isfinite(g).all()) for g in update.gradients), "the update is not finite")
            _require(update.batch_size == len(truth.labels), f"batch_size {update.batch_size} != {len(truth.labels)}")
            _require(update.model.training, "the handed model must be in train mode (the client's update is)")
        elif surface is Surface.SHARED_DATA:
            _require(observation.shared is not None, "the SHARED_DATA observation has no shared data")
        elif surface is Surface.MODEL_WHITEBOX:
            _require(observation.model is not None, "the MODEL_WHITEBOX observation has no model")
        else:
            _require(callable(observation.query), "the MODEL_QUERIES observation has no query function")
            logits = observation.query(problem.parts.nonmembers.images[:3].clone())
            _require(tuple(logits.shape) == (3, problem.num_classes),
                     f"the query gives {tuple(logits.shape)} for 3 images, expected (3, {problem.num_classes})")
    _require(exposed, "no surface is exposed: observe raises AttackError for every one")


@_check(("defenses",))
def check_defense_does_not_mutate_inputs(s: Spec) -> None:
    """Guards the integrity of every later step: ``fit`` leaves the members and nonmembers as they were, and
    ``observe`` (every surface, both rounds) leaves the target (released model, its mode, its initial state),
    the victim's batch and the data splits untouched (hashes before and after). ``fit`` may train the fresh
    model it is handed: that model becomes the target."""
    from privbench.threat import Surface

    fit = _fit(s)
    target = fit.require()
    _require(not fit.changed, f"fit changed the data it was handed: {', '.join(fit.changed)}")
    parts = tiny_problem().fresh_parts()
    victim = TinyProblem.defense_victim(parts)
    watched = {"Target.model": target.model, "Target.initial_state": target.initial_state,
               "the victim's batch": victim, "the members": parts.members, "the nonmembers": parts.nonmembers,
               "the auxiliary split": parts.auxiliary, "the fit context's members": fit.ctx.members,
               "the fit context's nonmembers": fit.ctx.nonmembers}
    before = {name: _fingerprint(value) for name, value in watched.items()}
    for gradient_round in ("init", "trained"):
        for surface in Surface:
            if gradient_round == "trained" and surface not in (Surface.GRADIENTS, Surface.SHARED_DATA):
                continue
            _observe(fit, surface, gradient_round, victim=victim, parts=parts)
            changed = [name for name, value in watched.items() if _fingerprint(value) != before[name]]
            _require(not changed, f"observe({surface.value}, round={gradient_round}) changed {', '.join(changed)}")


@_check(("defenses",))
def check_defense_observations_leak_nothing(s: Spec) -> None:
    """Guards the threat model: no observation (every surface, at round init and trained) lets an attacker reach
    the victim's images, the victim's labels (GRADIENTS), a member id, which candidates are members, or any
    secret the defense names in ``audit_secrets``, through any chain of attributes, closures or containers
    (``privbench.reachability.find_leaks``)."""
    import torch

    from privbench.reachability import Forbidden, find_leaks
    from privbench.threat import Surface

    fit = _fit(s)
    target = fit.require()
    problem = tiny_problem()
    victim = TinyProblem.defense_victim(problem.parts)
    found = []
    for gradient_round in ("init", "trained"):
        for surface in Surface:
            client = surface in (Surface.GRADIENTS, Surface.SHARED_DATA)
            if gradient_round == "trained" and not client:
                continue
            observation, truth, _ = _observe(fit, surface, gradient_round, victim=victim)
            if observation is None:
                continue
            forbidden = Forbidden(strings={f"member id {m}": m for m in problem.parts.members.ids})
            if client:
                forbidden.tensors.update({f"victim image {i}": image for i, image in enumerate(victim.images)})
                if surface is Surface.GRADIENTS:  # on SHARED_DATA the labels travel with the data, by design
                    forbidden.tensors["victim labels"] = victim.labels
            else:  # member images are candidates by design; which of them are members must stay hidden
                forbidden.tensors.update({"membership": torch.as_tensor(truth.is_member),
                                          "members as a block": problem.parts.members.images})
            ctx = dataclasses.replace(fit.ctx, config=dataclasses.replace(fit.ctx.config, gradient_round=gradient_round))
            for name, secret in fit.defense.audit_secrets(surface, target, ctx).items():
                if isinstance(secret, torch.Tensor):
                    forbidden.tensors[f"secret {name}"] = secret
                else:
                    forbidden.objects[f"secret {name}"] = secret
            leaks = find_leaks(observation, forbidden)
            found += [f"{surface.value} (round={gradient_round}): {leak}" for leak in leaks[:5]]
            if not client:  # a model-inversion attacker: no member image at all, nor a member id
                inversion, _, _ = _observe(fit, surface, gradient_round, family="model_inversion")
                members = Forbidden(tensors={f"member image {i}": image
                                             for i, image in enumerate(problem.parts.members.images)},
                                    strings=dict(forbidden.strings), objects=dict(forbidden.objects))
                if inversion is not None:
                    found += [f"{surface.value} (model inversion): {leak}"
                              for leak in find_leaks(inversion, members)[:5]]
    _require(not found, "the attacker can reach what it must not: " + "; ".join(found))


@_check(("defenses",))
def check_defense_determinism(s: Spec) -> None:
    """Guards reproducibility: the same seeds give the same target and observations even after the global RNGs
    moved (the defense draws from its ``ctx.seeds``, not from global state); other seeds give another target;
    and an observation that changes with the ``observe`` seed belongs to a defense declaring ``stochastic``."""
    first = _fit(s)
    target = first.require()
    again = _fit(s, fresh=True, scramble=12345)
    repeated = again.require()
    for name, a, b in (("the released model's weights", target.model.state_dict(), repeated.model.state_dict()),
                       ("the initial state", target.initial_state, repeated.initial_state)):
        _require(_close(a, b), f"{name} differ between two fits with the same seeds (relative difference "
                               f"{_distance(a, b):.3g}): the defense draws from global RNG state or from no seed")
    accuracies = (target.utility.get("accuracy"), repeated.utility.get("accuracy"))
    _require(accuracies[0] == accuracies[1], f"the accuracy differs between two fits with the same seeds: {accuracies}")
    observed, repeated_views = _released_views(first), _released_views(again)
    for name, a in observed.items():
        b = repeated_views.get(name)
        _require(b is not None and _close(a, b), f"{name} differs between two fits and observations with the same seeds "
                                                 f"(relative difference {_distance(a, b):.3g})")
    other = _fit(s, seed=OTHER_SEED).require()
    _require(not _close(target.model.state_dict(), other.model.state_dict()),
             "another seed gives the same released model: the defense ignores the seeds it is given")
    reseeded = _released_views(first, observe_seed=first.ctx.seeds["observe"] + 1)
    moved = [name for name, value in observed.items() if name in reseeded and not _close(value, reseeded[name])]
    _require(not moved or s.obj.stochastic,
             f"{', '.join(moved)} change with the observe seed, but the defense declares stochastic = False")


def _released_views(fit: _Fit, observe_seed: int | None = None) -> dict[str, Any]:
    """What each exposed surface releases, as tensors to compare: updates, data sent, models' weights, and the
    query's logits on fixed images (membership candidates and other kit-built parts are left out)."""
    from privbench.threat import Surface

    probe = tiny_problem().parts.nonmembers.images[:8].clone()
    out: dict[str, Any] = {}
    for surface in Surface:
        observation, _, _ = _observe(fit, surface, observe_seed=observe_seed)
        if observation is None:
            continue
        tag = surface.value
        update = observation.gradient_update
        if update is not None:
            out[f"the {tag} update"] = list(update.gradients) + list(update.buffers)
            out[f"the {tag} model"] = update.model.state_dict()
        if observation.shared is not None:
            shared = observation.shared
            out[f"the {tag} data sent"] = [shared.sent, shared.labels, shared.layer.dense]
            out[f"the {tag} service model"] = shared.model.state_dict()
        if observation.model is not None:
            out[f"the {tag} model"] = observation.model.state_dict()
        if observation.query is not None:
            out[f"the {tag} logits"] = observation.query(probe)
    return out


@_check(("defenses",))
def check_defense_declares_differentiability(s: Spec) -> None:
    """Guards the leaderboard's ``unreliable`` flag: a defense whose shared update is not what its declared
    update rule gives at the true batch (it prunes, quantises, masks...) cannot be inverted end to end by
    gradient descent on the rule, so it must declare ``differentiable = False``; one declaring ``True`` must
    hand over a model through which a dummy update can be differentiated twice (what gradient attacks do)."""
    import torch

    from privbench.attacks.gradient_inversion import dummy_update, mean_scale
    from privbench.threat import Surface

    fit = _fit(s)
    victim = TinyProblem.defense_victim(tiny_problem().fresh_parts())
    observation, _, _ = _observe(fit, Surface.GRADIENTS, victim=victim)
    if observation is None or s.obj.differentiable is False:
        return
    update = observation.gradient_update
    if update.encrypted or update.morphed is not None or update.local_steps != 1:
        return  # nothing in the clear, or an input that is not the image: nothing to compare at the truth
    params = [p for p in update.model.parameters() if p.requires_grad]
    with _quiet_environment():
        x = victim.images.clone().requires_grad_(True)
        dummy = dummy_update(update.model, params, x, victim.labels, update.rule, create_graph=True)
        distance = sum((d ** 2).sum() for d in dummy)
        (grad_x,) = torch.autograd.grad(distance, x)
    _require(bool(torch.isfinite(grad_x).all()), "the handed model gives no finite second-order gradient for the input")
    if update.rule.noise_std > 0:
        return  # declared Gaussian noise: the update is the rule's only up to a draw the attacker cannot know
    shared = mean_scale(update)
    gap = _distance([d.detach() for d in dummy], list(shared))
    _require(gap <= DIFFERENTIABLE_TOLERANCE,
             f"the shared update differs from what its declared update rule gives at the true batch (relative "
             f"difference {gap:.3g}): the defense transforms the update in a way attackers cannot differentiate "
             f"through, so it must declare differentiable = False (or describe the transformation in the rule)")


@_check(("defenses",))
def check_defense_utility_twin(s: Spec) -> None:
    """Guards ``accuracy_drop``: the utility twin is None or another defense (not this one with these
    parameters) that trains the same architecture plainly, fits the tiny problem within the CPU budget and
    reports an accuracy in [0, 1]."""
    from privbench.defenses.base import Defense

    fit = _fit(s)
    twin = fit.defense.utility_twin()
    if twin is None:
        return
    _require(isinstance(twin, Defense), f"utility_twin() returned {twin!r}, not a Defense or None")
    _require(twin.identity() != fit.defense.identity(), "the utility twin is the defense itself: accuracy_drop is 0 by construction")
    with _quiet_environment():
        start = time.process_time()
        twin_target = twin.fit(fit.ctx.build_model(), fit.ctx.members, fit.ctx)
        cpu = time.process_time() - start
    _require(cpu <= CPU_BUDGET_S, f"the twin's fit took {cpu:.1f} s of CPU, over the budget of {CPU_BUDGET_S} s")
    accuracy = twin_target.utility.get("accuracy")
    _require(isinstance(accuracy, (int, float)) and 0 <= accuracy <= 1, f"the twin's accuracy is {accuracy!r}")


DEFENSE_CHECKS = (
    check_defense_metadata, check_params_round_trip, check_bad_params_raise_config_error,
    check_defense_fits_tiny_problem, check_defense_target_survives_the_cache, check_defense_observes_every_surface,
    check_defense_does_not_mutate_inputs, check_defense_observations_leak_nothing, check_defense_determinism,
    check_defense_declares_differentiability, check_defense_utility_twin,
)


# -- attacks ----------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """One attack run on the tiny problem, instrumented."""

    output: "AttackOutput | None"
    error: BaseException | None
    truth: Any
    observation: "Observation"
    cpu_s: float
    forwards: int  # forward passes through the models the observation hands over
    touched: list[str]  # the store or dataset functions the attack called

    def require(self) -> "AttackOutput":
        if self.error is not None:
            raise _Failure(f"run on the tiny problem raised {type(self.error).__name__}: {self.error}") from self.error
        return self.output


def _host(s: Spec) -> Spec:
    """The defense whose tiny target an attack attacks (its ``tiny_defense``: a registered name or a class)."""
    from privbench import registry

    host = getattr(s.obj, "tiny_defense", "none")
    host_spec = spec(registry.defenses.entry(host) if isinstance(host, str) else host)
    model = getattr(s.obj, "tiny_model", None)  # the model the host fits, where the attack needs one (BatchNorm)
    return dataclasses.replace(host_spec, model=model) if model else host_spec


def _attack_observation(s: Spec) -> tuple[Any, Any]:
    """A fresh observation of the attack's surface on its host's tiny target, and the truth kept apart."""
    from privbench import observe
    from privbench.threat import Surface

    fit = _fit(_host(s))
    parts = tiny_problem().fresh_parts()
    if s.obj.surface in (Surface.GRADIENTS, Surface.SHARED_DATA):
        victim = observe.choose_victim(parts.members, 1, fit.ctx.seeds["victim"])
        observation, truth, why = _observe(fit, s.obj.surface, victim=victim, parts=parts)
    else:
        observation, truth, why = _observe(fit, s.obj.surface, family=s.obj.family)
    if observation is None:
        raise _Failure(f"its tiny_defense {_host(s)} exposes no {s.obj.surface.value} surface ({why}); set "
                       f"tiny_defense to a defense that does")
    return observation, truth


def _run_attack(s: Spec, seed: int = SEED, budget: Any = None, fresh: bool = False, scramble: int | None = None) -> _Run:
    """The attack run on the tiny problem with the store and the dataset registry sealed off, its forward passes
    through the handed models counted (shared between checks unless ``fresh``)."""
    from privbench.config import Budget
    from privbench.threat import AttackSetting

    key = (s.key, seed, None if budget is None else budget.max_grad_evals)
    if not fresh and key in _RUNS:
        return _RUNS[key]
    observation, truth = _attack_observation(s)
    problem = tiny_problem()
    parts = problem.parts
    attack = s.obj(_params(s), seed=seed)
    attack.check_setting(AttackSetting(len(parts.members), len(parts.nonmembers), len(parts.auxiliary), 1,
                                       problem.num_classes, parts.members.image_shape))
    counter = [0]
    handles = [m.register_forward_pre_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
               for m in _handed_models(observation)]
    touched: list[str] = []
    output, error = None, None
    try:
        with _quiet_environment():
            if scramble is not None:
                _scramble_global_rngs(scramble)
            start = time.process_time()
            try:
                with _sealed(touched):
                    output = attack.run(observation, budget or Budget())
            except Exception as exc:  # AttackError included: the kit's pair must be one the attack supports
                error = exc
            cpu = time.process_time() - start
    finally:
        for handle in handles:
            handle.remove()
    record = _Run(output, error, truth, observation, cpu, counter[0], touched)
    if not fresh:
        _RUNS[key] = record
    return record


def _handed_models(observation: "Observation") -> list:
    models = []
    if observation.gradient_update is not None:
        models.append(observation.gradient_update.model)
    if observation.shared is not None:
        models.append(observation.shared.model)
    if observation.model is not None:
        models.append(observation.model)
    return models


@contextlib.contextmanager
def _sealed(touched: list[str]):
    """The results store and the dataset registry raise (and are noted in ``touched``) while this is active.
    (Caches under the privbench home stay open: a shadow attack trains through the defense's pipeline, which
    may cache its stages there.)"""
    from privbench import datasets, registry, store

    def refuse(what: str) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            touched.append(what)
            raise RuntimeError(f"privbench.testing: an attack may not use {what}")

        return call

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(store.Store, "__init__", refuse("the results store (privbench.store.Store)")))
        for name in ("load", "source", "fingerprint"):
            stack.enter_context(mock.patch.object(datasets, name, refuse(f"the dataset registry (privbench.datasets.{name})")))
        for name in ("entry", "get", "names"):
            stack.enter_context(mock.patch.object(registry.datasets, name, refuse(f"the dataset registry "
                                                                                  f"(registry.datasets.{name})")))
        yield


@_check(("attacks",))
def check_attack_metadata(s: Spec) -> None:
    """Guards scoring and ``bench list``: a description, a ``surface`` (``Surface``), a ``family`` the metrics
    registry scores, a boolean ``stochastic`` flag and a ``tiny_defense`` to attack in these checks."""
    from privbench import registry
    from privbench.threat import Surface

    cls = s.obj
    description = getattr(cls, "description", "") or (cls.__doc__ or "")
    _require(isinstance(description, str) and description.strip(), "no description (class attribute or docstring)")
    _require(isinstance(getattr(cls, "surface", None), Surface), f"surface must be a Surface, got {getattr(cls, 'surface', None)!r}")
    family = getattr(cls, "family", None)
    _require(family in ("reconstruction", "model_inversion", "membership"), f"unknown family {family!r}")
    _require(family in registry.metrics, f"no scorer is registered for the family {family!r}")
    _require(isinstance(cls.stochastic, bool), f"stochastic must be a bool, got {cls.stochastic!r}")
    _require(isinstance(getattr(cls, "tiny_params", {}), Mapping), "tiny_params must be a dict")
    adaptive_for = getattr(cls, "adaptive_for", ())
    _require(isinstance(adaptive_for, tuple) and all(isinstance(x, str) and x for x in adaptive_for),
             f"adaptive_for must be a tuple of defense names, got {adaptive_for!r}")


@_check(("attacks",))
def check_attack_output_schema(s: Spec) -> None:
    """Guards scoring: on the tiny problem, within the CPU budget, the output has the declared schema
    (reconstruction: finite images in [0, 1] with the victim's shape and int64 labels per image; membership:
    one finite score per candidate, decisions None or one bool per candidate; gradient evaluations a count)
    and the family's scorer accepts it."""
    import torch

    from privbench import registry
    from privbench.attacks.base import AttackOutput
    from privbench.metrics.family import ScoreContext

    run = _run_attack(s)
    output = run.require()
    _require(run.cpu_s <= CPU_BUDGET_S, f"the run took {run.cpu_s:.1f} s of CPU, over the budget of {CPU_BUDGET_S} s")
    _require(isinstance(output, AttackOutput), f"run returned {type(output).__name__}, not AttackOutput")
    _require(isinstance(output.grad_evals, int) and output.grad_evals >= 0, f"grad_evals is {output.grad_evals!r}")
    family = s.obj.family
    if family in ("reconstruction", "model_inversion"):
        images, labels = output.images, output.labels
        _require(isinstance(images, torch.Tensor) and images.is_floating_point(), "images must be a float tensor")
        if family == "reconstruction":
            _require(tuple(images.shape) == tuple(run.truth.images.shape),
                     f"images have shape {tuple(images.shape)}, the victim's batch {tuple(run.truth.images.shape)}")
        _require(bool(torch.isfinite(images).all()) and float(images.min()) >= 0 and float(images.max()) <= 1,
                 "images must be finite and in [0, 1]")
        _require(isinstance(labels, torch.Tensor) and labels.dtype == torch.int64 and tuple(labels.shape) == (len(images),),
                 f"labels must be int64 [{len(images)}], got {None if labels is None else (labels.dtype, tuple(labels.shape))}")
    else:
        n = len(run.observation.candidates)
        scores = output.scores
        _require(isinstance(scores, np.ndarray) and scores.shape == (n,) and np.issubdtype(scores.dtype, np.floating),
                 f"scores must be a float array with one score per candidate ({n}), got "
                 f"{None if scores is None else (scores.dtype, scores.shape)}")
        _require(bool(np.isfinite(scores).all()), "scores must be finite")
        decisions = output.decisions
        _require(decisions is None or (isinstance(decisions, np.ndarray) and decisions.shape == (n,)
                                       and decisions.dtype == bool), "decisions must be None or bool [candidates]")
    scorer = registry.metrics.get(family)()
    staging = Path(tempfile.mkdtemp(prefix="staging-", dir=_kit_dir()))
    with _quiet_environment():
        scores = scorer.score(output, run.truth, ScoreContext(tiny_problem().fresh_parts().auxiliary, {}, staging,
                                                              s.obj.surface))
    _require(scores.metrics, f"the {family} scorer produced no metric for this output")


@_check(("attacks",))
def check_attack_respects_budget(s: Spec) -> None:
    """Guards comparable results: the attack counts its gradient evaluations honestly (at most two forward passes
    through the handed model per evaluation counted, plus a few) and, given ``Budget(max_grad_evals=n)`` below
    what it spends unbudgeted, reports at most n and does not exceed that count in forward passes."""
    from privbench.config import Budget

    base = _run_attack(s)
    output = base.require()
    _require(base.forwards <= 2 * output.grad_evals + FORWARD_SLACK,
             f"{base.forwards} forward passes through the handed model, but it reports {output.grad_evals} gradient "
             f"evaluations: it under-counts what it spends")
    if output.grad_evals < 2:
        return  # it spends (almost) no gradient evaluations: nothing to cap
    cap = output.grad_evals // 2
    capped = _run_attack(s, budget=Budget(max_grad_evals=cap))
    capped_output = capped.require()
    _require(capped_output.grad_evals <= cap, f"Budget(max_grad_evals={cap}): it reports {capped_output.grad_evals}")
    _require(capped.forwards <= 2 * cap + FORWARD_SLACK,
             f"Budget(max_grad_evals={cap}): {capped.forwards} forward passes through the handed model")


@_check(("attacks",))
def check_attack_reads_only_its_observation(s: Spec) -> None:
    """Guards the threat model from the attack's side: while it runs, the attack touches neither the results store
    nor the dataset registry, whose data includes the truth it is scored against."""
    run = _run_attack(s)
    _require(not run.touched, f"the attack used {', '.join(dict.fromkeys(run.touched))}")
    run.require()


@_check(("attacks",))
def check_attack_determinism(s: Spec) -> None:
    """Guards reproducibility: the same seed gives the same output even after the global RNGs moved (the attack
    draws from its own seed); another seed gives another output exactly when the attack declares ``stochastic``."""
    first = _run_attack(s).require()
    again = _run_attack(s, fresh=True, scramble=54321).require()
    _require(_same_output(first, again), "two runs with the same seed give different outputs: the attack draws from "
                                         "global RNG state (or from no seed)")
    other = _run_attack(s, seed=OTHER_SEED).require()
    if s.obj.stochastic:
        _require(not _same_output(first, other), "another seed gives the same output, but the attack declares "
                                                 "stochastic = True: it ignores its seed")
    else:
        _require(_same_output(first, other), "another seed gives another output: declare stochastic = True")


def _same_output(a: "AttackOutput", b: "AttackOutput") -> bool:
    for name in ("images", "labels", "scores", "decisions"):
        x, y = getattr(a, name), getattr(b, name)
        if (x is None) != (y is None):
            return False
        if x is not None and not _close(x, y, tolerance=0.0):
            return False
    return True


@_check(("attacks",))
def check_attack_refuses_other_surfaces(s: Spec) -> None:
    """Guards ``unsupported`` rows: handed an observation of another surface, the attack raises ``AttackError``
    (stored as unsupported), never a bare exception (stored as a failure, as if the attack were broken)."""
    from privbench.config import Budget
    from privbench.threat import AttackError, Observation, Surface

    attack = s.obj(_params(s), seed=SEED)
    for surface in Surface:
        if surface is s.obj.surface:
            continue
        observation = Observation(surface=surface, auxiliary=tiny_problem().fresh_parts().auxiliary)
        try:
            attack.run(observation, Budget(max_grad_evals=4))
        except AttackError:
            continue
        except Exception as exc:
            raise _Failure(f"on a {surface.value} observation it raises {type(exc).__name__}: {exc} "
                           f"(expected AttackError)") from exc
        raise _Failure(f"it runs on a {surface.value} observation, though its surface is {s.obj.surface.value}")


ATTACK_CHECKS = (
    check_attack_metadata, check_params_round_trip, check_bad_params_raise_config_error, check_attack_output_schema,
    check_attack_respects_budget, check_attack_reads_only_its_observation, check_attack_determinism,
    check_attack_refuses_other_surfaces,
)


# -- datasets ---------------------------------------------------------------------------------------------------


def write_plugin_distribution(site: Path | str, distribution: str, version: str,
                              entry_points: Mapping[str, Mapping[str, str]], files: Mapping[str, str]) -> Path:
    """Install a throwaway plugin into folder ``site`` the way ``pip install`` leaves one: a real
    ``*.dist-info`` (METADATA, entry_points.txt) beside the plugin's files. Put ``site`` on ``sys.path``
    (or ``PYTHONPATH``) and privbench finds it. ``entry_points``: group -> {name: "module:object"};
    ``files``: path relative to ``site`` -> text. Returns the dist-info folder."""
    site = Path(site)
    info = site / f"{distribution.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
    lines = []
    for group, names in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {value}" for name, value in names.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for relative, text in files.items():
        path = site / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return info


def write_image_folder(root: Path | str, classes: int = 4, per_class: int = 4, size: int = 20, seed: int = 0) -> Path:
    """Write a tiny dataset in the image-folder layout (``root/<class>/<i>.png``, grayscale) and return ``root``."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for k in range(classes):
        folder = root / f"class{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(size, size), dtype=np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")
    return root


def image_folder_setup(folder: Path) -> tuple[None, Path]:
    """A ``Spec.setup`` for datasets read from a folder of class sub-folders: writes a tiny one, returns (None, it)."""
    return None, write_image_folder(folder / "images")


def _source(s: Spec) -> Any:
    return s.obj() if isinstance(s.obj, type) else s.obj


def _dataset_location(s: Spec) -> tuple[str | None, Path | None]:
    if s.setup is None:
        return s.arg, None if s.root is None else Path(s.root)
    folder = Path(tempfile.mkdtemp(prefix="dataset-", dir=_kit_dir()))
    arg, root = s.setup(folder)
    return arg, None if root is None else Path(root)


def _load(s: Spec, arg: str | None, root: Path | None, channels: int = CHANNELS) -> "ImageDataset":
    source = _source(s)
    source.prepare(arg, root, IMAGE_SIZE, False)
    return source.load(arg, root, IMAGE_SIZE, channels, False)


@_check(("datasets",))
def check_dataset_metadata(s: Spec) -> None:
    """Guards ``bench list`` and the data fingerprint: a description, and the ``DatasetSource`` methods."""
    from privbench.datasets.base import DatasetSource

    source = _source(s)
    _require(isinstance(source, DatasetSource), "a dataset must be a privbench.datasets.base.DatasetSource")
    description = getattr(source, "description", "") or (type(source).__doc__ or "")
    _require(isinstance(description, str) and description.strip(), "no description (class attribute or docstring)")


@_check(("datasets",))
def check_dataset_loads_tiny_problem(s: Spec) -> None:
    """Guards every run's data: a load at 16x16 (1 and 3 channels) within the CPU budget gives float32
    [N, C, 16, 16] in [0, 1], int64 labels in [0, classes) for at least two classes, unique string ids, and
    JSON-serialisable provenance."""
    import torch

    from privbench.datasets import ImageDataset

    arg, root = _dataset_location(s)
    for channels in (1, 3):
        with _quiet_environment():
            start = time.process_time()
            data = _load(s, arg, root, channels)
            cpu = time.process_time() - start
        _require(cpu <= CPU_BUDGET_S, f"loading took {cpu:.1f} s of CPU, over the budget of {CPU_BUDGET_S} s")
        _require(isinstance(data, ImageDataset), f"load returned {type(data).__name__}, not ImageDataset")
        _require(data.images.dtype == torch.float32 and tuple(data.images.shape[1:]) == (channels, IMAGE_SIZE, IMAGE_SIZE),
                 f"images are {data.images.dtype} {tuple(data.images.shape)}, expected float32 [N, {channels}, "
                 f"{IMAGE_SIZE}, {IMAGE_SIZE}]")
        _require(len(data) > 0 and float(data.images.min()) >= 0 and float(data.images.max()) <= 1,
                 "images must be in [0, 1] (and there must be some)")
        _require(data.labels.dtype == torch.int64 and int(data.labels.min()) >= 0
                 and int(data.labels.max()) < data.num_classes and data.num_classes >= 2,
                 "labels must be int64 in [0, number of class names), with at least two classes")
        _require(len(set(data.ids)) == len(data.ids) and all(isinstance(i, str) for i in data.ids), "ids must be unique strings")
        try:
            json.dumps(data.provenance)
        except (TypeError, ValueError) as exc:
            raise _Failure(f"provenance is not JSON-serialisable: {exc}") from None


@_check(("datasets",))
def check_dataset_determinism(s: Spec) -> None:
    """Guards cache keys and splits: two loads give the same images, labels and ids in the same order, and the
    fingerprint is a stable non-empty string."""
    import torch

    arg, root = _dataset_location(s)
    with _quiet_environment():
        first = _load(s, arg, root)
        _scramble_global_rngs(99)
        second = _load(s, arg, root)
    _require(torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
             and first.ids == second.ids, "two loads differ")
    source = _source(s)
    a, b = source.fingerprint(arg, root), source.fingerprint(arg, root)
    _require(isinstance(a, str) and a and a == b, f"the fingerprint must be a stable non-empty string, got {a!r}, {b!r}")


@_check(("datasets",))
def check_dataset_bad_input_raises_dataset_error(s: Spec) -> None:
    """Guards exit code 2: an argument or data location that does not exist is ``DatasetError`` (with the path and
    the fix), never a bare exception (a crash mid-run)."""
    from privbench.datasets import DatasetError

    missing = _kit_dir() / "no-such-folder"
    source = _source(s)
    for arg, root in ((BAD_TEXT, None), (None, missing), (BAD_TEXT, missing)):
        for call in (source.fingerprint, functools.partial(_load, s)):
            try:
                call(arg, root)
            except DatasetError:
                pass
            except Exception as exc:
                raise _Failure(f"arg={arg!r}, root={str(root)!r} raises {type(exc).__name__}: {exc} "
                               f"(expected DatasetError)") from exc


DATASET_CHECKS = (check_dataset_metadata, check_dataset_loads_tiny_problem, check_dataset_determinism,
                  check_dataset_bad_input_raises_dataset_error)


# -- models -------------------------------------------------------------------------------------------------------


def _build(s: Spec, channels: int, size: int, classes: int, seed: int) -> Any:
    """The model built as ``privbench.models.build_model`` builds it: under ``torch.manual_seed(seed)``."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return s.obj.build(_params(s), channels, size, classes)


@_check(("models",))
def check_model_metadata(s: Spec) -> None:
    """Guards ``bench list`` and model building: a description (docstring), a ``Params`` dataclass and a static
    ``build(params, channels, image_size, num_classes)``."""
    description = getattr(s.obj, "description", "") or (s.obj.__doc__ or "")
    _require(isinstance(description, str) and description.strip(), "no description (docstring)")
    _require(dataclasses.is_dataclass(s.obj.Params), "Params must be a dataclass")
    _require(isinstance(getattr(s.obj, "tiny_params", {}), Mapping), "tiny_params must be a dict")


@_check(("models",))
def check_model_builds_and_differentiates(s: Spec) -> None:
    """Guards training and gradient attacks: for 1x16x16 (4 classes) and 3x32x32 (10 classes) inputs the model is a
    torch module giving finite logits [B, K], within the CPU budget, and a dummy input gets a finite gradient
    through the gradient of the loss (second order, as gradient inversion needs)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    for channels, size, classes in ((1, 16, 4), (3, 32, 10)):
        with _quiet_environment():
            start = time.process_time()
            model = _build(s, channels, size, classes, SEED)
            _require(isinstance(model, nn.Module), f"build returned {type(model).__name__}, not a torch module")
            x = torch.rand(2, channels, size, size, requires_grad=True)
            logits = model.train()(x)
            _require(tuple(logits.shape) == (2, classes) and bool(torch.isfinite(logits).all()),
                     f"{channels}x{size}x{size}: logits {tuple(logits.shape)}, expected finite (2, {classes})")
            params = [p for p in model.parameters() if p.requires_grad]
            grads = torch.autograd.grad(F.cross_entropy(logits, torch.tensor([0, 1])), params, create_graph=True)
            (grad_x,) = torch.autograd.grad(sum((g ** 2).sum() for g in grads), x)
            cpu = time.process_time() - start
        _require(bool(torch.isfinite(grad_x).all()), f"{channels}x{size}x{size}: no finite second-order input gradient")
        _require(cpu <= CPU_BUDGET_S, f"building and differentiating took {cpu:.1f} s of CPU, over {CPU_BUDGET_S} s")


@_check(("models",))
def check_model_seeded_init(s: Spec) -> None:
    """Guards ``round=init`` and reproducibility: the same seed gives the same initial weights even after the
    global RNGs moved (numpy, random), and another seed gives other weights."""
    with _quiet_environment():
        first = _build(s, CHANNELS, IMAGE_SIZE, 4, SEED).state_dict()
        _scramble_global_rngs(4242)
        again = _build(s, CHANNELS, IMAGE_SIZE, 4, SEED).state_dict()
        other = _build(s, CHANNELS, IMAGE_SIZE, 4, OTHER_SEED).state_dict()
    _require(_close(first, again, tolerance=0.0), "the same seed gives other weights: build draws from an unseeded RNG")
    _require(not _close(first, other), "another seed gives the same weights: build ignores torch's seed")


MODEL_CHECKS = (check_model_metadata, check_params_round_trip, check_bad_params_raise_config_error,
                check_model_builds_and_differentiates, check_model_seeded_init)

CHECKS = {"defenses": DEFENSE_CHECKS, "attacks": ATTACK_CHECKS, "datasets": DATASET_CHECKS, "models": MODEL_CHECKS}


# -- running the checks -------------------------------------------------------------------------------------------


def checks_for(component: Any) -> tuple[Callable[[Any], None], ...]:
    """Every check that applies to ``component`` (by its kind), in the order they run."""
    return CHECKS[spec(component).kind]


ExpectedFailures = Mapping[Any, str] | Callable[[Spec], Mapping[Any, str]] | None


def _expected_reason(expected: ExpectedFailures, s: Spec, check: Callable) -> str | None:
    """The reason ``check`` is expected to fail for ``s``: ``expected`` maps a check (function or name) or a test id
    ``<component>-<check>`` to a reason, or is a callable giving such a mapping for a component."""
    if expected is None:
        return None
    table = expected(s) if callable(expected) else expected
    for key in (check, check.__name__, f"{s.name}-{check.__name__}"):
        if key in table:
            return table[key]
    return None


def run_checks(component: Any, expected_failures: ExpectedFailures = None) -> dict[str, str]:
    """Run every check of ``component``'s kind; return ``{check: "passed" | "expected failure: <reason>"}``.

    Raises:
        ConformanceError: one or more checks failed unexpectedly (all of them are listed).
    """
    s = spec(component)
    report, failures = {}, []
    for check in checks_for(s):
        reason = _expected_reason(expected_failures, s, check)
        try:
            check(s)
        except ConformanceError as exc:
            if reason is None:
                failures.append(str(exc))
            report[check.__name__] = f"expected failure: {reason}" if reason else "failed"
            continue
        report[check.__name__] = "passed" if reason is None else f"passed, though expected to fail: {reason}"
    if failures:
        raise ConformanceError(f"{len(failures)} conformance check(s) failed:\n" + "\n".join(failures))
    return report


def check_defense(component: Any, expected_failures: ExpectedFailures = None) -> dict[str, str]:
    """Run every defense check on ``component`` (see ``run_checks``)."""
    _require_kind(component, "defenses")
    return run_checks(component, expected_failures)


def check_attack(component: Any, expected_failures: ExpectedFailures = None) -> dict[str, str]:
    """Run every attack check on ``component`` (see ``run_checks``)."""
    _require_kind(component, "attacks")
    return run_checks(component, expected_failures)


def check_dataset(component: Any, expected_failures: ExpectedFailures = None, *, arg: str | None = None,
                  root: Path | str | None = None,
                  setup: Callable[[Path], tuple[str | None, Path | str | None]] | None = None) -> dict[str, str]:
    """Run every dataset check on ``component`` loading ``arg`` from ``root`` (or what ``setup`` writes)."""
    _require_kind(component, "datasets")
    return run_checks(spec(component, arg=arg, root=root, setup=setup), expected_failures)


def check_model(component: Any, expected_failures: ExpectedFailures = None) -> dict[str, str]:
    """Run every model check on ``component`` (see ``run_checks``)."""
    _require_kind(component, "models")
    return run_checks(component, expected_failures)


def _require_kind(component: Any, kind: str) -> None:
    s = spec(component)
    if s.kind != kind:
        raise TypeError(f"{s} is not one of the {kind}")


def parametrize_with_checks(components: Iterable[Any], expected_failures: ExpectedFailures = None):
    """A ``pytest.mark.parametrize`` over every (component, check) pair, with ids ``<component>-<check>``.

    Args:
        components: classes (dataset sources may be instances), registry entries or ``Spec`` objects.
        expected_failures: check (function or name) or test id -> reason, or a callable giving that mapping per
            component; those tests are marked ``xfail(strict=True)``, so one that starts passing fails the run
            until its entry is removed.

    Example:
        >>> @parametrize_with_checks([MyDefense])  # doctest: +SKIP
        ... def test_conformance(component, check):
        ...     check(component)
    """
    import pytest

    params = []
    for component in components:
        s = spec(component)
        for check in checks_for(s):
            reason = _expected_reason(expected_failures, s, check)
            marks = [pytest.mark.xfail(strict=True, raises=ConformanceError, reason=reason)] if reason else []
            params.append(pytest.param(s, check, id=f"{s.name}-{check.__name__}", marks=marks))
    return pytest.mark.parametrize(("component", "check"), params)


# -- comparing and hashing --------------------------------------------------------------------------------------


def _flat(value: Any) -> list:
    """The tensors (and arrays) in ``value``, in a fixed order."""
    import torch

    if isinstance(value, (torch.Tensor, np.ndarray)):
        return [value]
    if isinstance(value, Mapping):
        return [t for k in sorted(value, key=str) for t in _flat(value[k])]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flat(v)]
    return []


def _distance(a: Any, b: Any) -> float:
    """Relative L2 distance between the tensors of ``a`` and ``b`` (inf if their structure differs)."""
    import torch

    xs, ys = _flat(a), _flat(b)
    if len(xs) != len(ys) or any(tuple(x.shape) != tuple(y.shape) for x, y in zip(xs, ys, strict=True)):
        return math.inf
    num = den = 0.0
    for x, y in zip(xs, ys, strict=True):
        x = torch.as_tensor(x).detach().double()
        y = torch.as_tensor(y).detach().double()
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            if not torch.equal(torch.nan_to_num(x, nan=0.5), torch.nan_to_num(y, nan=0.5)):
                return math.inf
            continue
        num += float(((x - y) ** 2).sum())
        den += float((y ** 2).sum())
    return math.sqrt(num) / (math.sqrt(den) + 1e-12) if num else 0.0


def _close(a: Any, b: Any, tolerance: float = RELATIVE_TOLERANCE) -> bool:
    return _distance(a, b) <= tolerance


def _fingerprint(value: Any) -> str:
    """sha256 over every tensor, module state (and train/eval mode), dataset and plain value in ``value``."""
    import torch
    from torch import nn

    from privbench.datasets import ImageDataset
    from privbench.threat import Victim

    h = hashlib.sha256()

    def feed(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(v, nn.Module):
            feed(v.state_dict())
            feed([m.training for m in v.modules()])
        elif isinstance(v, (ImageDataset, Victim)):
            feed([v.images, v.labels, list(v.ids)])
        elif isinstance(v, Mapping):
            for k in sorted(v, key=str):
                h.update(str(k).encode())
                feed(v[k])
        elif isinstance(v, (list, tuple)):
            for item in v:
                feed(item)
        else:
            h.update(repr(v).encode())

    feed(value)
    return h.hexdigest()
