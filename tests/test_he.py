"""The he defense: CKKS / Paillier aggregation accuracy, keyless aggregator, ledger, observers, bad input.

Fast tests on synthetic-mri at 16x16; Paillier uses short keys (the default 2048-bit key is timed in
benchmarks/perf/he_aggregation.py).
"""

import copy
import dataclasses
import importlib.util
import json

import numpy as np
import pytest
import torch
from torch import nn

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread, as the runner uses

pytest.importorskip("tenseal")
pytest.importorskip("phe")

from privbench.attacks.base import AttackError  # noqa: E402
from privbench.attacks.gradient_inversion import DLG, GradientInversionParams  # noqa: E402
from privbench.config import Budget, ConfigError, RunConfig, coerce_params  # noqa: E402
from privbench.datasets import load  # noqa: E402
from privbench.datasets import splits as splitlib  # noqa: E402
from privbench.defenses.base import FitContext, client_gradients  # noqa: E402
from privbench.defenses.he import ledger as ledgerlib  # noqa: E402
from privbench.defenses.he import schemes  # noqa: E402
from privbench.defenses.he.defense import HEParams, HomomorphicFedAvg  # noqa: E402
from privbench.defenses.he.protocol import (  # noqa: E402
    AGGREGATOR,
    Protocol,
    derive_update,
    flat_buffers,
    flat_params,
    hospital,
    split_clients,
)
from privbench.metrics.score_reconstruction import hungarian_by_psnr  # noqa: E402
from privbench.models import build_model  # noqa: E402
from privbench.runner import run  # noqa: E402
from privbench.store import Store  # noqa: E402
from privbench.threat import Surface, Victim  # noqa: E402

SIZE = 16


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    dataset = load("synthetic-mri", SIZE, 1, cache_dir=tmp_path_factory.mktemp("cache"))
    return splitlib.make(dataset, splitlib.SplitSpec(), seed=0)


@pytest.fixture(scope="module")
def ckks():
    return schemes.CKKSKeys(schemes.CKKSSettings())


def _lenet_updates(k=4, size=32):
    """K LeNet-sized updates (real gradients of LeNet at 32x32, 1 channel, 4 classes), float64."""
    model = build_model("lenet", {}, 1, size, 4, seed=0)
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(k):
        x, y = torch.rand(2, 1, size, size, generator=gen), torch.randint(0, 4, (2,), generator=gen)
        out.append(torch.cat([g.reshape(-1) for g in client_gradients(model, x, y)]).double().numpy())
    return out


# -- acceptance 1: aggregation accuracy and the keyless aggregator -------------------------------


def test_ckks_aggregate_of_four_lenet_sized_updates_matches_plaintext(ckks):
    updates = _lenet_updates()
    assert updates[0].size > 10_000  # LeNet at 32x32: three ciphertexts of 4096 slots each
    aggregate = ckks.public().add([schemes.Ciphertext.from_bytes(ckks.encrypt(u / 4, 4).to_bytes()) for u in updates])
    error = np.abs(ckks.decrypt(aggregate) - sum(u / 4 for u in updates)).max()
    assert 0 < error < 1e-5  # approximate (CKKS), and well within 1e-5


@pytest.mark.parametrize("pack", [False, True])
def test_paillier_aggregate_matches_within_fixed_point_precision(pack):
    keys = schemes.PaillierKeys(schemes.PaillierSettings(key_bits=512, precision=1e-9, pack=pack))
    rng = np.random.default_rng(1)
    values = [rng.normal(0, 0.3, 120) for _ in range(4)]
    aggregate = keys.public().add([keys.encrypt(v, 4) for v in values])
    error = np.abs(keys.decrypt(aggregate) - sum(values)).max()
    assert error <= keys.resolution(4) + 1e-15
    assert keys.resolution(4) < 1e-8
    if pack:  # several values per ciphertext
        assert len(aggregate.parts) < len(values[0]) / 4


