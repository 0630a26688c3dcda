"""Perceptual and set metrics: equal to the reference libraries with the same weights, honest when weights are missing."""

import socket
from unittest import mock

import numpy as np
import pytest
import torch

from privbench.metrics import sets, weights
from privbench.metrics.perceptual import LPIPS, InceptionFeatures


def _write_random_weights(home):
    """Randomly initialised checkpoints in the exact formats torchvision and pytorch-fid expect."""
    import torchvision
    from pytorch_fid import inception as fid_inception

    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), checkpoints / weights.KNOWN["alexnet"].filename)
    built = {}

    def keep(self, state_dict, *args, **kwargs):
        built["net"] = self

    with mock.patch.object(fid_inception, "load_state_dict_from_url", lambda *a, **k: {}), mock.patch.object(
        torchvision.models.Inception3, "load_state_dict", keep
    ):
        fid_inception.fid_inception_v3()
    torch.save(built["net"].state_dict(), checkpoints / weights.KNOWN["inception-fid"].filename)
    return checkpoints


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.delenv(weights.WEIGHTS_DIR_ENV, raising=False)
    return home


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _images(seed, n=4, size=32, channels=1):
    return torch.rand((n, channels, size, size), generator=torch.Generator().manual_seed(seed))


def test_lpips_equals_the_lpips_package_with_the_same_weights(torch_home, no_network):
    import lpips

    _write_random_weights(torch_home)
    x, y = _images(1), _images(2)
    ours = LPIPS("alex")(x, y)
    reference = lpips.LPIPS(net="alex", verbose=False)  # torchvision reads the same file from TORCH_HOME
    expected = reference(LPIPS.preprocess(x), LPIPS.preprocess(y), normalize=True).flatten().double()
    assert torch.allclose(ours, expected, rtol=1e-5, atol=0)
    assert LPIPS("alex").name(32) == "lpips[alex,up64-bilinear]" and LPIPS("alex").name(64) == "lpips[alex]"


def _fid_features(torch_home):
    from pytorch_fid import inception as fid_inception

    checkpoints = _write_random_weights(torch_home)
    x, y = _images(3, n=5), _images(4, n=5)
    ours = InceptionFeatures()
    fx, fy = ours(x), ours(y)
    state = torch.load(checkpoints / weights.KNOWN["inception-fid"].filename, weights_only=True)
    with mock.patch.object(fid_inception, "load_state_dict_from_url", lambda *a, **k: state):
        reference = fid_inception.InceptionV3([3]).eval()
    with torch.no_grad():
        rx = reference(x.expand(-1, 3, -1, -1))[0].flatten(1).double().numpy()
    np.testing.assert_allclose(fx, rx, rtol=1e-5, atol=1e-6)
    return fx, fy, rx


def _reference_fd(a, b):
    from pytorch_fid.fid_score import calculate_frechet_distance

    return calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def test_fid_features_and_distance_equal_pytorch_fid(torch_home, no_network):
    fx, fy, rx = _fid_features(torch_home)
    # the 2048-d matrix square root takes minutes on 2 cores: the full-width check is the slow test below
    assert sets.frechet_distance(fx[:, :64], fy[:, :64]) == pytest.approx(_reference_fd(rx[:, :64], fy[:, :64]), rel=1e-5)


@pytest.mark.slow
def test_fid_equals_pytorch_fid_on_all_2048_features(torch_home, no_network):
    fx, fy, rx = _fid_features(torch_home)
    assert sets.frechet_distance(fx, fy) == pytest.approx(_reference_fd(rx, fy), rel=1e-5)


def test_missing_weights_give_a_reason_naming_the_file_and_path(torch_home, no_network):
    with pytest.raises(weights.WeightsMissing) as info:
        LPIPS("alex")(_images(1), _images(2))
    message = str(info.value)
    assert "alexnet-owt-7be5be79.pth" in message and str(torch_home / "hub" / "checkpoints") in message
    assert "bench weights fetch alexnet" in message


def test_frechet_below_minimum_n_gives_no_number():
    a = np.random.default_rng(0).normal(size=(10, 8))
    score = sets.frechet_score("fd", a, a)
    assert score.value is None and score.n == 10 and "below the minimum 16" in score.reason


def test_frechet_interval_and_kid_behave():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 4)), rng.normal(size=(200, 4))
    same = sets.frechet_score("fd", a, b)
    shifted = sets.frechet_score("fd", a + 1.0, b)
    assert same.value < shifted.value and same.interval[0] <= same.value <= same.interval[1]
    kid_same, kid_shift = sets.kid_score("kid", a, b), sets.kid_score("kid", a + 1.0, b)
    assert abs(kid_same.value) < kid_shift.value and kid_same.spread > 0
    assert sets.kid_score("kid", a[:5], b[:5]).value is None
