"""Leaderboard and report over a store of synthetic rows: sort order, worst case, flags, intervals, failed
rows counted and never averaged in, escaping, the CLI's exits, the rendered report in headless Chromium."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from privbench import leaderboard, report
from privbench.cli import app
from privbench.store import Store, loads
from privbench.views.rows import select
from privbench.views.stats import BOOTSTRAP_B, BOOTSTRAP_SEED
from privbench.views.synthetic import make_row

SEEDS = range(4)
ROOT = Path(__file__).resolve().parents[1]


def _record(store: Store, rows) -> None:
    for r in rows:
        store.record(r)


def _scenario(store: Store) -> None:
    rows = []
    k = 0

    def add(defense, attack, strength, *, seeds=SEEDS, **kw):
        nonlocal k
        for s in seeds:
            rows.append(make_row(defense, attack, s, strength=strength, created=k, **kw))
            k += 1

    # reconstruction
    add("none", "dlg", 0.8, twin_accuracy=None, accuracy=0.82)
    add("none", "invgrad", 0.7, twin_accuracy=None, accuracy=0.82)
    add("none", "idlg", 0.0, twin_accuracy=None, accuracy=0.82)  # below its baseline even undefended
    add("dp", "dlg", 0.25, defense_params={"epsilon": 1.0}, accuracy=0.6, costs={"epsilon_spent": 1.0})
    add("dp", "invgrad", 0.3, defense_params={"epsilon": 1.0}, accuracy=0.6, costs={"epsilon_spent": 1.0})
    add("dp", "idlg", 0.0, defense_params={"epsilon": 1.0}, accuracy=0.6, costs={"epsilon_spent": 1.0})
    add("dp", "dlg", 0.5, defense_params={"epsilon": 8.0}, accuracy=0.75, costs={"epsilon_spent": 8.0})
    add("dp", "invgrad", 0.4, defense_params={"epsilon": 8.0}, accuracy=0.75, costs={"epsilon_spent": 8.0})
    add("mple", "dlg", 0.0, costs={"bytes_per_image_morphed": 4096})
    add("mple", "dlg-mple", 0.95, costs={"bytes_per_image_morphed": 4096})
    add("gradprune", "dlg", 0.12)
    add("he", "dlg", 0.0, model="convnet")  # no undefended convnet row
    # failed and superseded rows carrying numbers that must never be averaged in
    failed = make_row("dp", "dlg", 9, status="failed", defense_params={"epsilon": 1.0}, created=k,
                      error="RuntimeError: boom")
    failed.metrics = {"psnr": 999.0, "ssim": 1.0, "target_accuracy": 0.0}
    rows.append(failed)
    superseded = make_row("dp", "invgrad", 0, strength=1.0, defense_params={"epsilon": 1.0}, created=k + 1,
                          accuracy=0.0, request_salt="old")
    superseded.status = "superseded"
    rows.append(superseded)
    k += 2
    for s in SEEDS:  # a defense whose only attack failed on every seed
        rows.append(make_row("gascnn", "dlg-snn", s, status="failed", created=k, error="AttackError: no spikes"))
        k += 1
    # membership
    add("none", "loss-threshold", 0.6, seeds=range(2), twin_accuracy=None, accuracy=0.82)
    add("none", "lira", 0.8, seeds=range(2), twin_accuracy=None, accuracy=0.82)
    add("dp", "lira", 0.1, seeds=range(2), defense_params={"epsilon": 1.0}, accuracy=0.6)
    rows.append(make_row("mple", "lira", 0, status="unsupported", created=k, error="UnsupportedPair: no shadows"))
    _record(store, rows)


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    path = tmp_path_factory.mktemp("views") / "privbench.sqlite"
    store = Store(path)
    _scenario(store)
    selection = select(store)
    data = leaderboard.build(selection, store.cell_scores())
    return {"store": store, "selection": selection, "data": data,
            "fam": {b["family"]: b for b in data["families"]}}


def _line(board, family, label, model="lenet"):
    return next(ln for ln in board["fam"][family]["lines"] if ln["label"] == label and ln["model"] == model)


def _flags(line):
    return {f["flag"] for f in line["flags"]}


def test_sort_order_is_by_worst_case_most_private_first_with_no_number_last(board):
    lines = board["fam"]["reconstruction"]["lines"]
    assert [ln["label"] for ln in lines] == ["he", "gradprune", "dp[epsilon=1.0]", "dp[epsilon=8.0]", "none",
                                             "mple", "gascnn"]
    assert [ln["rank"] for ln in lines] == [1, 2, 3, 4, 5, 6, None]
    values = [ln["worst_case"]["value"] for ln in lines[:-1]]
    assert values == sorted(values)


def test_worst_case_is_the_strongest_attack_of_the_family(board):
    mple = _line(board, "reconstruction", "mple")
    by_attack = {e["label"]: e["success"]["value"] for e in mple["attacks"]}
    assert mple["worst_case"]["attack"] == "dlg-mple"
    assert mple["worst_case"]["value"] == max(by_attack.values())
    dp1 = _line(board, "reconstruction", "dp[epsilon=1.0]")
    assert dp1["worst_case"]["attack"] == "invgrad"
    gascnn = _line(board, "reconstruction", "gascnn")
    assert gascnn["worst_case"]["value"] is None and "4 failed" in gascnn["worst_case"]["reason"]


def test_flags(board):
    mple = _line(board, "reconstruction", "mple")
    assert _flags(mple) == {"adaptive", "unreliable"}
    assert any("naive dlg" in f["text"] and "dlg-mple" in f["text"] for f in mple["flags"])
    gradprune = _line(board, "reconstruction", "gradprune")
    assert _flags(gradprune) == {"unreliable"}
    assert "not differentiable" in gradprune["flags"][0]["text"]
    he = _line(board, "reconstruction", "he", model="convnet")
    assert _flags(he) == {"no verdict"}
    assert "no undefended control" in he["flags"][0]["text"]
    dp1 = _line(board, "reconstruction", "dp[epsilon=1.0]")
    nv = [f for f in dp1["flags"] if f["flag"] == "no verdict"]
    assert [f["attack"] for f in nv] == ["idlg"]  # dlg and invgrad beat their baseline against none: verdicts stand
    assert "does not beat its trivial baseline against the undefended" in nv[0]["text"]
    assert _flags(_line(board, "reconstruction", "dp[epsilon=8.0]")) == set()
    assert _flags(_line(board, "reconstruction", "none")) == {"no verdict"}  # idlg fails even undefended


def test_intervals_n_and_na_reasons(board):
    none = _line(board, "reconstruction", "none")
    dlg = next(e for e in none["attacks"] if e["label"] == "dlg")
    rows = [r for r in board["selection"].rows if r.run_id in dlg["run_ids"]]
    psnr = np.array([v for r in rows for v in r.info["per_image"]["psnr"]])
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    stats = np.median(psnr[rng.integers(0, psnr.size, (BOOTSTRAP_B, psnr.size))], axis=1)
    est = dlg["metrics"]["psnr"]
    assert est["n"] == 4 and est["value"] == pytest.approx(np.median(psnr))
    assert est["ci"] == pytest.approx(list(np.percentile(stats, [2.5, 97.5])))
    assert est["ci"][0] <= est["value"] <= est["ci"][1]
    lira = next(e for e in _line(board, "membership", "none")["attacks"] if e["label"] == "lira")
    assert lira["metrics"]["auc"]["n"] == 2 and lira["metrics"]["auc"]["ci"]
    tpr = lira["metrics"]["tpr_at_0.001_fpr"]
    assert tpr["value"] is None and "10,000 nonmembers" in tpr["reason"]
    md = leaderboard.to_markdown(board["data"])
    assert "n/a (needs 10,000 nonmembers scored, got 500)" in md
    he = _line(board, "reconstruction", "he", model="convnet")
    assert he["cost"]["epsilon"]["value"] is None and he["cost"]["epsilon"]["reason"] == "no privacy accountant"
    mple = _line(board, "reconstruction", "mple")
    assert mple["cost"]["bytes"]["value"] == 4096 and mple["cost"]["bytes"]["key"] == "bytes_per_image_morphed"


def test_failed_rows_are_counted_and_never_averaged_in(board):
    dp1 = _line(board, "reconstruction", "dp[epsilon=1.0]")
    dlg = next(e for e in dp1["attacks"] if e["label"] == "dlg")
    assert (dlg["n_ok"], dlg["n_failed"]) == (4, 1)
    assert dlg["errors"] == ["RuntimeError: boom"]
    assert dlg["metrics"]["psnr"]["n"] == 4 and dlg["metrics"]["psnr"]["value"] < 100
    assert dp1["n_failed"] == 1 and dp1["utility"]["accuracy"]["value"] == pytest.approx(0.6)
    invgrad = next(e for e in dp1["attacks"] if e["label"] == "invgrad")  # the superseded row is never shown
    assert invgrad["n_ok"] == 4 and invgrad["metrics"]["ssim"]["value"] < 0.6
    assert all(r.status != "superseded" for r in board["selection"].rows)
    mple = _line(board, "membership", "mple")
    assert (mple["n_ok"], mple["n_unsupported"]) == (0, 1) and mple["worst_case"]["value"] is None
    rows = board["data"]["rows"]
    assert (rows["failed"], rows["unsupported"]) == (5, 1)
    assert "5 failed, 1 unsupported" in leaderboard.to_markdown(board["data"])


def test_every_number_traces_to_runs_and_formats_agree(board):
    data = loads(leaderboard.to_json(board["data"]))
    for fam in data["families"]:
        for ln in fam["lines"]:
            assert ln["run_ids"] and ln["config_hashes"]
            for e in ln["attacks"]:
                assert set(e["run_ids"]) <= set(ln["run_ids"]) and e["config_hashes"]
    assert leaderboard.to_markdown(data) == leaderboard.to_markdown(board["data"])
    csv = leaderboard.to_csv(board["data"])
    assert csv.splitlines()[0].startswith("family,rank,defense")
    assert len(csv.splitlines()) == 1 + sum(len(f["lines"]) for f in data["families"])


def test_registry_metadata_for_rows_that_do_not_carry_it(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    rows = []
    for i, (d, a, s) in enumerate([("none", "dlg", 0.8), ("mple", "dlg", 0.0), ("mple", "dlg-mple", 0.9)]):
        r = make_row(d, a, 0, strength=s, created=i, accuracy=0.8, twin_accuracy=0.81)
        r.info.pop("components")
        rows.append(r)
    _record(store, rows)
    data = leaderboard.build(select(store))
    mple = next(ln for ln in data["families"][0]["lines"] if ln["defense"] == "mple")
    assert {"adaptive", "unreliable", "claim"} <= _flags(mple)
    claim = mple["claims"][0]
    assert claim["quantity"] == "accuracy_drop" and claim["ours"]["value"] == pytest.approx(0.01)


def test_identical_runs_keep_the_runs_own_interval_and_other_families_get_a_board(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    rows = [make_row("none", "loss-threshold", s, created=s, metrics={"auc": 0.51, "auc_ci": [0.47, 0.55]})
            for s in range(3)]
    for s in range(2):  # a family the board does not know by name: its own board, its key metric
        r = make_row("none", "class-inv", s, created=10 + s, metrics={"attack_accuracy": 0.3 + 0.1 * s})
        r.info["family"] = "model_inversion"
        rows.append(r)
    _record(store, rows)
    data = leaderboard.build(select(store))
    fam = {b["family"]: b for b in data["families"]}
    auc = fam["membership"]["lines"][0]["attacks"][0]["metrics"]["auc"]
    assert auc["n"] == 3 and auc["ci"] == [0.47, 0.55] and "same value" in auc["ci_over"]
    assert fam["membership"]["lines"][0]["attacks"][0]["beats_baseline"] is False  # a zero-width interval: no
    inv = fam["model_inversion"]["lines"][0]
    assert fam["model_inversion"]["title"] == "Model inversion"
    assert inv["worst_case"]["value"] == pytest.approx(0.35) and inv["worst_case"]["n"] == 2


# -- escaping, CLI -----------------------------------------------------------------------------------

XSS = "<script>alert(1)</script>"


def test_store_text_is_escaped_in_html_and_markdown(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    _record(store, [make_row("none", "dlg", s, strength=0.8, dataset=XSS, created=s) for s in range(2)]
            + [make_row("none", "idlg", 0, status="failed", dataset=XSS, error=f"ValueError: {XSS}", created=5)])
    selection = select(store)
    data = leaderboard.build(selection)
    html = leaderboard.to_html(data)
    path = report.build(selection, data, tmp_path / "report", gallery=False)
    for text in (html, path.read_text()):
        assert XSS not in text and "<script" not in text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    md = leaderboard.to_markdown(data)
    assert XSS not in md and "&lt;script&gt;alert(1)&lt;/script&gt;" in md


def test_cli_bad_input_exits_2(tmp_path, monkeypatch):
    monkeypatch.setenv("PRIVBENCH_HOME", str(tmp_path / "home"))
    runner = CliRunner()
    res = runner.invoke(app, ["leaderboard"])
    assert res.exit_code == 2 and "no results store" in res.output
    res = runner.invoke(app, ["leaderboard", "--store", str(tmp_path / "missing.sqlite")])
    assert res.exit_code == 2 and "missing.sqlite" in res.output
    store = Store(tmp_path / "s.sqlite")
    res = runner.invoke(app, ["leaderboard", "--store", str(store.path)])
    assert res.exit_code == 2 and "holds no rows" in res.output
    store.record(make_row("none", "dlg", 0))
    res = runner.invoke(app, ["leaderboard", "--store", str(store.path), "--suite", str(tmp_path / "nope.toml")])
    assert res.exit_code == 2 and "no such spec" in res.output
    bad = tmp_path / "bad.toml"
    bad.write_text("[suite]\nname = 'x'\nbogus = 1\n")
    res = runner.invoke(app, ["report", "--store", str(store.path), "--suite", str(bad), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "bogus" in res.output
    res = runner.invoke(app, ["leaderboard", "--store", str(store.path), "--format", "xml"])
    assert res.exit_code == 2


SPEC = """
[suite]
name = "tiny"
seeds = "0-1"
models = ["lenet"]

