"""The conformance kit (privbench.testing): every built-in passes it, it catches what it guards against, and broken
plugins fail with errors that name their distribution and entry point.

Fast: the kit's tiny problem (synthetic-mri:64 at 1x16x16); the whole built-in sweep takes well under a minute.
"""

from __future__ import annotations

import dataclasses
import json
import textwrap

import numpy as np
import pytest
from typer.testing import CliRunner

from privbench import cli, registry, testing
from privbench.attacks.gradient_inversion import DLG
from privbench.cli import app
from privbench.config import Budget
from privbench.defenses.none import NoDefense
from privbench.registry import DuplicateNameError, PluginLoadError
from privbench.testing import ConformanceError, parametrize_with_checks

pytestmark = pytest.mark.usefixtures("one_thread")


def _fake_medmnist(folder):
    """A MedMNIST-format file (train/val/test images and [N, 1] labels) for ``medmnist:kitmnist``."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 3).reshape(n, 1)
    np.savez(folder / "kitmnist.npz", **arrays)
    return "kitmnist", folder


# What the built-in datasets that read files load in the kit: a written image folder, a written MedMNIST file.
DATASET_SETUPS = {"imagefolder": testing.image_folder_setup, "brain-tumor-mri": testing.image_folder_setup,
                  "medmnist": _fake_medmnist}
KINDS = ("defenses", "attacks", "datasets", "models")
BUILTINS = [testing.spec(registry.ALL[kind].entry(name), setup=DATASET_SETUPS.get(name) if kind == "datasets" else None)
            for kind in KINDS for name in registry.ALL[kind].builtin_names()]
# Built-ins that fail a check, and why (each test stays xfail(strict=True) until the component is fixed).
EXPECTED_FAILURES: dict[str, str] = {}


@parametrize_with_checks(BUILTINS, expected_failures=EXPECTED_FAILURES)
def test_builtin_conforms(component, check):
    check(component)


def test_every_builtin_of_every_kind_is_in_the_sweep():
    checked = {(s.kind, s.name) for s in BUILTINS}
    for kind in KINDS:
        assert {(kind, name) for name in registry.ALL[kind].builtin_names()} <= checked


# -- the kit's own checks catch what they guard against -------------------------------------------------------


def _fails(check, component, *fragments):
    with pytest.raises(ConformanceError) as info:
        check(component)
    message = str(info.value)
    assert check.__name__ in message and all(f in message for f in fragments), message
    return message


class MutatingDefense(NoDefense):
    """Plain training that scribbles on the members it trains on."""

    def fit(self, model, members, ctx):
        members.images[0].mul_(0.5)
        return super().fit(model, members, ctx)


class GlobalRandomDefense(NoDefense):
    """Plain training that re-draws the weights from torch's global RNG: not reproducible from its seeds."""

    def fit(self, model, members, ctx):
        import torch

        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        return super().fit(model, members, ctx)


class SignOnlyDefense(NoDefense):
    """Shares only the signs of the update but declares itself differentiable (a gradient attack cannot follow)."""

    def observe(self, surface, target, victim, ctx):
        observation = super().observe(surface, target, victim, ctx)
        if observation.gradient_update is None:
            return observation
        update = dataclasses.replace(observation.gradient_update,
                                     gradients=tuple(g.sign() for g in observation.gradient_update.gradients))
        return dataclasses.replace(observation, gradient_update=update)


def test_the_kit_catches_a_defense_that_mutates_its_data():
    _fails(testing.check_defense_does_not_mutate_inputs, MutatingDefense, "fit changed the data it was handed: members")
    # the kit handed a copy: the shared tiny problem is intact for the checks that follow
    testing.check_defense_does_not_mutate_inputs(NoDefense)


def test_the_kit_catches_a_defense_that_draws_from_global_randomness():
    _fails(testing.check_defense_determinism, GlobalRandomDefense, "differ between two fits with the same seeds")


def test_the_kit_catches_an_undeclared_non_differentiable_defense():
    _fails(testing.check_defense_declares_differentiability, SignOnlyDefense, "differentiable = False")
    testing.check_defense_declares_differentiability(type("Declared", (SignOnlyDefense,), {"differentiable": False}))


class DataReadingAttack(DLG):
    """DLG that peeks at the dataset registry (where the truth lives)."""

    def run(self, observation, budget, progress=None):
        from privbench.datasets import load

        try:
            load("synthetic-mri:8", 16, 1)
        except RuntimeError:
            pass  # swallowing the refusal does not hide the access
        return super().run(observation, budget, progress)


class BudgetBlindAttack(DLG):
    """DLG that drops the budget it is given."""

    def run(self, observation, budget, progress=None):
        return super().run(observation, Budget(), progress)


