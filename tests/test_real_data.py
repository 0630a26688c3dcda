"""Acceptance-size checks on the real brain-tumor-mri data (slow; need PRIVBENCH_DATA_DIR)."""

import os
import statistics

import pytest

from privbench.config import RunConfig
from privbench.datasets.splits import SplitSpec
from privbench.runner import run
from privbench.store import Store

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("PRIVBENCH_DATA_DIR"), reason="PRIVBENCH_DATA_DIR is not set"),
]


@pytest.mark.parametrize("attack", ["dlg", "idlg"])
def test_gradient_inversion_on_lenet_reaches_30_db(attack, bench_home):
    store = Store()
    results = [
        run(RunConfig(attack=attack, dataset="brain-tumor-mri", model="lenet", image_size=32, channels=1, seed=s), store)
        for s in range(3)
    ]
    assert all(r.status == "ok" for r in results)
    assert statistics.median(r.metrics["psnr"] for r in results) >= 30
    if attack == "idlg":
        assert all(r.metrics["label_accuracy"] == 1 for r in results)


# Acceptance 1 of issue 7: a sanity target that overfits (200 members, trained to 100% training accuracy and
# near-zero loss, no augmentation; 1,000 nonmembers so that TPR at 1% FPR is reportable).
OVERFIT = dict(dataset="brain-tumor-mri", model="convnet", image_size=32, channels=1,
               defense_params={"epochs": 80, "batch_size": 32}, split=SplitSpec(members=200, nonmembers=1000))


def test_lira_beats_loss_threshold_on_an_overfit_target(bench_home):
    store = Store()
    loss = run(RunConfig(attack="loss-threshold", **OVERFIT), store)
    lira = run(RunConfig(attack="lira", attack_params={"shadows": 16}, **OVERFIT), store)
    assert loss.status == "ok" and lira.status == "ok", (loss.error, lira.error)
    training = lira.info["target"]["training"]
    assert training["train_accuracy"] == 1.0 and training["epoch_losses"][-1] < 0.01  # the premise: it overfits
    assert lira.metrics["n_nonmembers_scored"] == 1000 and lira.metrics["tpr_at_0.01_fpr"] is not None
    assert lira.metrics["auc"] > 0.75
    assert lira.metrics["tpr_at_0.01_fpr"] > loss.metrics["tpr_at_0.01_fpr"]
