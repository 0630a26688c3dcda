"""Core dataset types: the in-memory image set, the source interface, the error type.

No torch import at module level: ``fingerprint`` must stay cheap for cached runs.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    import torch


class DatasetError(Exception):
    """Missing folder, empty class, unreadable file, bad name: message says what, where, how to fix."""


# eq=False: comparing tensors field-wise is ambiguous; datasets compare by identity.
@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Labelled images held in memory.

    images: float32 [N, C, H, W] in [0, 1]; labels: int64 [N] in [0, num_classes);
    ids: one stable identifier per image (relative file path, "synthetic/<index>",
    "<npz split>/<index>"); provenance: JSON-serialisable description of the source.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]
    ids: tuple[str, ...]
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = int(self.images.shape[0])
        if self.images.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(self.images.shape)}")
        if int(self.labels.shape[0]) != n or len(self.ids) != n:
            raise ValueError(f"{n} images but {int(self.labels.shape[0])} labels and {len(self.ids)} ids")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def ids_digest(self) -> str:
        """sha256 hex digest of the ids in order: names exactly which images these are (for cache keys)."""
        return hashlib.sha256("\n".join(self.ids).encode()).hexdigest()

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageDataset:
        """The images at ``indices`` (in that order), same class names and provenance."""
        import torch

        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        t = torch.from_numpy(idx)
        return ImageDataset(
            images=self.images[t],
            labels=self.labels[t],
            class_names=self.class_names,
            ids=tuple(self.ids[i] for i in idx.tolist()),
            provenance=dict(self.provenance),
        )

    @classmethod
    def from_uint8(
        cls,
        images: np.ndarray,
        labels: np.ndarray,
        class_names: Sequence[str],
        ids: Sequence[str],
        provenance: dict[str, Any],
    ) -> ImageDataset:
        """Build from uint8 [N, C, H, W] pixels (scaled by 1/255) and integer labels [N]."""
        import torch

        if images.dtype != np.uint8:
            raise ValueError(f"expected uint8 pixels, got {images.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0)
        y = torch.from_numpy(np.asarray(labels, dtype=np.int64).copy())
        return cls(x, y, tuple(class_names), tuple(ids), provenance)

    def to_uint8(self) -> np.ndarray:
        """Pixels as uint8 [N, C, H, W] (round(x * 255)); exact for data built by ``from_uint8``."""
        import torch

        return (self.images.clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()


class DatasetSource(ABC):
    """A named source of images, registered with ``@registry.datasets.register(name)``.

    ``arg`` is the text after ":" in the dataset name ("medmnist:pathmnist" -> "pathmnist"),
    ``root`` the user's data location (``--data-root``) or None.
    """

    description: ClassVar[str] = ""

    def prepare(  # noqa: B027 -- optional hook, deliberately not abstract
        self, arg: str | None, root: Path | None, image_size: int, allow_download: bool
    ) -> None:
        """Make the data available locally (download it if allowed); default: nothing to do.

        Raise DatasetError if it is missing and cannot be fetched.
        """

    @abstractmethod
    def fingerprint(self, arg: str | None, root: Path | None) -> str:
        """Cheap identity of the source data (no torch, no image decoding); DatasetError if missing."""

    def location(self, arg: str | None, root: Path | None) -> str | None:
        """Where the data lives (for provenance), or None for generated data."""
        return None

    @abstractmethod
    def load(
        self,
        arg: str | None,
        root: Path | None,
        image_size: int,
        channels: int,
        allow_download: bool,
    ) -> ImageDataset:
        """Decode and preprocess to float32 [N, channels, image_size, image_size] in [0, 1]."""


def provenance(
    dataset: str,
    root: str | None,
    n_files: int,
    fingerprint: str,
    image_size: int,
    channels: int,
    resize: str,
    **extra: Any,
) -> dict[str, Any]:
    """The common provenance record every source returns (JSON-serialisable)."""
    return {
        "dataset": dataset,
        "root": root,
        "n_files": n_files,
        "fingerprint": fingerprint,
        "preprocessing": {
            "image_size": image_size,
            "channels": channels,
            "color": "grayscale (PIL 'L')" if channels == 1 else "RGB (PIL 'RGB')",
            "resize": resize,
            "range": "uint8 / 255 -> float32 [0, 1]",
        },
        **extra,
    }


def file_fingerprint(entries: Sequence[tuple[str, int]]) -> str:
    """sha256 (first 16 hex digits) over sorted (relative path, size in bytes) pairs."""
    h = hashlib.sha256()
    for rel, size in sorted(entries):
        h.update(f"{rel}\t{size}\n".encode())
    return h.hexdigest()[:16]