def test_aggregator_holds_no_secret_key(ckks):
    model = build_model("lenet", {}, 1, SIZE, 4, seed=0)
    agg = Protocol(ckks, model, 2, 0.1, 1).aggregator
    assert not agg.scheme.context.has_secret_key() and not agg.scheme.context.is_private()
    ciphertext = ckks.encrypt(np.ones(10), 2)
    with pytest.raises(ValueError, match="secret_key"):  # TenSEAL refuses
        agg.try_decrypt(ciphertext)
    paillier = schemes.PaillierKeys(schemes.PaillierSettings(key_bits=256))
    agg = Protocol(paillier, model, 2, 0.1, 1).aggregator
    from phe.paillier import PaillierPrivateKey

    assert not any(isinstance(v, PaillierPrivateKey) for v in vars(agg.scheme).values())
    assert not hasattr(agg.scheme.public_key, "p")
    with pytest.raises(schemes.NoSecretKeyError):
        agg.try_decrypt(paillier.encrypt(np.ones(3), 2))


# -- the protocol -------------------------------------------------------------------------------


def _batches(parts, sizes, offset=0):
    out, at = [], offset
    for n in sizes:
        out.append([(parts.members.images[at : at + n], parts.members.labels[at : at + n])])
        at += n
    return out


@pytest.mark.parametrize("scheme", ["plaintext", "ckks"])
def test_a_round_is_fedavg_of_the_weighted_gradients(parts, ckks, scheme):
    keys = ckks if scheme == "ckks" else schemes.PlainKeys()
    model = build_model("lenet", {}, 1, SIZE, 4, seed=0)
    before = flat_params(model)
    sizes = [3, 1, 2]
    batches = _batches(parts, sizes)
    expected = sum(
        n / 6 * torch.cat([g.reshape(-1) for g in client_gradients(model, *b[0])]).double().numpy()
        for n, b in zip(sizes, batches, strict=True)
    )
    protocol = Protocol(keys, model, 3, 0.1, 1)
    stats = protocol.round(0, batches, sizes)
    np.testing.assert_allclose(flat_params(model), before - 0.1 * expected, atol=1e-6)
    assert stats.max_abs_error < (1e-6 if scheme == "ckks" else 1e-12)
    assert len(protocol.ledger.blocks) == 1 and set(protocol.ledger.blocks[0]["client_digests"]) == {
        hospital(k) for k in range(3)}


def test_client_split_is_deterministic_and_skewed_by_dirichlet():
    labels = np.repeat(np.arange(4), 50)
    a = split_clients(labels, 4, seed=3, dirichlet_alpha=None)
    assert [len(s) for s in a] == [50] * 4 and np.array_equal(np.sort(np.concatenate(a)), np.arange(200))
    assert all(np.array_equal(x, y) for x, y in zip(a, split_clients(labels, 4, 3, None), strict=True))
    skew = split_clients(labels, 4, seed=3, dirichlet_alpha=0.1)
    assert np.array_equal(np.sort(np.concatenate(skew)), np.arange(200))
    purity = [np.bincount(labels[s], minlength=4).max() / len(s) for s in skew]
    assert np.mean(purity) > 0.6  # iid shards are ~0.25 pure
    with pytest.raises(ConfigError, match="exceeds"):
        split_clients(labels[:3], 4, 0, None)


# -- acceptance 4: the ledger -------------------------------------------------------------------


def test_changing_one_byte_of_a_stored_block_is_reported_at_that_block(parts):
    protocol = Protocol(schemes.PlainKeys(), build_model("lenet", {}, 1, SIZE, 4, seed=0), 2, 0.1, 1)
    for t in range(4):
        protocol.round(t, _batches(parts, [1, 1], offset=2 * t), [1, 1])
    text = protocol.ledger.to_jsonl()
    assert ledgerlib.verify(text).ok and ledgerlib.verify(text).blocks == 4
    lines = text.splitlines(keepends=True)
    for target in range(4):
        line = lines[target]
        at = line.index('"aggregate_digest":"') + len('"aggregate_digest":"') + 5
        flipped = line[:at] + ("0" if line[at] != "0" else "1") + line[at + 1 :]
        result = ledgerlib.verify("".join(lines[:target] + [flipped] + lines[target + 1 :]))
        assert not result.ok and result.bad_block == target, result
    raw = bytearray(text.encode())
    raw[len("".join(lines[:2])) + 3] ^= 0x01  # any byte of block 2, even one that breaks its JSON
    assert ledgerlib.verify(bytes(raw)).bad_block == 2


