"""Datasets: named sources of labelled images, preprocessed once and cached on disk.

Names: "synthetic-mri[:<count>]", "brain-tumor-mri", "imagefolder:<path>", "medmnist:<flag>",
or any plugin registered under ``privbench.datasets``. ``fingerprint`` never imports torch.
"""

from __future__ import annotations

from pathlib import Path

from privbench import registry
from privbench.datasets import cache
from privbench.datasets.base import DatasetError, DatasetSource, ImageDataset

__all__ = ["DatasetError", "DatasetSource", "ImageDataset", "fingerprint", "load", "parse_name", "source"]

CHANNELS = (1, 3)


def parse_name(name: str) -> tuple[str, str | None]:
    """Split at the first ':': "medmnist:pathmnist" -> ("medmnist", "pathmnist"), "synthetic-mri" -> (.., None)."""
    base, sep, arg = name.partition(":")
    if not base:
        raise DatasetError(
            f"dataset name {name!r} has no source before ':'. "
            f"Use e.g. 'synthetic-mri', 'imagefolder:<path>' or 'medmnist:pathmnist'."
        )
    return base, (arg if sep and arg else None)


def source(name: str) -> DatasetSource:
    """The registered source for the part of ``name`` before ':' (UnknownNameError if none)."""
    obj = registry.datasets.get(parse_name(name)[0])
    return obj() if isinstance(obj, type) else obj


def fingerprint(name: str, root: str | Path | None = None, image_size: int | None = None,
                allow_download: bool = False) -> str:
    """Cheap identity of the source data (no torch import, no image decoding). With ``allow_download``
    the source's files (at ``image_size`` where sizes differ) are downloaded first if missing."""
    _, arg = parse_name(name)
    if allow_download:
        source(name).prepare(arg, _path(root), image_size, True)
    return source(name).fingerprint(arg, _path(root))


def load(
    name: str,
    image_size: int,
    channels: int,
    root: str | Path | None = None,
    allow_download: bool = False,
    cache_dir: Path | None = None,
) -> ImageDataset:
    """Images float32 [N, channels, image_size, image_size] in [0, 1], served from the cache if built."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DatasetError(f"image_size must be a positive integer (pixels), got {image_size!r}.")
    if channels not in CHANNELS:
        raise DatasetError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}.")
    base, arg = parse_name(name)
    src = source(name)
    root_path = _path(root)
    src.prepare(arg, root_path, image_size, allow_download)
    fp = src.fingerprint(arg, root_path)
    path = cache.cache_path(
        cache_dir if cache_dir is not None else cache.default_cache_dir(),
        base,
        arg,
        fp,
        image_size,
        channels,
    )
    hit = cache.read(path)
    if hit is not None:
        prov = dict(hit.provenance)
        prov["root"] = src.location(arg, root_path)  # the data may have moved since caching
        return ImageDataset.from_uint8(hit.images, hit.labels, hit.class_names, hit.ids, prov)

    ds = src.load(arg, root_path, image_size, channels, allow_download)
    expected = (channels, image_size, image_size)
    if ds.image_shape != expected:
        raise DatasetError(
            f"dataset source {base!r} returned images of shape {ds.image_shape}, expected {expected}. "
            f"This is a bug in the source ({type(src).__module__})."
        )
    arrays = cache.CachedArrays(ds.to_uint8(), ds.labels.numpy(), ds.ids, ds.class_names, ds.provenance)
    cache.write(path, arrays)
    # Rebuild from the uint8 pixels so a fresh load equals a cached one bit for bit.
    return ImageDataset.from_uint8(arrays.images, arrays.labels, arrays.class_names, arrays.ids, arrays.provenance)


def _path(root: str | Path | None) -> Path | None:
    return Path(root).expanduser() if root is not None and str(root) != "" else None
