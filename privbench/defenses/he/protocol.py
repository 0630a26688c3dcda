"""The HE federated-aggregation protocol (after Kumar et al., 2022), simulated party by party.

Parties: hospitals ``hospital-0 .. hospital-{K-1}``, one ``aggregator``, and the
``outsider`` (the public). Every hospital holds the same CKKS/Paillier key pair
(as in the paper: the hospitals share the secret key); the aggregator holds the
public material only.

One round t, global model w_t (every hospital holds it):

1. Hospital k takes ``local_steps`` plain-SGD steps (learning rate ``lr``) on its
   own data from w_t and forms its update u_k = sum of its step gradients, so
   w_k = w_t - lr * u_k (with one step, u_k is the gradient of the mean
   cross-entropy over its batch). Its train-mode forward passes also update its
   floating-point buffers b_k (BatchNorm running_mean / running_var), which it
   appends: the shared vector is [u_k, b_k] (b_k empty without BatchNorm). It
   reports n_k, the number of examples behind u_k (sizes are public), and
   weights the vector by n_k / sum(n).
2. It encrypts n_k/N * [u_k, b_k] (after the scheme's range check), records the
   SHA-256 digest of the ciphertext bytes on the ledger, and sends the bytes to
   the aggregator.
3. The aggregator checks each received ciphertext against the digest its sender
   recorded (a mismatch aborts the round, naming the client, and nothing is
   applied), adds the ciphertexts homomorphically, and sends the encrypted
   aggregate to every hospital. It cannot decrypt anything.
4. Every hospital decrypts the aggregate [U, B] = sum_k n_k/N [u_k, b_k] and
   applies w_{t+1} = w_t - lr * U (FedAvg); the global running statistics
   become B, the size-weighted mean of the hospitals' (FedAvg on a state dict);
   the integer counts (num_batches_tracked) are not sent: each becomes the
   hospitals' maximum, the previous count plus ``local_steps``. The ledger
   seals the round's block (client digests, aggregate digest, digest of
   w_{t+1} and its buffers).
5. With ``aggregator_sees_models`` (a protocol variant: the aggregator also
   hosts the model) the hospitals send w_{t+1} to the aggregator in the clear.

At the end the final global model is released to everyone (the outsider sees
only it).

Each party's view (what it received or computed) is appended to a ``ViewLog``;
``derive_update`` turns an observer's view of one round into what it can
attack, and nothing else is consulted.
"""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from privbench.config import ConfigError
from privbench.defenses.he.ledger import CiphertextMismatch, Ledger
from privbench.defenses.he.schemes import Ciphertext, KeyHolderScheme, PublicScheme, digest

AGGREGATOR, OUTSIDER = "aggregator", "outsider"


def hospital(k: int) -> str:
    return f"hospital-{k}"


# -- data split --------------------------------------------------------------------------------


def split_clients(labels: np.ndarray, clients: int, seed: int, dirichlet_alpha: float | None) -> list[np.ndarray]:
    """Member indices of each of ``clients`` hospitals, deterministic in ``seed``.

    iid (``dirichlet_alpha`` None): a seeded permutation cut into near-equal parts.
    Class skew: for each class, its members are shared out by proportions drawn
    from Dirichlet(alpha, ..., alpha); redrawn (up to 100 times) until every
    hospital has at least one member.
    """
    n = len(labels)
    if clients < 1:
        raise ConfigError(f"he: clients must be >= 1, got {clients}")
    if clients > n:
        raise ConfigError(f"he: clients={clients} exceeds the {n} members: every hospital needs data")
    rng = np.random.default_rng(seed)
    if dirichlet_alpha is None:
        return [np.sort(part) for part in np.array_split(rng.permutation(n), clients)]
    for _ in range(100):
        shards: list[list[int]] = [[] for _ in range(clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([dirichlet_alpha] * clients))[:-1] * len(idx)).astype(int)
            for k, part in enumerate(np.split(idx, cuts)):
                shards[k].extend(part.tolist())
        if all(shards):
            return [np.sort(np.array(s, dtype=np.int64)) for s in shards]
    raise ConfigError(f"he: dirichlet_alpha={dirichlet_alpha} left a hospital without members in 100 draws; "
                      f"raise dirichlet_alpha or use fewer clients")


