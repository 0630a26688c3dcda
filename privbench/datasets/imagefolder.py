"""``imagefolder:<path>`` and ``brain-tumor-mri``: images in one sub-folder per class.

Layouts: ``<root>/<class>/*.<ext>`` or ``<root>/{Training,Testing}/<class>/*.<ext>`` (also
train/test, any case). Split folders are pooled: privbench makes its own splits. Hidden
files and folders (".ipynb_checkpoints", ...) are ignored. Ids are paths relative to root.

Symbolic links are followed once: a split folder, class folder or image file that is a link is read
where it points (its id is still its path under root). Class folders are read one level deep: a
folder inside a class folder is not searched (a warning names it). A link that loops (to itself, a
chain that comes back, or a folder that contains it), a link whose target is missing, and two
entries that lead to the same folder are errors (``DatasetError``, exit 2) naming the path.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path

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

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
SPLIT_NAMES = frozenset({"training", "testing", "train", "test"})
DATA_DIR_ENV = "PRIVBENCH_DATA_DIR"
log = logging.getLogger(__name__)
RESIZE_METHOD = (
    "PIL Image.resize to image_size x image_size with Resampling.BILINEAR "
    "(antialiased on downscale), aspect ratio not preserved, full-resolution decode"
)


@dataclass(frozen=True)
class FolderScan:
    """Image files under ``root``: relative POSIX paths (sorted), class labels, sizes in bytes."""

    root: Path
    layout: str  # "flat" or "splits"
    class_names: tuple[str, ...]
    files: tuple[str, ...]
    labels: tuple[int, ...]
    sizes: tuple[int, ...]

    def fingerprint(self) -> str:
        return file_fingerprint(list(zip(self.files, self.sizes, strict=True)))


@registry.datasets.register("imagefolder")
class ImageFolder(DatasetSource):
    """Images in one sub-folder per class (imagefolder:<path>); Training/Testing folders pooled."""

    description = "Images in one sub-folder per class (imagefolder:<path>); Training/Testing pooled"
    dataset_name = "imagefolder"

    def resolve_root(self, arg: str | None, root: Path | None) -> Path:
        if arg:
            return Path(arg).expanduser().absolute()
        if root is not None:
            return Path(root).expanduser().absolute()
        raise DatasetError(
            "imagefolder: no folder given. Name the folder as 'imagefolder:<path>' (or pass --data-root <path>)."
        )

    def location(self, arg: str | None, root: Path | None) -> str | None:
        return str(self.resolve_root(arg, root))

    def fingerprint(self, arg: str | None, root: Path | None) -> str:
        return scan(self.resolve_root(arg, root)).fingerprint()

    def load(
        self,
        arg: str | None,
        root: Path | None,
        image_size: int,
        channels: int,
        allow_download: bool,
    ) -> ImageDataset:
        found = scan(self.resolve_root(arg, root))
        images = decode(found.root, found.files, image_size, channels)
        counts = np.bincount(np.array(found.labels, dtype=np.int64), minlength=len(found.class_names))
        prov = provenance(
            self.dataset_name,
            root=str(found.root),
            n_files=len(found.files),
            fingerprint=found.fingerprint(),
            image_size=image_size,
            channels=channels,
            resize=RESIZE_METHOD,
            layout=found.layout,
            class_counts={c: int(n) for c, n in zip(found.class_names, counts, strict=True)},
        )
        return ImageDataset.from_uint8(images, np.array(found.labels), found.class_names, found.files, prov)


@registry.datasets.register("brain-tumor-mri")
class BrainTumorMRI(ImageFolder):
    """Brain Tumor MRI (Kaggle, ~7,000 JPEGs, 4 classes) from --data-root or $PRIVBENCH_DATA_DIR/brain-tumor-mri."""

    description = "Brain Tumor MRI (Kaggle), 4 classes, from --data-root or $PRIVBENCH_DATA_DIR/brain-tumor-mri"
    dataset_name = "brain-tumor-mri"

    def resolve_root(self, arg: str | None, root: Path | None) -> Path:
        if arg:
            raise DatasetError(
                f"brain-tumor-mri:{arg}: this dataset takes no argument after ':'. "
                f"Give its folder with --data-root or $PRIVBENCH_DATA_DIR, or use 'imagefolder:{arg}'."
            )
        if root is not None:
            return Path(root).expanduser().absolute()
        data_dir = os.environ.get(DATA_DIR_ENV)
        if not data_dir:
            raise DatasetError(
                f"brain-tumor-mri: no data location. Set {DATA_DIR_ENV} to the folder that contains "
                f"brain-tumor-mri/ (with Training/ and Testing/ inside), or pass --data-root "
                f"<path to the brain-tumor-mri folder>."
            )
        return (Path(data_dir).expanduser() / "brain-tumor-mri").absolute()


def scan(root: Path) -> FolderScan:
    """List class folders and image files under ``root`` (no decoding); DatasetError if unusable."""
    if root.is_symlink():
        _follow(root)
    if not root.exists():
        raise DatasetError(
            f"dataset folder {root} does not exist. Check the path (--data-root, "
            f"{DATA_DIR_ENV} or 'imagefolder:<path>') or download/unpack the data there."
        )
    if not root.is_dir():
        raise DatasetError(f"dataset path {root} is not a folder. Point it at the folder holding the class folders.")
    top = _subdirs(root)
    splits = [d for d in top if d.name.lower() in SPLIT_NAMES]
    if splits and len(splits) != len(top):
        others = ", ".join(d.name for d in top if d not in splits)
        raise DatasetError(
            f"dataset folder {root} mixes split folders ({', '.join(d.name for d in splits)}) with "
            f"other folders ({others}). Move the other folders out, or point at one split folder."
        )
    class_dirs = [c for s in splits for c in _subdirs(s)] if splits else top
    for s in splits:
        if not _subdirs(s):
            raise DatasetError(f"split folder {s} has no class folders. Put images in {s}/<class>/ or remove {s}.")
    if not class_dirs:
        raise DatasetError(
            f"dataset folder {root} has no class folders. Expected {root}/<class>/*.jpg (or .png, "
            f".bmp, .tif) or {root}/Training/<class>/*.jpg and {root}/Testing/<class>/*.jpg."
        )
    seen: dict[str, Path] = {}
    for d in [*splits, *class_dirs]:
        real = os.path.realpath(d)
        if real in seen:
            raise DatasetError(
                f"dataset folders {seen[real]} and {d} lead to the same folder {real} (through a symbolic link), so "
                f"its images would be read twice. Remove one of them.")
        seen[real] = d
    class_names = tuple(sorted({d.name for d in class_dirs}))
    entries: list[tuple[str, int, int]] = []
    for d in class_dirs:
        images = _images(d)
        if not images:
            raise DatasetError(
                f"class folder {d} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}). Add images or "
                f"remove the folder; if it holds class or split sub-folders, point the dataset at {d}."
            )
        label = class_names.index(d.name)
        entries += [(Path(p).relative_to(root).as_posix(), label, size) for p, size in images]
    entries.sort()
    return FolderScan(
        root=root,
        layout="splits" if splits else "flat",
        class_names=class_names,
        files=tuple(e[0] for e in entries),
        labels=tuple(e[1] for e in entries),
        sizes=tuple(e[2] for e in entries),
    )


def decode(root: Path, files: tuple[str, ...], image_size: int, channels: int) -> np.ndarray:
    """Decode, convert and resize every file -> uint8 [N, channels, image_size, image_size]."""
    mode = "L" if channels == 1 else "RGB"
    out = np.empty((len(files), image_size, image_size, channels), dtype=np.uint8)
    for i, rel in enumerate(files):
        path = root / rel
        try:
            with Image.open(path) as im:
                im = _to_8bit(im).convert(mode)
                if im.size != (image_size, image_size):
                    im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
                out[i] = np.asarray(im).reshape(image_size, image_size, channels)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise DatasetError(
                f"cannot read image file {path}: {type(exc).__name__}: {exc}. The file is corrupt or "
                f"not an image: delete it or replace it with a good copy, then rerun."
            ) from exc
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit and float images scaled to 8 bits (PIL's convert would clip them at 255)."""
    if im.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8))
    if im.mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        scaled = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        return Image.fromarray(np.round(scaled).astype(np.uint8))
    return im