def test_a_corrupted_ciphertext_fails_the_round_naming_the_client_and_applies_nothing(parts, ckks):
    def corrupt(round_, sender, blob):
        if round_ == 1 and sender == "hospital-2":
            blob = bytearray(blob)
            blob[-100] ^= 0xFF
            return bytes(blob)
        return blob

    model = build_model("lenet", {}, 1, SIZE, 4, seed=0)
    protocol = Protocol(ckks, model, 3, 0.1, 1, channel=corrupt)
    protocol.round(0, _batches(parts, [1, 1, 1]), [1, 1, 1])
    before = flat_params(model)
    with pytest.raises(ledgerlib.CiphertextMismatch, match="hospital-2") as info:
        protocol.round(1, _batches(parts, [1, 1, 1], offset=3), [1, 1, 1])
    assert info.value.client == "hospital-2" and info.value.round == 1
    assert np.array_equal(flat_params(model), before)  # no update from round 1
    assert len(protocol.ledger.blocks) == 1 and not protocol.ledger.pending


# -- observers ----------------------------------------------------------------------------------


def test_hospital_with_k2_recovers_the_other_hospitals_gradient(parts, ckks):
    model = build_model("lenet", {}, 1, SIZE, 4, seed=0)
    batches = _batches(parts, [2, 1])
    other = torch.cat([g.reshape(-1) for g in client_gradients(model, *batches[1][0])]).double().numpy()
    protocol = Protocol(ckks, model, 2, 0.1, 1)
    protocol.round(0, batches, [2, 1])
    derived = derive_update(protocol.log, hospital(0), 0, 0.1, "ckks")
    assert derived.batch_size == 1 and derived.parties == ("hospital-1",)
    np.testing.assert_allclose(derived.vector, other, atol=1e-6)


def test_aggregator_sees_ciphertexts_only_unless_it_receives_the_models(parts, ckks):
    model = build_model("lenet", {}, 1, SIZE, 4, seed=0)
    batches = _batches(parts, [1, 1, 1])
    protocol = Protocol(ckks, model, 3, 0.1, 1)
    protocol.round(0, batches, [1, 1, 1])
    assert {e.kind for e in protocol.log.of(AGGREGATOR)} == {"ciphertext", "client_sizes", "encrypted_aggregate",
                                                            "ledger_block"}
    assert derive_update(protocol.log, AGGREGATOR, 0, 0.1, "ckks").vector is None

    model = build_model("lenet", {}, 1, SIZE, 4, seed=0)
    mean = torch.cat([g.reshape(-1) for g in client_gradients(model, parts.members.images[:3],
                                                              parts.members.labels[:3])]).double().numpy()
    protocol = Protocol(ckks, model, 3, 0.1, 1, aggregator_sees_models=True)
    protocol.round(0, batches, [1, 1, 1])
    derived = derive_update(protocol.log, AGGREGATOR, 0, 0.1, "ckks")
    assert derived.batch_size == 3
    np.testing.assert_allclose(derived.vector, mean, atol=1e-5)  # float32 weights differenced, / lr


def _fit(parts, **params):
    cfg = RunConfig(defense="he", image_size=SIZE, defense_params={"rounds": 2, **params})
    seeds = cfg.derived_seeds()

    def fresh():
        return build_model("lenet", {}, 1, SIZE, parts.members.num_classes, seeds["init"])

    ctx = FitContext(cfg, fresh, parts.nonmembers, seeds, members=parts.members)
    defense = HomomorphicFedAvg(HEParams(**{"rounds": 2, **params}))
    return defense, defense.fit(fresh(), parts.members, ctx), ctx


