"""The dp defense: Opacus DP-SGD on the MODEL surfaces and the clipped-and-noised update on GRADIENTS.

Fast tests on synthetic-mri at 16x16 with one or two epochs.
"""

import importlib.util
import math
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from torch import nn

from privbench import registry
from privbench.config import ConfigError, RunConfig, coerce_params
from privbench.datasets import load
from privbench.datasets import splits as splitlib
from privbench.defenses.base import FitContext, client_gradients
from privbench.defenses.dp import (
    DPSGD,
    DPParams,
    FixedArchitectureTraining,
    calibrate_noise,
    dp_update,
    epsilon_for,
    fix_model,
)
from privbench.models import build_model
from privbench.runner import run
from privbench.store import Store
from privbench.threat import Surface, Victim

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread, as the runner uses

C = 0.5  # clipping bound used below


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    dataset = load("synthetic-mri", 16, 1, cache_dir=tmp_path_factory.mktemp("cache"))
    return splitlib.make(dataset, splitlib.SplitSpec(), seed=0)


def _ctx(parts, model="lenet", model_params=None, **config):
    cfg = RunConfig(defense="dp", image_size=16, model=model, model_params=model_params or {}, **config)
    seeds = cfg.derived_seeds()

    def fresh():
        return build_model(model, dict(cfg.model_params), 1, 16, parts.members.num_classes, seeds["init"])

    return FitContext(config=cfg, build_model=fresh, nonmembers=parts.nonmembers, seeds=seeds)


def _fit(parts, ctx=None, **params):
    """Fit dp on the first 120 members: one epoch, batch 30, clipping bound C, the fast RDP accountant unless given."""
    ctx = ctx or _ctx(parts)
    defense = DPSGD(DPParams(**{"epochs": 1, "batch_size": 30, "max_grad_norm": C, "accountant": "rdp", **params}))
    return defense, defense.fit(ctx.build_model(), _few(parts), ctx), ctx


def _few(parts):
    return parts.members.subset(range(120))


@pytest.fixture(scope="module")
def eps1(data):
    """dp at epsilon=1 (RDP), fitted once for the tests that only read it."""
    return _fit(data, epsilon=1.0)


def _victim(parts, n=1):
    return Victim(parts.members.images[:n], parts.members.labels[:n], parts.members.ids[:n])


def _flat(update):
    return torch.cat([g.reshape(-1) for g in update])


# -- parameters ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "given, named",
    [
        ({"epsilon": "0"}, "epsilon"),
        ({"epsilon": "-1"}, "epsilon"),
        ({"epsilon": "nan"}, "epsilon"),
        ({"max_grad_norm": "0"}, "max_grad_norm"),
        ({"max_grad_norm": "inf"}, "max_grad_norm"),
        ({"delta": "0"}, "delta"),
        ({"epochs": "0"}, "epochs"),
        ({"accountant": "gdp"}, "accountant"),
    ],
)

def test_bad_parameters_are_config_errors_naming_the_parameter(given, named):
    with pytest.raises(ConfigError, match=named):
        coerce_params(DPParams, given, "defense 'dp'")


def test_epsilon_inf_is_accepted_and_means_no_noise():
    assert coerce_params(DPParams, {"epsilon": "inf"}, "dp")["epsilon"] == math.inf
    assert calibrate_noise(math.inf, 1e-5, 0.1, 100, "prv") == 0.0


def test_missing_opacus_is_a_config_error_saying_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "opacus" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'opacus>=1\.5'"):
        DPSGD(DPParams())


def test_importing_the_module_does_not_import_opacus():
    code = "import sys, privbench.defenses.dp; assert 'opacus' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- accounting ----------------------------------------------------------------------


