"""The ledger against its recorded head: dropped, appended and rewritten blocks, through the API and the CLI."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from privbench.cli import app
from privbench.config import RunConfig
from privbench.defenses.he import ledger as ledgerlib
from privbench.store import Store

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread, as the runner uses


def _ledger(rounds: int) -> ledgerlib.Ledger:
    ledger = ledgerlib.Ledger()
    for t in range(rounds):
        ledger.post("hospital-0", f"{t:064x}")
        ledger.seal(t, f"{t + 100:064x}", f"{t + 200:064x}")
    return ledger


def _rehash(blocks: list[dict]) -> str:
    """The chain rewritten consistently: every block re-linked and re-hashed."""
    previous, out = ledgerlib.GENESIS, []
    for i, block in enumerate(blocks):
        block = {**block, "index": i, "prev_hash": previous}
        block["hash"] = ledgerlib.block_hash(block)
        previous = block["hash"]
        out.append(json.dumps(block, sort_keys=True, separators=(",", ":")) + "\n")
    return "".join(out)


def test_a_chain_checked_against_its_recorded_head_detects_dropped_appended_and_rewritten_blocks():
    ledger = _ledger(4)
    text, head = ledger.to_jsonl(), ledger.blocks[-1]["hash"]
    lines = text.splitlines(keepends=True)

    intact = ledgerlib.verify(text, expected_head=head, expected_blocks=4)
    assert intact.ok and intact.compared and intact.head == head and intact.blocks == 4

    for kept in (3, 1, 0):  # dropping the last block(s), down to an empty file, leaves a chain that verifies alone
        truncated = "".join(lines[:kept])
        assert ledgerlib.verify(truncated).ok
        result = ledgerlib.verify(truncated, expected_head=head, expected_blocks=4)
        assert not result.ok and result.chain_intact and result.bad_block == kept
        assert f"{4 - kept} block" in result.reason and "dropped" in result.reason
        assert "recorded 4 blocks" in result.reason and f"found {kept} block" in result.reason and head in result.reason

    longer = _ledger(6)  # the same first four blocks, then two more that chain onto them
    assert longer.blocks[3]["hash"] == head
    result = ledgerlib.verify(longer.to_jsonl(), expected_head=head, expected_blocks=4)
    assert not result.ok and result.bad_block == 4 and "2 blocks appended" in result.reason

    rewritten = _rehash([{**b, "aggregate_digest": "f" * 64} if b["index"] == 1 else b for b in ledger.blocks])
    assert ledgerlib.verify(rewritten).ok  # consistent on its own
    result = ledgerlib.verify(rewritten, expected_head=head, expected_blocks=4)
    assert not result.ok and result.bad_block is None and "rewritten" in result.reason

    broken = lines[0] + lines[1].replace('"round":1', '"round":9') + "".join(lines[2:])
    result = ledgerlib.verify(broken, expected_head=head, expected_blocks=4)
    assert not result.ok and not result.chain_intact and result.bad_block == 1

    empty = ledgerlib.verify("", expected_head=ledgerlib.GENESIS, expected_blocks=0)
    assert empty.ok and empty.head == ledgerlib.GENESIS
    with pytest.raises(ValueError, match="both"):
        ledgerlib.verify(text, expected_head=head)


# -- a stored he row -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A stored he row (CKKS, 3 rounds, 16x16): its store folder, run id and recorded ledger heads."""
    pytest.importorskip("tenseal")
    from privbench.runner import run

    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRIVBENCH_HOME", str(home))
        store = Store(home / "store" / "privbench.sqlite")
        result = run(RunConfig(defense="he", attack="dlg", image_size=16, defense_params={"rounds": 3},
                               attack_params={"steps": 2, "restarts": 1}), store)
    assert result.status == "ok", result.traceback
    return store.path.parent, result.run_id


@pytest.fixture
def copy(stored, tmp_path):
    """A private copy of the stored row's store folder: (store file, run id, artifacts folder, row)."""
    folder, run_id = stored
    shutil.copytree(folder, tmp_path / "store")
    store = Store(tmp_path / "store" / "privbench.sqlite")
    row = store.get(run_id)
    return store.path, run_id, store.root / row.artifacts, row


