"""The DP audit (``dp_bound_check``): a sound empirical epsilon lower bound that can fail.

The bound is checked on score arrays whose true epsilon is known (perfect
separation, random scores, randomized response), then end to end: a target that
memorizes randomly labelled canaries must be flagged at epsilon 1, and the same
canaries trained with DP-SGD at epsilon 1 must not be, with an audit strong
enough (``dp_audit_power`` above 1) that the absence of a violation means
something.
"""

import numpy as np
import pytest
import torch

from privbench.attacks.membership import LossThreshold, LossThresholdParams
from privbench.config import Budget
from privbench.datasets import ImageDataset, load
from privbench.datasets import splits as splitlib
from privbench.metrics.membership import dp_audit_power, dp_bound_check, membership_metrics, roc_curve
from privbench.models import build_model
from privbench.threat import Observation, Surface

DELTA = 1e-5


def _check(scores, is_member, epsilon, confidence=0.95):
    fpr, tpr, _ = roc_curve(scores, is_member)
    n_in = int(np.sum(is_member))
    return dp_bound_check({"fpr": fpr, "tpr": tpr}, epsilon, DELTA, n_in, len(is_member) - n_in, confidence)


def _labels(n_in, n_out):
    return np.r_[np.ones(n_in, bool), np.zeros(n_out, bool)]


# -- the bound on score arrays -------------------------------------------------------


def test_perfect_separation_is_flagged_only_when_the_sample_can_show_it():
    large = _check(np.r_[np.ones(200), np.zeros(200)], _labels(200, 200), epsilon=1.0)
    assert large["dp_bound_violations"] >= 1 and large["dp_audit"].startswith("violation")
    # a perfect attack reaches the audit's power exactly: nothing on this sample can show more
    assert large["empirical_epsilon_lower_bound"] == pytest.approx(large["dp_audit_power"])
    assert large["dp_audit_power"] == pytest.approx(3.08, abs=0.01) and large["dp_audit_can_detect"]
    small = _check(np.r_[np.ones(20), np.zeros(20)], _labels(20, 20), epsilon=1.0)
    assert small["dp_bound_violations"] == 0 and not small["dp_audit_can_detect"]
    assert small["dp_audit_power"] < 1 and small["dp_audit"].startswith("no evidence")


def test_random_scores_are_never_flagged():
    rng = np.random.default_rng(0)
    for _ in range(50):
        result = _check(rng.random(400), _labels(200, 200), epsilon=0.0)  # true epsilon 0: any flag is false
        assert result["dp_bound_violations"] == 0 and result["empirical_epsilon_lower_bound"] == 0


def _randomized_response(rng, n, epsilon):
    """Scores of an epsilon-DP mechanism whose trade-off is tight: a member says 1 w.p. e^eps / (1 + e^eps)."""
    p = np.exp(epsilon) / (1 + np.exp(epsilon))
    return np.r_[rng.random(n) < p, rng.random(n) >= p].astype(float), _labels(n, n)


def test_randomized_response_is_bounded_below_its_epsilon_and_flagged_above_it():
    rng = np.random.default_rng(1)
    bounds, flagged_at_half = [], 0
    for _ in range(30):
        scores, is_member = _randomized_response(rng, 2000, 1.0)
        at_true = _check(scores, is_member, epsilon=1.0)
        assert at_true["dp_bound_violations"] == 0  # sound: the true epsilon is never contradicted
        bounds.append(at_true["empirical_epsilon_lower_bound"])
        flagged_at_half += _check(scores, is_member, epsilon=0.5)["dp_bound_violations"] > 0
    assert max(bounds) < 1.0 and np.mean(bounds) > 0.7  # close to the true 1 at n = 2,000
    assert flagged_at_half == 30  # a claim of 0.5 for an epsilon-1 mechanism is caught every time


