"""Model inversion: the attacks recover class shapes, refuse what they cannot attack, never touch the members,
and the runner stores scored rows. Fast: 16x16 synthetic shapes and synthetic-mri."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from privbench import observe, registry
from privbench.attacks import model_inversion as mi
from privbench.config import Budget, RunConfig
from privbench.datasets import ImageDataset
from privbench.datasets.splits import Splits
from privbench.defenses.base import FitContext
from privbench.defenses.none import NoDefense
from privbench.metrics.family import ScoreContext
from privbench.models import build_model
from privbench.runner import run
from privbench.store import Store
from privbench.threat import AttackError, Observation, Surface, UnsupportedPair
from privbench.training import TrainParams, accuracy, train_classifier

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 16


def shapes(n: int, seed: int, prefix: str) -> ImageDataset:
    """Four classes of simple distinct shapes (horizontal bar, vertical bar, hollow square, X), jittered and noisy."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 1, SIZE, SIZE), np.float32)
    labels = np.arange(n) % 4
    for i, k in enumerate(labels):
        cx, cy = SIZE // 2 + rng.integers(-2, 3), SIZE // 2 + rng.integers(-2, 3)
        im = images[i, 0]
        if k == 0:
            im[cy - 1 : cy + 2, 2 : SIZE - 2] = 1
        elif k == 1:
            im[2 : SIZE - 2, cx - 1 : cx + 2] = 1
        elif k == 2:
            im[cy - 4 : cy + 4, cx - 4 : cx + 4] = 1
            im[cy - 2 : cy + 2, cx - 2 : cx + 2] = 0
        else:
            for d in range(-5, 6):
                im[cy + d, cx + d] = im[cy + d, cx - d] = 1
    images = np.clip(images + rng.normal(0, 0.05, images.shape).astype(np.float32), 0, 1)
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels).long(), ("h", "v", "square", "x"),
                        tuple(f"{prefix}/{i}" for i in range(n)))


