"""Typed registries of components: defenses, attacks, datasets, models, metrics.

Built-ins are declared here by name and module path and imported only when a
name is asked for (so ``bench --help`` and a cached ``bench run`` never import
torch). The built-in module registers its class with the ``@<registry>.register``
decorator on import. Third-party packages declare entry points in the group
``privbench.<kind>`` (for example ``privbench.defenses``); they are listed by
name without being imported and loaded when named.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata as md
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

T = TypeVar("T")

PLUGINS_ENABLED = True
"""Set to False (``--no-plugins``) to use built-in components only."""


class RegistryError(Exception):
    """Base class for registry errors; the CLI turns these into exit code 2."""


class UnknownNameError(RegistryError, KeyError):
    def __init__(self, kind: str, name: str, available: list[str]):
        self.kind, self.name, self.available = kind, name, available
        close = difflib.get_close_matches(name, available, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        msg = (
            f"unknown {kind[:-1] if kind.endswith('s') else kind} {name!r}.{hint} "
            f"Available: {', '.join(available) or '(none)'}. "
            f"Run 'bench list' to see every registered component."
        )
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class DuplicateNameError(RegistryError):
    pass


class PluginLoadError(RegistryError):
    pass


@dataclass(frozen=True)
class Origin:
    """Where a component came from: a built-in module or an installed distribution."""

    source: str  # "builtin" or "plugin"
    module: str
    distribution: str | None = None
    version: str | None = None

    def describe(self) -> str:
        if self.source == "builtin":
            return f"built-in ({self.module})"
        return f"plugin {self.distribution or '?'} {self.version or ''} ({self.module})".replace("  ", " ")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    origin: Origin

    @property
    def description(self) -> str:
        doc = getattr(self.obj, "description", None) or (getattr(self.obj, "__doc__", None) or "")
        return doc.strip().splitlines()[0] if doc.strip() else ""


class Registry(Generic[T]):
    """Name -> component for one kind, with lazy built-ins and lazy entry points."""

    def __init__(self, kind: str, builtins: dict[str, str]):
        self.kind = kind
        self.group = f"privbench.{kind}"
        self._builtin_modules = dict(builtins)  # name -> module that registers it
        self._entries: dict[str, Entry[T]] = {}
        self._plugin_eps: dict[str, md.EntryPoint] | None = None

    # -- registration -------------------------------------------------------
    def register(self, name: str) -> Callable[[T], T]:
        """Class or function decorator registering a built-in under ``name``."""

        def decorate(obj: T) -> T:
            self._add(name, obj, Origin("builtin", getattr(obj, "__module__", "?")))
            try:
                obj.registry_name = name  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                pass
            return obj

        return decorate

    def _add(self, name: str, obj: T, origin: Origin) -> None:
        if name in self._entries:
            prev = self._entries[name]
            raise DuplicateNameError(
                f"{self.kind}: the name {name!r} is registered twice: by {prev.origin.describe()} "
                f"and by {origin.describe()}. Rename one of them."
            )
        self._entries[name] = Entry(name, obj, origin)

    # -- lookup -------------------------------------------------------------
    def _plugins(self) -> dict[str, md.EntryPoint]:
        if not PLUGINS_ENABLED:
            return {}
        if self._plugin_eps is None:
            eps: dict[str, md.EntryPoint] = {}
            for ep in md.entry_points(group=self.group):
                if ep.name in eps or ep.name in self._builtin_modules:
                    other = eps.get(ep.name)
                    where = other.value if other else f"built-in {self._builtin_modules[ep.name]}"
                    raise DuplicateNameError(
                        f"{self.kind}: the name {ep.name!r} is registered twice: by {where} and by "
                        f"entry point {ep.value} ({_dist_label(ep)}). Uninstall or rename one; "
                        f"'--no-plugins' runs built-ins only."
                    )
                eps[ep.name] = ep
            self._plugin_eps = eps
        return self._plugin_eps

    def names(self) -> list[str]:
        return sorted(set(self._builtin_modules) | set(self._entries) | set(self._plugins()))

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def entry(self, name: str) -> Entry[T]:
        if name in self._entries:
            return self._entries[name]
        if name in self._builtin_modules:
            importlib.import_module(self._builtin_modules[name])
            if name not in self._entries:
                raise RegistryError(
                    f"{self.kind}: module {self._builtin_modules[name]} did not register {name!r}"
                )
            return self._entries[name]
        eps = self._plugins()
        if name in eps:
            ep = eps[name]
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plugin must not look like an unknown name
                raise PluginLoadError(
                    f"{self.kind}: plugin {name!r} from {_dist_label(ep)} failed to load "
                    f"({ep.value}): {type(exc).__name__}: {exc}. Fix or uninstall the plugin, "
                    f"or run with --no-plugins."
                ) from exc
            if name not in self._entries:  # the plugin may use the decorator itself
                self._add(name, obj, Origin("plugin", ep.value, *_dist_info(ep)))
            return self._entries[name]
        raise UnknownNameError(self.kind, name, self.names())

    def __contains__(self, name: str) -> bool:
        return name in self.names()

    def entries(self) -> list[Entry[T]]:
        """Every component, importing each one (for ``bench list``)."""
        return [self.entry(n) for n in self.names()]


def _dist_info(ep: md.EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    return dist.metadata["Name"], dist.version


def _dist_label(ep: md.EntryPoint) -> str:
    name, version = _dist_info(ep)
    return f"{name} {version}" if name else "an unknown distribution"


defenses: Registry = Registry(
    "defenses",
    {"none": "privbench.defenses.none", "dp": "privbench.defenses.dp", "mple": "privbench.defenses.mple",
     "gascnn": "privbench.defenses.gascnn.defense",
     "he": "privbench.defenses.he.defense"},
)
attacks: Registry = Registry(
    "attacks",
    {
        "dlg": "privbench.attacks.gradient_inversion",
        "idlg": "privbench.attacks.gradient_inversion",
        "invgrad": "privbench.attacks.gradient_inversion",
        "invgrad-snn": "privbench.attacks.gradient_inversion",
        "dlg-snn": "privbench.attacks.gradient_inversion",
        "loss-threshold": "privbench.attacks.membership",
        "shadow": "privbench.attacks.membership",
        "lira": "privbench.attacks.membership",
        "mple-view": "privbench.attacks.mple",
        "mple-feature-leak": "privbench.attacks.mple",
        "mple-known-plaintext": "privbench.attacks.mple",
        "dlg-mple": "privbench.attacks.mple",
        "invgrad-mple": "privbench.attacks.mple",
    },
)
datasets: Registry = Registry(
    "datasets",
    {
        "synthetic-mri": "privbench.datasets.synthetic",
        "imagefolder": "privbench.datasets.imagefolder",
        "brain-tumor-mri": "privbench.datasets.imagefolder",
        "medmnist": "privbench.datasets.medmnist",
    },
)
models: Registry = Registry(
    "models",
    {
        "lenet": "privbench.models.lenet",
        "convnet": "privbench.models.convnet",
        "resnet": "privbench.models.resnet",
        "vgg": "privbench.models.vgg",
        "capsnet": "privbench.models.capsnet",
    },
)
metrics: Registry = Registry(
    "metrics",
    {
        "mse": "privbench.metrics.image",
        "psnr": "privbench.metrics.image",
        "ssim": "privbench.metrics.image",
        "label_accuracy": "privbench.metrics.image",
        "reconstruction": "privbench.metrics.score_reconstruction",
        "membership": "privbench.metrics.score_membership",
    },
)

ALL: dict[str, Registry] = {
    r.kind: r for r in (defenses, attacks, datasets, models, metrics)
}