def test_audit_power_grows_with_the_sample_and_with_lower_confidence():
    powers = [dp_audit_power(n, n, DELTA) for n in (20, 100, 1000, 10_000)]
    assert np.all(np.diff(powers) > 0)
    assert powers[0] < 1 < powers[1] and powers[2] == pytest.approx(4.54, abs=0.01)
    assert dp_audit_power(100, 100, DELTA, confidence=0.5) > dp_audit_power(100, 100, DELTA, confidence=0.99)
    result = _check(np.r_[np.ones(100), np.zeros(100)], _labels(100, 100), epsilon=float("inf"))
    assert result["dp_bound_violations"] == 0 and not result["dp_audit_can_detect"]
    assert result["dp_audit"].startswith("nothing to audit")
    with pytest.raises(ValueError, match="confidence"):
        dp_bound_check({"fpr": [0, 1], "tpr": [0, 1]}, 1.0, DELTA, 10, 10, confidence=1.0)


# -- end to end: canaries, a non-private and a DP target --------------------------------

N = 200  # members, nonmembers and auxiliary canaries each
MODEL = {"width": 16, "hidden": 128}


@pytest.fixture(scope="module")
def canaries(tmp_path_factory, one_thread):
    """Synthetic-mri images with labels drawn at random: only memorization can fit a member's label."""
    dataset = load("synthetic-mri", 16, 1, cache_dir=tmp_path_factory.mktemp("cache"))
    parts = splitlib.make(dataset, splitlib.SplitSpec(members=N, nonmembers=N, auxiliary=N), seed=0)
    generator = torch.Generator().manual_seed(0)

    def relabel(part):
        labels = torch.randint(0, part.num_classes, (len(part),), generator=generator)
        return ImageDataset(part.images, labels, part.class_names, part.ids, part.provenance)

    members, nonmembers, auxiliary = (relabel(p) for p in (parts.members, parts.nonmembers, parts.auxiliary))
    candidates = ImageDataset(
        torch.cat([members.images, nonmembers.images]), torch.cat([members.labels, nonmembers.labels]),
        members.class_names, members.ids + nonmembers.ids,
    )
    return members, candidates, auxiliary


def _audit(model, canaries, epsilon):
    """The loss-threshold attack on the released model's logits, scored and audited as the runner does."""
    _, candidates, auxiliary = canaries
    model.eval()
    observation = Observation(surface=Surface.MODEL_QUERIES, query=lambda x: model(x).detach(),
                              candidates=candidates, auxiliary=auxiliary)
    output = LossThreshold(LossThresholdParams(), seed=0).run(observation, Budget())
    is_member = _labels(N, N)
    metrics, _, roc = membership_metrics(output.scores, is_member, output.decisions, bootstrap=10)
    return metrics, dp_bound_check(roc, epsilon, DELTA, N, N)


def _model():
    return build_model("convnet", MODEL, 1, 16, 4, seed=0)


def test_overfit_target_without_dp_violates_epsilon_1(canaries):
    from privbench.training import TrainParams, train_classifier

    model = _model()
    train_classifier(model, canaries[0], TrainParams(epochs=100, batch_size=25, lr=3e-3), seed=0)
    metrics, audit = _audit(model, canaries, epsilon=1.0)
    assert metrics["auc"] > 0.9
    assert audit["dp_bound_violations"] > 0 and audit["dp_audit"].startswith("violation")
    assert audit["empirical_epsilon_lower_bound"] > 2  # about 2.9 against a power of 3.08
    assert audit["dp_audit_can_detect"] and audit["dp_audit_power"] == pytest.approx(3.08, abs=0.01)


def test_dp_target_at_epsilon_1_is_not_flagged(canaries):
    pytest.importorskip("opacus")
    from privbench.defenses.dp import DPParams, fix_model, train_dp

    params = DPParams(epochs=20, batch_size=25, lr=3e-3, epsilon=1.0, delta=DELTA, accountant="rdp")
    model, _, record = train_dp(fix_model(_model())[0], canaries[0], params, seed=0)
    assert record["epsilon_spent"] <= 1.0
    metrics, audit = _audit(model, canaries, epsilon=record["epsilon_spent"])
    assert audit["dp_bound_violations"] == 0 and audit["dp_audit"].startswith("no violation found")
    assert audit["empirical_epsilon_lower_bound"] < record["epsilon_spent"]
    # the same sample could have shown a violation: the pass is evidence, not a blind spot
    assert audit["dp_audit_can_detect"] and audit["dp_audit_power"] > 3 * record["epsilon_spent"]