# -- flat parameter vectors ------------------------------------------------------------------------


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def flat_params(model: nn.Module) -> np.ndarray:
    """float32 [P]: the trainable parameters in ``model.parameters()`` order."""
    return torch.cat([p.detach().reshape(-1) for p in trainable(model)]).numpy().copy()


def unflatten(vector: np.ndarray, model: nn.Module) -> tuple[torch.Tensor, ...]:
    out, at = [], 0
    for p in trainable(model):
        out.append(torch.as_tensor(vector[at : at + p.numel()], dtype=p.dtype).reshape(p.shape).clone())
        at += p.numel()
    return tuple(out)


def running_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The floating-point buffers (BatchNorm running_mean / running_var) in ``model.buffers()`` order:
    aggregated with the parameters (``BUFFER_RULE``)."""
    return [b for b in model.buffers() if b.is_floating_point()]


def count_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The integer buffers (BatchNorm num_batches_tracked) in ``model.buffers()`` order: not transmitted."""
    return [b for b in model.buffers() if not b.is_floating_point()]


def flat_buffers(model: nn.Module) -> np.ndarray:
    """float32 [R]: the floating-point buffers in ``model.buffers()`` order (empty without BatchNorm)."""
    buffers = running_buffers(model)
    if not buffers:
        return np.zeros(0, dtype=np.float32)
    return torch.cat([b.detach().reshape(-1).float() for b in buffers]).numpy().copy()


def flat_state(model: nn.Module) -> np.ndarray:
    """float32 [P + R]: the parameters, then the floating-point buffers: what a model round carries."""
    return np.concatenate([flat_params(model), flat_buffers(model)])


def parameter_count(model: nn.Module) -> int:
    """P: the trainable values at the front of a shared vector."""
    return sum(p.numel() for p in trainable(model))


def load_buffers(model: nn.Module, vector: np.ndarray) -> None:
    """Set the floating-point buffers from ``vector`` [R] (``flat_buffers`` order), in place."""
    at = 0
    with torch.no_grad():
        for b in running_buffers(model):
            b.copy_(torch.as_tensor(vector[at : at + b.numel()]).reshape(b.shape).to(b.dtype))
            at += b.numel()


def buffer_values(vector: np.ndarray, model: nn.Module, steps: int) -> tuple[torch.Tensor, ...]:
    """Every buffer of ``model`` in ``model.buffers()`` order after a round: the floating-point ones from
    ``vector`` [R], the integer counts advanced by ``steps`` local steps from ``model``'s (the public count)."""
    out, at = [], 0
    for b in model.buffers():
        if b.is_floating_point():
            out.append(torch.as_tensor(vector[at : at + b.numel()]).reshape(b.shape).to(b.dtype).clone())
            at += b.numel()
        else:
            out.append(b.detach().clone() + steps)
    return tuple(out)


def model_digest(model: nn.Module) -> str:
    return hashlib.sha256(flat_state(model).tobytes()).hexdigest()


BUFFER_RULE = (
    "BatchNorm buffers are aggregated as FedAvg aggregates a state dict: each hospital appends its running_mean and "
    "running_var after its local steps to its update, weighted by n_k/N and encrypted with it in the same ciphertexts "
    "(in the clear with scheme=plaintext), so the decrypted sum is their size-weighted mean and becomes the global "
    "running statistics; num_batches_tracked is not sent: the global count is the hospitals' maximum, the previous "
    "count plus local_steps (public by the protocol)"
)


# -- the view log ----------------------------------------------------------------------------------


@dataclass
class ViewEntry:
    """One thing ``party`` received or computed in ``round``: ``kind`` from ``sender``; ``nbytes`` its size."""

    round: int
    party: str
    kind: str
    sender: str
    payload: Any
    nbytes: int


