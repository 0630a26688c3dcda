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
    record = snnlib.SpikeRecord(synaptic_ops={"a": 100.0}, analog_macs={"b": 10.0}, membrane_updates={"a": 40.0},
                                residual_adds={"b": 6.0}, spikes={"a": 4.0}, images=2)
    assert record.energy_pj() == pytest.approx((100 * 0.9 + 10 * 4.6 + (40 + 6 + 4) * 0.9) / 2)
    assert record.synaptic_energy_pj() == pytest.approx((100 * 0.9 + 10 * 4.6) / 2)


def _tiny_resnet():
    """ResNet-8 of width 2 on 1x8x8 images, 3 classes: feature maps 2x8x8, 4x4x4, 8x2x2."""
    torch.manual_seed(0)
    ann = build_model("resnet", {"width": 2}, 1, 8, 3, seed=0).eval()
    for m in ann.modules():  # non-trivial BatchNorm statistics, so the folded biases are not zero
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return ann


@pytest.mark.parametrize("encoding", ["direct", "poisson"])
def test_snn_operation_counts_match_a_hand_count(encoding):
    ann, steps, batch = _tiny_resnet(), 3, 2
    images = torch.rand(batch, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    snn = snnlib.SpikingResNet(ann, snnlib.balanced_thresholds(ann, images, 99.0), steps, encoding).eval()
    fired: list[float] = []  # every IF layer's spikes, counted independently of the record
    for lif in [snn.lif_stem] + [n for b in snn.blocks for n in (b.lif_a, b.lif_b)]:
        lif.register_forward_hook(lambda mod, inp, out: fired.append(float((out[0] != 0).sum())))
    record = snnlib.SpikeRecord()
    snn.record = record
    with torch.no_grad():
        snn(images)

    neurons = 2 * 8 * 8 + 2 * (2 * 8 * 8) + 2 * (4 * 4 * 4) + 2 * (8 * 2 * 2)  # stem, then a and b of each block
    assert neurons == 576 and sum(record.neurons.values()) == neurons
    ops = record.operations()
    assert ops["membrane_updates"] == (neurons + 3) * steps  # every IF neuron and the 3 output integrators, each step
    assert ops["residual_adds"] == (2 * 8 * 8 + 4 * 4 * 4 + 8 * 2 * 2) * steps  # each block's sum, each step
    assert ops["reset_subtractions"] == pytest.approx(sum(fired) / batch) and sum(fired) > 0  # one per spike
    stem_macs = 2 * 8 * 8 * 9  # outputs x fan-in of the 3x3 stem, at every step, only when fed analog images
    assert ops["first_layer_macs"] == (stem_macs * steps if encoding == "direct" else 0)
    assert ops["synaptic_ops"] == pytest.approx(sum(record.synaptic_ops.values()) / batch) and ops["synaptic_ops"] > 0
    parts = record.energy_breakdown_pj()
    assert parts["membrane_updates"] == pytest.approx(ops["membrane_updates"] * 0.9)
    assert parts["first_layer_macs"] == pytest.approx(ops["first_layer_macs"] * 4.6)
    assert record.energy_pj() == pytest.approx(sum(parts.values()))
    assert record.energy_pj() - record.synaptic_energy_pj() == pytest.approx(
        0.9 * (ops["membrane_updates"] + ops["residual_adds"] + ops["reset_subtractions"]))


def test_ann_operation_counts_match_a_hand_count():
    ops = snnlib.ann_operations(_tiny_resnet(), (1, 8, 8))
    macs = (2 * 8 * 8 * 9  # stem 1->2, 3x3
            + 2 * (2 * 8 * 8 * 18)  # block 0: two 2->2 3x3 convs at 8x8
            + 4 * 4 * 4 * 18 + 4 * 4 * 4 * 36 + 4 * 4 * 4 * 2  # block 1: 2->4 (stride 2), 4->4, shortcut 1x1 2->4
            + 8 * 2 * 2 * 36 + 8 * 2 * 2 * 72 + 8 * 2 * 2 * 4  # block 2: 4->8 (stride 2), 8->8, shortcut 1x1 4->8
            + 8 * 3)  # fc
    assert ops == {
        "macs": macs,
        "bias_adds": 2 * 8 * 8 * 3 + 4 * 4 * 4 * 3 + 8 * 2 * 2 * 3 + 3,  # every BatchNorm output (folded), fc bias
        "residual_adds": 2 * 8 * 8 + 4 * 4 * 4 + 8 * 2 * 2,
        "pooling_adds": 8 * 2 * 2,
    }
    energy, counts = snnlib.ann_energy_pj(_tiny_resnet(), (1, 8, 8))
    assert counts == ops and energy == pytest.approx(4.6 * macs + 0.9 * (ops["bias_adds"] + 224 + 32))


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
    assert "membrane updates" in costs["energy_convention"] and "0.9 pJ" in costs["energy_convention"]
    assert costs["snn_energy_pj"] == pytest.approx(sum(costs["snn_energy_breakdown_pj"].values()))
    assert costs["ann_energy_pj"] == pytest.approx(sum(costs["ann_energy_breakdown_pj"].values()))
    assert costs["snn_operations"]["membrane_updates"] > 0 and costs["snn_operations"]["residual_adds"] > 0
    assert costs["snn_energy_pj_synaptic_only"] < costs["snn_energy_pj"]
    assert "poisson/T=4" in result.info["target"]["training"]["accuracy_vs_T"]
    assert "EOT" in result.info["attack"]["adaptive"]
    assert (Store().root / result.artifacts / "synthetic_per_class.png").is_file()
    again = run(RunConfig(**common, attack="invgrad", attack_params={"steps": 2, "restarts": 1}), Store())
    assert again.status == "ok", again.traceback
    assert again.info["target"]["cached"]


def _tiny_convnet_teacher():
    """convnet (width 2, hidden 8) on 1x8x8, 3 classes, as GASCNN's teacher: BatchNorm after each conv, avg pooling."""
    teacher = snnlib.teacher_network(build_model("convnet", {"width": 2, "hidden": 8}, 1, 8, 3, seed=0)).eval()
    for m in teacher.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return teacher


def test_the_convnet_teacher_has_batchnorm_and_average_pooling_and_other_networks_are_refused():
    teacher = _tiny_convnet_teacher()
    kinds = [type(m).__name__ for m in teacher]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "AvgPool2d", "Conv2d", "BatchNorm2d", "ReLU", "AvgPool2d",
                     "Flatten", "Linear", "ReLU", "Linear"]
    with pytest.raises(ValueError, match="neither a ResNet nor a sequential"):
        snnlib.teacher_network(build_model("lenet", {}, 1, 16, 4, seed=0))
    with pytest.raises(ValueError, match="Sigmoid"):
        snnlib.teacher_network(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(8, 2)))


