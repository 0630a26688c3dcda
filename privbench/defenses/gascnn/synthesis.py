"""Data-free synthetic images from a frozen teacher's feature maps (DAFL / DeepInversion-style).

A class-conditional generator is trained against the frozen teacher, with no real image:
- feature-map statistics: the batch mean and variance at every BatchNorm input must match the
  running statistics the teacher stored (DeepInversion, Yin et al. 2020);
- confident predictions: cross-entropy of the teacher's output against the conditioned class;
- class balance: the entropy of the batch's mean prediction is maximised (DAFL, Chen et al. 2019).
The teacher plays the discriminator's role.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class SynthesisParams:
    latent: int = 64  # generator input noise dimension
    width: int = 32  # generator channels (the last hidden layer; the others have 2x)
    steps: int = 800  # generator updates
    batch_size: int = 64
    lr: float = 1e-3
    bn_weight: float = 1.0  # feature-statistics matching
    ce_weight: float = 1.0  # confident, class-conditioned predictions
    balance_weight: float = 5.0  # entropy of the mean prediction (class balance)
    synthetic_size: int = 4000  # labelled synthetic images produced


class Generator(nn.Module):
    """z [B, latent] and class y [B] -> images [B, C, S, S] in [0, 1]; S divisible by 4."""

    def __init__(self, latent: int, num_classes: int, channels: int, size: int, width: int = 64):
        super().__init__()
        self.side = size // 4
        self.embed = nn.Embedding(num_classes, latent)
        self.project = nn.Linear(latent, 2 * width * self.side * self.side)
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * width),
            nn.Upsample(scale_factor=2), nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2), nn.Conv2d(2 * width, width, 3, padding=1), nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, channels, 3, padding=1), nn.Sigmoid(),
        )
        self.width = width

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.project(z * self.embed(labels))
        return self.body(h.reshape(len(z), 2 * self.width, self.side, self.side))


class _BNStatistics:
    """Forward hooks on the teacher's BatchNorm layers: the distance of each batch's feature
    statistics to the stored running statistics."""

    def __init__(self, teacher: nn.Module):
        self.losses: list[torch.Tensor] = []
        self.hooks = [m.register_forward_hook(self._hook) for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.hooks:
            raise ValueError("the teacher has no BatchNorm2d layers: no feature-map statistics to match")

    def _hook(self, module: nn.BatchNorm2d, inputs, output) -> None:
        x = inputs[0]
        mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
        self.losses.append(torch.norm(mean - module.running_mean, 2) + torch.norm(var - module.running_var, 2))

    def pop(self) -> torch.Tensor:
        total = torch.stack(self.losses).sum()
        self.losses = []
        return total

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def train_generator(teacher: nn.Module, num_classes: int, channels: int, size: int, params: SynthesisParams,
                    seed: int, progress=None) -> tuple[Generator, dict]:
    """Train a generator against the frozen ``teacher`` (eval mode); returns it and its loss record."""
    torch.manual_seed(seed)
    generator = Generator(params.latent, num_classes, channels, size, params.width)
    teacher = teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    stats = _BNStatistics(teacher)
    optimizer = torch.optim.Adam(generator.parameters(), lr=params.lr, betas=(0.5, 0.999))
    rng = torch.Generator().manual_seed(seed)
    record = {"bn": [], "ce": [], "balance": []}
    start = time.perf_counter()
    try:
        for step in range(params.steps):
            z = torch.randn(params.batch_size, params.latent, generator=rng)
            y = torch.arange(params.batch_size) % num_classes
            logits = teacher(generator(z, y))
            bn = stats.pop()
            ce = F.cross_entropy(logits, y)
            mean_prob = F.softmax(logits, 1).mean(0)
            balance = (mean_prob * torch.log(mean_prob + 1e-8)).sum()  # = -entropy
            loss = params.bn_weight * bn + params.ce_weight * ce + params.balance_weight * balance
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % max(params.steps // 20, 1) == 0 or step == params.steps - 1:
                record["bn"].append(float(bn.detach()))
                record["ce"].append(float(ce.detach()))
                record["balance"].append(float(balance.detach()))
                if progress:
                    progress(step + 1, params.steps)
    finally:
        stats.remove()
        for p in teacher.parameters():
            p.requires_grad_(True)
    record["time_s"] = time.perf_counter() - start
    return generator.eval(), record


@torch.no_grad()
def synthesize(generator: Generator, teacher: nn.Module, count: int, num_classes: int, seed: int,
               batch: int = 256) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``count`` images [N, C, S, S] labelled by the teacher's prediction, and the fraction whose
    prediction equals the conditioned class."""
    rng = torch.Generator().manual_seed(seed)
    images, labels, agree = [], [], 0
    for begin in range(0, count, batch):
        n = min(batch, count - begin)
        y = (torch.arange(begin, begin + n)) % num_classes
        x = generator(torch.randn(n, generator.embed.embedding_dim, generator=rng), y)
        predicted = teacher.eval()(x).argmax(1)
        agree += int((predicted == y).sum())
        images.append(x)
        labels.append(predicted)
    return torch.cat(images), torch.cat(labels), agree / max(count, 1)