@dataclass
class ViewLog:
    """Every party's view, in order. ``keep_payloads=False`` keeps kinds and sizes only (long training runs)."""

    keep_payloads: bool = True
    entries: list[ViewEntry] = field(default_factory=list)

    def record(self, round_: int, party: str, kind: str, sender: str, payload: Any, nbytes: int) -> None:
        self.entries.append(ViewEntry(round_, party, kind, sender, payload if self.keep_payloads else None, nbytes))

    def of(self, party: str, round_: int | None = None, kind: str | None = None) -> list[ViewEntry]:
        return [e for e in self.entries if e.party == party and (round_ is None or e.round == round_)
                and (kind is None or e.kind == kind)]

    def one(self, party: str, round_: int, kind: str) -> ViewEntry | None:
        found = self.of(party, round_, kind)
        if len(found) > 1:
            raise RuntimeError(f"{party} has {len(found)} {kind!r} entries in round {round_}")
        return found[0] if found else None

    def summary(self, party: str, round_: int | None = None) -> dict[str, int]:
        """Kind -> how many entries of it ``party`` holds (in ``round_``)."""
        out: dict[str, int] = {}
        for e in self.of(party, round_):
            out[e.kind] = out.get(e.kind, 0) + 1
        return out


# -- parties ---------------------------------------------------------------------------------------


class Aggregator:
    """The aggregating node: public key material only; checks digests, adds ciphertexts."""

    def __init__(self, public: PublicScheme):
        self.scheme = public

    def aggregate(self, round_: int, received: dict[str, bytes], ledger: Ledger) -> Ciphertext:
        for client, blob in received.items():
            got = digest(blob)
            if got != ledger.recorded(client):
                raise CiphertextMismatch(round_, client, ledger.recorded(client), got)
        return self.scheme.add([Ciphertext.from_bytes(b) for b in received.values()])

    def try_decrypt(self, ciphertext: Ciphertext) -> np.ndarray:
        """Decrypt with what the aggregator holds: raises, since it holds no secret key (plaintext excepted)."""
        return self.scheme.decrypt(ciphertext)


@dataclass(frozen=True)
class RoundStats:
    """Costs of one round: seconds (encryption summed over clients, aggregation, one hospital's decryption),
    bytes per client (ciphertext vs float32 plaintext), max |decrypted - plaintext aggregate|."""

    round: int
    encrypt_s: float
    aggregate_s: float
    decrypt_s: float
    ciphertext_bytes_per_client: float
    plaintext_bytes_per_client: float
    max_abs_error: float
    local_s: float


Batch = tuple[torch.Tensor, torch.Tensor]  # images [b, C, H, W], labels [b]
Channel = Callable[[int, str, bytes], bytes]  # (round, sender, bytes) -> bytes delivered to the aggregator