@pytest.mark.parametrize("encoding", ["direct", "poisson"])
def test_sequential_snn_operation_counts_match_a_hand_count(encoding):
    teacher, steps, batch = _tiny_convnet_teacher(), 3, 2
    images = torch.rand(batch, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    snn = snnlib.SpikingSequential(teacher, snnlib.balanced_thresholds(teacher, images, 99.0), steps, encoding).eval()
    fired: list[torch.Tensor] = []
    for lif in snn.neurons:
        lif.register_forward_hook(lambda mod, inp, out: fired.append(out[0].detach()))
    record = snnlib.SpikeRecord()
    snn.record = record
    with torch.no_grad():
        snn(images)
    neurons = 2 * 8 * 8 + 4 * 4 * 4 + 8  # conv1, conv2, hidden linear
    assert sum(record.neurons.values()) == neurons
    ops = record.operations()
    assert ops["membrane_updates"] == (neurons + 3) * steps
    assert ops["reset_subtractions"] == pytest.approx(sum(float((f != 0).sum()) for f in fired) / batch)
    assert ops["first_layer_macs"] == (2 * 8 * 8 * 9 * steps if encoding == "direct" else 0)
    # the hidden linear layer: every spike of conv2 (pooled 2x2 into one input) reaches the 8 hidden units once
    conv2_spikes = sum(float((f != 0).sum()) for f in fired[1::3])
    assert record.synaptic_ops["layer2"] == pytest.approx(conv2_spikes * 8)
    ann = snnlib.ann_operations(teacher, (1, 8, 8))
    assert ann["macs"] == 2 * 8 * 8 * 9 + 4 * 4 * 4 * 18 + 16 * 8 + 8 * 3
    assert ann["bias_adds"] == 2 * 8 * 8 + 4 * 4 * 4 + 8 + 3  # BatchNorm (conv biases folded into it), linear biases
    assert ann["pooling_adds"] == 2 * 8 * 8 + 4 * 4 * 4


def test_convnet_conversion_preserves_the_ann_predictions_at_large_t(parts):
    torch.manual_seed(0)
    ctx = _ctx(parts)
    teacher = snnlib.teacher_network(build_model("convnet", {}, 1, 16, parts.members.num_classes, seed=1))
    teacher = fit_plainly(teacher, parts.members, TrainParams(epochs=6), ctx).model
    thresholds = snnlib.balanced_thresholds(teacher, parts.auxiliary.images[:200], 99.0)
    evaluation = parts.nonmembers.images[:300]
    with torch.no_grad():
        ann = teacher(evaluation).argmax(1)
        spiking = snnlib.SpikingSequential(teacher, thresholds, 64, "direct").eval()(evaluation).argmax(1)
    agreement = float((ann == spiking).double().mean())
    assert agreement > 0.9, f"ANN/SNN agreement {agreement:.3f} at T=64"
    assert len(set(ann.tolist())) > 1
