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
