"""The ``he`` defense: FedAvg across K hospitals with homomorphically encrypted aggregation and a ledger.

See ``privbench.defenses.he.protocol`` for the protocol (who holds which key,
what each party receives each round, what is released). ``fit`` runs
``rounds`` rounds on the members split among the hospitals and releases the
final global model. ``observe`` on GRADIENTS simulates one more round at the
stated point (``round=init``: the seed's initialization; ``trained``: the
released model) in which the victim batch is the attacked hospitals' data, split
in order as evenly as possible among them (a hospital left without victim images
takes part with an empty batch: a zero update of weight 0; hospital-0, the
hospital observer, trains on images of its own shard), and derives the observer's observation from that round's
view log:

- ``aggregator``: ciphertexts only -> no plaintext (the attack outputs its
  uninformed prior guess); with ``aggregator_sees_models`` it differences the
  consecutive global models into the decrypted aggregate of all K hospitals.
- ``hospital`` (hospital-0): decrypts the aggregate and subtracts its own
  weighted update -> the mean gradient of the other K-1 hospitals' images.
- ``outsider``: only the released model; the gradient attacks are unsupported.

MODEL_WHITEBOX and MODEL_QUERIES pass the released model through unchanged: HE
protects the updates in transit, not the model it produces.

BatchNorm: each hospital's running statistics after its local steps travel with
its update, in the same ciphertexts, and the global statistics become their
size-weighted mean (``protocol.BUFFER_RULE``; stated in the training record and
in every GRADIENTS observation's ``buffers`` note). An observer that derives a
plaintext update also derives the buffers behind it (``GradientUpdate.buffers``):
they reveal the batch's per-channel statistics. The model handed to the attacker
carries the global statistics of the attacked round's start, never the victims'.

Randomness: the split, batches and initialization are seeded; encryption uses
fresh randomness (as it must), so CKKS results vary at the level of its
encoding error (about 1e-9) between runs; Paillier decrypts exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import typing
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from privbench import registry
from privbench.config import ConfigError, derive_seed
from privbench.defenses.base import (
    Defense,
    FitContext,
    Target,
    gradient_protocol_note,
    has_batchnorm,
    model_at_round,
    released_model_observation,
)
from privbench.defenses.he import ledger as ledgerlib
from privbench.defenses.he.protocol import (
    AGGREGATOR,
    BUFFER_RULE,
    OUTSIDER,
    Protocol,
    ViewLog,
    buffer_values,
    derive_update,
    hospital,
    parameter_count,
    running_buffers,
    split_clients,
    unflatten,
)
from privbench.defenses.he.schemes import (
    CKKSKeys,
    CKKSSettings,
    KeyHolderScheme,
    PaillierKeys,
    PaillierSettings,
    PlainKeys,
)
from privbench.deps import require
from privbench.params import bounded
from privbench.threat import GradientUpdate, Observation, Surface, UnsupportedPair, Victim
from privbench.training import accuracy

Scheme = Literal["ckks", "paillier", "plaintext"]
Observer = Literal["aggregator", "hospital", "outsider"]

_NOT_TRAINING = ("observer", "aggregator_sees_models")  # parameters that do not shape the trained target
_SCHEME_SETTINGS = ("poly_modulus_degree", "coeff_mod_bit_sizes", "scale_bits", "paillier_key_bits",
                    "paillier_precision", "paillier_pack", "paillier_pack_bound")


@dataclass(frozen=True)
class HEParams:
    """FedAvg over ``clients`` hospitals for ``rounds`` rounds; each round every hospital takes
    ``local_steps`` plain-SGD steps (learning rate ``lr``) on minibatches of ``batch_size`` of its own
    members. ``dirichlet_alpha``: None for an iid split, else class skew Dirichlet(alpha).

    ``scheme``: ``ckks`` (TenSEAL: ring degree ``poly_modulus_degree``, ``coeff_mod_bit_sizes`` in bits,
    scale 2**``scale_bits``), ``paillier`` (phe: ``paillier_key_bits``-bit modulus, fixed-point encoding at
    ``paillier_precision``; ``paillier_pack`` packs several values in [-pack_bound, pack_bound] per
    plaintext) or ``plaintext`` (no encryption: FedAvg in the clear, the utility twin).
    ``observer``: who the attacker is (aggregator, hospital, outsider). ``aggregator_sees_models``: the
    protocol variant in which the aggregator also receives each new global model.
    """

    clients: int = bounded(4, ge=1, le=1024)
    rounds: int = bounded(50, ge=0, le=10**6)
    local_steps: int = bounded(1, ge=1, le=10**6)
    batch_size: int = bounded(32, ge=1, le=65_536)
    lr: float = bounded(0.05, gt=0, le=100)
    dirichlet_alpha: float | None = bounded(None, gt=0, le=1e6)
    scheme: Scheme = "ckks"
    poly_modulus_degree: int = bounded(8192, ge=1024, le=32_768)
    coeff_mod_bit_sizes: tuple[int, ...] = bounded((60, 40, 40, 60), ge=1, le=60)
    scale_bits: int = bounded(40, ge=1, le=60)
    paillier_key_bits: int = bounded(2048, ge=256, le=16_384)
    paillier_precision: float = bounded(1e-12, gt=0, lt=1)
    paillier_pack: bool = False
    paillier_pack_bound: float = bounded(64.0, gt=0, le=1e12)
    observer: Observer = "aggregator"
    aggregator_sees_models: bool = False

    def __post_init__(self) -> None:
        if self.scheme not in typing.get_args(Scheme):
            raise ValueError(f"scheme must be one of {list(typing.get_args(Scheme))}, got {self.scheme!r}")
        if not isinstance(self.clients, int) or self.clients < 1:
            raise ValueError(f"clients must be an integer >= 1 (the number of hospitals), got {self.clients!r}")
        if self.rounds < 0 or self.local_steps < 1 or self.batch_size < 1:
            raise ValueError("rounds must be >= 0, local_steps >= 1 and batch_size >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if self.dirichlet_alpha is not None and not (math.isfinite(self.dirichlet_alpha) and self.dirichlet_alpha > 0):
            raise ValueError(f"dirichlet_alpha must be > 0 (or none for iid), got {self.dirichlet_alpha}")
        if self.poly_modulus_degree < 1024 or self.poly_modulus_degree & (self.poly_modulus_degree - 1):
            raise ValueError(f"poly_modulus_degree must be a power of two >= 1024, got {self.poly_modulus_degree}")
        if not self.coeff_mod_bit_sizes or any(not 1 <= b <= 60 for b in self.coeff_mod_bit_sizes):
            raise ValueError(f"coeff_mod_bit_sizes must be 1..60 bits each, got {list(self.coeff_mod_bit_sizes)}")
        if not 1 <= self.scale_bits < self.coeff_mod_bit_sizes[0] - 1:
            raise ValueError(
                f"scale 2^{self.scale_bits} leaves no room for values below the first coefficient modulus "
                f"(2^{self.coeff_mod_bit_sizes[0]}): CKKS values need |v| * scale < 2^(q0-1); use "
                f"scale_bits < coeff_mod_bit_sizes[0] - 1"
            )
        if self.paillier_key_bits < 256:
            raise ValueError(f"paillier_key_bits must be >= 256, got {self.paillier_key_bits}")
        if not 0 < self.paillier_precision < 1:
            raise ValueError(f"paillier_precision must be in (0, 1), got {self.paillier_precision}")
        if not self.paillier_pack_bound > 0:
            raise ValueError(f"paillier_pack_bound must be > 0, got {self.paillier_pack_bound}")
        if self.observer == "hospital" and self.clients < 2:
            raise ValueError("observer=hospital needs clients >= 2: with one hospital there is no one else to attack")


def make_keys(p: HEParams) -> KeyHolderScheme:
    """The hospitals' shared key pair for ``p.scheme``."""
    if p.scheme == "ckks":
        return CKKSKeys(CKKSSettings(p.poly_modulus_degree, tuple(p.coeff_mod_bit_sizes), p.scale_bits))
    if p.scheme == "paillier":
        return PaillierKeys(PaillierSettings(p.paillier_key_bits, p.paillier_precision, p.paillier_pack,
                                             p.paillier_pack_bound))
    return PlainKeys()


