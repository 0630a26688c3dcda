"""Plain supervised training and evaluation of a target classifier."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Literal

import torch
from torch import nn
from torch.nn import functional as F

from privbench.params import bounded

if TYPE_CHECKING:
    from privbench.datasets import ImageDataset


@dataclass(frozen=True)
class TrainParams:
    """Minibatch training of the target: ``epochs`` passes over the members, shuffled by seed."""

    epochs: int = bounded(10, ge=0, le=100_000)
    batch_size: int = bounded(64, ge=1, le=65_536)
    lr: float = bounded(1e-3, gt=0, le=100)
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = bounded(0.9, ge=0, le=1)  # SGD only
    weight_decay: float = bounded(0.0, ge=0, le=100)

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs must be >= 0, batch_size >= 1 and lr > 0")


@dataclass(frozen=True, eq=False)
class TensorSet:
    """Inputs and labels that are not images (e.g. MpLe's morphed vectors): ``images`` [N, ...] (any input), ``labels`` int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.images.shape[0])


def make_optimizer(params: TrainParams, tensors: nn.Module | Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    """The optimizer ``params`` names over a model's parameters (or any tensors)."""
    tensors = list(tensors.parameters() if isinstance(tensors, nn.Module) else tensors)
    if params.optimizer == "adam":
        return torch.optim.Adam(tensors, lr=params.lr, weight_decay=params.weight_decay)
    return torch.optim.SGD(tensors, lr=params.lr, momentum=params.momentum, weight_decay=params.weight_decay)


def train_classifier(
    model: nn.Module,
    data: "ImageDataset | TensorSet",
    params: TrainParams,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
    before_step: Callable[[nn.Module], None] | None = None,
) -> dict:
    """Train ``model`` in place on ``data``; returns the training record (losses, time in s).

    ``before_step(model)``, if given, runs after each minibatch's backward pass and before the optimizer's
    step: a defense that transforms every training gradient (pruning, quantising) edits the ``.grad`` of the
    parameters there, and otherwise trains exactly as plain training does (same order, same optimizer).
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(params, model.parameters())
    n = len(data)
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    if progress:
        progress(0, params.epochs)  # the stage starts now, not after its first epoch
    for epoch in range(params.epochs):
        order = torch.randperm(n, generator=generator)
        total, seen = 0.0, 0
        for begin in range(0, n, params.batch_size):
            idx = order[begin : begin + params.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(data.images[idx]), data.labels[idx])
            loss.backward()
            if before_step is not None:
                before_step(model)
            optimizer.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        losses.append(total / max(seen, 1))
        if progress:
            progress(epoch + 1, params.epochs)
    model.eval()
    return {
        "epochs": params.epochs,
        "epoch_losses": losses,
        "train_accuracy": accuracy(model, data),
        "train_time_s": time.perf_counter() - start,
    }


@torch.no_grad()
def accuracy(model: nn.Module, data: "ImageDataset | TensorSet", batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on ``data``, in [0, 1]."""
    was_training = model.training
    model.eval()
    correct = 0
    for begin in range(0, len(data), batch_size):
        logits = model(data.images[begin : begin + batch_size])
        correct += int((logits.argmax(1) == data.labels[begin : begin + batch_size]).sum())
    model.train(was_training)
    return correct / max(len(data), 1)
