"""Numeric parameters: every one declares its range, and a value outside it is exit 2 before anything runs.

Property-style over the registries: every numeric parameter of every registered built-in defense,
attack and model (and the run's own numeric fields) is given NaN, +-inf, 0, -1, a value just past its
declared bounds and a huge value. A value its declared range refuses must be a ConfigError from the
config parser and, through ``bench run``, exit 2 with no traceback and nothing stored.
"""

from __future__ import annotations

import dataclasses
import math
import sqlite3
import types
import typing

import pytest
from typer.testing import CliRunner

from privbench import registry
from privbench.cli import app
from privbench.config import Budget, ConfigError, RunConfig, coerce_params
from privbench.datasets.splits import SplitSpec
from privbench.params import Range, declared_range, problem

runner = CliRunner()
KINDS = {"defenses": "--defense-param", "attacks": "--attack-param", "models": "--model-param"}


def _numeric(tp: typing.Any) -> bool:
    """int / float, optionally in an Optional or a tuple."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType, tuple):
        return any(_numeric(a) for a in typing.get_args(tp) if a is not type(None) and a is not Ellipsis)
    return tp in (int, float)


def _is_int(tp: typing.Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType, tuple):
        return any(_is_int(a) for a in typing.get_args(tp))
    return tp is int


def _builtin_numeric_fields():
    """(kind, component name, Params class, field name, field type) of every built-in component."""
    out = []
    for kind in KINDS:
        for entry in registry.ALL[kind].entries():
            if entry.origin.source != "builtin":
                continue
            params_cls = entry.obj.Params
            hints = typing.get_type_hints(params_cls)
            for f in dataclasses.fields(params_cls):
                if _numeric(hints[f.name]):
                    out.append((kind, entry.name, params_cls, f.name, hints[f.name]))
    return out


FIELDS = _builtin_numeric_fields()
IDS = [f"{kind}:{name}.{field}" for kind, name, _, field, _ in FIELDS]


def _probes(spec: Range, is_int: bool) -> list[float | int]:
    """NaN, +-inf, 0, -1, huge, and the first values past each declared bound."""
    probes: list[float | int] = [math.nan, math.inf, -math.inf, 0, -1, 10**30, 1e300]
    step = 1 if is_int else 1e-9
    if spec.low is not None:
        probes.append(spec.low if spec.low_open else spec.low - step)
    if spec.high is not None:
        probes.append(spec.high if spec.high_open else spec.high + step)
    return [int(p) if is_int and isinstance(p, float) and math.isfinite(p) and p.is_integer() else p for p in probes]


def _text(value: float | int) -> str:
    return repr(value) if isinstance(value, float) else str(value)


class TestEveryNumericParameterDeclaresItsRange:
    def test_there_are_numeric_parameters_to_check(self):
        assert len(FIELDS) > 50
        assert {kind for kind, *_ in FIELDS} == set(KINDS)

    @pytest.mark.parametrize("kind,name,params_cls,field,tp", FIELDS, ids=IDS)
    def test_declared_and_bounded(self, kind, name, params_cls, field, tp):
        spec = declared_range(params_cls, field)
        assert spec is not None, f"{kind} {name}: parameter {field!r} declares no range (use privbench.params.bounded)"
        assert spec.low is not None, f"{kind} {name}: {field!r} has no lower bound"
        assert spec.high is not None, f"{kind} {name}: {field!r} has no upper bound"
        default = next(f.default for f in dataclasses.fields(params_cls) if f.name == field)
        assert problem(default, spec) is None, f"{kind} {name}: the default of {field!r} is outside its own range"

    @pytest.mark.parametrize("cls", [SplitSpec, Budget])
    def test_run_level_dataclasses_declare_bounded_ranges(self, cls):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if _numeric(hints[f.name]):
                spec = declared_range(cls, f.name)
                assert spec is not None and spec.low is not None and spec.high is not None, f.name


class TestOutOfRangeValuesAreConfigErrors:
    @pytest.mark.parametrize("kind,name,params_cls,field,tp", FIELDS, ids=IDS)
    def test_parser_refuses_what_the_range_refuses(self, kind, name, params_cls, field, tp):
        spec = declared_range(params_cls, field)
        for value in _probes(spec, _is_int(tp)):
            raw = _text(value)
            if typing.get_origin(tp) is tuple:
                raw = f"{raw},{raw}"
            if problem(value, spec) is None:
                continue  # inside the range (e.g. 0 for a weight >= 0): other rules may still apply
            with pytest.raises(ConfigError, match=field):
                coerce_params(params_cls, {field: raw}, f"{kind} {name!r}")

    def test_a_refused_value_names_the_parameter_its_range_and_the_value(self):
        from privbench.attacks.gradient_inversion import GradientInversionParams

        with pytest.raises(ConfigError, match=r"'lr' must be finite and in \(0, 10\^4\], got inf"):
            coerce_params(GradientInversionParams, {"lr": "inf"}, "attack 'dlg'")
        with pytest.raises(ConfigError, match=r"'tv_weight' must be a number, not NaN"):
            coerce_params(GradientInversionParams, {"tv_weight": "nan"}, "attack 'dlg'")
        with pytest.raises(ConfigError, match=r"'steps' must fit a signed 64-bit integer"):
            coerce_params(GradientInversionParams, {"steps": "99999999999999999999"}, "attack 'dlg'")

    def test_a_subclass_that_changes_a_default_keeps_the_base_range(self):
        from privbench.attacks.gradient_inversion import SNNDLGParams

        assert declared_range(SNNDLGParams, "eot_samples").low == 1
        with pytest.raises(ConfigError, match="eot_samples"):
            coerce_params(SNNDLGParams, {"eot_samples": "0"}, "attack 'dlg-snn'")

    def test_dp_epsilon_accepts_inf_but_not_nan_or_minus_inf(self):
        from privbench.defenses.dp import DPParams

        assert coerce_params(DPParams, {"epsilon": "inf"}, "defense 'dp'")["epsilon"] == math.inf
        for bad in ("nan", "-inf", "0", "2e6"):
            with pytest.raises(ConfigError, match="epsilon"):
                coerce_params(DPParams, {"epsilon": bad}, "defense 'dp'")


def _component_args(kind: str, name: str) -> list[str]:
    """``bench run`` arguments that select the component (a model with the defense that accepts any)."""
    if kind == "defenses":
        return ["--defense", name]
    if kind == "attacks":
        return ["--attack", name]
    return ["--defense", "none", "--model", name]


def _nothing_stored(home) -> None:
    db = home / "privbench.sqlite"
    if db.exists():
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0
    assert not list((home / "artifacts").glob("*")) if (home / "artifacts").exists() else True


class TestBenchRunExits2AndStoresNothing:
    """Through the CLI: every numeric parameter of every built-in component, NaN / inf / 0 / -1 / huge."""

    @pytest.mark.parametrize("kind,name,params_cls,field,tp", FIELDS, ids=IDS)
    def test_component_parameter(self, bench_home, kind, name, params_cls, field, tp):
        spec = declared_range(params_cls, field)
        tried = 0
        for value in (math.nan, math.inf, -math.inf, 0, -1, 10**30):
            if problem(value, spec) is None:
                continue
            raw = _text(value)
            result = runner.invoke(app, ["run", *_component_args(kind, name), KINDS[kind], f"{field}={raw}"])
            assert result.exit_code == 2, (field, raw, result.output)
            assert field in result.output and "Traceback" not in result.output, result.output
            tried += 1
        assert tried >= 4  # NaN, +-inf and huge are refused by every parameter
        _nothing_stored(bench_home)

    @pytest.mark.parametrize("args,message", [
        (["--image-size", "100000"], "image_size must be an integer in [4, 1024]"),
        (["--image-size", "3"], "image_size"),
        (["--image-size", "0"], "image_size"),
        (["--victim-batch", "0"], "victim_batch"),
        (["--victim-batch", "100000"], "victim_batch"),
        (["--seed", "99999999999999999999"], "seed must be an integer in [0, 2^63 - 1]"),
        (["--seed", "-1"], "seed"),
        (["--split-seed", str(2**63)], "split_seed"),
        (["--target-seed", "-5"], "target_seed"),
        (["--max-grad-evals", "0"], "max_grad_evals"),
        (["--max-grad-evals", "-3"], "max_grad_evals"),
        (["--max-grad-evals", str(10**13)], "max_grad_evals"),
        (["--threads", "0"], "--threads must be an integer in [1, 1024]"),
        (["--threads", "-2"], "--threads"),
        (["--threads", "100000"], "--threads"),
        (["--members", "0"], "members"),
        (["--nonmembers", "-1"], "nonmembers"),
        (["--auxiliary", str(10**10)], "auxiliary"),
        (["--channels", "2"], "channels"),
    ])
    def test_run_option(self, bench_home, args, message):
        result = runner.invoke(app, ["run", *args])
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split()) and "Traceback" not in result.output
        _nothing_stored(bench_home)

    @pytest.mark.parametrize("value", ["abc", "0", "-1", "1.5", "99999"])
    def test_privbench_threads_environment(self, bench_home, monkeypatch, value):
        monkeypatch.setenv("PRIVBENCH_THREADS", value)
        result = runner.invoke(app, ["run"])
        assert result.exit_code == 2, result.output
        assert "PRIVBENCH_THREADS" in result.output and "Traceback" not in result.output
        _nothing_stored(bench_home)


def test_run_config_checks_its_own_fields():
    for bad in (dict(image_size=1025), dict(seed=2**63), dict(victim_batch=True), dict(channels=True)):
        with pytest.raises(ConfigError):
            RunConfig(**bad)
    assert RunConfig(seed=2**63 - 1, image_size=1024).seed == 2**63 - 1
    with pytest.raises(ConfigError, match="max_grad_evals"):
        RunConfig.from_dict({"budget": {"max_grad_evals": 0}})