class _Sampler:
    """Minibatches of one hospital's members: a seeded permutation, reshuffled at the end of each pass."""

    def __init__(self, indices: np.ndarray, batch_size: int, seed: int):
        self.indices, self.batch_size = indices, batch_size
        self.rng = np.random.default_rng(seed)
        self.order, self.at = self.rng.permutation(indices), 0

    def next(self) -> np.ndarray:
        if self.at >= len(self.order):
            self.order, self.at = self.rng.permutation(self.indices), 0
        batch = self.order[self.at : self.at + self.batch_size]
        self.at += self.batch_size
        return batch


def _buffer_note(model: nn.Module, shared: bool = False, encrypted: bool = False) -> str:
    """How the protocol treats ``model``'s buffers, and (for an observation) what the observer holds of them."""
    if not running_buffers(model):
        return "none: the model has no BatchNorm running statistics, so the updates carry parameters only"
    if encrypted:
        held = ("the observer holds them as ciphertexts only (GradientUpdate.buffers is empty); decrypted, they would "
                "reveal the per-channel mean and variance of the batches behind them")
    elif shared:
        held = ("GradientUpdate.buffers holds them (the size-weighted mean of the running statistics of the hospitals "
                "behind the update, after their local steps); with the global statistics b_t (the handed model's) "
                "they reveal the batch's per-channel mean and variance at every BatchNorm layer: b_k = (1 - m) b_t + "
                "m * batch statistic, m the BatchNorm momentum")
    else:
        held = "the released model carries the statistics aggregated in the last round"
    return f"{BUFFER_RULE}; {held}"


