"""MpLe: morphing preserves the network's function exactly, secrets stay out of every observation,
and the attacks reconstruct what the linear algebra says they can.

Fast tests on synthetic-mri at 16x16 (D = 18x18 = 324 padded values).
"""

import copy

import pytest
import torch

from privbench import morphing
from privbench.config import ConfigError, RunConfig
from privbench.datasets import load
from privbench.datasets import splits as splitlib
from privbench.defenses.base import FitContext
from privbench.defenses.mple import (
    FeaturesIn,
    MorphedService,
    MpLe,
    MpLeParams,
    find_first_conv,
    first_conv,
    fold_permutation,
    permute_leading_channels,
    released_model,
    service_body,
)
from privbench.models import build_model
from privbench.morphing import AugmentedConv
from privbench.runner import run
from privbench.store import Store
from privbench.threat import Surface, Victim

SIZE = 16


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    dataset = load("synthetic-mri", SIZE, 1, cache_dir=tmp_path_factory.mktemp("cache"))
    return splitlib.make(dataset, splitlib.SplitSpec(), seed=0)


def _service_and_plain(model_name: str, model_params: dict, dtype: torch.dtype, matrix: str = "orthogonal"):
    """A random-weight plain model and the MpLe service network built from it (same function)."""
    plain = build_model(model_name, model_params, 1, SIZE, 4, seed=3).to(dtype).eval()
    defense = MpLe(MpLeParams(matrix=matrix))
    conv, rest = plain[0], list(plain)[1:]  # convnet / vgg: a sequential model that starts with its conv
    secrets = defense.secrets(conv, (1, SIZE, SIZE), seed=3)
    layer = morphing.augmented_layer(secrets.matrix, conv.weight.detach(), secrets.permutation, secrets.geometry)
    first = morphing.AugmentedConv(layer.to(dtype), conv.bias.detach()[secrets.permutation], secrets.geometry.feature_shape)
    rest = copy.deepcopy(rest)
    permute_leading_channels(rest, secrets.permutation)
    return plain, MorphedService(first, rest).to(dtype).eval(), secrets


@pytest.mark.parametrize("model_name, model_params", [("convnet", {}), ("vgg", {"width": 0.125})])
@torch.no_grad()
def test_service_on_morphed_data_computes_the_plain_logits(model_name, model_params):
    images = torch.rand(6, 1, SIZE, SIZE, dtype=torch.float64)
    plain, service, secrets = _service_and_plain(model_name, model_params, torch.float64)
    morphed = morphing.pad_flat(images, secrets.geometry) @ secrets.matrix
    expected = plain(images)
    error64 = float((service(morphed) - expected).norm() / expected.norm())
    assert error64 < 1e-8
    plain32, service32, _ = _service_and_plain(model_name, model_params, torch.float32)
    error32 = float((service32(morphed.float()).double() - expected).norm() / expected.norm())
    assert error32 < 1e-4  # float32 rounding only (about 1e-7 measured)


def test_secret_matrices_are_well_conditioned_over_seeds():
    for kind in ("orthogonal", "gaussian"):
        for seed in range(12):
            matrix, condition = morphing.secret_matrix(100, kind, seed, max_condition=1e3)
            assert condition < 1e3
            assert torch.allclose(matrix @ torch.linalg.inv(matrix), torch.eye(100, dtype=torch.float64), atol=1e-9)
            if kind == "orthogonal":
                assert condition == pytest.approx(1.0)
    with pytest.raises(morphing.MorphingError, match="condition"):
        morphing.secret_matrix(60, "gaussian", 0, max_condition=1.5)


def _ctx(parts, model="convnet", **defense_params):
    cfg = RunConfig(defense="mple", attack="mple-view", image_size=SIZE, model=model,
                    defense_params={"epochs": 1, **defense_params})
    seeds = cfg.derived_seeds()

    def fresh():
        return build_model(model, {}, 1, SIZE, parts.members.num_classes, seeds["init"])

    return FitContext(config=cfg, build_model=fresh, nonmembers=parts.nonmembers, seeds=seeds)


@pytest.mark.parametrize("cr_secret", [False, True])
def test_the_service_gets_c_r_only_when_it_is_public(parts, cr_secret):
    """What is withheld is stated; the reachability of M, the permutation and a secret C_r is tested for every
    surface in test_threat_model.py."""
    defense = MpLe(MpLeParams(epochs=1, cr_secret=cr_secret))
    ctx = _ctx(parts, cr_secret=cr_secret)
    target = defense.fit(ctx.build_model(), parts.members, ctx)
    victim = Victim(parts.members.images[:2], parts.members.labels[:2], parts.members.ids[:2])
    observation = defense.observe(Surface.SHARED_DATA, target, victim, ctx)
    assert (observation.shared.layer.public_kernel is None) == cr_secret
    assert "M" in observation.notes["withheld"]
    assert defense.observe(Surface.GRADIENTS, target, victim, ctx).gradient_update.morphed.public_kernel is not None \
        or cr_secret