class Protocol:
    """Runs rounds on ``model`` (the global model, updated in place) and logs every party's view."""

    def __init__(self, keys: KeyHolderScheme, model: nn.Module, clients: int, lr: float, local_steps: int, *,
                 aggregator_sees_models: bool = False, log: ViewLog | None = None, ledger: Ledger | None = None,
                 channel: Channel | None = None):
        self.keys, self.model, self.clients, self.lr, self.local_steps = keys, model, clients, lr, local_steps
        self.aggregator = Aggregator(keys.public())
        self.aggregator_sees_models = aggregator_sees_models
        self.log = log if log is not None else ViewLog()
        self.ledger = ledger if ledger is not None else Ledger()
        self.channel = channel

    def _local_update(self, steps: list[Batch]) -> tuple[np.ndarray, list[torch.Tensor]]:
        """What a hospital shares, float64 [P + R]: u = the sum of its plain-SGD step gradients from the global
        model, then its floating-point buffers after those steps (BatchNorm running statistics, which train-mode
        forward passes update); and its integer buffer counts (kept, not sent)."""
        local = copy.deepcopy(self.model).train()
        params = trainable(local)
        if all(len(labels) == 0 for _, labels in steps):  # no data this round: a zero update of weight 0
            return np.concatenate([np.zeros(sum(q.numel() for q in params)),
                                   flat_buffers(local).astype(np.float64)]), count_buffers(local)
        total = None
        for images, labels in steps:
            grads = torch.autograd.grad(F.cross_entropy(local(images), labels), params)
            flat = torch.cat([g.reshape(-1) for g in grads]).double()
            total = flat if total is None else total + flat
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p.sub_(self.lr * g)
        return np.concatenate([total.numpy(), flat_buffers(local).astype(np.float64)]), count_buffers(local)

    def round(self, t: int, batches: list[list[Batch]], examples: list[int]) -> RoundStats:
        """One round; ``batches[k]``: client k's ``local_steps`` batches; ``examples[k]``: distinct examples in them."""
        if len(batches) != self.clients or len(examples) != self.clients or any(
            len(b) != self.local_steps for b in batches
        ):
            raise ValueError(f"round needs {self.clients} clients x {self.local_steps} local batches")
        log, names = self.log, [hospital(k) for k in range(self.clients)]
        start = flat_state(self.model)
        for name in names:
            log.record(t, name, "global_model", name, start, start.nbytes)
        if self.aggregator_sees_models:
            log.record(t, AGGREGATOR, "global_model", names[0], start, start.nbytes)

        t0 = time.perf_counter()
        updates, sizes, counts = [], {}, []
        for name, steps, n in zip(names, batches, examples, strict=True):
            u, local_counts = self._local_update(steps)
            updates.append(u)
            counts.append(local_counts)
            sizes[name] = int(n)
            log.record(t, name, "own_update", name, u, u.size * 4)
        local_s = time.perf_counter() - t0
        total_n = sum(sizes.values())
        for party in (*names, AGGREGATOR):
            log.record(t, party, "client_sizes", "all", dict(sizes), 8 * len(sizes))

        received, enc_s = {}, 0.0
        for name, u in zip(names, updates, strict=True):
            t0 = time.perf_counter()
            blob = self.keys.encrypt(sizes[name] / total_n * u, summands=self.clients).to_bytes()
            enc_s += time.perf_counter() - t0
            self.ledger.post(name, digest(blob))
            log.record(t, name, "ledger_digest", name, digest(blob), 64)
            sent = self.channel(t, name, blob) if self.channel else blob
            received[name] = sent
            log.record(t, AGGREGATOR, "ciphertext", name, sent, len(sent))

        t0 = time.perf_counter()
        try:
            aggregate = self.aggregator.aggregate(t, received, self.ledger)
        except CiphertextMismatch:
            self.ledger.abort_round()
            raise
        agg_s = time.perf_counter() - t0
        agg_blob = aggregate.to_bytes()
        log.record(t, AGGREGATOR, "encrypted_aggregate", AGGREGATOR, aggregate, len(agg_blob))

        t0 = time.perf_counter()
        decrypted = self.keys.decrypt(aggregate)  # every hospital does this; timed once
        dec_s = time.perf_counter() - t0
        for name in names:
            log.record(t, name, "encrypted_aggregate", AGGREGATOR, aggregate, len(agg_blob))
            log.record(t, name, "decrypted_aggregate", name, decrypted, decrypted.size * 8)
        plain = sum(sizes[name] / total_n * u for name, u in zip(names, updates, strict=True))
        error = float(np.max(np.abs(decrypted - plain))) if len(plain) else 0.0

        n_params = parameter_count(self.model)
        with torch.no_grad():
            for p, g in zip(trainable(self.model), unflatten(decrypted[:n_params], self.model), strict=True):
                p.sub_(self.lr * g.to(p.dtype))
            load_buffers(self.model, decrypted[n_params:])  # the size-weighted mean of the running statistics
            for j, b in enumerate(count_buffers(self.model)):
                b.copy_(max(local[j] for local in counts))
        new = flat_state(self.model)
        for name in names:
            log.record(t, name, "new_global_model", name, new, new.nbytes)
        if self.aggregator_sees_models:
            log.record(t, AGGREGATOR, "new_global_model", names[0], new, new.nbytes)
        block = self.ledger.seal(t, digest(agg_blob), hashlib.sha256(new.tobytes()).hexdigest())
        for party in (*names, AGGREGATOR):
            log.record(t, party, "ledger_block", "ledger", block, len(str(block)))
        return RoundStats(t, enc_s, agg_s, dec_s, float(np.mean([len(b) for b in received.values()])),
                          float(start.size * 4), error, local_s)

    def release(self, t: int) -> None:
        """The final global model goes public."""
        final = flat_state(self.model)
        for party in (*(hospital(k) for k in range(self.clients)), AGGREGATOR, OUTSIDER):
            self.log.record(t, party, "released_model", "hospitals", final, final.nbytes)


# -- what an observer can attack --------------------------------------------------------------------


