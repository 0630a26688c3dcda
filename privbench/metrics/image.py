"""Paired reconstruction metrics on images in [0, 1]: MSE, PSNR, SSIM, label accuracy.

Each metric takes reconstructions and originals, float [B, C, H, W] in [0, 1]
(labels: int64 [B]), and returns one value per image, float64 [B].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn import functional as F

from privbench import registry


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    family: str = "reconstruction"
    unit: str = ""
    depends_on: str | None = None  # a network or weights file the metric needs, if any
    description: str = ""

    def __call__(self, prediction: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        return self.fn(prediction, truth)


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((x.double() - y.double()) ** 2).flatten(1).mean(1)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB for data range 1 (inf for identical images)."""
    return 10 * torch.log10(1.0 / mse(x, y))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al., 2004): Gaussian window 11x11, sigma 1.5, K1=0.01, K2=0.03.

    Population covariances; the mean is taken over positions where the window
    lies inside the image, then over channels (as scikit-image's
    ``structural_similarity(gaussian_weights=True, use_sample_covariance=False)``).
    Images smaller than the window use a window as large as the image.
    """
    x, y = x.double(), y.double()
    channels = x.shape[1]
    window = min(window, x.shape[-1], x.shape[-2])
    kernel = _gaussian_window(window, sigma).expand(channels, 1, window, window).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(2).mean(2).mean(1)


def label_accuracy(predicted: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    return (predicted == true).double()


MSE = registry.metrics.register("mse")(Metric("mse", False, mse, description="Mean squared error, images in [0, 1]."))
PSNR = registry.metrics.register("psnr")(
    Metric("psnr", True, psnr, unit="dB", description="Peak signal-to-noise ratio, data range 1.")
)
SSIM = registry.metrics.register("ssim")(
    Metric("ssim", True, ssim, description="Structural similarity, Gaussian window 11, sigma 1.5.")
)
LABEL_ACCURACY = registry.metrics.register("label_accuracy")(
    Metric("label_accuracy", True, label_accuracy, description="Fraction of recovered labels that are right.")
)

IMAGE_METRICS = (MSE, PSNR, SSIM)


def score_reconstruction(
    images: torch.Tensor, labels: torch.Tensor | None, true_images: torch.Tensor, true_labels: torch.Tensor
) -> dict[str, float]:
    """Per-run scores: each image metric averaged over the batch, and label accuracy."""
    out = {m.name: float(m(images, true_images).mean()) for m in IMAGE_METRICS}
    if labels is not None:
        out["label_accuracy"] = float(label_accuracy(labels, true_labels).mean())
    return out