@pytest.fixture(scope="module")
def fitted(parts):
    return _fit(parts, clients=4, rounds=2)


def test_fit_records_costs_and_a_verifying_ledger(fitted):
    _, target, _ = fitted
    c = target.costs
    assert c["ciphertext_bytes_per_client_round"] > c["plaintext_bytes_per_client_round"] > 0
    assert 0 < c["he_max_abs_error"] < 1e-5 and c["he_encrypt_s_per_round"] > 0
    assert len(target.training["rounds"]) == 2 and target.training["ledger_blocks"] == 2
    assert ledgerlib.verify(target.training["artifacts"]["ledger.jsonl"]).ok


def test_observers_get_what_their_view_holds(parts, fitted):
    defense, target, ctx = fitted
    victim = Victim(parts.members.images[:3], parts.members.labels[:3], parts.members.ids[:3])
    hospital_obs = HomomorphicFedAvg(dataclasses.replace(defense.params, observer="hospital"))
    assert hospital_obs.identity() == defense.identity()  # the observer does not change the trained target
    obs = hospital_obs.observe(Surface.GRADIENTS, target, victim, ctx)
    update = obs.gradient_update
    assert obs.notes["plaintext"] and update.batch_size == 3 and not update.encrypted
    expected = client_gradients(update.model, victim.images, victim.labels)
    for g, e in zip(update.gradients, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)

    obs = defense.observe(Surface.GRADIENTS, target, victim, ctx)  # aggregator, ciphertexts only
    assert obs.gradient_update.encrypted and obs.gradient_update.gradients == () and not obs.notes["plaintext"]
    out = DLG(GradientInversionParams(steps=2), seed=0).run(obs, Budget())
    assert out.grad_evals == 0 and torch.all(out.images == 0.5) and "ciphertexts" in out.info["no_plaintext"]

    outsider = HomomorphicFedAvg(dataclasses.replace(defense.params, observer="outsider"))
    with pytest.raises(AttackError, match="released model"):
        outsider.observe(Surface.GRADIENTS, target, victim, ctx)
    whitebox = outsider.observe(Surface.MODEL_WHITEBOX, target, None, ctx).model
    torch.testing.assert_close(whitebox(parts.nonmembers.images[:4]), target.model(parts.nonmembers.images[:4]))


# -- BatchNorm buffers ----------------------------------------------------------------------------


def _buffers_after_local_step(model, batch):
    """A hospital's running statistics after one train-mode step on ``batch`` (float64 [R])."""
    local = copy.deepcopy(model).train()
    local(batch[0])
    return flat_buffers(local).astype(np.float64)


@pytest.mark.parametrize("scheme", ["plaintext", "ckks"])
def test_batchnorm_buffers_aggregate_to_the_size_weighted_mean_of_the_clients(parts, ckks, scheme):
    keys = ckks if scheme == "ckks" else schemes.PlainKeys()
    model = build_model("resnet", {}, 1, SIZE, 4, seed=0)
    sizes = [3, 1, 2]
    batches = _batches(parts, sizes)
    clients = [_buffers_after_local_step(model, b[0]) for b in batches]
    expected = sum(n / 6 * c for n, c in zip(sizes, clients, strict=True))
    assert np.abs(clients[0] - clients[1]).max() > 1e-3  # the hospitals' statistics differ
    protocol = Protocol(keys, model, 3, 0.1, 1)
    protocol.round(0, batches, sizes)
    np.testing.assert_allclose(flat_buffers(model), expected, atol=1e-6)
    counts = [int(b) for b in model.buffers() if not b.is_floating_point()]
    assert counts and set(counts) == {1}  # num_batches_tracked: the hospitals' maximum (0 + one local step)

    derived = derive_update(protocol.log, hospital(0), 0, 0.1, scheme, n_params=sum(p.numel() for p in model.parameters()))
    np.testing.assert_allclose(derived.buffers, (1 * clients[1] + 2 * clients[2]) / 3, atol=1e-6)  # the others'