def test_prv_is_at_most_rdp_and_both_fall_as_noise_grows():
    q, steps, delta = 0.05, 200, 1e-5
    previous = {"prv": math.inf, "rdp": math.inf}
    for sigma in (0.7, 1.0, 1.5, 2.0):
        eps = {acc: epsilon_for(acc, sigma, q, steps, delta) for acc in ("prv", "rdp")}
        assert all(math.isfinite(e) and e > 0 for e in eps.values())
        assert eps["prv"] <= eps["rdp"]
        for acc in eps:
            assert eps[acc] < previous[acc]
        previous = eps


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_calibrated_noise_reaches_the_target_under_its_own_accountant(accountant):
    sigma = calibrate_noise(2.0, 1e-5, 0.05, 200, accountant)
    spent = epsilon_for(accountant, sigma, 0.05, 200, 1e-5)
    assert 1.95 <= spent <= 2.0
    assert spent < epsilon_for(accountant, 0.9 * sigma, 0.05, 200, 1e-5)  # less noise would overspend


def test_fit_stores_the_budget_spent_below_the_target_and_the_schedule(data):
    defense, target, _ = _fit(data, epsilon=2.0, epochs=2, batch_size=50, accountant="prv")
    costs, training = target.costs, target.training
    n = len(_few(data))
    assert 0 < costs["epsilon_spent"] <= 2.0
    assert costs["noise_multiplier"] > 0 and costs["delta"] == 1e-5
    assert costs["sample_rate"] == 1 / math.ceil(n / 50) and costs["steps"] == 2 * math.ceil(n / 50)
    assert costs["expected_batch_size"] == int(n * costs["sample_rate"])
    # the engine's accountant saw exactly the calibrated schedule
    assert training["accountant_history"] == [[costs["noise_multiplier"], costs["sample_rate"], costs["steps"]]]
    assert training["accountant"] == "prv" and training["module_changes"] == []
    assert 0 <= target.utility["accuracy"] <= 1 and costs["train_time_s"] > 0
    # reading the epsilon back with a fresh accountant gives the same number
    assert costs["epsilon_spent"] == pytest.approx(
        epsilon_for("prv", costs["noise_multiplier"], costs["sample_rate"], costs["steps"], 1e-5), rel=1e-6
    )


def test_fit_is_reproducible_from_the_seed(data):
    _, a, _ = _fit(data, epsilon=8.0)
    _, b, _ = _fit(data, epsilon=8.0)
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key])
    assert a.costs["epsilon_spent"] == b.costs["epsilon_spent"]


def test_delta_not_below_one_over_n_warns_and_is_recorded(data):
    with pytest.warns(UserWarning, match="not below 1/N"):
        _, target, _ = _fit(data, epsilon=math.inf, delta=0.01)  # 1/N = 1/120
    assert any("not below 1/N" in w for w in target.training["warnings"])


# -- the GRADIENTS mechanism -----------------------------------------------------------


def test_without_noise_each_per_sample_gradient_is_clipped_to_max_grad_norm(data):
    model = build_model("lenet", {}, 1, 16, 4, seed=1)
    images, labels = data.members.images[:4], data.members.labels[:4]
    bound, expected = 0.05, 10
    raw = [_flat(client_gradients(model, images[i : i + 1], labels[i : i + 1])) for i in range(4)]
    assert all(r.norm() > bound for r in raw)  # the bound is active for every sample
    kw = dict(noise_multiplier=0.0, max_grad_norm=bound, expected_batch_size=expected)
    singles = [_flat(dp_update(model, images[i : i + 1], labels[i : i + 1], **kw)) * expected for i in range(4)]
    for single, r in zip(singles, raw, strict=True):
        assert single.norm() <= bound * (1 + 1e-5)
        assert torch.nn.functional.cosine_similarity(single, r, dim=0) > 0.9999  # rescaled, not redirected
    # the batch update is the sum of the per-sample clipped gradients (not a clipped batch gradient)
    batch = _flat(dp_update(model, images, labels, **kw)) * expected
    torch.testing.assert_close(batch, torch.stack(singles).sum(0), rtol=1e-4, atol=1e-7)


