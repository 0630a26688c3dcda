"""The gradient-inversion attacks must actually invert: a broken attack fails these tests."""

import pytest
import torch

from privbench import registry
from privbench.attacks.base import AttackError
from privbench.attacks.gradient_inversion import cosine_distance, l2_distance, total_variation
from privbench.attacks.label_recovery import analytic_label, count_labels
from privbench.config import Budget
from privbench.datasets import load
from privbench.defenses.base import client_gradients
from privbench.metrics.image import psnr
from privbench.models import build_model
from privbench.threat import GradientUpdate, Observation, Surface


@pytest.fixture(scope="module")
def data():
    return load("synthetic-mri", 16, 1, cache_dir=None)


@pytest.fixture(scope="module")
def victim(data):
    return data.images[7:8], data.labels[7:8], data.num_classes


def _observation(model_name, victim, seed=0, batch=1, auxiliary=None):
    images, labels, k = victim
    model = build_model(model_name, {}, 1, 16, k, seed)
    grads = client_gradients(model, images, labels)
    if auxiliary is None:
        auxiliary = load("synthetic-mri", 16, 1, cache_dir=None).subset(range(100, 164))
    return Observation(Surface.GRADIENTS, GradientUpdate(model, grads, batch, (1, 16, 16), k, "init"),
                       auxiliary=auxiliary)


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


def test_best_restart_is_chosen_by_the_objective(victim):
    out = _attack("dlg", restarts=3, steps=3).run(_observation("lenet", victim), Budget())
    objectives = out.info["restart_objectives"]
    assert out.info["chosen_restart"] == objectives.index(min(objectives))


def test_a_diverging_schedule_still_returns_its_best_iterate(victim):
    """Plain Adam at a learning rate far too large: the iterates blow up, the returned point does not."""
    obs = _observation("lenet", victim)
    start = _attack("invgrad", steps=1, restarts=1, signed=False, lr_drops=False, boxed=False).run(obs, Budget())
    diverged = _attack("invgrad", steps=30, restarts=1, signed=False, lr_drops=False, boxed=False,
                       lr=1e3).run(obs, Budget())
    best, last = diverged.info["restart_objectives"][0], diverged.info["restart_last_objectives"][0]
    assert last > 10 * best  # the schedule did diverge
    assert best <= start.info["restart_objectives"][0]  # the start (same seed) is one of its iterates
    assert psnr(diverged.images, victim[0]).item() == pytest.approx(psnr(start.images, victim[0]).item(), abs=1e-3)


def test_count_rule_recovers_a_batch_of_four_labels_with_a_repeat(data):
    images = data.images[[0, 1, 2, 3]]
    for wanted in ([0, 2, 2, 3], [1, 1, 1, 1], [3, 0, 1, 2]):
        labels = torch.tensor(wanted)
        model = build_model("lenet", {}, 1, 16, data.num_classes, 5)
        update = GradientUpdate(model, client_gradients(model, images, labels), 4, (1, 16, 16), data.num_classes,
                                "init")
        recovered = count_labels(update, update.gradients, data.images[100:356])
        assert recovered.tolist() == sorted(wanted)


def test_batches_default_to_the_count_rule(data):
    images, labels = data.images[:4], torch.tensor([0, 2, 2, 3])
    model = build_model("convnet", {}, 1, 16, data.num_classes, 1)
    update = GradientUpdate(model, client_gradients(model, images, labels), 4, (1, 16, 16), data.num_classes, "init")
    obs = Observation(Surface.GRADIENTS, update, auxiliary=data.subset(range(100, 356)))
    out = _attack("invgrad", steps=2, restarts=1).run(obs, Budget())
    assert out.info["label_rule"] == "count"
    assert sorted(out.labels.tolist()) == [0, 2, 2, 3]


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


def _resnet_update(data, bn_buffers: str, labels=(0, 1, 2, 3)):
    from privbench.defenses.base import shared_bn_buffers

    images = data.images[:4]
    model = build_model("resnet", {}, 1, 16, data.num_classes, 2).train()
    buffers = shared_bn_buffers(model, images) if bn_buffers == "shared" else ()
    grads = client_gradients(model, images, torch.tensor(labels))
    return images, GradientUpdate(model, grads, 4, (1, 16, 16), data.num_classes, "init", buffers=buffers)


def test_gradinversion_targets_the_victim_batch_statistics_from_shared_buffers(data):
    images, update = _resnet_update(data, "shared")
    attack = _attack("gradinversion")
    attack.prepare(Observation(Surface.GRADIENTS, update), update)
    assert "derived from the shared BatchNorm buffers" in attack.describe()["bn_prior"]
    first = attack._targets[0]
    with torch.no_grad():
        activations = update.model.stem[0](images)
    torch.testing.assert_close(first.mean, activations.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(first.var, activations.var(dim=(0, 2, 3), unbiased=True), atol=1e-5, rtol=1e-3)
    # the victim's own images satisfy the prior (up to float error); a random batch does not
    attack._model = update.model
    with torch.no_grad():
        assert float(attack.prior(images)) < 1e-3 * float(attack.prior(torch.rand_like(images)))

    _, private = _resnet_update(data, "private")
    attack.prepare(Observation(Surface.GRADIENTS, private), private)
    assert "running statistics" in attack.describe()["bn_prior"]


def test_gradinversion_beats_the_trivial_guess_and_keeps_to_its_budget(victim):
    obs = _observation("convnet", victim)
    out = _attack("gradinversion", steps=150, groups=2).run(obs, Budget(max_grad_evals=301))
    assert out.grad_evals <= 301
    flat = torch.full_like(victim[0], float(victim[0].mean()))
    assert psnr(out.images, victim[0]).item() > psnr(flat, victim[0]).item() + 3


def test_the_learning_rate_schedule_fits_inside_the_budget(victim):
    """2,000 scheduled steps but 100 evaluations per restart: the drops fall at 3/8, 5/8, 7/8 of 100 steps."""
    attack = _attack("invgrad", steps=2000, restarts=2)
    out = attack.run(_observation("convnet", victim), Budget(max_grad_evals=200))
    assert out.info["steps_per_restart"] == 100 and out.grad_evals == 200
    assert attack.schedule_steps(float("inf")) == 2000
