"""GASCNN: conversion fidelity, energy counting, members never read after stage 1, end to end.

Fast tests on synthetic-mri at 16x16 with tiny settings.
"""

import pytest
import torch
from torch import nn

from privbench.config import RunConfig
from privbench.datasets import load
from privbench.datasets import splits as splitlib
from privbench.defenses.base import FitContext, fit_plainly
from privbench.defenses.gascnn import snn as snnlib
from privbench.defenses.gascnn.defense import GASCNN, GASCNNParams
from privbench.models import build_model
from privbench.runner import run
from privbench.store import Store
from privbench.training import TrainParams

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread, as the runner uses


pytest.importorskip("snntorch")

TINY = dict(epochs=1, synthesis_steps=3, synthetic_size=40, timesteps=4, finetune_epochs=1, curve="4",
            curve_images=32, percentile=99.9)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    dataset = load("synthetic-mri", 16, 1, cache_dir=tmp_path_factory.mktemp("cache"))
    return splitlib.make(dataset, splitlib.SplitSpec(), seed=0)


def _ctx(parts, **defense_params):
    cfg = RunConfig(defense="gascnn", model="resnet", image_size=16, defense_params=defense_params)
    seeds = cfg.derived_seeds()

    def fresh():
        return build_model("resnet", {}, 1, 16, parts.members.num_classes, seeds["init"])

    data_identity = {"dataset": cfg.dataset, "data_fingerprint": parts.members.provenance["fingerprint"],
                     "split_seed": cfg.split_seed, "split": cfg.to_dict()["split"], "image_size": 16, "channels": 1}
    return FitContext(config=cfg, build_model=fresh, nonmembers=parts.nonmembers, seeds=seeds,
                      data_identity=data_identity)


def test_energy_counts_of_a_two_layer_network_match_a_hand_count():
    conv = nn.Conv2d(1, 2, 3, padding=1)
    linear = nn.Linear(8, 3)
    spikes = torch.zeros(1, 1, 4, 4)
    spikes[0, 0, 0, 0] = 1  # corner: reaches 2x2 output positions x 2 channels = 8
    spikes[0, 0, 1, 1] = 1  # interior: 3x3 positions x 2 channels = 18
    spikes[0, 0, 0, 2] = 0.7  # edge, graded amplitude (still one event): 2x3 positions x 2 channels = 12
    assert snnlib.fan_out_ops(conv, spikes) == 8 + 18 + 12
    assert snnlib.fan_out_ops(linear, torch.tensor([[1.0, 0, 1, 0, 0, 1, 0, 0]])) == 3 * 3
    assert snnlib.macs(conv, (1, 4, 4)) == 2 * 4 * 4 * 9  # outputs x fan-in (padding counted, as usual)
    assert snnlib.macs(linear, (8,)) == 24
    record = snnlib.SpikeRecord(synaptic_ops={"a": 100.0}, analog_macs={"b": 10.0}, images=2)
    assert record.energy_pj() == pytest.approx((100 * 0.9 + 10 * 4.6) / 2)


def test_conversion_preserves_the_ann_predictions_at_large_t(parts):
    torch.manual_seed(0)
    ctx = _ctx(parts)
    teacher = fit_plainly(ctx.build_model(), parts.members, TrainParams(epochs=8), ctx).model
    calibration, evaluation = parts.auxiliary.images[:200], parts.nonmembers.images[:300]
    thresholds = snnlib.balanced_thresholds(teacher, calibration, 98.0)
    with torch.no_grad():
        ann = teacher(evaluation).argmax(1)
        spiking = snnlib.SpikingResNet(teacher, thresholds, 64, "direct").eval()(evaluation).argmax(1)
    agreement = float((ann == spiking).double().mean())
    assert agreement > 0.9, f"ANN/SNN agreement {agreement:.3f} at T=64"
    assert len(set(ann.tolist())) > 1  # the teacher is not constant (else agreement is trivial)


class _Untouchable:
    """A members split that raises on any access."""

    def __getattr__(self, name):
        raise AssertionError(f"stages 2-4 read the members split ({name})")

    def __len__(self):
        raise AssertionError("stages 2-4 read the members split (len)")


def test_stages_after_the_teacher_never_read_the_members(parts, bench_home, monkeypatch):
    defense = GASCNN(GASCNNParams(**TINY))
    ctx = _ctx(parts, **TINY)
    teacher, record, key = defense.train_teacher(ctx.build_model(), parts.members, ctx)
    monkeypatch.setattr(defense, "train_teacher", lambda model, members, ctx: (teacher, record, key))
    target = defense.fit(ctx.build_model(), _Untouchable(), ctx)
    assert isinstance(target.model, snnlib.SpikingResNet)
    assert set(target.training["stage_times_s"]) >= {"teacher_s", "synthesis_s", "conversion_s", "spike_learning_s"}


def test_stage_outputs_are_cached_and_served_back_unchanged(parts, bench_home):
    defense = GASCNN(GASCNNParams(**TINY))
    ctx = _ctx(parts, **TINY)
    first = defense.fit(ctx.build_model(), parts.members, ctx)
    second = defense.fit(ctx.build_model(), parts.members, ctx)
    stages = ("teacher", "synthesis", "spike_learning")
    assert [first.training[s]["cached"] for s in stages] == [False] * 3
    assert [second.training[s]["cached"] for s in stages] == [True] * 3
    assert len(list((bench_home / "cache" / "gascnn").glob("*.pt"))) == 3
    for name, value in first.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[name], value), name
    assert second.training["synthesis"]["bn"] == first.training["synthesis"]["bn"]


def test_gascnn_end_to_end_through_the_runner(bench_home):
    common = dict(defense="gascnn", model="resnet", image_size=16, defense_params={**TINY, "encoding": "poisson"})
    result = run(RunConfig(**common, attack="invgrad-snn", attack_params={"steps": 2, "restarts": 1, "eot_samples": 2}),
                 Store())
    assert result.status == "ok", result.traceback
    costs = result.costs
    assert costs["snn_energy_pj"] > 0 and costs["ann_energy_pj"] > 0
    assert "poisson/T=4" in result.info["target"]["training"]["accuracy_vs_T"]
    assert "EOT" in result.info["attack"]["adaptive"]
    assert (Store().root / result.artifacts / "synthetic_per_class.png").is_file()
    again = run(RunConfig(**common, attack="invgrad", attack_params={"steps": 2, "restarts": 1}), Store())
    assert again.status == "ok", again.traceback
    assert again.info["target"]["cached"]
