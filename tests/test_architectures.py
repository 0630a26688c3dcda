"""One shared architecture: every built-in defense declares the models it runs on and its default,
refuses an impossible combination saying why and which model to use, and runs ``dlg`` on convnet and
resnet end to end through ``bench run``.

Fast: synthetic-mri at 16x16, tiny training and attack budgets (each run a few seconds).
"""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from privbench import registry
from privbench.cli import app
from privbench.config import ConfigError
from privbench.defenses.base import check_model
from privbench.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

BUILTIN = ("none", "dp", "mple", "he", "gascnn")
SHARED = ("convnet", "resnet")  # every built-in defense runs on both


@pytest.mark.parametrize("name", BUILTIN)
def test_every_defense_declares_its_models_and_a_default_among_them(name):
    cls = registry.defenses.get(name)
    assert cls.default_model in registry.models.names()
    assert cls.models is None or (cls.default_model in cls.models and set(cls.models) <= set(registry.models.names()))
    for model in (cls.default_model, *SHARED):
        check_model(cls, model)


def test_default_models_are_the_declared_ones():
    defaults = {name: registry.defenses.get(name).default_model for name in BUILTIN}
    assert defaults == {"none": "lenet", "dp": "lenet", "mple": "convnet", "he": "lenet", "gascnn": "resnet"}
    assert registry.defenses.get("none").models is None and registry.defenses.get("he").models is None


@pytest.mark.parametrize("defense, model, why, use", [
    ("mple", "lenet", "stride 2", r"Use --model convnet \(its default\), --model vgg or --model resnet\.$"),
    ("mple", "capsnet", "stride-1", "--model convnet"),
    ("gascnn", "lenet", None, r"--model resnet \(its default\)"),
])
def test_an_impossible_combination_says_why_and_which_model_to_use(defense, model, why, use):
    with pytest.raises(ConfigError, match=f"defense '{defense}' cannot run on model '{model}'") as info:
        check_model(registry.defenses.get(defense), model)
    assert why is None or why in str(info.value)
    assert re.search(use, str(info.value))


def test_opacus_can_train_every_built_in_model_dp_accepts():
    pytest.importorskip("opacus")
    from privbench.defenses.dp import fix_model

    assert registry.defenses.get("dp").models is None  # Opacus's validators decide, for plugins too
    for model in registry.models.names():
        fix_model(build_model(model, {}, 1, 32, 4, seed=0))  # raises ConfigError if Opacus cannot train it


# -- every built-in defense x (convnet, resnet) through `bench run` ---------------------------------

TINY_DEFENSE = {
    "none": ["epochs=1"],
    "dp": ["epochs=1"],
    "mple": ["epochs=1"],
    "he": ["rounds=2"],
    "gascnn": ["epochs=1", "synthesis_steps=3", "synthetic_size=40", "timesteps=4", "finetune_epochs=1", "curve=",
               "percentile=99.9"],
}
GRID = [(defense, model) for defense in BUILTIN for model in SHARED]


@pytest.mark.usefixtures("bench_home")
@pytest.mark.parametrize("defense, model", GRID)
def test_bench_run_dlg_on_the_shared_models(defense, model):
    args = ["run", "--defense", defense, "--attack", "dlg", "--model", model, "--image-size", "16",
            "--attack-param", "steps=3", "--attack-param", "restarts=1"]
    for param in TINY_DEFENSE[defense]:
        args += ["--defense-param", param]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
