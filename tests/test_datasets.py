"""Tests for privbench.datasets: sources, cache, splits. All data is generated in tmp_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from privbench import datasets
from privbench.config import RunConfig
from privbench.datasets import DatasetError, ImageDataset, cache, imagefolder, splits, synthetic
from privbench.datasets.splits import SplitSpec

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the default cache out of the work tree."""
    monkeypatch.setenv("PRIVBENCH_HOME", str(tmp_path / "home"))


def _write_image(path: Path, seed: int, size: tuple[int, int] = (20, 14), mode: str = "L") -> None:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)


def _tree(root: Path, layout: dict[str, int], suffix: str = ".png") -> None:
    """layout: "<relative class folder>" -> number of images."""
    seed = 0
    for folder, n in layout.items():
        for i in range(n):
            seed += 1
            _write_image(root / folder / f"img{i}{suffix}", seed, mode="RGB" if seed % 2 else "L")


# -- synthetic-mri -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 32])
def test_synthetic_shapes_and_determinism(size: int, tmp_path: Path) -> None:
    a = datasets.load("synthetic-mri:200", size, 1, cache_dir=tmp_path / "c1")
    b = datasets.load("synthetic-mri:200", size, 1, cache_dir=tmp_path / "c2")
    assert a.images.shape == (200, 1, size, size) and a.image_shape == (1, size, size)
    assert a.images.dtype == torch.float32 and a.labels.dtype == torch.int64
    assert 0.0 <= float(a.images.min()) and float(a.images.max()) <= 1.0
    assert a.class_names == ("glioma", "meningioma", "notumor", "pituitary") and a.num_classes == 4
    assert torch.bincount(a.labels).tolist() == [50, 50, 50, 50]
    assert a.ids[:2] == ("synthetic/0", "synthetic/1") and len(set(a.ids)) == 200
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.images * 255, (a.images * 255).round())  # quantised like real data
    json.dumps(a.provenance)


def test_synthetic_default_count_rgb_and_prefix(tmp_path: Path) -> None:
    full = datasets.load("synthetic-mri", 16, 3, cache_dir=tmp_path)
    assert len(full) == 1000 and full.images.shape[1] == 3
    assert torch.bincount(full.labels).tolist() == [250] * 4
    assert torch.equal(full.images[:, 0], full.images[:, 2])  # gray repeated
    head = datasets.load("synthetic-mri:8", 16, 3, cache_dir=tmp_path)
    assert torch.equal(head.images, full.images[:8])


def test_synthetic_images_are_distinct(tmp_path: Path) -> None:
    ds = datasets.load("synthetic-mri", 16, 1, cache_dir=tmp_path)
    kept, dedup = splits.deduplicate(ds, SplitSpec().near_duplicate_rms)
    assert len(kept) == len(ds)
    assert dedup["exact_duplicates_removed"] == dedup["near_duplicates_removed"] == 0


@pytest.mark.parametrize("name", ["synthetic-mri:abc", "synthetic-mri:2", "synthetic-mri:-5"])
def test_synthetic_bad_count(name: str, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="number of images"):
        datasets.load(name, 16, 1, cache_dir=tmp_path)


def test_load_validates_arguments(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="channels"):
        datasets.load("synthetic-mri:8", 16, 2, cache_dir=tmp_path)
    with pytest.raises(DatasetError, match="image_size"):
        datasets.load("synthetic-mri:8", 0, 1, cache_dir=tmp_path)


def test_unknown_name_is_a_registry_error() -> None:
    from privbench.registry import UnknownNameError

    with pytest.raises(UnknownNameError, match="synthetic-mri"):
        datasets.load("synthetic-mr", 16, 1)


# -- imagefolder / brain-tumor-mri --------------------------------------------------------------