def test_he_on_resnet_releases_aggregated_statistics_and_shares_them_in_the_observation(parts):
    members = parts.members.subset(list(range(96)))
    cfg = RunConfig(defense="he", model="resnet", image_size=SIZE)
    seeds = cfg.derived_seeds()

    def fresh():
        return build_model("resnet", {}, 1, SIZE, parts.members.num_classes, seeds["init"])

    ctx = FitContext(cfg, fresh, parts.nonmembers, seeds, members=members)
    defense = HomomorphicFedAvg(HEParams(rounds=2, clients=3, scheme="plaintext", observer="hospital"))
    target = defense.fit(fresh(), members, ctx)
    assert "size-weighted mean" in target.training["buffers"]
    released = dict(target.model.named_buffers())
    assert any(name.endswith("running_mean") and value.abs().max() > 0 for name, value in released.items())
    assert all(int(v) == 2 for k, v in released.items() if k.endswith("num_batches_tracked"))  # 2 rounds x 1 step

    victim = Victim(members.images[:4], members.labels[:4], members.ids[:4])
    obs = defense.observe(Surface.GRADIENTS, target, victim, ctx)
    update = obs.gradient_update
    assert "per-channel mean and variance" in obs.notes["buffers"]
    # the handed model carries the global statistics of the round's start (round=init), never the victims'
    for name, value in update.model.named_buffers():
        assert torch.equal(value, target.initial_state[name]), name
    # the shared buffers: the size-weighted mean of the attacked hospitals' statistics on their victim images
    assert len(update.buffers) == len(list(update.model.buffers()))
    halves = [victim.images[:2], victim.images[2:]]  # hospitals 1 and 2 get two victim images each
    expected = np.mean([_buffers_after_local_step(update.model, (h,)) for h in halves], axis=0)
    shared = torch.cat([b.reshape(-1) for b in update.buffers if b.is_floating_point()]).double().numpy()
    np.testing.assert_allclose(shared, expected, atol=1e-5)

    encrypted = HomomorphicFedAvg(dataclasses.replace(defense.params, scheme="ckks", observer="aggregator"))
    obs = encrypted.observe(Surface.GRADIENTS, target, victim, ctx)
    assert obs.gradient_update.buffers == () and "ciphertexts only" in obs.notes["buffers"]


def test_multi_step_updates_are_refused_by_the_gradient_attack(parts):
    defense, target, ctx = _fit(parts, clients=2, rounds=0, local_steps=3, observer="hospital")
    victim = Victim(parts.members.images[:1], parts.members.labels[:1], parts.members.ids[:1])
    obs = defense.observe(Surface.GRADIENTS, target, victim, ctx)
    assert obs.gradient_update.local_steps == 3
    with pytest.raises(AttackError, match="not a gradient"):
        DLG(GradientInversionParams(steps=2), seed=0).run(obs, Budget())


def test_hungarian_matching_undoes_a_permutation():
    truth = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    perm = [3, 0, 4, 1, 2]
    noisy = (truth[perm] + 0.01 * torch.randn(5, 1, 8, 8)).clamp(0, 1)
    order = hungarian_by_psnr(noisy, truth)
    assert [perm[i] for i in order] == list(range(5))


# -- acceptance 6: bad input ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "given, named",
    [({"clients": "0"}, "clients"), ({"scale_bits": "60"}, "scale"),
     ({"coeff_mod_bit_sizes": "30,20,30", "scale_bits": "29"}, "scale"),
     ({"observer": "hospital", "clients": "1"}, "clients"), ({"dirichlet_alpha": "0"}, "dirichlet_alpha")],
)

def test_bad_parameters_are_config_errors(given, named):
    with pytest.raises(ConfigError, match=named):
        coerce_params(HEParams, given, "defense 'he'")


