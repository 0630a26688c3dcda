"""Typed registries of components: defenses, attacks, datasets, models, metrics.

Built-ins are declared here by name and module path and imported only when a
name is asked for (so ``bench --help`` and a cached ``bench run`` never import
torch). The built-in module registers its class with the ``@<registry>.register``
decorator on import. Third-party packages declare entry points in the group
``privbench.<kind>`` (for example ``privbench.defenses``); they are listed by
name without being imported and loaded when named.

A plugin that fails to load, or whose name is already taken (by a built-in or
another plugin), is an error naming its distribution and entry point wherever
that name is used; every other name keeps working, and ``bench list`` shows the
broken plugins beside the loadable components (``Registry.survey``).
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
    """A name registered twice (two plugins, or a plugin and a built-in); the message names both origins."""


class PluginLoadError(RegistryError):
    """A plugin's entry point failed to import, or loaded something that is not a component of its kind."""


@dataclass(frozen=True)
class Origin:
    """Where a component came from: a built-in module or an installed distribution."""

    source: str  # "builtin", "plugin" (an installed distribution's entry point) or "local" (registered at run time)
    module: str  # the built-in module, or the entry point's value ("package.module:Object")
    distribution: str | None = None
    version: str | None = None
    entry_point: str | None = None  # the entry point's name (plugins)

    def describe(self) -> str:
        if self.source == "builtin":
            return f"built-in ({self.module})"
        if self.source == "local":
            return f"registered at run time by {self.module}"
        dist = f"{self.distribution} {self.version}" if self.version else (self.distribution or "an unknown distribution")
        name = f"{self.entry_point} = " if self.entry_point else ""
        return f"plugin {dist} (entry point {name}{self.module})"


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
        self._clashes: dict[str, str] = {}  # name -> why it cannot be used (two origins)
        self._loading: Origin | None = None  # the plugin being imported: its decorator registrations are its own

    # -- registration -------------------------------------------------------
    def register(self, name: str) -> Callable[[T], T]:
        """Class or function decorator registering a component under ``name``.

        Built-ins use it in their modules; a plugin module may use it too, in which case the
        registration is attributed to the plugin's distribution and entry point.
        """

        def decorate(obj: T) -> T:
            self._add(name, obj, self._origin_of_new(obj))
            return obj

        return decorate

    def _origin_of_new(self, obj: object) -> Origin:
        """Where a decorated component comes from: the plugin being loaded, privbench itself, the installed
        plugin whose entry point names the module, or else the module that registered it at run time."""
        if self._loading is not None:
            return self._loading
        module = getattr(obj, "__module__", None) or "?"
        if module == "privbench" or module.startswith("privbench."):
            return Origin("builtin", module)
        for ep in self._plugins().values():
            if ep.value.split(":")[0].strip() == module:
                return _ep_origin(ep)
        return Origin("local", module)

    def _add(self, name: str, obj: T, origin: Origin) -> None:
        if name in self._entries:
            prev = self._entries[name]
            raise DuplicateNameError(
                f"{self.kind}: the name {name!r} is registered twice: by {prev.origin.describe()} "
                f"and by {origin.describe()}. Rename one of them{_way_out(prev.origin, origin)}."
            )
        if origin.source == "plugin" and name in self._builtin_modules:
            raise DuplicateNameError(
                f"{self.kind}: the name {name!r} is registered twice: by built-in ({self._builtin_modules[name]}) "
                f"and by {origin.describe()}. Rename the plugin's component{_way_out(origin)}."
            )
        self._entries[name] = Entry(name, obj, origin)
        try:
            obj.registry_name = name  # type: ignore[attr-defined]
        except (AttributeError, TypeError):
            pass

    # -- lookup -------------------------------------------------------------
    def _plugins(self) -> dict[str, md.EntryPoint]:
        """Entry points of this kind by name (not imported). A name that two entry points declare, or that
        an entry point shares with a built-in, goes to ``_clashes`` and is refused when used."""
        if not PLUGINS_ENABLED:
            return {}
        if self._plugin_eps is None:
            eps: dict[str, md.EntryPoint] = {}
            clashes: dict[str, str] = {}
            for ep in md.entry_points(group=self.group):
                if ep.name in self._builtin_modules:
                    first = f"built-in ({self._builtin_modules[ep.name]})"
                elif ep.name in eps:
                    first = _ep_origin(eps[ep.name]).describe()
                else:
                    eps[ep.name] = ep
                    continue
                clashes[ep.name] = (
                    f"{self.kind}: the name {ep.name!r} is registered twice: by {first} and by "
                    f"{_ep_origin(ep).describe()}. Uninstall or rename one of them{_way_out(_ep_origin(ep))}."
                )
            for name in clashes:
                eps.pop(name, None)
            self._plugin_eps, self._clashes = eps, clashes
        return self._plugin_eps

    def _clashing(self) -> dict[str, str]:
        """Names two origins declare (see ``_plugins``), with the error; none with plugins disabled."""
        self._plugins()
        return self._clashes if PLUGINS_ENABLED else {}

    def names(self) -> list[str]:
        local = {n for n, e in self._entries.items() if PLUGINS_ENABLED or e.origin.source != "plugin"}
        return sorted(set(self._builtin_modules) | local | set(self._plugins()) | set(self._clashing()))

    def builtin_names(self) -> list[str]:
        """The built-in names (never plugins): what the project's own tests parametrize over."""
        return sorted(self._builtin_modules)

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def check_clash(self, name: str) -> None:
        """Raise ``DuplicateNameError`` if two origins declare ``name`` (reads entry points, imports nothing)."""
        clashes = self._clashing()
        if name in clashes:
            raise DuplicateNameError(clashes[name])

    def entry(self, name: str) -> Entry[T]:
        eps = self._plugins()
        self.check_clash(name)
        if name in self._builtin_modules:
            if name not in self._entries:
                importlib.import_module(self._builtin_modules[name])
            entry = self._entries.get(name)
            if entry is None:
                raise RegistryError(f"{self.kind}: module {self._builtin_modules[name]} did not register {name!r}")
            return entry
        if name in self._entries and (PLUGINS_ENABLED or self._entries[name].origin.source != "plugin"):
            return self._entries[name]
        if name in eps:
            return self._load_plugin(name, eps[name])
        raise UnknownNameError(self.kind, name, self.names())

    def _load_plugin(self, name: str, ep: md.EntryPoint) -> Entry[T]:
        origin = _ep_origin(ep)
        self._loading = origin
        try:
            obj = ep.load()
        except RegistryError:  # e.g. the plugin's own decorator registered a taken name
            raise
        except Exception as exc:  # a broken plugin must not look like an unknown name
            raise PluginLoadError(
                f"{self.kind}: plugin {name!r} from {origin.describe()} failed to load: "
                f"{type(exc).__name__}: {exc}. Fix or uninstall the plugin{_way_out(origin)}."
            ) from exc
        finally:
            self._loading = None
        problem = _not_a_component(self.kind, obj)
        if problem:
            raise PluginLoadError(
                f"{self.kind}: plugin {name!r} from {origin.describe()} loads {obj!r}, which {problem}. "
                f"Fix the entry point{_way_out(origin)}."
            )
        if name not in self._entries:  # the plugin may have used the decorator itself
            self._add(name, obj, origin)
        return self._entries[name]

    def __contains__(self, name: str) -> bool:
        return name in self.names()

    def entries(self) -> list[Entry[T]]:
        """Every component, importing each one; the first that cannot be loaded raises."""
        return [self.entry(n) for n in self.names()]

    def survey(self) -> tuple[list[Entry[T]], dict[str, str]]:
        """(every loadable component, {name: error} for each plugin that cannot be used), for ``bench list``."""
        loaded, broken = [], {}
        for name in self.names():
            try:
                loaded.append(self.entry(name))
            except (PluginLoadError, DuplicateNameError) as exc:
                broken[name] = str(exc)
        return loaded, broken

    def origin_of(self, obj: object) -> Origin | None:
        """The origin of an already loaded component object (None if it is not registered here)."""
        for entry in self._entries.values():
            if entry.obj is obj:
                return entry.origin
        return None


