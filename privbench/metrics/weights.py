"""Pretrained weights for perceptual metrics, resolved offline first.

A file is looked for in ``$PRIVBENCH_WEIGHTS_DIR`` and then in the standard torch
hub cache (``$TORCH_HOME/hub/checkpoints``, by default ``~/.cache/torch/hub/checkpoints``).
Nothing is downloaded unless the user allows it (``bench weights fetch`` or
``--allow-download``). Every checkpoint is read by privbench with
``torch.load(..., weights_only=True)`` and handed to the network as a state dict.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

WEIGHTS_DIR_ENV = "PRIVBENCH_WEIGHTS_DIR"


@dataclass(frozen=True)
class WeightsFile:
    key: str  # short name used by privbench ("alexnet", "inception-fid", ...)
    filename: str  # exact file name in the hub cache
    url: str  # where `bench weights fetch` downloads it from
    used_by: str  # which metric needs it


KNOWN: dict[str, WeightsFile] = {
    w.key: w
    for w in (
        WeightsFile(
            "alexnet", "alexnet-owt-7be5be79.pth",
            "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", "lpips[alex] backbone (torchvision AlexNet)",
        ),
        WeightsFile(
            "vgg16", "vgg16-397923af.pth",
            "https://download.pytorch.org/models/vgg16-397923af.pth", "lpips[vgg] backbone (torchvision VGG-16)",
        ),
        WeightsFile(
            "squeezenet1_1", "squeezenet1_1-b8a52dc0.pth",
            "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth",
            "lpips[squeeze] backbone (torchvision SqueezeNet 1.1)",
        ),
        WeightsFile(
            "inception-fid", "pt_inception-2015-12-05-6726825d.pth",
            "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
            "fid / kid (pytorch-fid InceptionV3, 2048-d pool features)",
        ),
    )
}


class WeightsMissing(Exception):
    """A weights file is not on this machine; the message names the file, the paths tried and the fix."""

    def __init__(self, weights: WeightsFile, looked: list[Path]):
        self.weights, self.looked = weights, looked
        super().__init__(
            f"weights file {weights.filename} ({weights.used_by}) not found; looked at "
            f"{', '.join(str(p) for p in looked)}. Provide it by copying the file into "
            f"{looked[-1].parent} (or into ${WEIGHTS_DIR_ENV}), or let privbench download it with "
            f"'bench weights fetch {weights.key}' or '--allow-download'."
        )


def hub_checkpoints_dir() -> Path:
    """``$TORCH_HOME/hub/checkpoints`` as torch resolves it (without importing torch)."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch"
    )
    return Path(torch_home) / "hub" / "checkpoints"


def candidate_paths(weights: WeightsFile) -> list[Path]:
    paths = []
    if os.environ.get(WEIGHTS_DIR_ENV):
        paths.append(Path(os.environ[WEIGHTS_DIR_ENV]) / weights.filename)
    paths.append(hub_checkpoints_dir() / weights.filename)
    return paths


def locate(key: str, allow_download: bool = False) -> Path:
    """Path of weights ``key``; downloads into the hub cache only if ``allow_download``."""
    weights = KNOWN[key]
    paths = candidate_paths(weights)
    for path in paths:
        if path.is_file():
            return path
    if allow_download:
        return fetch(key)
    raise WeightsMissing(weights, paths)


def fetch(key: str) -> Path:
    """Download weights ``key`` into the hub cache (the user asked for it)."""
    import torch

    weights = KNOWN[key]
    target = hub_checkpoints_dir() / weights.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(weights.url, str(target), progress=True)
    return target


def load_state_dict(key: str, allow_download: bool = False) -> dict:
    """The checkpoint's state dict, read with ``weights_only=True``."""
    import torch

    path = locate(key, allow_download)
    return torch.load(path, map_location="cpu", weights_only=True)