def test_mple_trains_like_its_frozen_first_layer_twin(parts):
    defense = MpLe(MpLeParams(epochs=2))
    ctx = _ctx(parts, epochs=2)
    target = defense.fit(ctx.build_model(), parts.members, ctx)
    twin = defense.utility_twin().fit(ctx.build_model(), parts.members, ctx)
    # Same init (up to the channel permutation), same batches: only float rounding differs.
    assert abs(target.utility["accuracy"] - twin.utility["accuracy"]) <= 0.02
    assert target.training["released_vs_service_max_logit_diff"] < 1e-3
    assert target.costs["bytes_per_image_morphed"] == 18 * 18 * 4
    assert target.costs["cac_parameters"] == 18 * 18 * 32 * 16 * 16 + 32


def test_wrong_image_size_and_memory_limit_and_model_give_clear_errors(parts):
    defense = MpLe(MpLeParams())
    ctx = _ctx(parts)
    _, conv = first_conv(ctx.build_model(), (1, SIZE, SIZE))
    secrets = defense.secrets(conv, (1, SIZE, SIZE), 0)
    with pytest.raises(ConfigError, match="built for 1x16x16 images"):
        defense.morph(torch.rand(2, 1, 32, 32), secrets)
    with pytest.raises(ConfigError, match=r"C_ac for 1x16x16 input.*MB in float32"):
        MpLe(MpLeParams(max_memory_gb=0.001)).secrets(conv, (1, SIZE, SIZE), 0)
    with pytest.raises(ConfigError, match=r"first convolution 'body.0' cannot carry the morphing.*stride-1"):
        first_conv(build_model("lenet", {}, 1, SIZE, 4, seed=0), (1, SIZE, SIZE))


def _run(attack, attack_params=None, **defense_params):
    config = RunConfig(defense="mple", attack=attack, dataset="synthetic-mri:1600", image_size=SIZE, model="convnet", victim_batch=4,
                       defense_params={"epochs": 1, **defense_params}, attack_params=attack_params or {})
    result = run(config, Store())
    assert result.status == "ok", result.traceback
    return result.metrics


def test_attacks_through_the_runner(bench_home):
    view = _run("mple-view")
    leak = _run("mple-feature-leak")
    leak_secret = _run("mple-feature-leak", cr_secret=True)
    few = _run("mple-known-plaintext", {"pairs": 8})
    enough = _run("mple-known-plaintext", {"pairs": 330})
    assert view["psnr"] < view["baseline_psnr"] + 3  # morphed data reads as noise
    assert leak["psnr"] > 60 and leak_secret["psnr"] > 40  # exact up to float32 C_ac, scale from auxiliary data
    assert enough["psnr"] > 60 > few["psnr"]  # n >= D pairs determine M^-1 exactly
    assert leak["label_accuracy"] == 1.0  # labels travel in the clear


def test_other_defenses_refuse_the_shared_data_surface(bench_home):
    config = RunConfig(defense="none", attack="mple-view", image_size=SIZE, defense_params={"epochs": 1})
    result = run(config, Store())
    assert result.status == "unsupported" and "shared_data" in result.error


def test_gradient_attack_on_mple_reads_the_morphed_reconstruction_as_an_image(bench_home):
    config = RunConfig(defense="mple", attack="dlg", image_size=SIZE, model="convnet",
                       defense_params={"epochs": 1}, attack_params={"steps": 2, "restarts": 1})
    result = run(config, Store())
    assert result.status == "ok", result.traceback
    assert "read_as_image" in result.info["attack"]
    assert result.info["observation"]["observer"].startswith("outside eavesdropper")


# -- any model whose first operation on the image is a convolution (the ResNet stem) -----------------


