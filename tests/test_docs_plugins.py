"""docs/plugins.md is exercised whole: its files are written out and installed as a plugin distribution, every
command it shows is run and its shown output checked, every other code block is executed.

Conventions of the guide: a code block whose first line is ``# <path>`` is that file; a ``console`` block holds
``$ <command>`` lines, each followed by output lines that must appear in the command's output in order ("..."
stands for anything; a shown ``error:`` line means exit code 2, else 0); any other ``python`` block is a snippet,
run after the package is installed.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from privbench import cli, testing
from privbench.cli import app

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "plugins.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)
BOX = str.maketrans({c: " " for c in "│┃┏┓┗┛━─┡┩╇╈┳┻┣┫╋┌┐└┘├┤┬┴┼═║╔╗╚╝"})


def _blocks() -> list[tuple[str, str]]:
    return FENCE.findall(DOC.read_text())


def _file_path(body: str) -> str | None:
    first = body.splitlines()[0] if body.strip() else ""
    match = re.fullmatch(r"# ([\w./-]+\.(?:py|toml))", first.strip())
    return match.group(1) if match else None


def _files() -> dict[str, str]:
    return {path: body for _, body in _blocks() if (path := _file_path(body))}


def _commands() -> list[tuple[str, list[str]]]:
    """(command, the output lines shown after it) for every ``$`` line of the console blocks, in order."""
    out: list[tuple[str, list[str]]] = []
    for lang, body in _blocks():
        if lang != "console":
            continue
        for line in body.splitlines():
            if line.startswith("$ "):
                out.append((line[2:].strip(), []))
            elif line.strip():
                out[-1][1].append(line)
    return out


def _normal(text: str) -> str:
    return " ".join(text.translate(BOX).split())


def _shows(expected: str, actual: str) -> bool:
    """Every part of ``expected`` between "..." appears in ``actual``, in order (whitespace and table rules aside)."""
    haystack, position = _normal(actual), 0
    for piece in (_normal(p) for p in expected.split("...")):
        if not piece:
            continue
        found = haystack.find(piece, position)
        if found < 0:
            return False
        position = found + len(piece)
    return True


def test_every_code_block_is_a_file_a_console_session_or_a_snippet():
    for lang, body in _blocks():
        assert lang in ("python", "toml", "console"), f"a {lang!r} block is not exercised:\n{body}"
        assert lang == "python" or lang == "console" or _file_path(body), f"a toml block without a file name:\n{body}"
    assert {"pyproject.toml", "tests/test_conformance.py", "noise-sweep.toml"} <= set(_files())
    assert [c for c, _ in _commands()][:2] == ["pip install -e .", "bench list"]


def test_the_guide_lists_every_check_of_the_kit():
    listed = set(re.findall(r"^\| `(check_\w+)` \|", DOC.read_text(), re.M))
    assert listed == {check.__name__ for checks in testing.CHECKS.values() for check in checks}


def _install(plugin_site, project: Path) -> dict:
    """Write the guide's files into ``project`` and install it as ``pip install -e .`` would (dist-info + modules
    on sys.path, from the guide's pyproject.toml)."""
    for path, body in _files().items():
        (project / path).parent.mkdir(parents=True, exist_ok=True)
        (project / path).write_text(body)
    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    sources = {path.removeprefix("src/"): body for path, body in _files().items() if path.startswith("src/")}
    plugin_site.install(meta["name"], meta["version"], meta["entry-points"], sources)
    return meta


def _run(command: str, project: Path, site: Path) -> tuple[int, str]:
    if command == "pip install -e .":
        return 0, ""  # done by _install
    argv = shlex.split(command)
    if argv[0] == "bench":
        result = CliRunner().invoke(app, argv[1:])
        return result.exit_code, result.output
    if argv[0] == "pytest":
        argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *argv[1:]]
    else:
        raise AssertionError(f"the guide shows a command this test does not know how to run: {command}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "PRIVBENCH_THREADS": "1"}
    done = subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True, timeout=600)
    return done.returncode, done.stdout + done.stderr


def _check(command: str, shown: list[str], code: int, output: str) -> None:
    expected_code = 2 if any(line.startswith("error:") for line in shown) else 0
    assert code == expected_code, f"$ {command}\nexit {code}, expected {expected_code}:\n{output}"
    for line in shown:
        assert _shows(line, output), f"$ {command}\nthe guide shows {line!r}; the output is:\n{output}"


def test_the_guide_works_as_written(plugin_site, bench_home, tmp_path, monkeypatch):
    """The package as the guide writes it installs, lists, runs, and fails the way the guide says."""
    monkeypatch.setattr(cli.console, "width", 1000)
    monkeypatch.setattr(cli.err_console, "width", 1000)
    project = tmp_path / "privbench-example"
    project.mkdir()
    _install(plugin_site, project)
    monkeypatch.chdir(project)  # the guide's commands name its files relative to the project
    slow = ("pytest", "python")
    for command, shown in _commands():
        if command.split()[0] in slow:
            continue  # test_the_guides_subprocess_commands
        _check(command, shown, *_run(command, project, plugin_site.root))
    for lang, body in _blocks():
        if lang == "python" and not _file_path(body):
            exec(compile(body, f"{DOC}:snippet", "exec"), {"__name__": "guide_snippet"})


@pytest.mark.parametrize("program", ["pytest"])
def test_the_guides_subprocess_commands(plugin_site, bench_home, tmp_path, program):
    """The guide's `pytest tests` (the kit over its four components), in a subprocess."""
    project = tmp_path / "privbench-example"
    project.mkdir()
    _install(plugin_site, project)
    commands = [(command, shown) for command, shown in _commands() if command.split()[0] == program]
    assert commands
    for command, shown in commands:
        _check(command, shown, *_run(command, project, plugin_site.root))
