"""The gradient-inversion attacks must actually invert: a broken attack fails these tests."""

import pytest
import torch

from privbench import registry
from privbench.attacks.base import AttackError
from privbench.attacks.gradient_inversion import analytic_label, cosine_distance, l2_distance, total_variation
from privbench.config import Budget
from privbench.datasets import load
from privbench.defenses.base import client_gradients
from privbench.metrics.image import psnr
from privbench.models import build_model
from privbench.threat import GradientUpdate, Observation, Surface


@pytest.fixture(scope="module")
def victim():
    data = load("synthetic-mri", 16, 1, cache_dir=None)
    return data.images[7:8], data.labels[7:8], data.num_classes


def _observation(model_name, victim, seed=0, batch=1):
    images, labels, k = victim
    model = build_model(model_name, {}, 1, 16, k, seed)
    grads = client_gradients(model, images, labels)
    return Observation(Surface.GRADIENTS, GradientUpdate(model, grads, batch, (1, 16, 16), k, "init"))


def _attack(name, **params):
    cls = registry.attacks.get(name)
    return cls(cls.Params(**params), seed=0)


def test_dlg_reconstructs_a_16px_image(victim):
    out = _attack("dlg", restarts=1).run(_observation("lenet", victim), Budget())
    assert psnr(out.images, victim[0]).item() > 30
    assert out.labels.tolist() == victim[1].tolist()
    assert out.images.shape == victim[0].shape and 0 <= out.images.min() and out.images.max() <= 1


def test_idlg_reads_the_label_off_the_gradient_and_reconstructs(victim):
    obs = _observation("lenet", victim)
    assert analytic_label(obs.gradient_update).tolist() == victim[1].tolist()
    out = _attack("idlg", restarts=1).run(obs, Budget())
    assert psnr(out.images, victim[0]).item() > 30
    assert out.info["label_rule"] == "analytic"


def test_invgrad_beats_the_trivial_guess_on_a_relu_network(victim):
    obs = _observation("convnet", victim)
    out = _attack("invgrad", steps=300, restarts=1).run(obs, Budget())
    flat = torch.full_like(victim[0], float(victim[0].mean()))
    assert psnr(out.images, victim[0]).item() > psnr(flat, victim[0]).item() + 3


def test_budget_caps_gradient_evaluations(victim):
    out = _attack("dlg", restarts=2).run(_observation("lenet", victim), Budget(max_grad_evals=40))
    assert out.grad_evals <= 40
    assert out.info["restart_grad_evals"] == [20, 20]


def test_best_restart_is_chosen_by_gradient_distance(victim):
    out = _attack("dlg", restarts=3, steps=3).run(_observation("lenet", victim), Budget())
    distances = out.info["restart_distances"]
    assert out.info["chosen_restart"] == distances.index(min(distances))


def test_analytic_label_refuses_batches():
    update = GradientUpdate(build_model("lenet", {}, 1, 16, 4, 0), (), 2, (1, 16, 16), 4, "init")
    with pytest.raises(AttackError, match="one image only"):
        analytic_label(update)


def test_attack_without_gradients_is_an_attack_error():
    with pytest.raises(AttackError, match="GRADIENTS"):
        _attack("dlg").run(Observation(Surface.MODEL_WHITEBOX), Budget())


def test_distances_and_prior():
    a = (torch.ones(3), torch.ones(2, 2))
    assert l2_distance(a, a).item() == 0
    assert cosine_distance(a, tuple(2 * t for t in a)).item() == pytest.approx(0, abs=1e-6)
    assert cosine_distance(a, tuple(-t for t in a)).item() == pytest.approx(2, abs=1e-6)
    assert total_variation(torch.zeros(1, 1, 4, 4)).item() == 0
    step = torch.zeros(1, 1, 4, 4)
    step[..., 2:] = 1
    assert total_variation(step).item() == pytest.approx(1 / 3)