def _follow(path: Path) -> str:
    """Where the symbolic link ``path`` leads (followed to the end); DatasetError if it loops or dangles."""
    try:
        return os.path.realpath(path, strict=True)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DatasetError(
                f"{path} is a symbolic link that loops ({exc.strerror}): it leads back to itself. Remove the link or "
                f"point it at the folder or image it stands for.") from None
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        raise DatasetError(
            f"{path} is a symbolic link to {target}, which cannot be read ({exc.strerror}). Fix or remove the "
            f"link.") from None


def _kind(entry: os.DirEntry) -> str:
    """``"dir"``, ``"file"`` or ``"other"``, following a symbolic link once; DatasetError for a link that loops
    or dangles, or a folder link that leads to a folder containing it (reading it would loop)."""
    if entry.is_symlink():
        real = _follow(Path(entry.path))
        if os.path.isdir(real):
            parent = os.path.realpath(os.path.dirname(entry.path))
            if parent == real or parent.startswith(real.rstrip(os.sep) + os.sep):
                raise DatasetError(
                    f"{entry.path} is a symbolic link to {real}, a folder that contains the link itself: following "
                    f"it would loop. Remove the link.")
            return "dir"
        return "file" if os.path.isfile(real) else "other"
    try:
        return "dir" if entry.is_dir(follow_symlinks=False) else "file" if entry.is_file(follow_symlinks=False) else "other"
    except OSError as exc:
        raise DatasetError(f"cannot read {entry.path} ({exc.strerror}).") from None


def _listing(folder: Path) -> list[tuple[os.DirEntry, str]]:
    """The visible entries of ``folder`` with their kind (symbolic links followed once)."""
    try:
        with os.scandir(folder) as it:
            entries = [e for e in it if not e.name.startswith(".")]
    except OSError as exc:
        raise DatasetError(f"cannot list dataset folder {folder} ({exc.strerror}).") from None
    return [(e, _kind(e)) for e in entries]


def _subdirs(folder: Path) -> list[Path]:
    return sorted(Path(e.path) for e, kind in _listing(folder) if kind == "dir")


def _images(folder: Path) -> list[tuple[str, int]]:
    """(path, size in bytes) of the image files directly inside ``folder`` (links followed once)."""
    out, skipped = [], []
    for e, kind in _listing(folder):
        if kind == "dir":
            skipped.append(e.name)
        elif kind == "file" and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES:
            try:
                out.append((e.path, e.stat().st_size))
            except OSError as exc:
                raise DatasetError(f"cannot read image file {e.path} ({exc.strerror}).") from None
    if skipped:
        log.warning("class folder %s: sub-folder(s) %s not searched (class folders are read one level deep)",
                    folder, ", ".join(sorted(skipped)))
    return out
