import pytest
import torch


@pytest.fixture
def bench_home(tmp_path, monkeypatch):
    """An empty privbench home (store, artifacts, caches) for one test."""
    home = tmp_path / "home"
    monkeypatch.setenv("PRIVBENCH_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread, as the runner uses: these models are too small to gain from two, and two
    threads on a shared 2-core machine slow the tests many-fold."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class PluginSite:
    """A folder on sys.path where tests install throwaway plugin distributions: a real ``*.dist-info``
    (METADATA, entry_points.txt) beside the plugin's modules, as ``pip install`` leaves them."""

    def __init__(self, root):
        self.root = root
        self.modules: set[str] = set()

    def install(self, distribution: str, version: str, entry_points: dict, files: dict) -> None:
        """``entry_points``: group -> {name: "module:object"}; ``files``: path relative to the site -> text."""
        import importlib

        from privbench.testing import write_plugin_distribution

        write_plugin_distribution(self.root, distribution, version, entry_points, files)
        self.modules |= {relative.split("/")[0].removesuffix(".py") for relative in files}
        importlib.invalidate_caches()
        _forget_plugins()


def _forget_plugins() -> None:
    """Drop every registry's entry-point scan and plugin entries (built-ins stay registered)."""
    from privbench import registry

    for reg in registry.ALL.values():
        reg._plugin_eps, reg._clashes = None, {}
        reg._entries = {name: e for name, e in reg._entries.items() if e.origin.source == "builtin"}


@pytest.fixture
def plugin_site(tmp_path, monkeypatch):
    """Install plugin distributions for one test; afterwards they, their modules and their registrations are gone."""
    import sys

    from privbench import registry

    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(registry, "PLUGINS_ENABLED", True)
    installed = PluginSite(site)
    _forget_plugins()
    yield installed
    for name in list(sys.modules):
        if name.split(".")[0] in installed.modules:
            del sys.modules[name]
    monkeypatch.undo()  # sys.path first, so the rescan below no longer sees the site
    _forget_plugins()