def _verify(*args):
    return CliRunner().invoke(app, ["ledger", "verify", *map(str, args)])


def test_the_row_records_each_ledgers_head_and_block_count(copy):
    _, _, artifacts, row = copy
    for name, part in (("ledger.jsonl", "target"), ("twin-ledger.jsonl", "twin")):
        training = row.info[part]["training"]
        text = (artifacts / name).read_text()
        assert training["ledger_blocks"] == 3 == len(text.splitlines())
        assert training["ledger_head"] == json.loads(text.splitlines()[-1])["hash"]


def test_an_untouched_stored_ledger_verifies_against_its_row(copy):
    path, run_id, artifacts, row = copy
    result = _verify(run_id, "--store", path)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # rich wraps long lines
    assert text.count("3 blocks, hash chain intact, ending in the recorded head") == 2, text  # target and twin
    assert row.info["target"]["training"]["ledger_head"] in text and row.info["twin"]["training"]["ledger_head"] in text


@pytest.mark.parametrize("name", ["ledger.jsonl", "twin-ledger.jsonl"])
@pytest.mark.parametrize("kept", [2, 1])
def test_dropping_the_last_blocks_of_a_stored_ledger_fails_against_its_row(copy, name, kept):
    path, run_id, artifacts, row = copy
    ledger = artifacts / name
    lines = ledger.read_text().splitlines(keepends=True)
    ledger.write_text("".join(lines[:kept]))
    assert ledgerlib.verify(ledger.read_text()).ok  # the chain alone cannot tell

    result = _verify(run_id, "--store", path)
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())  # rich wraps long lines
    assert f"{3 - kept} block" in text and "dropped from the end" in text
    assert "recorded 3 blocks" in text and f"found {kept} block" in text

    bare = _verify(ledger)  # a bare path has no recorded head: it passes, and says why that proves little
    assert bare.exit_code == 0, bare.output
    assert "no stored head to compare: truncation cannot be detected" in " ".join(bare.output.split())


def test_appended_altered_and_missing_ledgers_fail_against_the_row(copy):
    path, run_id, artifacts, row = copy
    ledger = artifacts / "ledger.jsonl"
    original = ledger.read_text()
    blocks = [json.loads(line) for line in original.splitlines()]
    extra = {"index": 3, "round": 3, "client_digests": {}, "aggregate_digest": "0" * 64, "model_digest": "0" * 64,
             "prev_hash": blocks[-1]["hash"]}
    extra["hash"] = ledgerlib.block_hash(extra)
    ledger.write_text(original + json.dumps(extra, sort_keys=True, separators=(",", ":")) + "\n")
    result = _verify(run_id, "--store", path)
    assert result.exit_code == 1 and "1 block appended" in " ".join(result.output.split()), result.output

    blocks[1]["round"] = 7
    ledger.write_text(_rehash(blocks))
    result = _verify(run_id, "--store", path)
    assert result.exit_code == 1 and "rewritten consistently" in " ".join(result.output.split()), result.output

    ledger.unlink()
    result = _verify(run_id, "--store", path)
    assert result.exit_code == 1 and "missing" in result.output, result.output


def test_python_m_privbench_cli_has_the_ledger_command(copy):
    path, run_id, artifacts, _ = copy
    env = {**os.environ, "PRIVBENCH_THREADS": "1"}
    ok = subprocess.run([sys.executable, "-m", "privbench.cli", "ledger", "verify", run_id, "--store", str(path)],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    ledger = artifacts / "ledger.jsonl"
    ledger.write_text("".join(ledger.read_text().splitlines(keepends=True)[:1]))
    dropped = subprocess.run([sys.executable, "-m", "privbench.cli", "ledger", "verify", run_id, "--store", str(path)],
                             capture_output=True, text=True, env=env, timeout=120)
    assert dropped.returncode == 1 and "dropped" in dropped.stderr, dropped.stdout + dropped.stderr
