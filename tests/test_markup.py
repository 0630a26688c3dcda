"""Text from users, files, plugins and the store is printed as written, never read as rich markup.

Each hostile string (closing tags that would crash rich, style tags that would be eaten, emoji codes,
links, a trailing backslash that would escape a following tag) is put in each place outside text
enters: a data folder's path, component names, a stored error, a store path, a plugin's description,
a stored row, a stage name. Every command must exit as it would for plain text, print the string
literally and never show a traceback.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from privbench import cli, registry
from privbench.cli import app
from privbench.store import Store

runner = CliRunner()
HOSTILE = ["[/i]", "[red]x[/red]", "[/x]", ":smile:", "[link=file:///etc/passwd]y[/link]", "end\\", "[bold]b"]
TINY = ["--image-size", "16", "--attack-param", "steps=3", "--attack-param", "restarts=1",
        "--defense-param", "epochs=1"]


@pytest.fixture(autouse=True)
def wide(monkeypatch):
    """Wide consoles, so that no line or table cell is wrapped and a literal string can be found whole."""
    for console in (cli.console, cli.err_console):
        monkeypatch.setattr(console, "width", 2000)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _folder(root, n_per_class=12):
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(root / label / f"{i}.png")
    return root


@pytest.mark.parametrize("text", ["[/i]", "[red]x[/red]", ":smile:", "end\\"])
def test_a_data_folder_named_with_markup_runs_and_lists(bench_home, tmp_path, text):
    root = _folder(tmp_path / f"data-{text}")
    run = invoke("run", "--dataset", f"imagefolder:{root}", *TINY)
    assert run.exit_code == 0, run.output
    assert str(root) in run.output and "Traceback" not in run.output
    for _ in range(2):  # every later listing too
        listing = invoke("runs")
        assert listing.exit_code == 0, listing.output
        assert str(root) in listing.output


@pytest.mark.parametrize("text", HOSTILE)
@pytest.mark.parametrize("option", ["--defense", "--attack", "--model", "--dataset"])
def test_a_component_name_with_markup_exits_2_and_is_printed_as_written(bench_home, option, text):
    result = invoke("run", option, text)
    assert result.exit_code == 2, result.output
    named = text.split(":", 1)[0] if option == "--dataset" else text  # a dataset is named <source>:<argument>
    assert named in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("text", HOSTILE)
def test_a_stored_error_is_printed_as_written(bench_home, monkeypatch, text):
    from privbench.attacks.gradient_inversion import DLG

    def boom(self, observation, budget, progress=None):
        raise RuntimeError(f"boom {text} boom")

    monkeypatch.setattr(DLG, "run", boom)
    result = invoke("run", *TINY)
    assert result.exit_code == 1, result.output
    assert f"boom {text} boom" in result.output and "Traceback" not in result.output
    listing = invoke("runs")
    assert listing.exit_code == 0 and "failed" in listing.output


@pytest.mark.parametrize("text", HOSTILE)
def test_a_store_path_with_markup_is_named_as_written(tmp_path, text):
    path = tmp_path / f"store-{text}.sqlite"
    result = invoke("runs", "--store", path)
    assert result.exit_code == 2 and str(path) in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("text", HOSTILE)
def test_stored_rows_with_markup_in_every_column_list(bench_home, text):
    from privbench.config import RunConfig
    from privbench.store import RunResult

    config = {**RunConfig().to_dict(), "defense": f"d{text}", "attack": f"a{text}", "dataset": f"s{text}",
              "model": f"m{text}"}
    Store().record(RunResult(run_id="r1", created_at="2026-01-01T00:00:00", status="ok", config=config,
                             config_hash="h", cache_key="c", request_key="q", privbench_version="0",
                             metrics={f"psnr{text}": 1.0}))
    listing = invoke("runs")
    assert listing.exit_code == 0, listing.output
    for value in (f"d{text}", f"a{text}", f"s{text}", f"m{text}"):
        assert value in listing.output


@pytest.mark.parametrize("text", HOSTILE)
def test_a_plugins_description_is_printed_as_written(monkeypatch, text):
    class Hostile:
        description = f"plugin {text} description"

    entry = registry.Entry(f"hostile{text}", Hostile, registry.Origin("builtin", __name__))
    monkeypatch.setitem(registry.attacks._entries, f"hostile{text}", entry)
    result = invoke("list", "attacks")
    assert result.exit_code == 0, result.output
    assert f"plugin {text} description" in result.output and f"hostile{text}" in result.output


@pytest.mark.parametrize("text", HOSTILE)
def test_a_stage_name_with_markup_in_the_progress_bar(text):
    from privbench.stages import BarSink, StageTracker

    console = Console(record=True, width=500, force_terminal=True, markup=False, emoji=False, highlight=False)
    tracker = StageTracker()
    with BarSink(console) as sink:
        tracker.sinks.append(sink)
        tracker(f"stage {text}", 1, 2)
        tracker(f"stage {text}", 2, 2)
        tracker.close("done")
    assert f"stage stage {text} done in" in console.export_text()
