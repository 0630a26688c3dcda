"""Threat-model integrity: what every observation lets an attacker reach, the update rule attacks use,
what the handed model carries, and which modules may import which.

Fast: synthetic-mri at 16x16, tiny training settings.
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch

from privbench import observe
from privbench.attacks.gradient_inversion import dummy_update, mean_scale
from privbench.config import RunConfig
from privbench.datasets import load
from privbench.datasets import splits as splitlib
from privbench.defenses.base import FitContext, client_gradients, gradient_observation, model_at_round
from privbench.models import build_model
from privbench.reachability import Forbidden, find_leaks
from privbench.registry import defenses
from privbench.threat import AttackError, Observation, Surface, Victim

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 16
# Each registered defense with tiny settings and a model it accepts.
CASES = {
    "none": ("lenet", {"epochs": 1}),
    "dp": ("lenet", {"epochs": 1, "epsilon": 8.0}),
    "mple": ("convnet", {"epochs": 1}),
    "mple-secret-cr": ("convnet", {"epochs": 1, "cr_secret": True}),
    "mple-resnet": ("resnet", {"epochs": 1}),  # the morphed stem: not a sequential model
    "gascnn": ("resnet", {"epochs": 1, "synthesis_steps": 3, "synthetic_size": 40, "timesteps": 4,
                          "finetune_epochs": 1, "curve": "", "percentile": 99.9}),
    "he-aggregator": ("lenet", {"rounds": 2, "clients": 2, "observer": "aggregator", "scheme": "ckks"}),
    "he-hospital": ("lenet", {"rounds": 2, "clients": 3, "observer": "hospital", "scheme": "ckks"}),
    "he-resnet": ("resnet", {"rounds": 2, "clients": 3, "observer": "hospital", "scheme": "plaintext"}),  # BatchNorm
}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    dataset = load("synthetic-mri", SIZE, 1, cache_dir=tmp_path_factory.mktemp("cache"))
    return splitlib.make(dataset, splitlib.SplitSpec(), seed=0)


def _context(parts, case: str) -> tuple[object, FitContext]:
    name = case.split("-")[0]
    model, params = CASES[case]
    cls = defenses.get(name)
    cfg = RunConfig(defense=name, model=model, image_size=SIZE, defense_params=params, victim_batch=4)
    seeds = cfg.derived_seeds()

    def fresh():
        return build_model(model, {}, 1, SIZE, parts.members.num_classes, seeds["init"])

    ctx = FitContext(config=cfg, build_model=fresh, nonmembers=parts.nonmembers, seeds=seeds, members=parts.members,
                     data_identity={"dataset": "synthetic-mri", "test": case})
    return cls(cls.Params(**params)), ctx


def _victim(parts) -> Victim:
    labels = parts.members.labels
    idx = [int((labels == k).nonzero()[0]) for k in range(4)]  # four distinct labels: an unmistakable pattern
    chosen = parts.members.subset(idx)
    return Victim(chosen.images, chosen.labels, chosen.ids)


@pytest.fixture(scope="module")
def fitted(parts, tmp_path_factory):
    pytest.importorskip("snntorch")
    pytest.importorskip("opacus")
    out = {}
    import os

    os.environ.setdefault("PRIVBENCH_HOME", str(tmp_path_factory.mktemp("home")))
    for case in CASES:
        defense, ctx = _context(parts, case)
        out[case] = (defense, ctx, defense.fit(ctx.build_model(), parts.members, ctx))
    return out


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("surface", list(Surface))
def test_no_observation_reaches_victim_data_members_or_secrets(parts, fitted, case, surface):
    defense, ctx, target = fitted[case]
    victim = _victim(parts)
    forbidden = Forbidden(
        tensors={**{f"victim image {i}": image for i, image in enumerate(victim.images)}},
        strings={f"member id {m}": m for m in parts.members.ids},
        objects={},
    )
    for name, secret in defense.audit_secrets(surface, target, ctx).items():
        (forbidden.tensors if isinstance(secret, torch.Tensor) else forbidden.objects)[name] = secret
    try:
        if surface in (Surface.GRADIENTS, Surface.SHARED_DATA):
            observation = observe.client_observation(defense, surface, target, victim, parts.auxiliary, ctx)
            if surface is Surface.GRADIENTS:  # on SHARED_DATA the labels are sent with the data, by design
                forbidden.tensors["victim labels"] = victim.labels
        else:
            observation, truth = observe.membership_observation(defense, surface, target, parts, ctx)
            # Member images are candidates, by design; which of them are members is what must not be reachable.
            forbidden.tensors = {**{k: v for k, v in forbidden.tensors.items() if not k.startswith("victim")},
                                 "membership": torch.as_tensor(truth.is_member),
                                 "members as a block": parts.members.images}
    except AttackError:
        pytest.skip(f"{case} exposes no {surface.value} surface")
    assert find_leaks(observation, forbidden) == []


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("surface", [Surface.MODEL_WHITEBOX, Surface.MODEL_QUERIES])
def test_no_model_inversion_observation_reaches_a_member(parts, fitted, case, surface):
    """A model-inversion attacker holds the released model (or its queries) and the auxiliary split: no member image
    (alone or in a batch) and no member id, though the truth it is scored against holds them all."""
    defense, ctx, target = fitted[case]
    observation, truth = observe.inversion_observation(defense, surface, target, parts, ctx)
    assert truth.members is parts.members and truth.nonmembers is parts.nonmembers
    forbidden = Forbidden(tensors={f"member image {i}": image for i, image in enumerate(parts.members.images)},
                          strings={f"member id {m}": m for m in parts.members.ids})
    assert find_leaks(observation, forbidden) == []
    assert observation.auxiliary is parts.auxiliary
    if surface is Surface.MODEL_QUERIES:  # the victims' outputs, never their images
        assert observation.victim_outputs.shape == (len(truth.victims.labels), parts.members.num_classes)
    else:
        assert observation.model is not None and not observation.model.training


def test_the_walk_finds_a_deliberately_leaky_observation(parts):
    victim = _victim(parts)
    image = victim.images[2].clone()
    secret = torch.randn(8, 8, dtype=torch.float64)

    def oracle():  # a closure over the truth, as a careless runner would hand over
        return image

    leaky = Observation(surface=Surface.GRADIENTS, notes={"debug": {"ids": [victim.ids[1]]}},
                        query=lambda x: x + secret.float().sum() * 0, shadow_trainer=oracle)
    leaks = find_leaks(leaky, Forbidden(tensors={"victim image 2": victim.images[2], "M": secret},
                                        strings={"victim id": victim.ids[1]}))
    assert any(leak.startswith("victim image 2 at") and "closure image" in leak for leak in leaks)
    assert any(leak.startswith("M at") for leak in leaks)
    assert any(leak.startswith("victim id at observation.notes") for leak in leaks)
    batch = torch.cat([parts.auxiliary.images[:3], victim.images[2:3]])  # the image hidden in a batch
    assert find_leaks(Observation(surface=Surface.GRADIENTS, notes={"x": batch}),
                      Forbidden(tensors={"victim image 2": victim.images[2]})) != []


def test_the_handed_model_carries_the_global_buffers_not_the_victims_statistics(parts):
    model = build_model("resnet", {}, 1, SIZE, 4, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    victim = _victim(parts)
    cfg = RunConfig(model="resnet", image_size=SIZE)
    ctx = FitContext(config=cfg, build_model=lambda: copy.deepcopy(model), nonmembers=parts.nonmembers,
                     seeds=cfg.derived_seeds())
    observation = gradient_observation(model, client_gradients(model, victim.images, victim.labels), victim, ctx)
    handed = observation.gradient_update.model.state_dict()
    for name, value in before.items():
        assert torch.equal(handed[name], value), name
        assert torch.equal(model.state_dict()[name], value), name


def test_he_hands_the_global_buffers_and_shares_the_clients_buffers_beside_them(parts, fitted):
    defense, ctx, target = fitted["he-resnet"]
    update = observe.client_observation(defense, Surface.GRADIENTS, target, _victim(parts), parts.auxiliary,
                                        ctx).gradient_update
    at_round = model_at_round(target, ctx.build_model, ctx.config.gradient_round)
    for (name, handed), expected in zip(update.model.named_buffers(), at_round.buffers(), strict=True):
        assert torch.equal(handed, expected), name  # the global statistics, not the victims'
    assert len(update.buffers) == len(list(at_round.buffers()))
    moved = [not torch.equal(b, e) for b, e in zip(update.buffers, at_round.buffers(), strict=True)
             if b.is_floating_point()]
    assert moved and all(moved)  # the shared statistics moved towards the victims' batches


def test_dp_updates_are_reproduced_by_the_public_rule_at_the_truth(parts):
    """At epsilon=inf the shared update is clip(g)/E; the attacker's rule gives it exactly at the true image."""
    pytest.importorskip("opacus")
    defense, ctx = _context(parts, "dp")
    defense.params = type(defense.params)(**{**defense.params.__dict__, "epsilon": float("inf")})
    target = defense.fit(ctx.build_model(), parts.members, ctx)
    victim = _victim(parts)
    update = defense.observe(Surface.GRADIENTS, target, victim, ctx).gradient_update
    assert update.rule.clip_norm == defense.params.max_grad_norm and update.rule.divisor > len(victim.labels)
    params = [p for p in update.model.parameters() if p.requires_grad]
    simulated = dummy_update(update.model, params, victim.images, victim.labels, update.rule, create_graph=False)
    for got, shared in zip(simulated, mean_scale(update), strict=True):
        torch.testing.assert_close(got, shared, rtol=1e-4, atol=1e-7)
    plain = dummy_update(update.model, params, victim.images, victim.labels, type(update.rule)(), create_graph=False)
    ratio = sum(g.norm() ** 2 for g in plain).sqrt() / sum(g.norm() ** 2 for g in update.gradients).sqrt()
    assert ratio > 2  # the naive mean gradient is far off in scale from the shared update: the rule matters
    assert sum(g.norm() ** 2 for g in mean_scale(update)) > 100 * sum(g.norm() ** 2 for g in update.gradients)