def _way_out(*origins: Origin) -> str:
    dists = [o.distribution for o in origins if o.source == "plugin" and o.distribution]
    uninstall = f" (pip uninstall {' or '.join(dict.fromkeys(dists))})" if dists else ""
    return f"{uninstall}; '--no-plugins' runs built-ins only" if any(o.source == "plugin" for o in origins) else ""


def _ep_origin(ep: md.EntryPoint) -> Origin:
    return Origin("plugin", ep.value, *_dist_info(ep), entry_point=ep.name)


def _not_a_component(kind: str, obj: object) -> str | None:
    """Why ``obj`` cannot be a component of ``kind`` (None if it can): the base class or interface it lacks."""
    if kind == "defenses":
        from privbench.defenses.base import Defense

        if not (isinstance(obj, type) and issubclass(obj, Defense)):
            return "is not a subclass of privbench.defenses.base.Defense"
    elif kind == "attacks":
        from privbench.attacks.base import Attack

        if not (isinstance(obj, type) and issubclass(obj, Attack)):
            return "is not a subclass of privbench.attacks.base.Attack"
    elif kind == "datasets":
        from privbench.datasets.base import DatasetSource

        if not (isinstance(obj, DatasetSource) or (isinstance(obj, type) and issubclass(obj, DatasetSource))):
            return "is not a privbench.datasets.base.DatasetSource (subclass or instance)"
    elif kind == "models":
        if not (hasattr(obj, "Params") and callable(getattr(obj, "build", None))):
            return "has no Params dataclass and build(params, channels, image_size, num_classes) method"
    return None


def _dist_info(ep: md.EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    return dist.metadata["Name"], dist.version


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
        "gradinversion": "privbench.attacks.gradinversion",
        "loss-threshold": "privbench.attacks.membership",
        "shadow": "privbench.attacks.membership",
        "lira": "privbench.attacks.membership",
        "mple-view": "privbench.attacks.mple",
        "mple-feature-leak": "privbench.attacks.mple",
        "mple-known-plaintext": "privbench.attacks.mple",
        "dlg-mple": "privbench.attacks.mple",
        "invgrad-mple": "privbench.attacks.mple",
        "mi-face": "privbench.attacks.model_inversion",
        "mi-face-art": "privbench.attacks.model_inversion",
        "deepinversion": "privbench.attacks.model_inversion",
        "gmi": "privbench.attacks.model_inversion",
        "pred-decoder": "privbench.attacks.model_inversion",
        "mi-face-snn": "privbench.attacks.model_inversion",
        "gmi-snn": "privbench.attacks.model_inversion",
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
        "model_inversion": "privbench.metrics.score_inversion",
    },
)

ALL: dict[str, Registry] = {
    r.kind: r for r in (defenses, attacks, datasets, models, metrics)
}


def named_by(config) -> list[tuple[Registry, str]]:
    """(registry, name) of each component a run config names: defense, attack, model, dataset source."""
    pairs = [(defenses, config.defense), (attacks, config.attack), (models, config.model),
             (datasets, config.dataset.split(":", 1)[0])]
    return [(reg, name) for reg, name in pairs if name is not None]
