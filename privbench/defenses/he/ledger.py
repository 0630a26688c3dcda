"""An append-only, hash-chained (SHA-256) record of each aggregation round.

Each block holds: its index, the round number, each client's ciphertext digest
(SHA-256 of the bytes it sent), the aggregate ciphertext's digest, the new global
model's digest, and the previous block's hash; its own ``hash`` is the SHA-256
of the canonical JSON of those fields. Changing any byte of a stored block
changes its recomputed hash (or breaks its JSON), and every later block names
its predecessor's hash, so ``verify`` finds the first block that does not match.

A chain that verifies on its own can still have lost blocks from its end, or
have gained some: each block only names its predecessor. The training record
therefore keeps the head (the last block's hash) and the block count, and
``verify(..., expected_head=, expected_blocks=)`` compares the recomputed chain
with them; without them truncation cannot be detected.

This is a tamper-evident log kept by the simulation, not a blockchain: there is
no consensus network, no replication between hospitals and no signatures, so
whoever rewrites the whole chain consistently is not detected. It records what
each round's parties committed to, and lets the aggregator check each received
ciphertext against the digest its sender recorded (ciphertexts carry no
integrity check of their own).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

GENESIS = "0" * 64


class LedgerError(RuntimeError):
    """A ledger or ciphertext does not match what was recorded."""


class CiphertextMismatch(LedgerError):
    """A received ciphertext does not match the digest its sender recorded; the round is aborted."""

    def __init__(self, round_: int, client: str, recorded: str | None, received: str):
        self.round, self.client = round_, client
        super().__init__(
            f"round {round_}: the ciphertext received from {client} does not match the digest it recorded on the "
            f"ledger (recorded {recorded or 'nothing'}, received {received}); the round is aborted and no model "
            f"update from it is applied"
        )


def block_hash(fields: dict[str, Any]) -> str:
    body = {k: v for k, v in fields.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class VerifyResult:
    """``ok``; else ``bad_block`` (index of the first block that does not match, None if no single block
    is to blame) and ``reason``. ``head``: the hash of the last block of the chain as far as it verified
    (GENESIS for none). ``chain_intact``: whether every block verified against its predecessor (a failure
    with an intact chain is a mismatch with the recorded head or count). ``compared``: whether a recorded
    head and block count were compared."""

    ok: bool
    blocks: int
    bad_block: int | None = None
    reason: str = ""
    head: str = GENESIS
    chain_intact: bool = True
    compared: bool = False


@dataclass
class Ledger:
    blocks: list[dict[str, Any]] = field(default_factory=list)
    pending: dict[str, str] = field(default_factory=dict)  # client -> digest posted for the open round

    def post(self, client: str, digest: str) -> None:
        """A client records the digest of the ciphertext it is about to send."""
        self.pending[client] = digest

    def recorded(self, client: str) -> str | None:
        return self.pending.get(client)

    def abort_round(self) -> None:
        self.pending = {}

    def seal(self, round_: int, aggregate_digest: str, model_digest: str) -> dict[str, Any]:
        """Append the block of a completed round (with the digests posted during it)."""
        block = {
            "index": len(self.blocks),
            "round": round_,
            "client_digests": dict(sorted(self.pending.items())),
            "aggregate_digest": aggregate_digest,
            "model_digest": model_digest,
            "prev_hash": self.blocks[-1]["hash"] if self.blocks else GENESIS,
        }
        block["hash"] = block_hash(block)
        self.blocks.append(block)
        self.pending = {}
        return block

    def to_jsonl(self) -> str:
        """One block per line (canonical JSON)."""
        return "".join(json.dumps(b, sort_keys=True, separators=(",", ":")) + "\n" for b in self.blocks)


def verify(jsonl: str | bytes, *, expected_head: str | None = None,
           expected_blocks: int | None = None) -> VerifyResult:
    """Recompute the chain of a stored ledger; name the first block that does not match.

    With ``expected_head`` and ``expected_blocks`` (the head hash and block count recorded when the
    ledger was written), an intact chain must also end in that head after that many blocks: this is
    what detects blocks dropped from the end, appended after it, or a chain rewritten consistently.
    """
    if (expected_head is None) != (expected_blocks is None):
        raise ValueError("give both expected_head and expected_blocks, or neither")
    compared = expected_head is not None
    if isinstance(jsonl, bytes):
        jsonl = jsonl.decode("utf-8", errors="replace")
    lines = [line for line in jsonl.splitlines() if line.strip()]
    previous = GENESIS
    hashes: list[str] = []

    def broken(i: int, reason: str) -> VerifyResult:
        return VerifyResult(False, len(lines), i, reason, previous, chain_intact=False, compared=compared)

    for i, line in enumerate(lines):
        try:
            block = json.loads(line)
        except json.JSONDecodeError as exc:
            return broken(i, f"block {i} is not valid JSON ({exc.msg})")
        if not isinstance(block, dict) or block.get("index") != i:
            return broken(i, f"block {i} has index {block.get('index') if isinstance(block, dict) else '?'}")
        if block.get("prev_hash") != previous:
            return broken(i, f"block {i} does not name the previous block's hash")
        if block_hash(block) != block.get("hash"):
            return broken(i, f"block {i}'s contents do not match its hash")
        previous = block["hash"]
        hashes.append(previous)
    found = len(lines)
    if not compared or (found == expected_blocks and previous == expected_head):
        return VerifyResult(True, found, head=previous, compared=compared)
    counts = f"recorded {_blocks(expected_blocks)} with head {expected_head}, found {_blocks(found)} with head {previous}"
    if found < expected_blocks:
        gone = f"block {found}" if expected_blocks - found == 1 else f"blocks {found}..{expected_blocks - 1}"
        return VerifyResult(False, found, found, f"{_blocks(expected_blocks - found)} dropped from the end "
                            f"({gone} missing): {counts}", previous, compared=compared)
    at_recorded_end = hashes[expected_blocks - 1] if expected_blocks else GENESIS
    if found > expected_blocks and at_recorded_end == expected_head:
        return VerifyResult(False, found, expected_blocks, f"{_blocks(found - expected_blocks)} appended after "
                            f"the recorded head (from block {expected_blocks} on): {counts}", previous, compared=compared)
    return VerifyResult(False, found, None, f"the chain verifies on its own but does not end in the recorded head: "
                        f"it was rewritten consistently ({counts})", previous, compared=compared)


def _blocks(n: int) -> str:
    return f"{n} block{'' if n == 1 else 's'}"
