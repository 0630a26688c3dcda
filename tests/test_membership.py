"""Membership inference: metrics against scikit-learn, the three attacks end to end, bad input."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from privbench.config import RunConfig
from privbench.metrics.membership import membership_metrics, roc_curve, tpr_at_fpr
from privbench.runner import run
from privbench.store import Store


def _scores(seed=0, n_in=300, n_out=1500, shift=1.0):
    rng = np.random.default_rng(seed)
    scores = np.r_[rng.normal(shift, 1, n_in), rng.normal(0, 1, n_out)]
    return scores, np.r_[np.ones(n_in, bool), np.zeros(n_out, bool)]


def test_roc_and_auc_match_scikit_learn():
    scores, is_member = _scores()
    scores = np.round(scores, 1)  # ties
    fpr, tpr, _ = roc_curve(scores, is_member)
    sk_fpr, sk_tpr, _ = sk_roc_curve(is_member, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    metrics, _, _ = membership_metrics(scores, is_member, bootstrap=20)
    assert metrics["auc"] == pytest.approx(roc_auc_score(is_member, scores), abs=1e-12)


def test_tpr_at_low_fpr_needs_enough_nonmembers():
    scores, is_member = _scores(n_out=1500)
    metrics, reasons, roc = membership_metrics(scores, is_member, bootstrap=50)
    fpr, tpr = np.array(roc["fpr"]), np.array(roc["tpr"])
    assert metrics["tpr_at_0.01_fpr"] == tpr_at_fpr(fpr, tpr, 0.01)
    low, high = metrics["tpr_at_0.01_fpr_ci"]
    assert low <= metrics["tpr_at_0.01_fpr"] <= high
    assert metrics["tpr_at_0.001_fpr"] is None and "10000 nonmembers" in reasons["tpr_at_0.001_fpr"]
    small, small_reasons, _ = membership_metrics(*_scores(n_out=500), bootstrap=10)
    assert small["tpr_at_0.01_fpr"] is None and "has 500" in small_reasons["tpr_at_0.01_fpr"]


def test_perfect_and_random_scores():
    is_member = np.r_[np.ones(50, bool), np.zeros(50, bool)]
    perfect, _, _ = membership_metrics(is_member.astype(float), is_member, bootstrap=10)
    assert perfect["auc"] == 1 and perfect["advantage"] == 1
    with pytest.raises(ValueError, match="members and nonmembers"):
        membership_metrics(np.ones(5), np.ones(5, bool))


TINY = dict(image_size=16, model="convnet", defense_params={"epochs": 3})


@pytest.mark.parametrize(
    "attack,params",
    [("loss-threshold", {}), ("lira", {"shadows": 4}), ("lira", {"shadows": 4, "online": False, "shadow_size": 100}),
     ("shadow", {"shadows": 2})],
)
def test_membership_attacks_run_end_to_end(bench_home, attack, params):
    result = run(RunConfig(attack=attack, attack_params=params, **TINY), Store())
    assert result.status == "ok", result.error
    m = result.metrics
    assert 0 <= m["auc"] <= 1 and m["n_members_scored"] == 500 and m["n_nonmembers_scored"] == 250
    assert m["tpr_at_0.01_fpr"] is None and "1000 nonmembers" in result.info["unavailable_metrics"]["tpr_at_0.01_fpr"]
    assert (Store().root / result.artifacts / "roc.json").is_file()


def test_lira_vectorized_and_sequential_shadows_agree(bench_home):
    a = run(RunConfig(attack="lira", attack_params={"shadows": 2, "vectorized": True}, **TINY), Store())
    b = run(RunConfig(attack="lira", attack_params={"shadows": 2, "vectorized": False}, **TINY), Store())
    assert a.info["attack"]["shadow_training"].startswith("vectorized")
    assert b.info["attack"]["shadow_training"] == "one after another"
    assert a.metrics["auc"] == pytest.approx(b.metrics["auc"], abs=0.05)


def test_too_many_shadows_is_a_clear_error_and_stores_nothing(bench_home):
    from privbench.config import ConfigError

    store = Store()
    with pytest.raises(ConfigError, match="shadows need at least"):
        run(RunConfig(attack="shadow", attack_params={"shadows": 50}, **TINY), store)
    assert store.counts() == {}


def test_shadow_over_budget_is_unsupported_with_the_estimate(bench_home):
    result = run(RunConfig(attack="shadow", attack_params={"shadows": 2, "shadow_budget_s": 1e-6}, **TINY), Store())
    assert result.status == "unsupported" and "estimated at" in result.error and "shadow budget" in result.error


def test_empty_nonmember_split_is_rejected(bench_home):
    from privbench.datasets import DatasetError
    from privbench.datasets.splits import SplitSpec

    with pytest.raises(DatasetError):
        run(RunConfig(attack="loss-threshold", split=SplitSpec(members=500, nonmembers=0), **TINY), Store())


def test_dp_bound_check_flags_roc_points_beyond_the_bound():
    from privbench.metrics.membership import dp_bound_check

    fine = {"fpr": [0.0, 0.1, 0.5, 1.0], "tpr": [0.0, 0.12, 0.55, 1.0]}
    assert dp_bound_check(fine, 1.0, 1e-5, 1000, 1000)["dp_bound_violations"] == 0
    broken = {"fpr": [0.0, 0.01, 1.0], "tpr": [0.0, 0.9, 1.0]}
    result = dp_bound_check(broken, 0.5, 1e-5, 1000, 1000)
    assert result["dp_bound_violations"] >= 1 and result["empirical_epsilon_lower_bound"] > 2
    # the same point on 20 samples is within sampling error of the bound at FPR 0
    assert dp_bound_check({"fpr": [0.0, 0.0, 1.0], "tpr": [0.0, 0.1, 1.0]}, 1.0, 1e-5, 20, 20)["dp_bound_violations"] == 0


def test_membership_against_dp_respects_the_dp_bounds(bench_home):
    result = run(RunConfig(attack="loss-threshold", defense="dp", image_size=16, model="convnet",
                           defense_params={"epochs": 2, "epsilon": 1.0}), Store())
    assert result.status == "ok", result.error
    m = result.metrics
    assert m["dp_bound_violations"] == 0 and m["accountant_epsilon"] <= 1.0
    assert 0 <= m["empirical_epsilon_lower_bound"]
    # 500 members and 250 nonmembers could show epsilon up to 3.9: the pass is a real (if weak) audit
    assert m["dp_audit_can_detect"] and m["dp_audit_power"] == pytest.approx(3.89, abs=0.01)
    assert m["dp_audit_confidence"] == 0.95 and m["dp_audit"].startswith("no violation found")


@pytest.mark.parametrize("pool,size,shadows", [(1200, 200, 16), (1000, 500, 4), (7, 3, 5), (10, 10, 3), (3000, 1000, 16)])
def test_balanced_inclusion_gives_every_example_equal_in_and_out_counts(pool, size, shadows):
    import torch

    from privbench.attacks.membership import balanced_inclusion

    inside = balanced_inclusion(pool, size, shadows, torch.Generator().manual_seed(3))
    assert inside.shape == (shadows, pool) and (inside.sum(1) == size).all()
    counts = inside.sum(0)
    low = shadows * size // pool
    assert counts.min() >= low and counts.max() <= -(-shadows * size // pool)
    assert ((shadows - counts) >= shadows - counts.max()).all() and int(counts.sum()) == shadows * size
    if shadows >= max(-(-pool // size), -(-pool // max(pool - size, 1))) and size < pool:
        assert counts.min() >= 1 and (shadows - counts).min() >= 1


def test_online_lira_scores_need_in_and_out_shadows_and_rank_by_confidence():
    import torch

    from privbench.attacks.membership import _online_scores

    inside = torch.tensor([[True, False], [False, True], [True, False], [False, True]])
    shadow = torch.tensor([[5.0, 0.0], [1.0, 4.0], [6.0, 1.0], [0.0, 5.0]], dtype=torch.float64)
    # fixed variance: the likelihood ratio grows with the target's confidence for each candidate
    low, high = (_online_scores(torch.tensor([v, v], dtype=torch.float64), shadow, inside, True) for v in (0.0, 9.0))
    assert (high > low).all()
    with pytest.raises(ValueError, match="IN and an OUT shadow"):
        _online_scores(torch.zeros(2, dtype=torch.float64), shadow, torch.ones(4, 2, dtype=torch.bool), True)


def test_online_lira_with_too_few_shadows_for_the_pool_is_a_clear_error(bench_home):
    from privbench.config import ConfigError
    from privbench.datasets.splits import SplitSpec

    store = Store()
    with pytest.raises(ConfigError, match="at least 5 shadows"):
        run(RunConfig(attack="lira", attack_params={"shadows": 4}, split=SplitSpec(members=100, nonmembers=400), **TINY),
            store)
    assert store.counts() == {}
