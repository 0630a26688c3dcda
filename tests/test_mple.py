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
from privbench.defenses.mple import MorphedService, MpLe, MpLeParams, permute_leading_channels, split_first_conv
from privbench.models import build_model
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
    conv, rest = split_first_conv(plain)
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


def _ctx(parts, **defense_params):
    cfg = RunConfig(defense="mple", attack="mple-view", image_size=SIZE, model="convnet",
                    defense_params={"epochs": 1, **defense_params})
    seeds = cfg.derived_seeds()

    def fresh():
        return build_model("convnet", {}, 1, SIZE, parts.members.num_classes, seeds["init"])

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
    conv, _ = split_first_conv(ctx.build_model())
    secrets = defense.secrets(conv, (1, SIZE, SIZE), 0)
    with pytest.raises(ConfigError, match="built for 1x16x16 images"):
        defense.morph(torch.rand(2, 1, 32, 32), secrets)
    with pytest.raises(ConfigError, match=r"C_ac for 1x16x16 input.*MB in float32"):
        MpLe(MpLeParams(max_memory_gb=0.001)).secrets(conv, (1, SIZE, SIZE), 0)
    with pytest.raises(ConfigError, match="first layer is a Conv2d"):
        split_first_conv(build_model("resnet", {}, 1, SIZE, 4, seed=0))


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
