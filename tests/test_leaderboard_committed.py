"""The committed board (leaderboard/) is generated, never hand-edited: its Markdown is exactly what its JSON
renders to, and the JSON records the command that regenerates both."""

from __future__ import annotations

from pathlib import Path

import pytest

from privbench import leaderboard
from privbench.store import loads

BOARD = Path(__file__).resolve().parents[1] / "leaderboard"


def test_committed_markdown_and_json_agree():
    md, js = BOARD / "README.md", BOARD / "leaderboard.json"
    if not (md.is_file() and js.is_file()):
        pytest.skip(f"no committed board yet ({md} and {js}); generate it with "
                    f"'bench leaderboard --suite benchmarks/suites/medical-mri.toml --out leaderboard'")
    data = loads(js.read_text(encoding="utf-8"))
    assert data["command"].startswith("bench leaderboard")
    assert md.read_text(encoding="utf-8") == leaderboard.to_markdown(data), (
        "leaderboard/README.md differs from what leaderboard/leaderboard.json renders to: regenerate both with "
        f"'{data['command']}' instead of editing them")
    csv = BOARD / "leaderboard.csv"
    if csv.is_file():
        assert csv.read_text(encoding="utf-8") == leaderboard.to_csv(data)
