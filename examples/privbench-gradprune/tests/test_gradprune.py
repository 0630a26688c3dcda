"""privbench-gradprune: the conformance kit, the pruning itself, training under pruning, and the installed plugin."""

from __future__ import annotations

import importlib.metadata as md

import pytest
import torch
from privbench_gradprune import GradientPruning, GradPruneParams, MaskedDLG, prune

from privbench import testing
from privbench.defenses.base import client_gradients, model_at_round
from privbench.testing import ConformanceError, fit_tiny, parametrize_with_checks
from privbench.threat import Surface


@parametrize_with_checks([testing.spec(GradientPruning, name="gradprune"),
                          testing.spec(MaskedDLG, name="dlg-gradprune")])
def test_conformance(component, check):
    check(component)


def test_prune_zeroes_exactly_the_smallest_fraction_of_each_layer():
    grads = (torch.tensor([[0.1, -3.0], [0.5, 2.0]]), torch.tensor([1.0, -2, 3, -4, 5, -6, 7, -8, 9, -10]))
    out = prune(grads, 0.5)
    assert torch.equal(out[0], torch.tensor([[0.0, -3.0], [0.0, 2.0]]))
    assert torch.equal(out[1], torch.tensor([0.0, 0, 0, 0, 0, -6, 7, -8, 9, -10]))
    assert all(torch.equal(a, b) for a, b in zip(prune(grads, 0.0), grads, strict=True))
    assert [int((g == 0).sum()) for g in prune(grads, 0.3)] == [1, 3]  # floor(0.3 n), not a rounding error less
    together = prune(grads, 0.5, scope="global")  # 7 of 14 entries, ranked across both tensors
    assert sum(int((g == 0).sum()) for g in together) == 7 and not together[0].any() and together[1][3] == -4


def test_params_refuse_a_fraction_outside_zero_to_one():
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="prune must be in"):
            GradPruneParams(prune=bad)


def _fit(prune_fraction: float):
    return fit_tiny(GradientPruning, params={"epochs": 1, "batch_size": 8, "prune": prune_fraction})


def test_the_shared_update_is_the_plain_update_pruned():
    defense, ctx, target, victim = _fit(0.9)
    update = defense.observe(Surface.GRADIENTS, target, victim, ctx).gradient_update
    plain = client_gradients(model_at_round(target, ctx.build_model, "init"), victim.images, victim.labels)
    assert all(torch.equal(a, b) for a, b in zip(update.gradients, prune(plain, 0.9), strict=True))
    assert update.rule.is_plain_mean and update.batch_size == len(victim.labels)


def test_training_prunes_every_step_and_prune_zero_is_the_twin():
    defense, _, target, _ = _fit(0.0)
    twin = defense.utility_twin()
    twin_target = fit_tiny(type(twin), params={"epochs": 1, "batch_size": 8})[2]  # the twin on the same problem
    state, twin_state = target.model.state_dict(), twin_target.model.state_dict()
    assert all(torch.equal(state[k], twin_state[k]) for k in state)  # same loop, order and optimizer
    pruned = _fit(0.99)[2]
    assert not torch.equal(pruned.model.state_dict()["fc.weight"], state["fc.weight"])
    assert pruned.training["gradient_pruning"]["prune"] == 0.99 and pruned.costs["update_density"] == pytest.approx(0.01)


def test_declaring_pruning_differentiable_fails_the_kit():
    liar = type("DifferentiablePruning", (GradientPruning,), {"differentiable": True})
    with pytest.raises(ConformanceError, match="must declare differentiable = False"):
        testing.check_defense_declares_differentiability(liar)


def test_the_adaptive_attack_masks_its_dummy_gradient_to_the_kept_entries():
    attack = MaskedDLG(MaskedDLG.Params(), seed=0)
    shared = (torch.tensor([0.0, 2.0, 0.0]),)
    assert float(attack.gradient_distance((torch.tensor([5.0, 2.0, -5.0]),), shared)) == 0.0
    assert float(attack.gradient_distance((torch.tensor([5.0, 1.0, -5.0]),), shared)) == 1.0


def test_the_installed_plugin_is_found_through_its_entry_points():
    try:
        dist = md.distribution("privbench-gradprune")
    except md.PackageNotFoundError:
        pytest.skip("privbench-gradprune is not installed (pip install -e examples/privbench-gradprune)")
    from privbench import registry

    entry = registry.defenses.entry("gradprune")
    assert entry.obj is GradientPruning
    assert (entry.origin.distribution, entry.origin.version) == ("privbench-gradprune", dist.version)
    assert registry.attacks.get("dlg-gradprune") is MaskedDLG