class CrashingAttack(DLG):
    """DLG that does not check which surface it was handed."""

    def run(self, observation, budget, progress=None):
        observation.gradient_update.model  # noqa: B018 -- AttributeError on any other surface
        return super().run(observation, budget, progress)


class UnseededAttack(DLG):
    """DLG whose random start ignores its seed."""

    def run(self, observation, budget, progress=None):
        self.seed = int(np.random.default_rng().integers(1 << 30))
        return super().run(observation, budget, progress)


def test_the_kit_catches_an_attack_that_reads_the_dataset_registry():
    _fails(testing.check_attack_reads_only_its_observation, DataReadingAttack, "the dataset registry")


def test_the_kit_catches_an_attack_that_ignores_its_budget():
    _fails(testing.check_attack_respects_budget, BudgetBlindAttack, "Budget(max_grad_evals=")


def test_the_kit_catches_an_attack_that_crashes_on_another_surface():
    _fails(testing.check_attack_refuses_other_surfaces, CrashingAttack, "AttributeError", "expected AttackError")


def test_the_kit_catches_an_attack_that_ignores_its_seed():
    _fails(testing.check_attack_determinism, UnseededAttack, "same seed give different outputs")


@dataclasses.dataclass(frozen=True)
class NoDefaultParams:
    steps: int  # no default


@dataclasses.dataclass(frozen=True)
class CrashingParams:
    steps: int = 3

    def __post_init__(self):
        if self.steps < 0:
            raise RuntimeError("negative")  # not a ValueError: escapes the config layer as a bare exception


def test_the_kit_catches_bad_parameter_classes():
    no_default = type("NoDefaultDLG", (DLG,), {"Params": NoDefaultParams, "tiny_params": {}})
    _fails(testing.check_params_round_trip, no_default, "has no default")
    crashing = type("CrashingDLG", (DLG,), {"Params": CrashingParams, "tiny_params": {}})
    _fails(testing.check_bad_params_raise_config_error, crashing, "steps='-1' raises RuntimeError",
           "expected ConfigError")
    _fails(testing.check_bad_params_raise_config_error, type("Stale", (DLG,), {"Params": CrashingParams}),
           "its tiny_params are refused", "'restarts'")


def test_ids_select_one_check_and_expected_failures_are_strict():
    mark = parametrize_with_checks([NoDefense, DLG], expected_failures={
        "check_defense_utility_twin": "a reason", "dlg-check_attack_determinism": "another"})
    names, params = mark.args
    ids = [p.id for p in params]
    assert names == ("component", "check")
    assert "none-check_defense_observations_leak_nothing" in ids and "dlg-check_attack_respects_budget" in ids
    assert len(ids) == len(set(ids)) == len(testing.DEFENSE_CHECKS) + len(testing.ATTACK_CHECKS)
    xfails = {p.id: p.marks[0] for p in params if p.marks}
    assert set(xfails) == {"none-check_defense_utility_twin", "dlg-check_attack_determinism"}
    assert all(m.kwargs["strict"] and m.kwargs["raises"] is ConformanceError for m in xfails.values())
    assert xfails["none-check_defense_utility_twin"].kwargs["reason"] == "a reason"


def test_run_checks_reports_each_check_and_lists_every_failure():
    report = testing.check_model(registry.models.entry("lenet"))
    assert set(report) == {c.__name__ for c in testing.MODEL_CHECKS} and set(report.values()) == {"passed"}
    with pytest.raises(ConformanceError, match=r"1 conformance check\(s\) failed:\n.*check_defense_determinism"):
        testing.check_defense(GlobalRandomDefense)
    report = testing.check_defense(GlobalRandomDefense, expected_failures={"check_defense_determinism": "known"})
    assert report["check_defense_determinism"] == "expected failure: known"


# -- broken plugins: each error names the distribution and the entry point -----------------------------------------

RAISES_ON_IMPORT = "raise RuntimeError('the plugin is broken on purpose')\n"
LEAKY = textwrap.dedent('''
    import dataclasses

    from privbench.defenses.none import NoDefense


    class LeakyDefense(NoDefense):
        """Plain training whose shared update carries the client's images "for debugging"."""

        description = "Leaks the victim's images into its GRADIENTS observation."

        def observe(self, surface, target, victim, ctx):
            observation = super().observe(surface, target, victim, ctx)
            if victim is None:
                return observation
            return dataclasses.replace(observation, notes={**observation.notes, "debug": victim.images.clone()})
''')
PLAIN = textwrap.dedent('''
    from privbench.defenses.none import NoDefense


    class PlainPlugin(NoDefense):
        """Plain training, shipped as a plugin."""

        description = "Plain training, shipped as a plugin."
''')