def test_values_beyond_the_ckks_capacity_are_refused_before_encrypting(ckks):
    with pytest.raises(schemes.HERangeError, match="wrap"):
        ckks.encrypt(np.array([0.1, 2.0e5]), summands=4)  # 4 x 2e5 > 2^19
    model = nn.Linear(4, 2)
    nn.init.zeros_(model.weight)  # softmax 1/2 each: the weight gradient is -0.5 * 1e7 on the true class's row
    big = [[(torch.full((1, 4), 1e7), torch.tensor([0]))], [(torch.zeros(1, 4), torch.tensor([1]))]]
    before = flat_params(model)
    with pytest.raises(schemes.HERangeError):
        Protocol(ckks, model, 2, 0.1, 1).round(0, big, [1, 1])
    assert np.array_equal(flat_params(model), before)


def test_seal_rejected_parameters_are_config_errors():
    with pytest.raises(ConfigError, match="rejected by SEAL"):
        schemes.CKKSKeys(schemes.CKKSSettings(4096, (60, 40, 40, 60), 40))  # 200 bits > 109 for N=4096


def test_missing_tenseal_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tenseal" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'tenseal>=0\.3'"):
        HomomorphicFedAvg(HEParams())


def _cli(*args):
    from typer.testing import CliRunner

    from privbench.cli import app

    return CliRunner().invoke(app, ["run", "--image-size", "16", *args])


def test_cli_bad_input_exits_2_and_stores_nothing(bench_home):
    for args, says in [
        (["--defense-param", "clients=0"], "clients"),
        (["--members", "6", "--defense-param", "clients=8"], "exceeds"),
        (["--defense-param", "scale_bits=58", "--defense-param", "coeff_mod_bit_sizes=59,40,59"], "scale"),
    ]:
        result = _cli("--defense", "he", *args)
        assert result.exit_code == 2, result.output
        assert says in result.output
    assert not Store().all_ok()


def test_range_error_during_fit_stores_nothing(bench_home, monkeypatch):
    monkeypatch.setattr(schemes.CKKSSettings, "capacity", property(lambda self: 1e-9))
    with pytest.raises(schemes.HERangeError):
        run(RunConfig(defense="he", image_size=SIZE, defense_params={"rounds": 1}), Store())
    assert not Store().all_ok()


# -- acceptance 3 (first half): an ok row whose observation is the aggregator's view -----------------


def test_runner_stores_the_aggregators_view_and_the_ledger(bench_home):
    store = Store()
    result = run(RunConfig(defense="he", attack="dlg", image_size=SIZE, defense_params={"rounds": 2,
                                                                                     "observer": "aggregator"},
                           attack_params={"steps": 2, "restarts": 1}), store)
    assert result.status == "ok", result.traceback
    row = store.get(result.run_id)
    obs = row.info["observation"]
    assert obs["party"] == "aggregator" and obs["plaintext"] is False and "ciphertexts only" in obs["derived"]
    assert obs["view"]["ciphertext"] == 4 and "decrypted_aggregate" not in obs["view"]
    assert row.info["attack"]["no_plaintext"] and row.grad_evals == 0
    ledger = store.root / row.artifacts / "ledger.jsonl"
    assert ledgerlib.verify(ledger.read_text()).ok
    assert row.info["target"]["training"]["artifacts"] == ["ledger.jsonl"]
    assert json.loads(ledger.read_text().splitlines()[-1])["round"] == 1
    assert row.metrics["accuracy_drop"] == pytest.approx(row.metrics["twin_accuracy"] - row.metrics["target_accuracy"])

    from typer.testing import CliRunner

    from privbench.cli import app

    intact = CliRunner().invoke(app, ["ledger", "verify", result.run_id])
    assert intact.exit_code == 0 and "2 blocks, hash chain intact" in intact.output, intact.output
    lines = ledger.read_text().splitlines(keepends=True)
    ledger.write_text(lines[0] + lines[1].replace('"round":1', '"round":7'))
    tampered = CliRunner().invoke(app, ["ledger", "verify", str(ledger)])
    assert tampered.exit_code == 1 and "block 1 of 2" in tampered.output, tampered.output
    unknown = CliRunner().invoke(app, ["ledger", "verify", "no-such-run"])
    assert unknown.exit_code == 2 and "neither a ledger file nor a run id" in unknown.output
