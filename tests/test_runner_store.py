"""Runner and store: one row per run, cached results, failures stored, interrupts leave nothing."""

import json

import pytest
import torch

from privbench import registry
from privbench.attacks.gradient_inversion import DLG
from privbench.config import RunConfig
from privbench.runner import RunOptions, lookup, run
from privbench.store import RunResult, Store

TINY = dict(image_size=16, attack_params={"steps": 5, "restarts": 1}, defense_params={"epochs": 1})


@pytest.fixture
def store(bench_home):
    return Store()


def test_run_stores_one_complete_row_and_artifacts(store):
    result = run(RunConfig(**TINY), store)
    assert result.status == "ok" and not result.cached
    row = store.get(result.run_id)
    assert row.config == result.config and row.config["attack_params"]["steps"] == 5
    for name in ("psnr", "ssim", "mse", "label_accuracy", "baseline_psnr", "baseline_ssim", "target_accuracy"):
        assert name in row.metrics
    assert row.grad_evals > 0 and row.wall_time_s > 0
    assert set(row.info["seeds"]) == {"split", "init", "train", "secrets", "victim", "observe", "attack"}
    assert row.info["versions"]["torch"] == torch.__version__ and "privbench" in row.info["versions"]
    assert row.info["splits"]["members"] > 0 and "dedup" in row.info["splits"]
    assert (store.root / row.artifacts / "reconstruction.png").is_file()
    assert not list(store.artifacts_root.glob(".staging-*"))


def test_same_config_is_served_from_the_store_and_force_recomputes(store):
    first = run(RunConfig(**TINY), store)
    again = run(RunConfig(**TINY), store)
    assert again.cached and again.run_id == first.run_id and again.metrics == first.metrics
    # the fast path finds it without resolving components
    assert lookup(RunConfig(**TINY), store, RunOptions()).run_id == first.run_id
    forced = run(RunConfig(**TINY), store, RunOptions(force=True))
    assert not forced.cached and forced.run_id != first.run_id
    assert forced.metrics == first.metrics  # reproducible from config and seed
    assert store.counts() == {"ok": 1, "superseded": 1}  # one ok row per request; the old one kept as history
    assert store.get(first.run_id).status == "superseded"
    assert lookup(RunConfig(**TINY), store, RunOptions()).run_id == forced.run_id


def test_seeds_with_one_target_seed_attack_different_victims_of_one_cached_target(store):
    first = run(RunConfig(**TINY, seed=0, target_seed=5), store)
    second = run(RunConfig(**TINY, seed=1, target_seed=5), store)
    assert not first.info["target"]["cached"] and second.info["target"]["cached"]
    assert second.info["target"]["cache_key"] == first.info["target"]["cache_key"]
    assert first.metrics["target_accuracy"] == second.metrics["target_accuracy"]
    assert first.info["victim_ids"] != second.info["victim_ids"]
    own = run(RunConfig(**TINY, seed=5), store)  # seed 5 alone trains the same target
    assert own.info["target"]["cache_key"] == first.info["target"]["cache_key"]


def test_resolved_equivalent_config_hits_the_cache(store):
    first = run(RunConfig(**TINY), store)
    explicit = dict(TINY, attack_params={"steps": "5", "restarts": "1", "lr": "1.0"})
    assert run(RunConfig(**explicit), store).run_id == first.run_id


def test_a_new_privbench_version_does_not_reuse_old_results(store, monkeypatch):
    first = run(RunConfig(**TINY), store)
    monkeypatch.setattr("privbench.config.__version__", "999.0")
    monkeypatch.setattr("privbench.runner.__version__", "999.0")
    assert run(RunConfig(**TINY), store).run_id != first.run_id


def test_a_failing_attack_is_stored_as_failed_with_its_traceback(store, monkeypatch):
    def boom(self, observation, budget, progress=None):
        raise RuntimeError("numerical trouble")

    monkeypatch.setattr(DLG, "run", boom)
    result = run(RunConfig(**TINY), store)
    assert result.status == "failed" and "numerical trouble" in result.error
    assert "Traceback" in result.traceback
    assert store.counts() == {"failed": 1}
    assert lookup(RunConfig(**TINY), store, RunOptions()) is None  # failures are never served as results


def test_interrupted_run_leaves_no_row_and_no_staging(store, monkeypatch):
    def interrupted(self, observation, budget, progress=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(DLG, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(RunConfig(**TINY), store)
    assert store.counts() == {}
    assert not store.artifacts_root.exists() or not any(store.artifacts_root.iterdir())


def test_unsupported_pair_is_stored_as_unsupported(store):
    result = run(RunConfig(**dict(TINY, attack="idlg", victim_batch=2)), store)
    assert result.status == "unsupported" and "one image only" in result.error


def test_attack_never_receives_the_victims_images(store, monkeypatch):
    seen = {}
    original = DLG.run

    def spy(self, observation, budget, progress=None):
        seen["observation"] = observation
        return original(self, observation, budget, progress)

    monkeypatch.setattr(DLG, "run", spy)
    result = run(RunConfig(**TINY), store)
    victim_id = result.info["victim_ids"][0]
    from privbench.datasets import load

    data = load("synthetic-mri", 16, 1)
    truth = data.images[data.ids.index(victim_id)]
    obs = seen["observation"]
    update = obs.gradient_update
    tensors = list(update.gradients) + list(update.model.parameters()) + list(update.model.buffers())
    assert all(t.shape != truth.shape and t.numel() != truth.numel() or not torch.equal(t.reshape(-1), truth.reshape(-1))
               for t in tensors)
    assert obs.model is None and obs.query is None
    assert victim_id not in obs.auxiliary.ids  # the attacker's population data never holds the victim
    assert update.round == "init"


def test_store_round_trip(store):
    original = RunResult(
        run_id="r1", created_at="2026-01-01T00:00:00", status="ok",
        config=RunConfig(model="lenet").to_dict(), config_hash="h", cache_key="c", request_key="q", privbench_version="0",
        metrics={"psnr": float("inf"), "ssim": 0.5, "lpips": None}, costs={"t": 1.0}, info={"a": [1, 2]},
        wall_time_s=1.5, grad_evals=3,
    )
    store.record(original)
    back = store.get("r1")
    assert back == original
    assert store.find_ok(cache_key="c").run_id == "r1" and store.find_ok(request_key="q").run_id == "r1"
    assert [r.run_id for r in store.recent()] == ["r1"]
    assert json.loads(json.dumps(back.to_dict(), default=str))["metrics"]["ssim"] == 0.5


def test_registry_lists_every_builtin_component():
    for reg in registry.ALL.values():
        for entry in reg.entries():
            assert entry.description, f"{reg.kind}/{entry.name} has no description"