[run]
dataset = "synthetic-mri"
target_seed = 0

[[defenses]]
name = "none"

[[defenses]]
name = "dp"
grid = { epsilon = [1.0, 8.0] }

[[attacks]]
name = "dlg"
"""


def test_cli_suite_selects_exactly_its_jobs_and_writes_every_format(tmp_path):
    from privbench.suite import spec as speclib

    spec_path = tmp_path / "tiny.toml"
    spec_path.write_text(SPEC)
    spec = speclib.load(spec_path)
    assert speclib.load(spec_path, resolve_components=False).request_keys().keys() == spec.request_keys().keys()
    store = Store(tmp_path / "s.sqlite")
    for i, (key, job) in enumerate(spec.request_keys().items()):
        cfg = job.config
        store.record(make_row(cfg.defense, cfg.attack, cfg.seed, defense_params=dict(cfg.defense_params),
                              strength=0.8 if cfg.defense == "none" else 0.3, created=i, request_key=key))
    store.record(make_row("none", "invgrad", 0, created=99))  # not a job of the suite
    runner = CliRunner()
    out = tmp_path / "board"
    res = runner.invoke(app, ["leaderboard", "--store", str(store.path), "--suite", str(spec_path), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "leaderboard.csv", "leaderboard.html",
                                                     "leaderboard.json"]
    data = loads((out / "leaderboard.json").read_text())
    assert data["rows"]["total"] == 6 and data["suite"]["name"] == "tiny" and data["suite"]["missing"] == 0
    assert "invgrad" not in (out / "README.md").read_text()
    assert (out / "README.md").read_text() == leaderboard.to_markdown(data)
    res = runner.invoke(app, ["leaderboard", "--store", str(store.path), "--format", "json"])
    assert res.exit_code == 0 and loads(res.output)["rows"]["total"] == 7
    res = runner.invoke(app, ["report", "--store", str(store.path), "--suite", str(spec_path), "--out",
                              str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "rep" / "index.html").is_file()
    assert {p.suffix for p in (tmp_path / "rep" / "figures").iterdir()} == {".png", ".svg"}
    assert "dp-epsilon.svg" in {p.name for p in (tmp_path / "rep" / "figures").iterdir()}


def test_views_never_load_the_runner(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    _record(store, [make_row("none", "dlg", s, created=s) for s in range(2)])
    code = (f"import sys; from privbench.cli import app; from typer.testing import CliRunner; "
            f"r = CliRunner().invoke(app, ['leaderboard', '--store', {str(store.path)!r}]); assert r.exit_code == 0; "
            f"r = CliRunner().invoke(app, ['leaderboard', '--store', {str(store.path)!r}, '--out', "
            f"{str(tmp_path / 'b')!r}]); assert r.exit_code == 0, r.output; "
            f"import privbench.report; print('privbench.runner' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["False", "False"]  # rows carry their components' metadata: no registry load


# -- the report in a real browser ----------------------------------------------------------------------


def _with_artifacts(store: Store) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    k = 0
    for d, params, strength in (("none", {}, 0.8), ("dp", {"epsilon": 1.0}, 0.2), ("dp", {"epsilon": 8.0}, 0.5)):
        for attack in ("dlg", "lira"):
            for s in range(3):
                row = make_row(d, attack, s, strength=strength, defense_params=params, created=k,
                               twin_accuracy=None if d == "none" else 0.82)
                folder = store.root / "artifacts" / row.run_id
                folder.mkdir(parents=True)
                row.artifacts = f"artifacts/{row.run_id}"
                if attack == "dlg":
                    img = (rng.random((40, 120)) * 255).astype("uint8")
                    Image.fromarray(img).save(folder / "reconstruction.png")
                else:
                    fpr = np.r_[0, np.sort(rng.random(50)), 1]
                    tpr = np.clip(fpr ** (1 - 0.8 * strength), 0, 1)
                    (folder / "roc.json").write_text(json.dumps({"fpr": fpr.tolist(), "tpr": tpr.tolist()}))
                store.record(row)
                k += 1


def test_report_renders_in_headless_chromium(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    import chromium

    if chromium.find() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium; .ci/run installs it where apt "
                    "is available)")
    store = Store(tmp_path / "store" / "privbench.sqlite")
    _with_artifacts(store)
    selection = select(store)
    t0 = time.perf_counter()
    page = report.build(selection, leaderboard.build(selection), tmp_path / "report")
    assert time.perf_counter() - t0 < 60
    html = page.read_text()
    assert "http://" not in html and "https://" not in html  # self-contained: nothing fetched
    found = chromium.check_page(page, tmp_path / "shot.png")
    assert found.errors == []
    assert len(found.images) >= 6  # frontier x2, distributions, ROC, DP curve, gallery cells
    assert [i for i in found.images if not i["complete"] or i["naturalWidth"] == 0] == []
    assert found.screenshot.stat().st_size > 10_000