def test_imagefolder_flat_layout(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _tree(root, {"zeta": 3, "alpha": 2})
    _write_image(root / "alpha" / "UPPER.PNG", 99)
    (root / "alpha" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("ignored")
    ds = datasets.load(f"imagefolder:{root}", 8, 1, cache_dir=tmp_path / "c")
    assert ds.class_names == ("alpha", "zeta")
    assert ds.images.shape == (6, 1, 8, 8)
    assert ds.ids == tuple(sorted(ds.ids)) and ds.ids[0] == "alpha/UPPER.PNG"
    assert all(not Path(i).is_absolute() for i in ds.ids)
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.provenance["root"] == str(root) and ds.provenance["n_files"] == 6
    assert "BILINEAR" in ds.provenance["preprocessing"]["resize"]
    rgb = datasets.load(f"imagefolder:{root}", 8, 3, cache_dir=tmp_path / "c")
    assert rgb.images.shape == (6, 3, 8, 8)


def test_imagefolder_pixels_match_pil(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _write_image(root / "a" / "x.png", 1, size=(40, 30), mode="RGB")
    ds = datasets.load(f"imagefolder:{root}", 16, 1, cache_dir=tmp_path / "c")
    with Image.open(root / "a" / "x.png") as im:
        expected = np.asarray(im.convert("L").resize((16, 16), Image.Resampling.BILINEAR))
    assert np.array_equal(ds.to_uint8()[0, 0], expected)


def test_imagefolder_16bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    ramp = np.linspace(0, 65535, 8 * 8).astype(np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(root / "a" / "deep.png")
    ds = datasets.load(f"imagefolder:{root}", 8, 1, cache_dir=tmp_path / "c")
    assert np.array_equal(ds.to_uint8()[0, 0], (ramp >> 8).astype(np.uint8))


def test_imagefolder_split_layout_is_pooled(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _tree(root, {"Training/b": 2, "Training/a": 2, "Testing/a": 1, "Testing/c": 1}, suffix=".jpg")
    _write_image(root / "Testing" / "a" / ".ipynb_checkpoints" / "x-checkpoint.jpg", 5)
    ds = datasets.load(f"imagefolder:{root}", 8, 1, cache_dir=tmp_path / "c")
    assert ds.class_names == ("a", "b", "c")
    assert len(ds) == 6 and ds.provenance["layout"] == "splits"
    assert ds.ids[0] == "Testing/a/img0.jpg"
    assert {i.split("/")[0] for i in ds.ids} == {"Training", "Testing"}
    assert dict(zip(ds.ids, ds.labels.tolist(), strict=True))["Testing/c/img0.jpg"] == 2

    lower = tmp_path / "lower"
    _tree(lower, {"train/x": 1, "test/y": 1})
    assert datasets.load(f"imagefolder:{lower}", 8, 1, cache_dir=tmp_path / "c").class_names == ("x", "y")


def test_error_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError, match="does not exist") as e:
        datasets.load(f"imagefolder:{missing}", 8, 1, cache_dir=tmp_path / "c")
    assert str(missing) in str(e.value)
    with pytest.raises(DatasetError, match="does not exist"):
        datasets.fingerprint(f"imagefolder:{missing}")


def test_error_root_is_a_file_or_has_no_classes(tmp_path: Path) -> None:
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    with pytest.raises(DatasetError, match="not a folder"):
        datasets.fingerprint(f"imagefolder:{f}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no class folders") as e:
        datasets.fingerprint(f"imagefolder:{empty}")
    assert str(empty) in str(e.value)


def test_error_empty_class_folder(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _tree(root, {"full": 2})
    (root / "hollow").mkdir()
    with pytest.raises(DatasetError, match="no images") as e:
        datasets.load(f"imagefolder:{root}", 8, 1, cache_dir=tmp_path / "c")
    assert str(root / "hollow") in str(e.value)


def test_error_mixed_layout(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _tree(root, {"Training/a": 1, "extra": 1})
    with pytest.raises(DatasetError, match="mixes split folders"):
        datasets.fingerprint(f"imagefolder:{root}")


def test_error_corrupt_image(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _tree(root, {"a": 2})
    bad = root / "a" / "x.jpg"
    bad.write_bytes(b"\x00garbage, not a jpeg" * 10)
    with pytest.raises(DatasetError) as e:
        datasets.load(f"imagefolder:{root}", 8, 1, cache_dir=tmp_path / "c")
    assert str(bad) in str(e.value) and "delete" in str(e.value)


def test_brain_tumor_mri_needs_a_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PRIVBENCH_DATA_DIR", raising=False)
    with pytest.raises(DatasetError, match="PRIVBENCH_DATA_DIR"):
        datasets.load("brain-tumor-mri", 8, 1, cache_dir=tmp_path)
    monkeypatch.setenv("PRIVBENCH_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(DatasetError, match="does not exist") as e:
        datasets.fingerprint("brain-tumor-mri")
    assert str(tmp_path / "data" / "brain-tumor-mri") in str(e.value)


def test_brain_tumor_mri_from_root_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "data" / "brain-tumor-mri"
    _tree(root, {"Training/glioma": 2, "Testing/notumor": 1}, suffix=".jpg")
    ds = datasets.load("brain-tumor-mri", 8, 1, root=root, cache_dir=tmp_path / "c")
    assert ds.class_names == ("glioma", "notumor") and len(ds) == 3
    assert ds.provenance["dataset"] == "brain-tumor-mri"
    monkeypatch.setenv("PRIVBENCH_DATA_DIR", str(tmp_path / "data"))
    assert datasets.fingerprint("brain-tumor-mri") == datasets.fingerprint("brain-tumor-mri", root)


# -- medmnist -----------------------------------------------------------------------------------


def _fake_medmnist(path: Path, size: int = 28, rgb: bool = False, n: tuple = (6, 2, 3), k: int = 3) -> None:
    rng = np.random.default_rng(size)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n, strict=True):
        shape = (count, size, size, 3) if rgb else (count, size, size)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, k, (count, 1)).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def test_medmnist_pooled(tmp_path: Path) -> None:
    folder = tmp_path / "mm"
    _fake_medmnist(folder / "fakemnist.npz")
    ds = datasets.load("medmnist:fakemnist", 32, 1, root=folder, cache_dir=tmp_path / "c")
    assert ds.images.shape == (11, 1, 32, 32)
    assert ds.ids[:1] + ds.ids[6:7] + ds.ids[8:9] == ("train/0", "val/0", "test/0")
    with np.load(folder / "fakemnist.npz") as z:
        labels = np.concatenate([z[f"{s}_labels"][:, 0] for s in ("train", "val", "test")])
    assert ds.labels.tolist() == labels.tolist()
    assert ds.class_names == tuple(str(i) for i in range(int(labels.max()) + 1))
    same = datasets.load("medmnist:fakemnist", 28, 1, root=folder, cache_dir=tmp_path / "c")
    with np.load(folder / "fakemnist.npz") as z:
        assert np.array_equal(same.to_uint8()[0, 0], z["train_images"][0])


def test_medmnist_rgb_and_size_choice(tmp_path: Path) -> None:
    folder = tmp_path / "mm"
    _fake_medmnist(folder / "fakemnist.npz", rgb=True)
    _fake_medmnist(folder / "fakemnist_64.npz", size=64, rgb=True)
    small = datasets.load("medmnist:fakemnist", 16, 3, root=folder, cache_dir=tmp_path / "c")
    big = datasets.load("medmnist:fakemnist", 48, 1, root=folder, cache_dir=tmp_path / "c")
    assert small.provenance["file"] == "fakemnist.npz" and small.images.shape == (11, 3, 16, 16)
    assert big.provenance["file"] == "fakemnist_64.npz" and big.images.shape == (11, 1, 48, 48)


def test_medmnist_missing_file(tmp_path: Path) -> None:
    folder = tmp_path / "mm"
    with pytest.raises(DatasetError, match="--allow-download") as e:
        datasets.load("medmnist:fakemnist", 28, 1, root=folder, cache_dir=tmp_path / "c")
    assert str(folder / "fakemnist.npz") in str(e.value)


def test_medmnist_download_without_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "medmnist", None)  # import fails even if it is installed
    with pytest.raises(DatasetError, match=r"pip install 'medmnist>=3'"):
        datasets.load("medmnist:fakemnist", 28, 1, root=tmp_path, allow_download=True, cache_dir=tmp_path)


def test_medmnist_multilabel_and_bad_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="single-label"):
        datasets.load("medmnist:chestmnist", 28, 1, root=tmp_path, cache_dir=tmp_path)
    np.savez(
        tmp_path / "multimnist.npz",
        **{f"{s}_images": np.zeros((2, 28, 28), np.uint8) for s in ("train", "val", "test")},
        **{f"{s}_labels": np.zeros((2, 14), np.uint8) for s in ("train", "val", "test")},
    )
    with pytest.raises(DatasetError, match="single-label"):
        datasets.load("medmnist:multimnist", 28, 1, root=tmp_path, cache_dir=tmp_path)
    (tmp_path / "brokenmnist.npz").write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="corrupt") as e:
        datasets.load("medmnist:brokenmnist", 28, 1, root=tmp_path, cache_dir=tmp_path)
    assert str(tmp_path / "brokenmnist.npz") in str(e.value)


# -- cache --------------------------------------------------------------------------------------


def test_cache_hit_skips_decoding_and_corrupt_cache_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, cdir = tmp_path / "data", tmp_path / "cache"
    _tree(root, {"a": 2, "b": 2})
    first = datasets.load(f"imagefolder:{root}", 8, 1, cache_dir=cdir)
    files = list(cdir.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"  # no temp file left behind

    real_decode = imagefolder.decode

    def no_decode(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(imagefolder, "decode", no_decode)
    second = datasets.load(f"imagefolder:{root}", 8, 1, cache_dir=cdir)
    assert torch.equal(first.images, second.images) and first.ids == second.ids
    assert first.provenance == second.provenance and first.class_names == second.class_names

    files[0].write_bytes(b"PK\x03\x04 truncated garbage")
    calls = []

    def counting_decode(*args: object, **kwargs: object) -> np.ndarray:
        calls.append(1)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(imagefolder, "decode", counting_decode)
    third = datasets.load(f"imagefolder:{root}", 8, 1, cache_dir=cdir)
    assert calls == [1] and torch.equal(first.images, third.images)
    assert cache.read(files[0]) is not None  # rewritten and readable


def test_cache_key_follows_data_and_preprocessing(tmp_path: Path) -> None:
    root, cdir = tmp_path / "data", tmp_path / "cache"
    _tree(root, {"a": 2, "b": 1})
    fp = datasets.fingerprint(f"imagefolder:{root}")
    datasets.load(f"imagefolder:{root}", 8, 1, cache_dir=cdir)
    datasets.load(f"imagefolder:{root}", 8, 3, cache_dir=cdir)
    _write_image(root / "b" / "new.png", 1234)
    assert datasets.fingerprint(f"imagefolder:{root}") != fp
    assert len(datasets.load(f"imagefolder:{root}", 8, 1, cache_dir=cdir)) == 4
    assert len(list(cdir.glob("*.npz"))) == 3


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert cache.default_cache_dir() == tmp_path / "home" / "cache" / "datasets"
    monkeypatch.delenv("PRIVBENCH_HOME")
    assert cache.default_cache_dir() == Path("runs/cache/datasets")


def test_fingerprint_does_not_import_torch(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _tree(root, {"a": 1})
    code = (
        "import sys\n"
        "from privbench import datasets\n"
        "datasets.fingerprint('synthetic-mri')\n"
        f"datasets.fingerprint('imagefolder:{root}')\n"
        "import privbench.datasets.medmnist, privbench.datasets.splits\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path)


# -- splits -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool() -> ImageDataset:
    return synthetic.SyntheticMRI().load("200", None, 16, 1, False)


def test_splits_deterministic_disjoint_and_sized(pool: ImageDataset) -> None:
    a = splits.make(pool, SplitSpec(), seed=1)
    b = splits.make(pool, SplitSpec(), seed=1)
    c = splits.make(pool, SplitSpec(), seed=2)
    for part in ("members", "nonmembers", "auxiliary"):
        assert getattr(a, part).ids == getattr(b, part).ids
    assert a.members.ids != c.members.ids
    assert (len(a.members), len(a.nonmembers), len(a.auxiliary)) == (100, 50, 50)
    ids = [set(a.members.ids), set(a.nonmembers.ids), set(a.auxiliary.ids)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert a.members.class_names == pool.class_names
    d = a.describe()
    assert (d["members"], d["nonmembers"], d["auxiliary"], d["unused"]) == (100, 50, 50, 0)
    json.dumps(d)
    # the subset carries the right pixels and labels for its ids
    i = pool.ids.index(a.members.ids[0])
    assert torch.equal(a.members.images[0], pool.images[i]) and a.members.labels[0] == pool.labels[i]


def test_splits_absolute_counts(pool: ImageDataset) -> None:
    s = splits.make(pool, SplitSpec(members=20, nonmembers=30, auxiliary=40), seed=0)
    assert (len(s.members), len(s.nonmembers), len(s.auxiliary)) == (20, 30, 40)
    assert s.describe()["unused"] == 110
    with pytest.raises(DatasetError, match="200 unique images"):
        splits.make(pool, SplitSpec(members=150, nonmembers=40, auxiliary=40), seed=0)


@pytest.mark.parametrize(
    "spec",
    [
        lambda: SplitSpec(members_fraction=0.5, nonmembers_fraction=0.5),
        lambda: SplitSpec(members_fraction=0.0),
        lambda: SplitSpec(members=0),
        lambda: SplitSpec(near_duplicate_rms=-1.0),
    ],
)
def test_bad_split_specs_raise(spec, pool: ImageDataset) -> None:
    with pytest.raises(DatasetError):
        splits.make(pool, spec(), seed=0)


def test_empty_auxiliary_from_counts_raises(pool: ImageDataset) -> None:
    with pytest.raises(DatasetError, match="auxiliary split would be empty"):
        splits.make(pool, SplitSpec(members=150, nonmembers=50), seed=0)


def _with_duplicates(pool: ImageDataset) -> ImageDataset:
    """pool + exact copies of 3, 5, 5 + near copies of 7, 9 + an exact copy of the near copy of 9."""
    u8 = pool.to_uint8()
    rng = np.random.default_rng(0)

    def jitter(img: np.ndarray) -> np.ndarray:
        noise = rng.integers(-2, 3, img.shape)
        noise.flat[0] = 2  # never an exact copy
        return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)

    near9 = jitter(u8[9])
    extra = [u8[3], u8[5], u8[5], jitter(u8[7]), near9, near9]
    src = [3, 5, 5, 7, 9, 9]
    images = np.concatenate([u8, np.stack(extra)])
    labels = np.concatenate([pool.labels.numpy(), pool.labels.numpy()[src]])
    ids = pool.ids + tuple(f"copy{i}/of{s}" for i, s in enumerate(src))
    return ImageDataset.from_uint8(images, labels, pool.class_names, ids, {})


def test_splits_remove_exact_and_near_duplicates(pool: ImageDataset) -> None:
    data = _with_duplicates(pool)
    s = splits.make(data, SplitSpec(), seed=3)
    # exact: copies beyond the first of each byte-identical set (3, 5, 5 and the second near copy of 9)
    assert s.dedup["exact_duplicates_removed"] == 4
    assert s.dedup["near_duplicates_removed"] == 2  # the near copies of 7 and of 9
    assert s.dedup["groups"] == 4
    assert s.dedup["images_before"] == 206 and s.dedup["images_after"] == 200
    kept = s.members.ids + s.nonmembers.ids + s.auxiliary.ids
    assert set(kept) == set(pool.ids)  # lowest index (the original) kept, every copy dropped

    # brute force: no two kept images are exact or near duplicates of each other
    both = ImageDataset.from_uint8(
        np.concatenate([s.members.to_uint8(), s.nonmembers.to_uint8(), s.auxiliary.to_uint8()]),
        np.zeros(len(kept), dtype=np.int64),
        pool.class_names,
        kept,
        {},
    )
    small = splits._downsample(both.to_uint8())
    d = np.sqrt(((small[:, None] - small[None]) ** 2).mean(-1))
    np.fill_diagonal(d, np.inf)
    assert d.min() >= SplitSpec().near_duplicate_rms


def test_near_pairs_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    centres = rng.random((40, 256))
    sigma = rng.uniform(0.002, 0.01, (200, 1))  # pairs on both sides of the threshold
    x = np.repeat(centres, 5, axis=0) + sigma * rng.standard_normal((200, 256))
    got = {tuple(sorted(p)) for p in splits._near_pairs(x, 0.01).tolist()}
    d = np.sqrt(((x[:, None] - x[None]) ** 2).mean(-1))
    want = {(i, j) for i, j in zip(*np.nonzero(d < 0.01), strict=True) if i < j}
    assert got == want
    assert 0 < len(want) < 400  # some but not all of the 40 * 10 within-cluster pairs


def test_dedup_is_fast_enough() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7000, 1, 32, 32), dtype=np.uint8)
    ds = ImageDataset.from_uint8(images, np.zeros(7000, np.int64), ("x",), tuple(map(str, range(7000))), {})
    t = time.perf_counter()
    splits.deduplicate(ds, 0.01)
    assert time.perf_counter() - t < 10.0


# -- the real data set (optional) -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("PRIVBENCH_DATA_DIR"), reason="set PRIVBENCH_DATA_DIR to run")
def test_real_brain_tumor_mri(tmp_path: Path) -> None:
    ds = datasets.load("brain-tumor-mri", 32, 1, cache_dir=tmp_path)
    assert len(ds) == 7019 and ds.class_names == ("glioma", "meningioma", "notumor", "pituitary")
    assert ds.image_shape == (1, 32, 32)
    # 300 groups of byte-identical images (726 files) at 32x32 gray -> 426 surplus copies
    n_unique_bytes = len({p.tobytes() for p in ds.to_uint8()})
    assert len(ds) - n_unique_bytes == 426
    s = splits.make(ds, SplitSpec(), seed=0)
    d = s.dedup
    print("dedup:", d)
    removed = d["exact_duplicates_removed"] + d["near_duplicates_removed"]
    assert removed == d["images_before"] - d["images_after"] >= 426
    # exact removals whose twin was kept; the others fell into groups led by a near copy
    assert d["exact_duplicates_removed"] == 426 and removed < 2000
    ids = s.members.ids + s.nonmembers.ids + s.auxiliary.ids
    assert len(set(ids)) == len(ids) == d["images_after"]


def test_a_run_with_allow_download_fetches_the_data_before_keying_the_run(tmp_path: Path, monkeypatch) -> None:
    """The data's fingerprint is part of every run key: with --allow-download the files are fetched first."""
    from privbench.datasets import medmnist as medmnist_source
    from privbench.runner import RunOptions, lookup
    from privbench.store import Store

    folder = tmp_path / "mm"
    fetched = []

    def fake_download(flag, target, size):
        fetched.append(flag)
        _fake_medmnist(target / f"{flag}.npz")

    monkeypatch.setattr(medmnist_source, "_download", fake_download)
    config = RunConfig(dataset="medmnist:fakemnist", image_size=16)
    assert lookup(config, Store(tmp_path / "store.sqlite"), RunOptions(data_root=str(folder), allow_download=True)) is None
    assert fetched == ["fakemnist"] and (folder / "fakemnist.npz").is_file()
