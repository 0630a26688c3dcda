"""``fd_eval``: a Frechet distance in the features of an evaluation classifier privbench trains itself.

The model-inversion literature scores reconstructions with an evaluation
classifier that the attack never saw. Here it is a small ResNet with a 32-d
penultimate layer, trained on the dataset's *auxiliary* split (never on the
target's members), 90% for training and 10% held out to report its own
accuracy beside every fd_eval value. It works fully offline and is cached on
disk by the hash of everything that shaped it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from privbench import cache
from privbench.datasets import ImageDataset
from privbench.datasets.splits import SplitSpec
from privbench.models.resnet import SmallResNet

if TYPE_CHECKING:
    from privbench.training import TrainParams

FEATURE_DIM = 32

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalClassifierSpec:
    """Everything that shapes the evaluation classifier (its cache key)."""

    dataset: str
    data_fingerprint: str
    image_size: int
    channels: int
    split_seed: int
    split: SplitSpec = field(default_factory=SplitSpec)  # with split_seed: which images form the auxiliary split
    depth: int = 8
    width: int = 16
    feature_dim: int = FEATURE_DIM
    epochs: int = 20
    lr: float = 1e-3
    heldout_fraction: float = 0.1
    seed: int = 0

    @property
    def metric_name(self) -> str:
        return f"fd_eval[resnet{self.depth}-d{self.feature_dim}@{self.dataset}]"

    def key(self) -> str:
        return cache.cache_key("eval-classifier", asdict(self))[:24]

    def cache_files(self, cache_dir: Path) -> tuple[Path, Path]:
        """(weights .pt, info .json) of this classifier in ``cache_dir``."""
        return Path(cache_dir) / f"eval-{self.key()}.pt", Path(cache_dir) / f"eval-{self.key()}.json"


class EvalNet(nn.Module):
    """ResNet body -> linear(feature_dim) + ReLU (the features) -> linear(K)."""

    def __init__(self, channels: int, num_classes: int, depth: int, width: int, feature_dim: int):
        super().__init__()
        self.body = SmallResNet(channels, num_classes, depth, width)
        self.body.fc = nn.Identity()
        self.project = nn.Linear(4 * width, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.project(self.body(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class EvalClassifier:
    spec: EvalClassifierSpec
    net: EvalNet
    heldout: ImageDataset  # the auxiliary images it did not train on (baseline draws come from here)
    info: dict

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """float64 [N, feature_dim] for images [N, C, H, W] in [0, 1]."""
        self.net.eval()
        return np.concatenate(
            [self.net.features(images[i : i + batch_size]).double().numpy() for i in range(0, len(images), batch_size)]
        )


def _heldout_split(auxiliary: ImageDataset, spec: EvalClassifierSpec) -> tuple[ImageDataset, ImageDataset]:
    order = np.random.default_rng(spec.seed).permutation(len(auxiliary))
    k = max(1, int(round(len(auxiliary) * spec.heldout_fraction)))
    return auxiliary.subset(order[k:]), auxiliary.subset(order[:k])


def load_or_train(fresh: Callable[[], EvalNet], train: ImageDataset, heldout: ImageDataset, params: "TrainParams",
                  seed: int, files: tuple[Path, Path], about: dict) -> tuple[EvalNet, dict, bool]:
    """An ``EvalNet`` from ``files`` (weights .pt, info .json), else ``fresh()`` trained on ``train`` and cached.

    Returns the network in eval mode, its info (``about`` plus held-out and train accuracy and the train time
    in s; on a hit the stored info) and whether it came from the cache. Weights that do not fit the network
    are a miss. A cache that cannot be written is warned about, not fatal.
    """
    from privbench.training import accuracy, train_classifier

    weights, meta = files
    net = fresh()
    state, info = cache.load_torch(weights), cache.load_json(meta)
    if state is not None and info is not None:
        try:
            net.load_state_dict(state)
            return net.eval(), info, True
        except Exception as exc:  # weights that do not fit the network: a miss, retrained
            log.warning("evaluation classifier cache %s does not fit the network (%s); retraining", weights, exc)
            net = fresh()
    start = time.perf_counter()
    record = train_classifier(net, train, params, seed)
    info = {
        **about,
        "heldout_accuracy": accuracy(net, heldout),
        "train_accuracy": record["train_accuracy"],
        "train_time_s": time.perf_counter() - start,
    }
    try:  # the weights first: an entry counts only once its info is written too
        cache.save_torch(weights, net.state_dict())
        cache.save_json(meta, info)
    except OSError as exc:
        log.warning("could not write the evaluation classifier cache %s (%s); continuing without it", weights, exc)
    return net.eval(), info, False


def train_or_load(spec: EvalClassifierSpec, auxiliary: ImageDataset, cache_dir: Path) -> EvalClassifier:
    """The evaluation classifier for ``spec``, trained on ``auxiliary`` or loaded from ``cache_dir``."""
    from privbench.training import TrainParams

    def fresh() -> EvalNet:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            return EvalNet(spec.channels, auxiliary.num_classes, spec.depth, spec.width, spec.feature_dim)

    train, heldout = _heldout_split(auxiliary, spec)
    about = {
        "metric": spec.metric_name,
        "n_train": len(train),
        "n_heldout": len(heldout),
        "trained_on": "auxiliary split (never the target's members)",
        "spec": asdict(spec),
    }
    net, info, _ = load_or_train(fresh, train, heldout, TrainParams(epochs=spec.epochs, lr=spec.lr), spec.seed,
                                 spec.cache_files(cache_dir), about)
    return EvalClassifier(spec, net, heldout, info)