def test_shadows_get_their_own_secrets(parts, fitted, monkeypatch):
    defense, ctx, target = fitted["mple"]
    observation, _ = observe.membership_observation(defense, Surface.MODEL_QUERIES, target, parts, ctx)
    used = []
    original = type(defense).secrets

    def spy(self, conv, image_shape, seed):
        used.append(seed)
        return original(self, conv, image_shape, seed)

    monkeypatch.setattr(type(defense), "secrets", spy)
    observation.shadow_trainer(parts.auxiliary, 5)
    observation.shadow_trainer(parts.auxiliary, 6)
    assert len(used) == 2 and len(set(used)) == 2 and ctx.seeds["secrets"] not in used


def test_model_at_round_is_unaffected_by_gradient_observations(parts, fitted):
    defense, ctx, target = fitted["none"]
    state = copy.deepcopy(target.model.state_dict())
    observe.client_observation(defense, Surface.GRADIENTS, target, _victim(parts), parts.auxiliary, ctx)
    assert all(torch.equal(v, target.model.state_dict()[k]) for k, v in state.items())
    assert model_at_round(target, ctx.build_model, "trained").training


# -- import graph ------------------------------------------------------------------------------------

PACKAGE = Path(__file__).resolve().parents[1] / "privbench"


def _imports(path: Path) -> set[str]:
    """Every privbench module a file imports (at module level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in out if name.startswith("privbench")}


def _violations(folder: str, banned: tuple[str, ...]) -> list[str]:
    return [f"{path.relative_to(PACKAGE.parent)} imports {name}"
            for path in sorted((PACKAGE / folder).rglob("*.py")) for name in sorted(_imports(path))
            if any(name == b or name.startswith(b + ".") for b in banned)]


def test_attacks_import_neither_defenses_nor_the_store():
    assert _violations("attacks", ("privbench.defenses", "privbench.store", "privbench.runner")) == []


def test_defenses_do_not_import_attacks():
    assert _violations("defenses", ("privbench.attacks", "privbench.runner")) == []


def test_views_do_not_import_the_runner():
    views = [PACKAGE / "leaderboard.py", PACKAGE / "report.py", *sorted((PACKAGE / "views").rglob("*.py"))]
    found = [f"{path.relative_to(PACKAGE.parent)} imports {name}" for path in views for name in sorted(_imports(path))
             if name == "privbench.runner" or name.startswith("privbench.runner.")]
    assert len(views) > 3 and found == []


def test_the_import_graph_check_sees_a_violation(tmp_path, monkeypatch):
    fake = tmp_path / "privbench" / "attacks"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n    from privbench.defenses.mple import MpLe\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path / "privbench")
    assert _violations("attacks", ("privbench.defenses",)) == ["privbench/attacks/bad.py imports privbench.defenses.mple",
                                                              "privbench/attacks/bad.py imports privbench.defenses.mple.MpLe"]


def _protocol_observation(parts, bn_mode: str, bn_buffers: str):
    model = build_model("resnet", {}, 1, SIZE, 4, seed=1)
    victim = _victim(parts)
    cfg = RunConfig(model="resnet", image_size=SIZE, bn_mode=bn_mode, bn_buffers=bn_buffers)
    ctx = FitContext(config=cfg, build_model=lambda: copy.deepcopy(model), nonmembers=parts.nonmembers,
                     seeds=cfg.derived_seeds())
    gradients = client_gradients(model, victim.images, victim.labels, bn_mode)
    return model, victim, gradient_observation(model, gradients, victim, ctx)


@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_the_batchnorm_mode_is_the_protocols_and_the_attacker_models_it(parts, bn_mode):
    """The update is computed in the stated mode; the handed model is in that mode, so a dummy update of the
    victim's own images reproduces the shared one exactly."""
    model, victim, observation = _protocol_observation(parts, bn_mode, "private")
    update = observation.gradient_update
    assert update.bn_mode == bn_mode and update.model.training == (bn_mode == "train")
    params = [q for q in update.model.parameters() if q.requires_grad]
    dummy = dummy_update(update.model, params, victim.images, victim.labels, update.rule, create_graph=False)
    for d, g in zip(dummy, mean_scale(update), strict=True):
        torch.testing.assert_close(d, g)
    other = client_gradients(model, victim.images, victim.labels, "eval" if bn_mode == "train" else "train")
    assert not all(torch.allclose(a, b) for a, b in zip(other, update.gradients, strict=True))
    assert f"{bn_mode} mode" in observation.notes["gradient_protocol"]


def test_shared_buffers_reveal_the_victim_batch_statistics_and_private_ones_nothing(parts):
    model, victim, shared = _protocol_observation(parts, "train", "shared")
    update = shared.gradient_update
    named = dict(zip((n for n, _ in update.model.named_buffers()), update.buffers, strict=True))
    bn, momentum = model.stem[1], model.stem[1].momentum
    batch_mean = (named["stem.1.running_mean"] - (1 - momentum) * bn.running_mean) / momentum
    with torch.no_grad():
        true_mean = model.stem[0](victim.images).mean(dim=(0, 2, 3))
    torch.testing.assert_close(batch_mean, true_mean, atol=1e-5, rtol=1e-4)
    assert "shared with the update" in shared.notes["gradient_protocol"]
    for bn_mode, bn_buffers in (("train", "private"), ("eval", "shared")):
        _, _, observation = _protocol_observation(parts, bn_mode, bn_buffers)
        assert observation.gradient_update.buffers == ()