def test_a_plugin_that_raises_on_import_names_its_distribution_and_entry_point(plugin_site, bench_home, monkeypatch):
    plugin_site.install("privbench-broken", "0.1", {"privbench.defenses": {"broken": "privbench_broken:Broken"}},
                        {"privbench_broken/__init__.py": RAISES_ON_IMPORT})
    plugin_site.install("privbench-plain", "0.3", {"privbench.defenses": {"plainplug": "privbench_plain:PlainPlugin"}},
                        {"privbench_plain.py": PLAIN})
    with pytest.raises(PluginLoadError) as info:
        registry.defenses.get("broken")
    message = str(info.value)
    for fragment in ("'broken'", "privbench-broken 0.1", "entry point broken = privbench_broken:Broken",
                     "RuntimeError: the plugin is broken on purpose", "--no-plugins"):
        assert fragment in message, message
    monkeypatch.setattr(cli.console, "width", 400)
    runner = CliRunner()
    listing = runner.invoke(app, ["list", "defenses"])
    assert listing.exit_code == 0, listing.output
    assert "plugin privbench-plain 0.3 (entry point plainplug = privbench_plain:PlainPlugin)" in listing.output
    assert "plugins that cannot be used" in listing.output and "privbench-broken 0.1" in listing.output
    run = runner.invoke(app, ["run", "--defense", "broken"])
    assert run.exit_code == 2 and "privbench-broken 0.1" in run.output and "Traceback" not in run.output
    ok = runner.invoke(app, ["run", "--defense", "plainplug", "--image-size", "16", "--defense-param", "epochs=1",
                             "--attack-param", "steps=2", "--attack-param", "restarts=1", "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["info"]["versions"]["plugin:privbench-plain"] == "0.3"  # the row records it
    quiet = runner.invoke(app, ["--no-plugins", "list", "defenses"])
    assert quiet.exit_code == 0 and "broken" not in quiet.output and "plainplug" not in quiet.output


def test_a_plugin_taking_a_taken_name_names_both_origins_wherever_the_name_is_used(plugin_site, bench_home):
    plugin_site.install("privbench-dup", "0.2", {"privbench.defenses": {"none": "privbench_dup:PlainPlugin",
                                                                         "twice": "privbench_dup:PlainPlugin"}},
                        {"privbench_dup.py": PLAIN})
    plugin_site.install("privbench-dup-two", "1.0", {"privbench.defenses": {"twice": "privbench_dup:PlainPlugin"}}, {})
    for name, first in (("none", "built-in (privbench.defenses.none)"),
                        ("twice", "plugin privbench-dup 0.2 (entry point twice = privbench_dup:PlainPlugin)")):
        with pytest.raises(DuplicateNameError) as info:
            registry.defenses.get(name)
        message = str(info.value)
        assert f"'{name}' is registered twice" in message and first in message, message
        assert "entry point" in message and "pip uninstall" in message and "--no-plugins" in message
    assert "privbench-dup-two 1.0" in str(pytest.raises(DuplicateNameError, registry.defenses.get, "twice").value)
    assert registry.defenses.get("dp").registry_name == "dp"  # the other names keep working
    runner = CliRunner()
    clash = runner.invoke(app, ["run", "--defense", "none", "--image-size", "16"])
    assert clash.exit_code == 2 and "privbench-dup 0.2" in clash.output
    fine = runner.invoke(app, ["--no-plugins", "run", "--defense", "none", "--image-size", "16", "--defense-param",
                               "epochs=1", "--attack-param", "steps=2", "--attack-param", "restarts=1"])
    assert fine.exit_code == 0, fine.output


def test_a_plugin_that_leaks_the_victims_images_is_caught_by_the_kit(plugin_site):
    plugin_site.install("privbench-leaky", "0.1", {"privbench.defenses": {"leaky": "privbench_leaky:LeakyDefense"}},
                        {"privbench_leaky.py": LEAKY})
    entry = registry.defenses.entry("leaky")  # it loads: nothing but the kit can tell it is wrong
    message = _fails(testing.check_defense_observations_leak_nothing, entry,
                     "defense 'leaky' (plugin privbench-leaky 0.1 (entry point leaky = privbench_leaky:LeakyDefense))",
                     "victim image 0 at observation.notes['debug']")
    assert "gradients (round=init)" in message
    with pytest.raises(ConformanceError, match="check_defense_observations_leak_nothing"):
        testing.check_defense(entry)


def test_a_plugin_loading_something_that_is_no_component_names_it(plugin_site):
    plugin_site.install("privbench-odd", "0.1", {"privbench.attacks": {"odd": "privbench_odd:thing"}},
                        {"privbench_odd.py": "thing = 42\n"})
    with pytest.raises(PluginLoadError, match=r"privbench-odd 0\.1 .*loads 42, which is not a subclass of "
                                              r"privbench\.attacks\.base\.Attack"):
        registry.attacks.get("odd")
