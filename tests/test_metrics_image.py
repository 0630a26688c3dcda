import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from privbench.metrics.image import label_accuracy, mse, psnr, ssim


def _pair(seed, shape):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g)
    y = (x + 0.1 * torch.randn(shape, generator=g)).clamp(0, 1)
    return x, y


@pytest.mark.parametrize("shape", [(3, 1, 32, 32), (2, 3, 16, 16), (1, 1, 64, 48)])
def test_psnr_matches_scikit_image(shape):
    x, y = _pair(0, shape)
    ours = psnr(y, x)
    for i in range(shape[0]):
        ref = peak_signal_noise_ratio(x[i].numpy().astype(np.float64), y[i].numpy().astype(np.float64), data_range=1.0)
        assert ours[i].item() == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("shape", [(3, 1, 32, 32), (2, 3, 16, 16), (1, 1, 64, 48)])
def test_ssim_matches_scikit_image(shape):
    x, y = _pair(1, shape)
    ours = ssim(y, x)
    for i in range(shape[0]):
        ref = structural_similarity(
            x[i].numpy().astype(np.float64), y[i].numpy().astype(np.float64), data_range=1.0,
            gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=0,
        )
        assert ours[i].item() == pytest.approx(ref, abs=1e-9)


def test_identical_images_score_perfectly():
    x, _ = _pair(2, (2, 1, 16, 16))
    assert torch.isinf(psnr(x, x)).all()
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    assert mse(x, x).sum() == 0


def test_label_accuracy():
    assert label_accuracy(torch.tensor([1, 2, 3]), torch.tensor([1, 0, 3])).mean().item() == pytest.approx(2 / 3)
