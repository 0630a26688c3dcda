import importlib.metadata as md

import pytest

from privbench import registry
from privbench.registry import DuplicateNameError, PluginLoadError, Registry, UnknownNameError


def test_builtins_are_listed_without_importing_them():
    assert {"none"} <= set(registry.defenses.names())
    assert {"dlg", "idlg", "invgrad"} <= set(registry.attacks.names())
    assert {"lenet", "convnet", "resnet"} <= set(registry.models.names())


def test_registering_a_name_twice_raises():
    reg = Registry("things", {})

    @reg.register("a")
    class A:
        pass

    with pytest.raises(DuplicateNameError, match="'a' is registered twice"):

        @reg.register("a")
        class B:
            pass


def test_unknown_name_suggests_close_matches_and_lists_available():
    with pytest.raises(UnknownNameError) as info:
        registry.attacks.get("idgl")
    message = str(info.value)
    assert "did you mean 'idlg'" in message.lower()
    assert "dlg" in message and "invgrad" in message


def test_unknown_name_without_close_match_still_lists_names():
    with pytest.raises(UnknownNameError, match="Available: .*none"):
        registry.defenses.get("zzzzzz")


class _FakeEntryPoint:
    def __init__(self, name, value, loader):
        self.name, self.value, self._loader, self.dist = name, value, loader, None

    def load(self):
        return self._loader()


def _with_entry_points(monkeypatch, eps, group="privbench.things"):
    monkeypatch.setattr(md, "entry_points", lambda group=group, _g=group: [e for e in eps if group == _g])


def test_entry_point_plugin_is_loaded_lazily_when_named(monkeypatch):
    loaded = []

    class PluginDefense:
        """A plugin defense."""

    def loader():
        loaded.append(True)
        return PluginDefense

    _with_entry_points(monkeypatch, [_FakeEntryPoint("plug", "pkg.mod:PluginDefense", loader)])
    reg = Registry("things", {})
    assert reg.names() == ["plug"] and loaded == []
    entry = reg.entry("plug")
    assert entry.obj is PluginDefense and entry.origin.source == "plugin" and loaded == [True]
    assert entry.origin.entry_point == "plug" and PluginDefense.registry_name == "plug"


def test_plugin_that_raises_on_import_gives_a_clear_error(monkeypatch):
    def loader():
        raise ImportError("no module named foo")

    _with_entry_points(monkeypatch, [_FakeEntryPoint("broken", "pkg.mod:X", loader)])
    with pytest.raises(PluginLoadError, match="'broken'.*entry point broken = pkg.mod:X.*failed to load.*"
                                              "no module named foo.*--no-plugins"):
        Registry("things", {}).get("broken")


def test_plugin_shadowing_a_builtin_name_is_refused_where_the_name_is_used(monkeypatch):
    _with_entry_points(monkeypatch, [_FakeEntryPoint("none", "pkg.mod:X", lambda: object)], "privbench.defenses")
    reg = registry.defenses
    monkeypatch.setattr(reg, "_plugin_eps", None)  # rescanned now, restored after the test
    monkeypatch.setattr(reg, "_clashes", {})
    assert "none" in reg.names() and "dp" in reg.names()  # listing still works
    with pytest.raises(DuplicateNameError, match=r"'none' is registered twice: by built-in \(privbench.defenses.none\) "
                                                 r"and by plugin an unknown distribution \(entry point none = pkg.mod:X\)"):
        reg.get("none")
    assert reg.get("dp").__name__ == "DPSGD"  # other names keep working
    loaded, broken = reg.survey()
    assert "dp" in [e.name for e in loaded] and list(broken) == ["none"]
    monkeypatch.setattr(registry, "PLUGINS_ENABLED", False)
    assert reg.get("none").__name__ == "NoDefense"  # --no-plugins: the built-in


def test_a_plugin_using_the_decorator_is_attributed_to_its_distribution(monkeypatch):
    reg = Registry("things", {"builtin": "privbench.defenses.none"})

    def loader():
        @reg.register("decorated")
        class Decorated:
            """Registers itself while its entry point loads."""

        return Decorated

    def stealer():
        @reg.register("builtin")
        class Thief:
            pass

        return Thief

    _with_entry_points(monkeypatch, [_FakeEntryPoint("decorated", "pkg.mod:Decorated", loader),
                                     _FakeEntryPoint("other", "pkg.other:Thief", stealer)])
    assert reg.entry("decorated").origin.source == "plugin"
    with pytest.raises(DuplicateNameError, match="'builtin' is registered twice: by built-in"):
        reg.get("other")


def test_no_plugins_ignores_entry_points(monkeypatch):
    _with_entry_points(monkeypatch, [_FakeEntryPoint("plug", "pkg.mod:X", lambda: object)])
    monkeypatch.setattr(registry, "PLUGINS_ENABLED", False)
    assert "plug" not in Registry("things", {}).names()


def test_a_clashing_plugin_is_refused_even_when_a_stored_row_would_answer(monkeypatch, bench_home):
    """The stored row of `none` was computed with the built-in; once a plugin claims the name too, asking for
    `none` is an error naming both origins instead of an answer that hides the clash."""
    from privbench.config import RunConfig
    from privbench.runner import RunOptions, lookup, run
    from privbench.store import Store

    config = RunConfig(image_size=16, attack_params={"steps": 3, "restarts": 1}, defense_params={"epochs": 1})
    store = Store()
    run(config, store)
    assert lookup(config, store, RunOptions()) is not None
    _with_entry_points(monkeypatch, [_FakeEntryPoint("none", "pkg.mod:X", lambda: object)], "privbench.defenses")
    monkeypatch.setattr(registry.defenses, "_plugin_eps", None)
    monkeypatch.setattr(registry.defenses, "_clashes", {})
    with pytest.raises(DuplicateNameError, match="'none' is registered twice"):
        lookup(config, store, RunOptions())