def _randomise_batchnorm(model: torch.nn.Module, seed: int) -> None:
    """Running statistics and affine parameters away from their init, so that eval-mode BatchNorm matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=gen) * 0.3)
                module.running_var.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
                module.weight.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(module.num_features, generator=gen) * 0.1)


@torch.no_grad()
def test_on_resnet_the_released_model_computes_what_the_service_computes_on_morphed_data():
    model = build_model("resnet", {}, 1, SIZE, 4, seed=3).double()
    _randomise_batchnorm(model, 3)
    where, conv = first_conv(model, (1, SIZE, SIZE))
    assert where.path == "stem.0" and not where.sequential and conv.bias is None
    defense = MpLe(MpLeParams())
    secrets = defense.secrets(conv, (1, SIZE, SIZE), seed=3)
    layer = morphing.augmented_layer(secrets.matrix, conv.weight.detach(), secrets.permutation, secrets.geometry)
    first = AugmentedConv(layer, torch.zeros(conv.out_channels, dtype=torch.float64), secrets.geometry.feature_shape)
    body = service_body(model, where)
    assert isinstance(body.get_submodule("stem.0"), FeaturesIn)
    service = MorphedService(first, body).eval()
    released = released_model(body, where, fold_permutation(conv, secrets.permutation)).eval()
    assert released.state_dict().keys() == model.state_dict().keys()  # the plain architecture, loadable as such
    images = torch.rand(5, 1, SIZE, SIZE, dtype=torch.float64)
    morphed = morphing.pad_flat(images, secrets.geometry) @ secrets.matrix
    expected = released(images)
    assert float((service(morphed) - expected).norm() / expected.norm()) < 1e-8
    # the stem's features are the plain convolution's with the secret channel order
    torch.testing.assert_close(first(morphed), conv(images)[:, secrets.permutation])


def test_the_first_convolution_must_be_the_only_reader_of_the_image():
    class Scaled(torch.nn.Module):  # an operation before the convolution
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(2 * x).mean((1, 2, 3))

    class TwoReaders(torch.nn.Module):  # the image also feeds another layer
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
            self.pool = torch.nn.AvgPool2d(2)

        def forward(self, x):
            return self.conv(x).mean((1, 2, 3)) + self.pool(x).mean((1, 2, 3))

    with pytest.raises(ConfigError, match="on a tensor computed from the image"):
        find_first_conv(Scaled(), (1, 8, 8))
    with pytest.raises(ConfigError, match="also reaches pool"):
        find_first_conv(TwoReaders(), (1, 8, 8))
    with pytest.raises(ConfigError, match="applies Flatten .0. first"):
        find_first_conv(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2)), (1, 8, 8))


def test_mple_on_resnet_trains_and_its_gradient_observation_carries_the_morphed_stem(parts):
    defense = MpLe(MpLeParams(epochs=1))
    ctx = _ctx(parts, model="resnet")
    members = parts.members.subset(list(range(128)))
    target = defense.fit(ctx.build_model(), members, ctx)
    record = target.training
    assert record["first_conv"] == "stem.0" and record["permutation_compensated"] is False
    assert "equally random start" in record["service_init"]
    assert record["released_vs_service_max_logit_diff"] < 1e-3
    assert target.costs["cr_parameters"] == 16 * 9  # the stem's 16 3x3 filters, no bias

    victim = Victim(members.images[:2], members.labels[:2], members.ids[:2])
    update = defense.observe(Surface.GRADIENTS, target, victim, ctx).gradient_update
    layer = update.morphed
    d = 18 * 18
    assert update.input_shape == (1, 1, d) and layer.feature_shape == (16, SIZE, SIZE) and layer.padding == 1
    assert layer.dense.shape == (d, 16 * SIZE * SIZE) and torch.equal(layer.bias, torch.zeros(16))
    assert isinstance(update.model.first, AugmentedConv) and torch.equal(update.model.first.dense, layer.dense)
    params = [p for p in update.model.parameters() if p.requires_grad]
    assert [g.shape for g in update.gradients] == [p.shape for p in params]
    # what the observer's layer computes from a morphed vector is the released stem's output on the image
    secrets = defense.secrets(defense._first_layer(ctx), (1, SIZE, SIZE), ctx.seeds["secrets"])
    morphed = defense.morph(victim.images, secrets)
    features = (morphed @ layer.dense + layer.bias.repeat_interleave(SIZE * SIZE)).reshape(2, 16, SIZE, SIZE)
    released_init = ctx.build_model()
    released_init.load_state_dict(target.initial_state)
    torch.testing.assert_close(features, released_init.stem[0](victim.images), atol=1e-4, rtol=1e-4)

    shared = defense.observe(Surface.SHARED_DATA, target, victim, ctx).shared  # at round=init, as the update
    assert isinstance(shared.model.get_submodule("stem.0"), FeaturesIn)  # the network after the first layer
    with torch.no_grad():
        torch.testing.assert_close(shared.model(released_init.stem[0](victim.images)),
                                   released_init.eval()(victim.images))
