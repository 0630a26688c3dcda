"""A component whose library is missing exits 2 before anything is trained, with the exact install command."""

import re
import shlex
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from privbench import deps
from privbench.cli import app
from privbench.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

# (what, bench run arguments, the module hidden, the exact command the output must hold)
CASES = [
    ("dp", ["--defense", "dp"], "opacus", "pip install 'opacus>=1.5'"),
    ("gascnn", ["--defense", "gascnn", "--model", "resnet"], "snntorch", "pip install 'snntorch>=0.9'"),
    ("he ckks", ["--defense", "he"], "tenseal", "pip install 'tenseal>=0.3'"),
    ("he paillier", ["--defense", "he", "--defense-param", "scheme=paillier"], "phe", "pip install 'phe>=1.5'"),
    ("shadow", ["--attack", "shadow"], "art", "pip install 'adversarial-robustness-toolbox>=1.17'"),
    ("shadow models", ["--attack", "shadow"], "sklearn", "pip install 'scikit-learn>=1.3'"),
]


def _no_training(monkeypatch):
    from privbench.defenses.base import Defense
    from privbench.defenses.none import NoDefense

    def fail(*args, **kwargs):
        raise AssertionError("a target was trained before the missing library was reported")

    monkeypatch.setattr(NoDefense, "fit", fail)
    for cls in Defense.__subclasses__():
        monkeypatch.setattr(cls, "fit", fail)


@pytest.mark.parametrize("what, args, module, command", CASES, ids=[c[0] for c in CASES])
def test_a_missing_library_exits_2_with_the_exact_install_command(what, args, module, command, bench_home, monkeypatch):
    from privbench.store import Store

    monkeypatch.setitem(sys.modules, module, None)  # the import fails, and find_spec finds nothing
    _no_training(monkeypatch)
    result = runner.invoke(app, ["run", *args, "--image-size", "16"])
    assert result.exit_code == 2, result.output
    assert command in result.output  # one line, brackets and quotes as printed
    assert re.findall(r"pip install '[^']*'", result.output) == [command]
    assert "Traceback" not in result.output
    assert Store().counts() == {}  # nothing was stored


def test_medmnist_without_its_file_names_the_package_and_its_install_command(bench_home, tmp_path):
    result = runner.invoke(app, ["run", "--dataset", "medmnist:pathmnist", "--data-root", str(tmp_path),
                                 "--image-size", "28"])
    assert result.exit_code == 2, result.output
    assert "pip install 'medmnist>=3'" in result.output and "--allow-download" in result.output


def test_error_messages_print_brackets_as_written(bench_home, monkeypatch):
    from privbench.defenses.none import NoDefense

    def refuse(self, params):
        raise ConfigError("install the extra: pip install 'privbench[medmnist]' [or see bench doctor]")

    monkeypatch.setattr(NoDefense, "__init__", refuse)
    result = runner.invoke(app, ["run", "--image-size", "16"])
    assert result.exit_code == 2
    assert "pip install 'privbench[medmnist]' [or see bench doctor]" in result.output


def test_the_install_command_is_a_shell_command_naming_the_declared_requirement():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = set(project["dependencies"]) | {r for extra in project["optional-dependencies"].values() for r in extra}
    for module, requirement in deps.REQUIREMENTS.items():
        assert requirement in declared, f"{module}: {requirement} is not what pyproject.toml declares"
        assert shlex.split(deps.install_command(module)) == ["pip", "install", requirement]


def test_every_library_a_built_in_component_needs_is_a_core_dependency():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {re.split(r"[<>=!~ ]", r, maxsplit=1)[0] for r in project["dependencies"]}
    for name in ("torch", "snntorch", "opacus", "adversarial-robustness-toolbox", "scikit-learn", "pytorch-fid",
                 "lpips", "pandas", "seaborn", "tenseal", "phe", "gmpy2"):
        assert name in core
    # extras are optional machinery only: downloading MedMNIST, running suites on a Dask cluster, tests, lint
    assert set(project["optional-dependencies"]) == {"medmnist", "dask", "test", "lint"}


def test_require_names_the_purpose_and_the_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "snntorch", None)
    assert deps.missing("snntorch") and not deps.missing("json")
    with pytest.raises(deps.MissingLibrary) as info:
        deps.require("snntorch", "the gascnn defense")
    assert isinstance(info.value, ConfigError)
    assert str(info.value).startswith("the gascnn defense needs the Python module 'snntorch'")
    assert str(info.value).endswith("Install it with: pip install 'snntorch>=0.9'")
    assert info.value.command == "pip install 'snntorch>=0.9'"