@dataclass(frozen=True)
class DerivedUpdate:
    """An observer's best plaintext estimate of the clients' gradient in one round, from its view alone.

    ``vector`` float64 [P] (None: the observer holds only ciphertexts); ``buffers`` float64 [R]: the
    floating-point buffers shared with it (the size-weighted mean of the same clients' BatchNorm running
    statistics after their local steps; None without such buffers or without plaintext); ``batch_size``
    the number of examples behind it (client sizes are public); ``how`` the derivation in words;
    ``parties`` whose data is behind it.
    """

    vector: np.ndarray | None
    batch_size: int
    how: str
    parties: tuple[str, ...]
    buffers: np.ndarray | None = None


def _split(vector: np.ndarray, n_params: int | None, **fields: Any) -> DerivedUpdate:
    """A shared vector [P + R] as the parameter part and the buffer part (None when R is 0)."""
    n = len(vector) if n_params is None else n_params
    buffers = vector[n:]
    return DerivedUpdate(vector[:n], buffers=buffers if buffers.size else None, **fields)


def derive_update(log: ViewLog, observer: str, round_: int, lr: float, scheme: str,
                  n_params: int | None = None) -> DerivedUpdate:
    """Derive what ``observer`` (``aggregator``, ``hospital-k`` or ``outsider``) can attack in ``round_``.

    ``n_params``: P, the parameter values at the front of each logged vector (the rest are floating-point
    buffers, ``flat_state`` order); None: the vectors hold parameters only.
    """
    from privbench.threat import AttackError

    if observer == OUTSIDER:
        raise AttackError("the outsider sees only the released model: no client update reaches it, so there is no "
                          "gradients surface to attack (attack the released model: model_whitebox / model_queries)")
    sizes_entry = log.one(observer, round_, "client_sizes")
    if sizes_entry is None:
        raise RuntimeError(f"{observer} has no view of round {round_}")
    sizes: dict[str, int] = sizes_entry.payload
    if observer == AGGREGATOR:
        before = log.one(AGGREGATOR, round_, "global_model")
        after = log.one(AGGREGATOR, round_, "new_global_model")
        everyone = tuple(sorted(sizes))
        if before is not None and after is not None:
            old, new = before.payload.astype(np.float64), after.payload.astype(np.float64)
            n = len(old) if n_params is None else n_params
            # parameters: w_t+1 = w_t - lr U; buffers: the new global running statistics are the aggregate itself
            vector = np.concatenate([(old[:n] - new[:n]) / lr, new[n:]])
            return _split(vector, n_params, batch_size=sum(sizes.values()), parties=everyone,
                          how="difference of the consecutive global models it received, divided by the public "
                              "learning rate: (w_t - w_t+1) / lr = the decrypted aggregate (float32 rounding); the "
                              "new global BatchNorm statistics, where the model has them, are the aggregated ones")
        if scheme == "plaintext":
            aggregate = log.one(AGGREGATOR, round_, "encrypted_aggregate")
            return _split(_read_plaintext(aggregate.payload), n_params, batch_size=sum(sizes.values()),
                          parties=everyone,
                          how="the clients' updates arrive unencrypted (scheme=plaintext): their sum, read directly")
        kinds = log.summary(AGGREGATOR, round_)
        return DerivedUpdate(None, sum(sizes.values()),
                             f"ciphertexts only ({', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))}); "
                             f"it holds no secret key, so no plaintext of any update", everyone)
    own = log.one(observer, round_, "own_update")
    aggregate = log.one(observer, round_, "decrypted_aggregate")
    if own is None or aggregate is None:
        raise RuntimeError(f"{observer} has no own update or decrypted aggregate in round {round_}")
    total = sum(sizes.values())
    own_weight = sizes[observer] / total
    if own_weight >= 1:
        raise AttackError(f"{observer} is the only client: there are no other hospitals' updates to attack")
    vector = (aggregate.payload - own_weight * own.payload) / (1 - own_weight)
    others = tuple(sorted(k for k in sizes if k != observer))
    return _split(vector, n_params, batch_size=total - sizes[observer], parties=others,
                  how="decrypted aggregate minus its own weighted update, divided by the other hospitals' total "
                      "weight: (U - w_own u_own) / (1 - w_own) = the others' mean gradient (and, where the model has "
                      "BatchNorm, the others' size-weighted mean running statistics)")


def _read_plaintext(ciphertext: Ciphertext) -> np.ndarray:
    """scheme=plaintext: the aggregator reads the "ciphertext" directly."""
    from privbench.defenses.he.schemes import PlainPublic

    return PlainPublic().decrypt(ciphertext)
