"""``medmnist:<flag>``: a 2-D single-label MedMNIST data set read from its official .npz file.

File: ``<folder>/<flag>.npz`` (28 px) or ``<folder>/<flag>_<size>.npz`` (MedMNIST+, 64/128/224 px),
folder = --data-root or ``~/.medmnist`` (the medmnist package's default). The train, val and
test splits are pooled; ids are "<split>/<index within split>". The ``medmnist`` package is
optional: it supplies class names and downloads (``--allow-download``).
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from privbench import registry
from privbench.datasets.base import (
    DatasetError,
    DatasetSource,
    ImageDataset,
    file_fingerprint,
    provenance,
)

SIZES = (28, 64, 128, 224)  # 28 is the original MedMNIST file, the others MedMNIST+
SPLITS = ("train", "val", "test")
DEFAULT_FOLDER = "~/.medmnist"
MULTI_LABEL = frozenset({"chestmnist"})
RESIZE_METHOD = (
    "from the MedMNIST file whose size is the smallest >= image_size (else the largest), "
    "PIL Image.resize with Resampling.BILINEAR (antialiased on downscale)"
)


@registry.datasets.register("medmnist")
class MedMNIST(DatasetSource):
    """A 2-D single-label MedMNIST data set (medmnist:<flag>, e.g. medmnist:pathmnist), splits pooled."""

    description = "MedMNIST 2-D single-label set from <flag>.npz (medmnist:<flag>, e.g. medmnist:pathmnist)"

    def prepare(self, arg: str | None, root: Path | None, image_size: int, allow_download: bool) -> None:
        flag, folder = _flag(arg), _folder(root)
        if _present(flag, folder):
            return
        if not allow_download:
            raise _missing(flag, folder)
        _download(flag, folder, _best(SIZES, image_size))
        if not _present(flag, folder):
            raise _missing(flag, folder)

    def fingerprint(self, arg: str | None, root: Path | None) -> str:
        flag, folder = _flag(arg), _folder(root)
        present = _present(flag, folder)
        if not present:
            raise _missing(flag, folder)
        return file_fingerprint([(p.name, p.stat().st_size) for p in present.values()])

    def location(self, arg: str | None, root: Path | None) -> str | None:
        return str(_folder(root))

    def load(
        self,
        arg: str | None,
        root: Path | None,
        image_size: int,
        channels: int,
        allow_download: bool,
    ) -> ImageDataset:
        self.prepare(arg, root, image_size, allow_download)
        flag, folder = _flag(arg), _folder(root)
        present = _present(flag, folder)
        path = present[_best(tuple(present), image_size)]
        images, labels, ids = _read(path)
        if labels.size and labels.min() < 0:
            raise DatasetError(f"{path}: negative class labels; the file is not a MedMNIST classification set.")
        names = _class_names(flag, int(labels.max()) + 1 if labels.size else 0)
        if labels.size and labels.max() >= len(names):
            raise DatasetError(
                f"{path}: label {int(labels.max())} but medmnist.INFO[{flag!r}] lists {len(names)} classes. "
                f"Delete the file and download it again."
            )
        prov = provenance(
            f"medmnist:{flag}",
            root=str(folder),
            n_files=1,
            fingerprint=self.fingerprint(arg, root),
            image_size=image_size,
            channels=channels,
            resize=RESIZE_METHOD,
            file=path.name,
            source_size=int(images.shape[1]),
        )
        out = _convert(images, image_size, channels)
        return ImageDataset.from_uint8(out, labels, names, ids, prov)


def _flag(arg: str | None) -> str:
    if not arg:
        raise DatasetError("medmnist: no data set named. Use 'medmnist:<flag>', e.g. medmnist:pathmnist.")
    flag = arg.strip().lower()
    if not re.fullmatch(r"[a-z0-9]+", flag):
        raise DatasetError(
            f"medmnist:{arg}: {arg!r} is not a MedMNIST flag (lowercase letters and digits, e.g. pathmnist)."
        )
    if flag in MULTI_LABEL:
        raise DatasetError(
            f"medmnist:{flag} is multi-label; privbench supports single-label classification only. "
            f"Choose a single-label flag such as pathmnist, dermamnist or bloodmnist."
        )
    if flag.endswith("3d"):
        raise DatasetError(f"medmnist:{flag} is a 3-D volume set; only 2-D MedMNIST sets are supported.")
    return flag


def _folder(root: Path | None) -> Path:
    return Path(root if root is not None else DEFAULT_FOLDER).expanduser().absolute()


def _file(flag: str, folder: Path, size: int) -> Path:
    return folder / (f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz")


def _present(flag: str, folder: Path) -> dict[int, Path]:
    """Source size in px -> existing file."""
    return {s: p for s in SIZES if (p := _file(flag, folder, s)).is_file()}


def _best(sizes: tuple[int, ...], image_size: int) -> int:
    """Smallest size >= image_size (downscaling loses least), else the largest."""
    bigger = [s for s in sizes if s >= image_size]
    return min(bigger) if bigger else max(sizes)


def _missing(flag: str, folder: Path) -> DatasetError:
    from privbench.deps import install_command

    paths = ", ".join(str(_file(flag, folder, s)) for s in SIZES)
    return DatasetError(
        f"medmnist:{flag}: no data file found; looked for {paths}. Download it with --allow-download "
        f"(needs the medmnist package: {install_command('medmnist')}), or place the official {flag}.npz in {folder} "
        f"(or pass --data-root <folder holding it>)."
    )


def _read(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Pooled images uint8 [N, H, W] or [N, H, W, 3], labels int64 [N], ids."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in z.files]
            if missing:
                raise DatasetError(
                    f"{path} is not a MedMNIST file: keys {', '.join(missing)} are missing. "
                    f"Delete it and download it again (--allow-download) or replace it."
                )
            parts = [(s, z[f"{s}_images"], z[f"{s}_labels"]) for s in SPLITS]
    except DatasetError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetError(
            f"cannot read {path}: {type(exc).__name__}: {exc}. The file is corrupt: delete it and "
            f"download it again (--allow-download) or replace it."
        ) from exc
    for split, images, labels in parts:
        rgb = images.ndim == 4 and images.shape[-1] == 3
        if images.dtype != np.uint8 or not (images.ndim == 3 or rgb) or images.shape[1] != images.shape[2]:
            raise DatasetError(
                f"{path}: {split}_images has dtype {images.dtype} and shape {images.shape}; expected uint8 "
                f"[N, H, W] or [N, H, W, 3] (2-D MedMNIST). 3-D sets are not supported."
            )
        if labels.ndim != 2 or labels.shape[1] != 1 or labels.shape[0] != images.shape[0]:
            raise DatasetError(
                f"{path}: {split}_labels has shape {labels.shape}, expected [{images.shape[0]}, 1]. "
                f"Multi-label sets are not supported (single-label classification only)."
            )
    shapes = {p[1].shape[1:] for p in parts}
    if len(shapes) != 1:
        raise DatasetError(f"{path}: the splits have different image shapes {sorted(shapes)}; the file is corrupt.")
    images = np.concatenate([p[1] for p in parts])
    labels = np.concatenate([p[2][:, 0] for p in parts]).astype(np.int64)
    ids = tuple(f"{s}/{i}" for s, im, _ in parts for i in range(im.shape[0]))
    return images, labels, ids


def _convert(images: np.ndarray, image_size: int, channels: int) -> np.ndarray:
    """uint8 [N, H, W(, 3)] -> uint8 [N, channels, image_size, image_size], same PIL ops as imagefolder."""
    mode = "L" if channels == 1 else "RGB"
    out = np.empty((images.shape[0], image_size, image_size, channels), dtype=np.uint8)
    for i, a in enumerate(images):
        im = Image.fromarray(a).convert(mode)
        if im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
        out[i] = np.asarray(im).reshape(image_size, image_size, channels)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def _class_names(flag: str, n_seen: int) -> tuple[str, ...]:
    info = _info(flag)
    if info is not None and isinstance(info.get("label"), dict):
        labels: dict[str, str] = info["label"]
        return tuple(labels[k] for k in sorted(labels, key=int))
    return tuple(str(i) for i in range(n_seen))


def _info(flag: str) -> dict[str, Any] | None:
    try:
        import medmnist
    except ImportError:
        return None
    return medmnist.INFO.get(flag)


def _download(flag: str, folder: Path, size: int) -> None:
    try:
        import medmnist
    except ImportError as exc:
        from privbench.deps import install_command

        raise DatasetError(
            f"medmnist:{flag}: downloading needs the medmnist package (install it with: "
            f"{install_command('medmnist')}), or place {_file(flag, folder, size).name} in {folder} yourself."
        ) from exc
    info = medmnist.INFO.get(flag)
    if info is None:
        raise DatasetError(f"medmnist:{flag}: unknown flag. Known flags: {', '.join(sorted(medmnist.INFO))}.")
    if "multi-label" in str(info.get("task", "")):
        raise DatasetError(f"medmnist:{flag} is multi-label; only single-label classification is supported.")
    folder.mkdir(parents=True, exist_ok=True)
    data_class = getattr(medmnist, info["python_class"])
    kwargs: dict[str, Any] = {"split": "train", "download": True, "root": str(folder)}
    if size != 28:
        kwargs["size"] = size  # MedMNIST+ (medmnist >= 3)
    try:
        data_class(**kwargs)
    except Exception as exc:  # network, disk, old medmnist without ``size``: all reported the same way
        raise DatasetError(
            f"medmnist:{flag}: download of {_file(flag, folder, size).name} into {folder} failed: "
            f"{type(exc).__name__}: {exc}. Check the network, or download the file via "
            f"https://medmnist.com and place it in {folder}."
        ) from exc
