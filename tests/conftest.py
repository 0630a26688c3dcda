import pytest


@pytest.fixture
def bench_home(tmp_path, monkeypatch):
    """An empty privbench home (store, artifacts, caches) for one test."""
    home = tmp_path / "home"
    monkeypatch.setenv("PRIVBENCH_HOME", str(home))
    return home
