"""``synthetic-mri[:<count>]``: procedural brain-MRI-like phantoms in 4 tumour classes, no files needed.

Each image is rendered analytically on a coordinate grid at the requested size, so the
same phantom exists at any resolution. Image ``i`` has label ``i % 4`` and its shape
parameters come from ``default_rng([DATA_SEED, i])``: the set is deterministic and
``synthetic-mri:100`` is the first 100 images of ``synthetic-mri``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from privbench import registry
from privbench.datasets.base import DatasetError, DatasetSource, ImageDataset, provenance

GENERATOR_VERSION = 1
"""Bump when the rendering changes (invalidates cached copies)."""
DATA_SEED = 20_240_917
CLASS_NAMES = ("glioma", "meningioma", "notumor", "pituitary")
DEFAULT_COUNT = 1000
MIN_SIZE = 8  # below this, phantoms stop being distinct images


@registry.datasets.register("synthetic-mri")
class SyntheticMRI(DatasetSource):
    """Procedural brain-MRI-like phantoms, 4 classes, no download (synthetic-mri[:count], default 1000)."""

    description = "Procedural brain-MRI-like phantoms, 4 tumour classes, no files (synthetic-mri[:count])"

    def fingerprint(self, arg: str | None, root: Path | None) -> str:
        count = _count(arg)
        key = f"synthetic-mri/v{GENERATOR_VERSION}/seed{DATA_SEED}/n{count}"
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def load(
        self,
        arg: str | None,
        root: Path | None,
        image_size: int,
        channels: int,
        allow_download: bool,
    ) -> ImageDataset:
        count = _count(arg)
        if image_size < MIN_SIZE:
            raise DatasetError(
                f"synthetic-mri: image_size {image_size} is too small to render distinct phantoms; "
                f"use an image size of at least {MIN_SIZE} pixels."
            )
        labels = np.arange(count, dtype=np.int64) % len(CLASS_NAMES)
        gray = np.empty((count, image_size, image_size), dtype=np.uint8)
        for i in range(count):
            img = render(i, int(labels[i]), image_size)
            gray[i] = np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
        _check_distinct(gray)
        images = np.repeat(gray[:, None], channels, axis=1)
        prov = provenance(
            "synthetic-mri",
            root=None,
            n_files=0,
            fingerprint=self.fingerprint(arg, root),
            image_size=image_size,
            channels=channels,
            resize="none: rendered analytically at the target size",
            n_images=count,
            generator_version=GENERATOR_VERSION,
            data_seed=DATA_SEED,
        )
        ids = tuple(f"synthetic/{i}" for i in range(count))
        return ImageDataset.from_uint8(images, labels, CLASS_NAMES, ids, prov)


def _count(arg: str | None) -> int:
    if arg is None:
        return DEFAULT_COUNT
    try:
        count = int(arg)
    except ValueError:
        count = 0
    if count < len(CLASS_NAMES):
        raise DatasetError(
            f"synthetic-mri:{arg}: the part after ':' is the number of images and must be an "
            f"integer >= {len(CLASS_NAMES)} (one per class), e.g. synthetic-mri:1000."
        )
    return count


def _check_distinct(gray: np.ndarray) -> None:
    seen: dict[bytes, int] = {}
    for i, img in enumerate(gray):
        j = seen.setdefault(hashlib.sha1(img.tobytes()).digest(), i)
        if j != i:
            raise DatasetError(
                f"synthetic-mri: images {j} and {i} are identical at {gray.shape[-1]} px. "
                f"Use a larger image size; if that does not help, this is a generator bug."
            )


def render(index: int, label: int, size: int) -> np.ndarray:
    """Phantom ``index`` with lesion class ``label`` as float64 [size, size], roughly in [0, 1].

    Geometry is in normalised coordinates: x right, y down, both in [-1, 1] across the image.
    """
    rng = np.random.default_rng([DATA_SEED, index])
    c = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    x, y = np.meshgrid(c, c)
    px = 2.0 / size  # one pixel in normalised units, used as the edge softness

    # Pose and head shape jitter; (u, v) is the head frame, (hu, hv) scaled so the head is a unit disc.
    theta = rng.uniform(-0.2, 0.2)
    cx, cy = rng.uniform(-0.06, 0.06, size=2)
    a, b = rng.uniform(0.66, 0.78), rng.uniform(0.80, 0.92)
    cos, sin = np.cos(theta), np.sin(theta)
    u = cos * (x - cx) + sin * (y - cy)
    v = -sin * (x - cx) + cos * (y - cy)
    hu, hv = u / a, v / b
    rho = np.hypot(hu, hv)
    edge = px / min(a, b)  # edge softness in head units

    skull_t = rng.uniform(0.07, 0.11)
    csf_gap = rng.uniform(0.015, 0.035)
    skull_level = rng.uniform(0.75, 0.95)
    brain_r = 1.0 - skull_t - csf_gap

    tissue = rng.uniform(0.38, 0.50) + 0.07 * _texture(rng, 5, hu, hv) + 0.035 * _texture(rng, 9, hu, hv)
    tissue *= 1.0 - 0.25 * np.exp(-((u / (0.01 + 0.5 * px)) ** 2))  # interhemispheric fissure

    head = _inside(rho - 1.0, edge)
    inner = _inside(rho - (1.0 - skull_t), edge)
    brain = _inside(rho - brain_r, edge)
    img = skull_level * (head - inner) + 0.10 * (inner - brain) + tissue * brain

    # Lateral ventricles: two tilted dark ellipses either side of the midline.
    dv, vy = rng.uniform(0.08, 0.13), rng.uniform(-0.12, 0.02)
    ru, rv, tilt = rng.uniform(0.05, 0.08), rng.uniform(0.16, 0.24), rng.uniform(0.2, 0.45)
    for side in (-1.0, 1.0):
        ventricle = _ellipse(hu, hv, side * dv, vy, ru, rv, -side * tilt, edge)
        img = _blend(img, 0.12, ventricle)

    img = _lesion(rng, CLASS_NAMES[label], img, hu, hv, brain_r, edge)
    img = img * rng.uniform(0.9, 1.05)  # scanner gain

    noise_rng = np.random.default_rng([DATA_SEED, index, size])
    return img + rng.uniform(0.008, 0.02) * noise_rng.standard_normal((size, size))


def _lesion(
    rng: np.random.Generator,
    kind: str,
    img: np.ndarray,
    hu: np.ndarray,
    hv: np.ndarray,
    brain_r: float,
    edge: float,
) -> np.ndarray:
    if kind == "glioma":  # irregular bright mass inside one hemisphere, maybe a necrotic core
        side = rng.choice([-1.0, 1.0])
        gx, gy = side * rng.uniform(0.28, 0.5), rng.uniform(-0.45, 0.35)
        r0 = rng.uniform(0.13, 0.22)
        k = np.arange(2, 6)
        amp = rng.uniform(0.0, 0.25, size=k.size) / np.sqrt(k)
        phase = rng.uniform(0.0, 2 * np.pi, size=k.size)
        du, dw = hu - gx, hv - gy
        phi = np.arctan2(dw, du)
        radius = r0 * (1.0 + np.tensordot(amp, np.cos(np.multiply.outer(k, phi) + phase[:, None, None]), 1))
        dist = np.hypot(du, dw)
        img = img + 0.08 * np.exp(-((dist / (1.6 * r0)) ** 2))  # surrounding oedema
        img = _blend(img, rng.uniform(0.72, 0.92), _inside(dist - radius, edge))
        if rng.random() < 0.5:
            img = _blend(img, rng.uniform(0.25, 0.35), _inside(dist - 0.45 * radius, edge))
        return img
    if kind == "meningioma":  # round homogeneous bright mass touching the skull
        psi = rng.uniform(0.0, 2 * np.pi)
        r = rng.uniform(0.12, 0.18)
        d = brain_r - 0.8 * r  # centre so the disc overlaps the skull's inner edge
        return _blend(img, rng.uniform(0.85, 1.0), _ellipse(hu, hv, d * np.cos(psi), d * np.sin(psi), r, r, 0.0, edge))
    if kind == "pituitary":  # small bright mass low on the midline
        px_, py = rng.uniform(-0.03, 0.03), rng.uniform(0.50, 0.62)
        r = rng.uniform(0.06, 0.10)
        blob = _ellipse(hu, hv, px_, py, r * rng.uniform(1.0, 1.3), r, 0.0, edge)
        return _blend(img, rng.uniform(0.80, 0.95), blob)
    return img  # notumor


def _texture(rng: np.random.Generator, grid: int, hu: np.ndarray, hv: np.ndarray) -> np.ndarray:
    """Smooth noise: a random grid x grid field sampled at head coordinates (smoothstep-bilinear)."""
    field = rng.standard_normal((grid, grid))
    gx = np.clip((hu + 1.0) / 2.0 * (grid - 1), 0.0, grid - 1.0)
    gy = np.clip((hv + 1.0) / 2.0 * (grid - 1), 0.0, grid - 1.0)
    ix = np.minimum(gx.astype(int), grid - 2)
    iy = np.minimum(gy.astype(int), grid - 2)
    fx, fy = gx - ix, gy - iy
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    top = field[iy, ix] * (1 - fx) + field[iy, ix + 1] * fx
    bottom = field[iy + 1, ix] * (1 - fx) + field[iy + 1, ix + 1] * fx
    return top * (1 - fy) + bottom * fy


def _ellipse(
    hu: np.ndarray, hv: np.ndarray, x0: float, y0: float, rx: float, ry: float, tilt: float, edge: float
) -> np.ndarray:
    cos, sin = np.cos(tilt), np.sin(tilt)
    du, dv = hu - x0, hv - y0
    p, q = cos * du + sin * dv, -sin * du + cos * dv
    return _inside((np.hypot(p / rx, q / ry) - 1.0) * min(rx, ry), edge)


def _inside(signed_dist: np.ndarray, edge: float) -> np.ndarray:
    """Soft mask: 1 inside (distance < 0), 0 outside, linear ramp one pixel wide."""
    return np.clip(0.5 - signed_dist / edge, 0.0, 1.0)


def _blend(img: np.ndarray, level: float, mask: np.ndarray) -> np.ndarray:
    return img * (1.0 - mask) + level * mask
