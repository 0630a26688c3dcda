"""fd_eval: zero for a set against itself, growing with the noise added to it; cell scoring end to end."""

import socket

import numpy as np
import pytest
import torch

from privbench import scoring
from privbench.config import RunConfig
from privbench.datasets import load, splits
from privbench.metrics import eval_classifier, sets
from privbench.runner import run
from privbench.store import Store


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    data = load("synthetic-mri", 16, 1, cache_dir=tmp_path_factory.mktemp("data"))
    parts = splits.make(data, splits.SplitSpec(), seed=0)
    spec = eval_classifier.EvalClassifierSpec("synthetic-mri", "test", 16, 1, 0, epochs=3)
    return eval_classifier.train_or_load(spec, parts.auxiliary, tmp_path_factory.mktemp("eval")), parts


def test_fd_eval_is_zero_for_a_set_against_itself(classifier):
    model, parts = classifier
    features = model.features(parts.nonmembers.images[:100])
    assert sets.frechet_distance(features, features) == pytest.approx(0, abs=1e-6)


def test_fd_eval_grows_with_noise(classifier):
    model, parts = classifier
    images = parts.nonmembers.images[:128]
    reference = model.features(images)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(images.shape, generator=generator)
    distances = [
        sets.frechet_distance(model.features((images + s * noise).clamp(0, 1)), reference)
        for s in (0.0, 0.05, 0.1, 0.2, 0.4)
    ]
    assert all(a < b for a, b in zip(distances, distances[1:], strict=False)), distances
    assert model.info["heldout_accuracy"] >= 0 and model.info["trained_on"].startswith("auxiliary")


def test_score_cell_stores_set_metrics_with_reasons(bench_home, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: (_ for _ in ()).throw(OSError("blocked")))
    store = Store()
    for seed in range(3):
        result = run(RunConfig(image_size=16, seed=seed, attack_params={"steps": 3, "restarts": 1},
                               defense_params={"epochs": 1}), store)
        assert result.status == "ok"
        lpips_name = "lpips[alex,up64-bilinear]"
        assert result.metrics[lpips_name] is None
        assert "alexnet-owt-7be5be79.pth" in result.info["unavailable_metrics"][lpips_name]
        assert result.metrics["psnr"] is not None
    cells = scoring.reconstruction_cells(store)
    assert len(cells) == 1 and len(next(iter(cells.values()))) == 3
    report = scoring.score_cell(store, next(iter(cells.values())))
    by_name = {e["score"]["name"]: e for e in report.scores}
    fd = by_name["fd_eval[resnet8-d32@synthetic-mri]"]
    assert fd["score"]["value"] is None and fd["score"]["n"] == 3 and "below the minimum 64" in fd["score"]["reason"]
    fid = by_name["fid[inception-pool3@299px-bilinear]"]
    assert fid["score"]["value"] is None and "pt_inception-2015-12-05-6726825d.pth" in fid["score"]["reason"]
    stored = store.cell_scores(report.cell_key)
    assert {s["metric"] for s in stored} == set(by_name) and all(s["run_ids"] for s in stored)
    assert np.isfinite(report.per_run_medians["psnr"])
