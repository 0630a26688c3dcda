"""Acceptance-size checks on the real brain-tumor-mri data (slow; need PRIVBENCH_DATA_DIR)."""

import os
import statistics

import pytest

from privbench.config import RunConfig
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
