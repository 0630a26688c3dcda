"""The CLI's exits: 2 with a clear message and no traceback for bad input."""

import json

import pytest
from typer.testing import CliRunner

from privbench import cli
from privbench.cli import app

runner = CliRunner()
TINY = ["--image-size", "16", "--attack-param", "steps=5", "--attack-param", "restarts=1", "--defense-param", "epochs=1"]


def invoke(*args):
    return runner.invoke(app, list(args))


@pytest.mark.usefixtures("bench_home")
def test_unknown_defense_exits_2_with_suggestions():
    result = invoke("run", "--defense", "nope", "--attack", "dlg")
    assert result.exit_code == 2
    assert "unknown defense 'nope'" in result.output and "none" in result.output
    assert "Traceback" not in result.output


@pytest.mark.usefixtures("bench_home")
def test_unknown_attack_suggests_close_name():
    result = invoke("run", "--attack", "dgl")
    assert result.exit_code == 2 and "Did you mean 'dlg'" in result.output


@pytest.mark.usefixtures("bench_home")
def test_ill_typed_attack_param_exits_2_naming_the_parameter():
    result = invoke("run", "--attack-param", "steps=abc")
    assert result.exit_code == 2
    assert "'steps' expects int, got 'abc'" in result.output and "Traceback" not in result.output


@pytest.mark.usefixtures("bench_home")
def test_missing_data_root_exits_2_naming_the_path(tmp_path):
    missing = tmp_path / "no-such-folder"
    result = invoke("run", "--dataset", "brain-tumor-mri", "--data-root", str(missing))
    assert result.exit_code == 2 and str(missing) in result.output.replace("\n", "")
    assert "Traceback" not in result.output


@pytest.mark.usefixtures("bench_home")
def test_run_json_then_cached(monkeypatch):
    monkeypatch.setattr(cli.console, "width", 200)
    first = invoke("run", *TINY, "--json")
    assert first.exit_code == 0, first.output
    row = json.loads(first.output)
    assert row["status"] == "ok" and row["metrics"]["psnr"] > 0 and not row["cached"]
    second = json.loads(invoke("run", *TINY, "--json").output)
    assert second["cached"] and second["run_id"] == row["run_id"]
    table = invoke("run", *TINY)
    assert "psnr" in table.output and "baseline" in table.output and "stored result" in table.output
    listing = invoke("runs")
    assert row["run_id"][:15] in listing.output and "ok: 1" in listing.output


def test_list_shows_components_and_origins():
    result = invoke("list")
    assert result.exit_code == 0
    for name in ("none", "dlg", "idlg", "invgrad", "synthetic-mri", "brain-tumor-mri", "lenet", "resnet", "psnr"):
        assert name in result.output
    assert "built-in" in result.output
    assert invoke("list", "attackz").exit_code == 2


def test_dp_bad_input_exits_2_and_stores_nothing(bench_home, monkeypatch):
    from dataclasses import dataclass

    from torch import nn

    from privbench import registry
    from privbench.store import Store

    @dataclass(frozen=True)
    class NoParams:
        pass

    class Unfixable:
        """Spectral norm keeps buffers in a trainable Linear, which Opacus's fixers do not replace."""

        Params = NoParams

        @staticmethod
        def build(params, channels, image_size, num_classes):
            linear = nn.Linear(channels * image_size * image_size, num_classes)
            return nn.Sequential(nn.Flatten(), nn.utils.spectral_norm(linear))

    entry = registry.Entry("unfixable", Unfixable, registry.Origin("builtin", __name__))
    monkeypatch.setitem(registry.models._entries, "unfixable", entry)
    dp = ["run", "--defense", "dp", "--attack", "dlg", *TINY]
    cases = [
        (["--defense-param", "epsilon=0"], "'epsilon' must be in (0, 10^6] (or inf)"),
        (["--defense-param", "epsilon=-1"], "'epsilon' must be in (0, 10^6] (or inf)"),
        (["--defense-param", "max_grad_norm=0"], "'max_grad_norm' must be in (0,"),
        (["--model", "unfixable"], "cannot train this model with DP-SGD"),
    ]
    for extra, message in cases:
        result = invoke(*dp, *extra)
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert Store().counts() == {}


@pytest.mark.usefixtures("bench_home")
def test_a_membership_run_prints_its_familys_metrics_in_run_and_runs(monkeypatch):
    monkeypatch.setattr(cli.console, "width", 250)  # a wide terminal: rich wraps table cells to the width
    args = ["run", "--attack", "loss-threshold", "--image-size", "16", "--defense-param", "epochs=1"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "auc" in result.output and "balanced_accuracy" in result.output and "psnr" not in result.output
    listing = invoke("runs")
    assert "auc" in listing.output and "loss-threshold" in listing.output


@pytest.mark.usefixtures("bench_home")
def test_a_shadow_count_the_auxiliary_data_cannot_support_exits_2_before_training(monkeypatch):
    from privbench.defenses.none import NoDefense

    def no_training(*args, **kwargs):
        raise AssertionError("the target was trained before the input was checked")

    monkeypatch.setattr(NoDefense, "fit", no_training)
    result = invoke("run", "--attack", "shadow", "--image-size", "16", "--attack-param", "shadows=500")
    assert result.exit_code == 2 and "Ask for fewer shadows" in result.output


def test_run_defaults_are_the_run_configs():
    import inspect

    from privbench.config import RunConfig

    defaults = {name: p.default for name, p in inspect.signature(cli.run).parameters.items()}
    config = RunConfig()
    for name in ("defense", "attack", "dataset", "model", "image_size", "channels", "seed", "split_seed",
                 "target_seed", "gradient_round", "victim_batch"):
        assert defaults[name] == getattr(config, name), name