def test_noise_std_is_noise_multiplier_times_bound_over_expected_batch(data):
    model = build_model("lenet", {}, 1, 16, 4, seed=1)
    images, labels = data.members.images[:3], data.members.labels[:3]
    sigma, expected = 1.5, 20
    clean = _flat(dp_update(model, images, labels, noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=expected))
    noisy = _flat(
        dp_update(model, images, labels, noise_multiplier=sigma, max_grad_norm=C, expected_batch_size=expected,
                  generator=torch.Generator().manual_seed(0))
    )
    noise = noisy - clean
    std = sigma * C / expected
    assert noise.numel() > 5000  # so the std estimate is within ~1% (1/sqrt(2n))
    assert noise.std().item() == pytest.approx(std, rel=0.05)
    assert abs(noise.mean().item()) < 5 * std / math.sqrt(noise.numel())


def test_gradients_observation_is_the_mechanism_with_the_calibrated_noise(data, eps1):
    defense, target, ctx = eps1
    victim = _victim(data)
    obs = defense.observe(Surface.GRADIENTS, target, victim, ctx)
    update = obs.gradient_update
    sigma, expected = target.costs["noise_multiplier"], target.costs["expected_batch_size"]
    assert obs.notes["noise_multiplier"] == sigma > 0 and obs.notes["expected_batch_size"] == expected
    # the attacker's model: a plain module at the init round, parameters aligned with the gradients
    assert type(update.model).__module__.split(".")[0] != "opacus"
    assert [p.shape for p in update.model.parameters()] == [g.shape for g in update.gradients]
    for key, value in update.model.state_dict().items():
        assert torch.equal(value, target.initial_state[key])
    kw = dict(max_grad_norm=C, expected_batch_size=expected)
    clean = _flat(dp_update(update.model, victim.images, victim.labels, noise_multiplier=0.0, **kw))
    noise = _flat(update.gradients) - clean
    assert noise.std().item() == pytest.approx(sigma * C / expected, rel=0.05)
    again = defense.observe(Surface.GRADIENTS, target, victim, ctx).gradient_update
    assert torch.equal(_flat(again.gradients), _flat(update.gradients))  # seeded from the run seed


def test_epsilon_inf_observation_is_the_clipped_gradient_only(data):
    defense, target, ctx = _fit(data, epsilon=math.inf)
    assert target.costs["noise_multiplier"] == 0 and target.costs["epsilon_spent"] == math.inf
    victim = _victim(data)
    update = defense.observe(Surface.GRADIENTS, target, victim, ctx).gradient_update
    raw = _flat(client_gradients(update.model, victim.images, victim.labels))
    shared = _flat(update.gradients) * target.costs["expected_batch_size"]
    assert shared.norm() <= C * (1 + 1e-5)
    torch.testing.assert_close(shared, raw * min(1.0, C / raw.norm().item()), rtol=1e-4, atol=1e-7)


def test_trained_round_uses_the_dp_trained_weights(data, eps1):
    defense, target, ctx = eps1
    ctx = replace(ctx, config=replace(ctx.config, gradient_round="trained"))
    update = defense.observe(Surface.GRADIENTS, target, _victim(data), ctx).gradient_update
    for key, value in update.model.state_dict().items():
        assert torch.equal(value, target.model.state_dict()[key])
    assert not torch.equal(target.model.state_dict()["fc.weight"], target.initial_state["fc.weight"])


def test_model_surfaces_release_the_dp_trained_model(data, eps1):
    defense, target, ctx = eps1
    whitebox = defense.observe(Surface.MODEL_WHITEBOX, target, _victim(data), ctx).model
    x = data.nonmembers.images[:5]
    torch.testing.assert_close(whitebox(x), target.model(x))
    query = defense.observe(Surface.MODEL_QUERIES, target, _victim(data), ctx).query
    torch.testing.assert_close(query(x), target.model(x))