@registry.defenses.register("he")
class HomomorphicFedAvg(Defense):
    """HE federated aggregation (Kumar et al. 2022): K hospitals, CKKS or Paillier, hash-chained ledger."""

    Params = HEParams
    description = (
        "HE federated aggregation (Kumar et al. 2022): K hospitals share one CKKS (TenSEAL) or Paillier (phe) key; "
        "each round they send encrypted weighted updates, the keyless aggregator adds ciphertexts (checked "
        "against ledger digests), every hospital decrypts the sum and applies FedAvg; the final model is released. "
        "Observers: aggregator (ciphertexts), hospital (aggregate minus own), outsider (released model)."
    )
    protects = frozenset({Surface.GRADIENTS})
    stochastic = True  # fresh encryption randomness (CKKS decrypts with ~1e-9 noise)
    models = None  # any registered model: BatchNorm buffers are aggregated with the parameters (protocol.BUFFER_RULE)
    default_model = "lenet"
    # the hospital observer sees a decrypted aggregate: the view where a leaked key or plaintext would show
    tiny_params = {"rounds": 2, "clients": 3, "batch_size": 8, "observer": "hospital"}

    def __init__(self, params: HEParams):
        needed = {"ckks": "tenseal", "paillier": "phe"}.get(params.scheme)
        if needed:
            require(needed, f"the he defense with scheme={params.scheme}")
        super().__init__(params)

    def identity(self) -> dict[str, Any]:
        params = dataclasses.asdict(self.params)
        drop = _NOT_TRAINING + (_SCHEME_SETTINGS if self.params.scheme == "plaintext" else ())
        return {"class": f"{type(self).__module__}.{type(self).__qualname__}",
                "params": {k: v for k, v in params.items() if k not in drop}}

    def utility_twin(self) -> Defense | None:
        if self.params.scheme == "plaintext":
            return None
        return HomomorphicFedAvg(dataclasses.replace(self.params, scheme="plaintext"))

    # -- training ---------------------------------------------------------------------------------
    def shards(self, members, seed: int) -> list[np.ndarray]:
        p = self.params
        return split_clients(members.labels.numpy(), p.clients, derive_seed(seed, "he-split"), p.dirichlet_alpha)

    def fit(self, model: nn.Module, members, ctx: FitContext) -> Target:
        p = self.params
        shards = self.shards(members, ctx.seeds["train"])
        initial_state = copy.deepcopy(model.state_dict())
        t0 = time.perf_counter()
        keys = make_keys(p)
        keygen_s = time.perf_counter() - t0
        protocol = Protocol(keys, model, p.clients, p.lr, p.local_steps,
                            aggregator_sees_models=p.aggregator_sees_models, log=ViewLog(keep_payloads=False))
        samplers = [_Sampler(s, p.batch_size, derive_seed(ctx.seeds["train"], f"he-batches-{k}"))
                    for k, s in enumerate(shards)]
        stats = []
        start = time.perf_counter()
        model.train()
        if ctx.progress:
            ctx.progress("train (federated rounds)", 0, p.rounds)
        for t in range(p.rounds):
            batches, examples = [], []
            for sampler in samplers:
                steps = [sampler.next() for _ in range(p.local_steps)]
                batches.append([(members.images[idx], members.labels[idx]) for idx in steps])
                examples.append(len(set(np.concatenate(steps).tolist())))
            stats.append(protocol.round(t, batches, examples))
            if ctx.progress:
                ctx.progress("train (federated rounds)", t + 1, p.rounds)
        protocol.release(p.rounds)
        train_time = time.perf_counter() - start
        model.eval()
        ledger_text = protocol.ledger.to_jsonl()
        check = ledgerlib.verify(ledger_text)
        if not check.ok:  # the simulation wrote it: a mismatch is a bug
            raise RuntimeError(f"ledger does not verify after training: {check.reason}")
        rounds = [dataclasses.asdict(s) for s in stats]

        def mean(key: str) -> float:
            return float(np.mean([r[key] for r in rounds])) if rounds else 0.0

        parties = [hospital(k) for k in range(p.clients)] + [AGGREGATOR, OUTSIDER]
        record = {
            "protocol": "see privbench.defenses.he.protocol",
            "scheme": keys.describe(),
            "clients": p.clients,
            "shard_sizes": [len(s) for s in shards],
            "shard_class_counts": [np.bincount(members.labels.numpy()[s], minlength=members.num_classes).tolist()
                                   for s in shards],
            "rounds": rounds,
            "views": {party: protocol.log.summary(party) for party in parties},
            "ledger_blocks": len(protocol.ledger.blocks),
            "ledger_verified": check.ok,
            "ledger_head": protocol.ledger.blocks[-1]["hash"] if protocol.ledger.blocks else ledgerlib.GENESIS,
            "buffers": _buffer_note(model),
            "train_accuracy": accuracy(model, members),
            "train_time_s": train_time,
            "artifacts": {"ledger.jsonl": ledger_text},
        }
        costs = {
            "train_time_s": train_time,
            "he_keygen_s": keygen_s,
            "he_encrypt_s_per_round": mean("encrypt_s"),
            "he_aggregate_s_per_round": mean("aggregate_s"),
            "he_decrypt_s_per_round": mean("decrypt_s"),
            "ciphertext_bytes_per_client_round": mean("ciphertext_bytes_per_client"),
            "plaintext_bytes_per_client_round": mean("plaintext_bytes_per_client"),
            "he_max_abs_error": max((r["max_abs_error"] for r in rounds), default=0.0),
        }
        if costs["plaintext_bytes_per_client_round"]:
            costs["ciphertext_expansion"] = costs["ciphertext_bytes_per_client_round"] / costs[
                "plaintext_bytes_per_client_round"]
        return Target(model=model, initial_state=initial_state, training=record,
                      utility={"accuracy": accuracy(model, ctx.nonmembers)}, costs=costs)

    # -- observation ------------------------------------------------------------------------------
    def observe(self, surface: Surface, target: Target, victim: Victim | None, ctx: FitContext) -> Observation:
        if surface is not Surface.GRADIENTS:
            return released_model_observation(surface, target, "he")
        p = self.params
        if (ctx.config.bn_mode, ctx.config.bn_buffers) != ("train", "shared") and has_batchnorm(ctx.build_model()):
            raise UnsupportedPair(
                f"he's FedAvg protocol computes each local step with BatchNorm in train mode and averages the "
                f"BatchNorm buffers with the weights; bn_mode={ctx.config.bn_mode}, bn_buffers={ctx.config.bn_buffers} "
                f"is not this protocol: use --bn-mode train --bn-buffers shared, or a model without BatchNorm")
        if p.observer == "outsider":
            derive_update(ViewLog(), OUTSIDER, 0, p.lr, p.scheme)  # raises: the outsider receives no update
        party = AGGREGATOR if p.observer == "aggregator" else hospital(0)
        attacked = list(range(p.clients)) if party == AGGREGATOR else list(range(1, p.clients))
        # the victim batch is the attacked hospitals' data this round, split in order as evenly as possible;
        # a hospital left without victim images takes part with an empty batch (a zero update, weight 0)
        cuts = np.array_split(np.arange(len(victim.labels)), len(attacked))
        per = max(len(c) for c in cuts)
        batches: list[list] = [[] for _ in range(p.clients)]
        for idx, k in zip(cuts, attacked, strict=True):
            batches[k] = [(victim.images[idx], victim.labels[idx])]
        if party != AGGREGATOR:
            batches[0] = [self._own_batch(ctx, victim, per)]
        batches = [steps * p.local_steps for steps in batches]  # the same batch at each local step
        round_ = 0 if ctx.config.gradient_round == "init" else p.rounds
        model = model_at_round(target, ctx.build_model, ctx.config.gradient_round)
        protocol = Protocol(make_keys(p), copy.deepcopy(model), p.clients, p.lr, p.local_steps,
                            aggregator_sees_models=p.aggregator_sees_models)
        stats = protocol.round(round_, batches, [len(steps[0][1]) for steps in batches])
        derived = derive_update(protocol.log, party, round_, p.lr, p.scheme, n_params=parameter_count(model))
        gradients = () if derived.vector is None else unflatten(derived.vector, model)
        buffers = () if derived.buffers is None else buffer_values(derived.buffers, model, p.local_steps)
        update = GradientUpdate(
            model=model, gradients=gradients, batch_size=derived.batch_size, input_shape=tuple(victim.images.shape[1:]),
            num_classes=ctx.nonmembers.num_classes, round=ctx.config.gradient_round,
            encrypted=derived.vector is None, local_steps=p.local_steps, buffers=buffers,
        )
        notes = {
            "gradient_protocol": gradient_protocol_note(ctx.config, model),
            "observer": p.observer,
            "party": party,
            "derived": derived.how,
            "plaintext": derived.vector is not None,
            "behind_update": list(derived.parties),
            "attacked_hospitals": [hospital(k) for k in attacked],
            "images_per_hospital": {hospital(k): len(batches[k][0][1]) for k in range(p.clients)},
            "view": protocol.log.summary(party, round_),
            "protocol_round": round_,
            "scheme": protocol.keys.describe(),
            "round_costs": dataclasses.asdict(stats),
            "local_steps": p.local_steps,
            "buffers": _buffer_note(model, shared=bool(buffers), encrypted=derived.vector is None),
        }
        return Observation(surface=Surface.GRADIENTS, gradient_update=update, notes=notes)

    def audit_secrets(self, surface: Surface, target: Target, ctx: FitContext) -> dict[str, Any]:
        """The hospitals' decryption key: a key-holder scheme, a TenSEAL context with its secret key, a
        Paillier private key."""
        def holds_secret_key(obj: Any) -> bool:
            if isinstance(obj, KeyHolderScheme):
                return True
            if type(obj).__name__ == "PaillierPrivateKey":
                return True
            return type(obj).__module__.startswith("tenseal") and bool(getattr(obj, "has_secret_key", lambda: False)())

        return {"decryption key": holds_secret_key}

    def _own_batch(self, ctx: FitContext, victim: Victim, per: int) -> tuple[torch.Tensor, torch.Tensor]:
        """hospital-0's own images in the attacked round: from its shard, none of them a victim image."""
        members = ctx.members
        if members is None:
            raise RuntimeError("he: the hospital observer needs the members (FitContext.members)")
        shard = self.shards(members, ctx.seeds["train"])[0]
        taken = set(victim.ids)
        free = [i for i in shard.tolist() if members.ids[i] not in taken]
        if len(free) < per:
            raise ConfigError(f"he: hospital-0 holds {len(free)} images besides the victims', needs {per}")
        idx = np.random.default_rng(derive_seed(ctx.seeds["victim"], "he-own")).choice(free, size=per, replace=False)
        return members.images[idx], members.labels[idx]