class HeldOut(nn.Module):
    """A held-out judge of another architecture than the target (an MLP on pixels), trained on other images."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 64), nn.ReLU(), nn.Linear(64, 4))

    def forward(self, x):
        return self.net(x)


@pytest.fixture(scope="module")
def shape_task():
    torch.manual_seed(0)
    members, auxiliary, judge_data = shapes(200, 1, "m"), shapes(200, 2, "a"), shapes(400, 3, "j")
    target = build_model("convnet", {}, 1, SIZE, 4, seed=0)
    train_classifier(target, members, TrainParams(epochs=5), 0)
    judge = HeldOut()
    train_classifier(judge, judge_data, TrainParams(epochs=20), 1)
    assert accuracy(target, auxiliary) > 0.95 and accuracy(judge, auxiliary) > 0.95
    return target.eval(), judge.eval(), auxiliary


def _judged(judge, images) -> float:
    with torch.no_grad():
        return float((judge(images).argmax(1) == torch.arange(4)).float().mean())


def test_mi_face_recovers_the_class_shapes(shape_task):
    target, judge, auxiliary = shape_task
    attack = mi.MIFace(mi.MIFaceParams(steps=300), seed=0)
    out = attack.run(Observation(surface=Surface.MODEL_WHITEBOX, model=target, auxiliary=auxiliary), Budget())
    assert out.labels.tolist() == [0, 1, 2, 3] and out.grad_evals == 300 * 8
    assert _judged(judge, out.images) >= 0.75


def test_a_broken_mi_face_fails_the_shape_test(shape_task, monkeypatch):
    """The test above is not passed by any output: with the class score cut off, the images stay uninformative."""
    target, judge, auxiliary = shape_task
    monkeypatch.setattr(mi, "class_cost", lambda logits, labels, loss: torch.zeros(len(labels)) + 0 * logits.sum())
    attack = mi.MIFace(mi.MIFaceParams(steps=300), seed=0)
    out = attack.run(Observation(surface=Surface.MODEL_WHITEBOX, model=target, auxiliary=auxiliary), Budget())
    assert _judged(judge, out.images) < 0.75


def test_deepinversion_refuses_a_model_without_batchnorm_statistics(shape_task):
    _, _, auxiliary = shape_task
    attack = mi.DeepInversion(mi.DeepInversionParams(steps=2), seed=0)
    for model, reason in ((build_model("convnet", {}, 1, SIZE, 4, seed=0), "no BatchNorm layer"),
                          (nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4 * 14 * 14, 4)),
                           "GroupNorm")):
        with pytest.raises(UnsupportedPair, match=reason):
            attack.run(Observation(surface=Surface.MODEL_WHITEBOX, model=model, auxiliary=auxiliary), Budget())
    resnet = build_model("resnet", {}, 1, SIZE, 4, seed=0).eval()  # with BatchNorm: it runs
    out = attack.run(Observation(surface=Surface.MODEL_WHITEBOX, model=resnet, auxiliary=auxiliary), Budget())
    assert out.images.shape == (4, 1, SIZE, SIZE) and out.info["batchnorm_layers"] > 0


class Untouchable:
    """Members that raise on any access: what must never be read while the attacker works."""

    def __getattr__(self, name):
        raise AssertionError(f"the members were read ({name})")

    def __len__(self):
        raise AssertionError("the members were read (len)")


def _none_target(members: ImageDataset, nonmembers: ImageDataset):
    cfg = RunConfig(defense="none", model="convnet", image_size=SIZE, defense_params={"epochs": 1})
    seeds = cfg.derived_seeds()
    ctx = FitContext(config=cfg, build_model=lambda: build_model("convnet", {}, 1, SIZE, 4, seeds["init"]),
                     nonmembers=nonmembers, seeds=seeds, data_identity={"test": "model inversion"})
    defense = NoDefense(NoDefense.Params(epochs=1))
    return defense, ctx, defense.fit(ctx.build_model(), members, ctx)


def test_the_gan_trains_on_auxiliary_images_only(tmp_path, monkeypatch):
    monkeypatch.setenv("PRIVBENCH_HOME", str(tmp_path))
    members, nonmembers, auxiliary = shapes(40, 1, "m"), shapes(20, 4, "n"), shapes(40, 2, "a")
    defense, ctx, target = _none_target(members, nonmembers)
    parts = Splits(members=Untouchable(), nonmembers=nonmembers, auxiliary=auxiliary, dedup={})
    observation, truth = observe.inversion_observation(defense, Surface.MODEL_WHITEBOX, target, parts, ctx)
    assert observation.auxiliary is auxiliary and observation.victim_outputs is None
    params = mi.GMIParams(gan_steps=10, gan_batch=8, width=8, latent=8, steps=5, restarts=1)
    out = mi.GMI(params, seed=0).run(observation, Budget())
    assert out.images.shape == (4, 1, SIZE, SIZE) and out.info["gan"]["trained_on"] == "auxiliary split (40 images)"
    again = mi.GMI(params, seed=0).run(observation, Budget())  # the GAN comes from the cache, keyed by the split
    assert again.info["gan"]["cached"] and torch.equal(again.images, out.images)
    other = shapes(40, 5, "b")
    gen, _, info = mi.train_gan(other, params)
    assert not info["cached"]  # another auxiliary split: another GAN
    with pytest.raises(AssertionError, match="members were read"):
        len(truth.members)  # the truth holds them for the scorer alone


def test_pred_decoder_counts_its_queries_and_never_sees_the_victims(tmp_path):
    members, nonmembers, auxiliary = shapes(40, 1, "m"), shapes(20, 4, "n"), shapes(60, 2, "a")
    defense, ctx, target = _none_target(members, nonmembers)
    parts = Splits(members=members, nonmembers=nonmembers, auxiliary=auxiliary, dedup={})
    observation, truth = observe.inversion_observation(defense, Surface.MODEL_QUERIES, target, parts, ctx)
    assert observation.model is None and observation.victim_outputs.shape == (4, 4)
    assert sorted(truth.victims.labels.tolist()) == [0, 1, 2, 3]
    from privbench.reachability import Forbidden, find_leaks

    assert find_leaks(observation, Forbidden(tensors={f"victim {i}": v for i, v in enumerate(truth.victims.images)})) == []
    out = mi.PredictionDecoder(mi.PredDecoderParams(steps=5, batch=8, width=8), seed=0).run(observation,
                                                                                           Budget(max_grad_evals=25))
    assert out.grad_evals == 25 == observation.query.images_queried
    with pytest.raises(AttackError):
        mi.PredictionDecoder(mi.PredDecoderParams(), seed=0).run(
            Observation(surface=Surface.MODEL_QUERIES, query=observation.query, auxiliary=auxiliary), Budget())


def test_the_scorer_sees_a_copy_of_the_members_as_leakage_and_keeps_baselines(tmp_path):
    members, nonmembers, auxiliary = shapes(80, 1, "m"), shapes(40, 4, "n"), shapes(40, 2, "a")
    defense, ctx, target = _none_target(members, nonmembers)
    parts = Splits(members=members, nonmembers=nonmembers, auxiliary=auxiliary, dedup={})
    _, truth = observe.inversion_observation(defense, Surface.MODEL_WHITEBOX, target, parts, ctx)
    copies = torch.stack([members.images[int((members.labels == k).nonzero()[0])] for k in range(4)])
    copies = (copies + 0.001 * torch.randn(copies.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    from privbench.attacks.base import AttackOutput

    scorer = registry.metrics.get("model_inversion")()
    scores = scorer.score(AttackOutput(images=copies, labels=torch.arange(4)), truth,
                          ScoreContext(auxiliary, {}, tmp_path, Surface.MODEL_WHITEBOX, cache_dir=tmp_path))
    m = scores.metrics
    assert m["chance_level"] == 0.25 and m["member_closer_fraction"] == 1.0 and m["nearest_member_psnr"] > 30
    assert m["nearest_member_psnr"] > m["nearest_nonmember_psnr"]
    for name in ("attack_accuracy", "nn_feature_distance_member", "member_closer_fraction"):
        assert f"baseline_class_mean_{name}" in m and f"baseline_random_auxiliary_{name}" in m
    assert 0 <= m["eval_classifier_heldout_accuracy"] <= 1
    fd = next(k for k in m if k.startswith("fd_eval"))
    assert m[fd] is None and "below the minimum" in scores.unavailable[fd]  # never a 0 in its place
    assert (tmp_path / "inversion.png").is_file()


@pytest.fixture
def store(bench_home):
    return Store()


def test_runs_are_stored_with_the_family_metrics_or_as_unsupported(store):
    base = dict(image_size=SIZE, model="lenet", defense_params={"epochs": 1})
    ok = run(RunConfig(**base, attack="mi-face", attack_params={"steps": 10, "restarts": 1}), store)
    assert ok.status == "ok", ok.error
    assert ok.info["family"] == "model_inversion" and ok.metrics["chance_level"] == 0.25
    assert "attack_accuracy" in ok.metrics and "baseline_class_mean_attack_accuracy" in ok.metrics
    assert (store.root / store.get(ok.run_id).artifacts / "inversion.png").is_file()
    refused = run(RunConfig(**base, attack="deepinversion", attack_params={"steps": 2}), store)
    assert refused.status == "unsupported" and "BatchNorm" in refused.error
    queried = run(RunConfig(**base, attack="pred-decoder", attack_params={"steps": 5}), store)
    assert queried.status == "ok", queried.error
    assert queried.info["images_queried"] == queried.grad_evals and "victim_psnr" in queried.metrics
    assert len(queried.info["victim_ids"]) == 4


def test_the_adaptive_snn_presets_refuse_a_network_that_does_not_spike(shape_task):
    target, _, auxiliary = shape_task
    for cls in (mi.MIFaceSNN, mi.GMISNN):
        with pytest.raises(UnsupportedPair, match="not a spiking network"):
            cls(cls.Params(), seed=0).run(Observation(surface=Surface.MODEL_WHITEBOX, model=target,
                                                      auxiliary=auxiliary), Budget())


def test_the_rate_coded_ann_computes_what_the_released_snn_computes():
    pytest.importorskip("snntorch")
    from privbench import testing

    _, _, target, _ = testing.fit_tiny(registry.defenses.entry("gascnn"))
    snn = target.model.eval()
    ann = mi.rate_coded_ann(snn)
    images = testing.tiny_problem().parts.nonmembers.images
    with torch.no_grad():
        a, b = ann(images), snn(images)
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.8
    assert float((a.argmax(1) == b.argmax(1)).float().mean()) >= 0.75


def test_the_leaderboard_shows_the_model_inversion_family(store):
    from privbench import leaderboard
    from privbench.views.rows import select

    base = dict(image_size=SIZE, model="lenet", defense_params={"epochs": 1})
    for seed in (0, 1):
        assert run(RunConfig(**base, seed=seed, attack="mi-face", attack_params={"steps": 5, "restarts": 1}),
                   store).status == "ok"
    board = {b["family"]: b for b in leaderboard.build(select(store))["families"]}["model_inversion"]
    entry = board["lines"][0]["attacks"][0]
    assert board["title"] == "Model inversion" and entry["attack"] == "mi-face"
    assert entry["success"]["n"] == 2 and entry["beats_baseline"] in (True, False)
    assert {"attack_accuracy", "baseline_attack_accuracy", "chance_level"} <= set(entry["metrics"])