# -- architecture: ModuleValidator.fix -------------------------------------------------


def test_batchnorm_model_is_fixed_recorded_and_shared_with_the_twin(data):
    ctx = _ctx(data, model="resnet", model_params={"width": 4})
    defense, target, ctx = _fit(data, ctx, epsilon=math.inf)
    assert any("BatchNorm2d -> GroupNorm" in c for c in target.training["module_changes"])
    assert target.costs["modules_replaced"] == len(target.training["module_changes"]) > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in target.model.modules())
    update = defense.observe(Surface.GRADIENTS, target, _victim(data), ctx).gradient_update
    assert any(isinstance(m, nn.GroupNorm) for m in update.model.modules())
    assert [p.shape for p in update.model.parameters()] == [g.shape for g in update.gradients]

    twin = defense.utility_twin()
    assert isinstance(twin, FixedArchitectureTraining) and twin.params.epochs == defense.params.epochs
    twin_target = twin.fit(ctx.build_model(), _few(data), ctx)
    assert [type(m) for m in twin_target.model.modules()] == [type(m) for m in target.model.modules()]
    for key, value in twin_target.initial_state.items():  # same architecture, same starting weights
        assert torch.equal(value, target.initial_state[key])


def test_twin_identity_does_not_depend_on_the_privacy_parameters():
    a = DPSGD(DPParams(epsilon=1.0)).utility_twin().identity()
    b = DPSGD(DPParams(epsilon=8.0, max_grad_norm=2.0, accountant="rdp")).utility_twin().identity()
    assert a == b and a != DPSGD(DPParams(epochs=3)).utility_twin().identity()


class _CustomNorm(nn.BatchNorm2d):
    """A BatchNorm subclass: Opacus's fixers match exact types, so it stays, running buffers and all."""


def test_model_opacus_cannot_fix_is_a_config_error():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), _CustomNorm(4), nn.Flatten(), nn.LazyLinear(4))
    with pytest.raises(ConfigError, match="cannot train this model with DP-SGD.*buffers"):
        fix_model(model)
    parametrized = nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="ModuleValidator.fix failed"):
        fix_model(nn.Sequential(parametrized))


# -- through the runner ------------------------------------------------------------------


def test_runner_stores_budget_and_accuracy_drop(bench_home):
    store = Store()
    config = RunConfig(
        defense="dp", attack="dlg", image_size=16, defense_params={"epochs": 1, "epsilon": 2, "accountant": "rdp"},
        attack_params={"steps": 3, "restarts": 1, "distance": "cosine"},
    )
    result = run(config, store)
    assert result.status == "ok", result.traceback
    row = store.get(result.run_id)
    assert 0 < row.costs["epsilon_spent"] <= 2 and row.costs["noise_multiplier"] > 0
    m = row.metrics
    assert m["accuracy_drop"] == pytest.approx(m["twin_accuracy"] - m["target_accuracy"])
    assert row.info["observation"]["noise_multiplier"] == row.costs["noise_multiplier"]
    assert registry.defenses.entry("dp").origin.source == "builtin"


def test_cached_dp_target_of_a_batchnorm_model_is_reused(bench_home):
    from privbench.config import RunConfig
    from privbench.runner import RunOptions, run
    from privbench.store import Store

    cfg = dict(defense="dp", model="resnet", image_size=16, attack_params={"steps": 2, "restarts": 1},
               defense_params={"epochs": 1, "epsilon": 8.0})
    first = run(RunConfig(**cfg), Store())
    assert first.status == "ok", first.error
    assert not first.info["target"]["cached"]
    again = run(RunConfig(**cfg), Store(), RunOptions(force=True))
    assert again.info["target"]["cached"] and again.info["twin"]["cached"]
    assert again.metrics["target_accuracy"] == first.metrics["target_accuracy"]
