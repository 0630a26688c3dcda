"""privbench.cache: keys name everything that shaped a value, writes are atomic, and no cache load runs stored code.

Each cache privbench keeps is given a file holding a pickle whose loading would run code (it would
create a marker file) under the exact name the cache reads; the load must be a miss that recomputes
the value, and the marker must never appear. Tiny stand-in values keep these tests fast.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import privbench
from privbench import cache
from privbench.config import RunConfig
from privbench.datasets import ImageDataset
from privbench.datasets import cache as dataset_cache
from privbench.metrics import eval_classifier

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = {"dataset": "synthetic-mri", "data_fingerprint": "f00d", "split_seed": 0,
        "split": dataclasses.asdict(RunConfig().split), "image_size": 16, "channels": 1}


class _Payload:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def _plant_torch(path: Path, marker: Path, wrap=lambda payload: payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(wrap(_Payload(marker)), path)


def _plant_pickle(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(_Payload(marker)))


def test_the_payload_is_live_when_loaded_unsafely(tmp_path):
    """Control: the planted files do run code under an unsafe load, so the tests below mean something."""
    for plant, load in ((_plant_torch, lambda p: torch.load(p, weights_only=False)),
                        (_plant_pickle, lambda p: pickle.loads(p.read_bytes()))):
        marker = tmp_path / f"marker-{plant.__name__}"
        plant(tmp_path / f"{plant.__name__}.pt", marker)
        load(tmp_path / f"{plant.__name__}.pt")
        assert marker.read_text() == "code ran"


# -- (1) no load runs stored code; an unsafe file is a miss ----------------------------------


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("plant", [_plant_torch, _plant_pickle])
def test_load_torch_refuses_a_pickle_that_runs_code(tmp_path, caplog, plant):
    path, marker = tmp_path / "entry.pt", tmp_path / "marker"
    plant(path, marker)
    with caplog.at_level(logging.WARNING, logger="privbench.cache"):
        assert cache.load_torch(path) is None
    assert not marker.exists()
    assert not path.exists()  # removed, so the next write starts clean
    assert "unreadable or unsafe" in caplog.text


def test_load_torch_round_trip_and_misses(tmp_path):
    value = {"state": {"w": torch.arange(3.0)}, "record": {"losses": [0.5, 0.25], "time_s": 1.0, "name": "x"}}
    path = tmp_path / "sub" / "entry.pt"
    assert cache.load_torch(path) is None  # missing
    cache.save_torch(path, value)
    loaded = cache.load_torch(path)
    assert torch.equal(loaded["state"]["w"], value["state"]["w"]) and loaded["record"] == value["record"]
    path.write_bytes(b"truncated")
    assert cache.load_torch(path) is None and not path.exists()


def test_save_torch_refuses_values_a_safe_load_would_refuse(tmp_path):
    path = tmp_path / "entry.pt"
    for bad in ({"x": np.float64(1.0)}, [SimpleNamespace(a=1)], {"model": nn.Linear(2, 2)}):
        with pytest.raises(TypeError, match="weights_only"):
            cache.save_torch(path, bad)
    assert list(tmp_path.iterdir()) == []


def test_json_round_trip_and_a_corrupt_file_is_a_miss(tmp_path, caplog):
    path = tmp_path / "entry.json"
    assert cache.load_json(path) is None
    cache.save_json(path, {"a": [1, 2.5, "x"]})
    assert cache.load_json(path) == {"a": [1, 2.5, "x"]}
    path.write_text('{"a": ')
    with caplog.at_level(logging.WARNING, logger="privbench.cache"):
        assert cache.load_json(path) is None
    assert not path.exists() and "unreadable" in caplog.text


def test_gascnn_stage_cache_refuses_a_pickle_that_runs_code(bench_home, tmp_path):
    pytest.importorskip("snntorch")
    from privbench.defenses.gascnn.defense import _stage_cache, stage_cache_path

    identity = {"stage": "teacher", "data": DATA, "target_seed": 0}
    marker = tmp_path / "marker"
    _plant_torch(stage_cache_path(identity), marker, wrap=lambda payload: {"state": payload, "training": {}})
    calls = []

    def compute():
        calls.append(1)
        return {"state": {"w": torch.ones(2)}, "training": {"epoch_losses": [1.0]}}

    value, cached = _stage_cache(identity, compute)
    assert not marker.exists()
    assert (cached, len(calls)) == (False, 1)
    again, cached = _stage_cache(identity, compute)  # the recomputed value replaced the planted file
    assert (cached, len(calls)) == (True, 1)
    assert torch.equal(again["state"]["w"], value["state"]["w"]) and again["training"] == value["training"]


def test_gascnn_stage_cache_write_failure_is_not_fatal(bench_home, monkeypatch):
    pytest.importorskip("snntorch")
    from privbench.defenses.gascnn import defense as gascnn

    def fail(path, obj):
        raise PermissionError("read-only")

    monkeypatch.setattr(gascnn, "save_torch", fail)
    value, cached = gascnn._stage_cache({"stage": "teacher", "data": DATA}, lambda: {"x": 1})
    assert (value, cached) == ({"x": 1}, False)


def test_gascnn_stage_cache_without_a_data_identity_stores_nothing(bench_home):
    pytest.importorskip("snntorch")
    from privbench.defenses.gascnn.defense import _stage_cache

    assert _stage_cache({"stage": "teacher", "data": {}}, lambda: {"x": 1}) == ({"x": 1}, False)
    assert not (bench_home / "cache" / "gascnn").exists()


def _tiny_auxiliary() -> ImageDataset:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(24, 1, 8, 8, generator=generator)
    return ImageDataset(images, torch.arange(24) % 2, ("a", "b"), tuple(f"t/{i}" for i in range(24)))


def _tiny_spec(**changes) -> eval_classifier.EvalClassifierSpec:
    spec = eval_classifier.EvalClassifierSpec("tiny", "f00d", 8, 1, 0, width=4, feature_dim=4, epochs=1)
    return dataclasses.replace(spec, **changes)


def test_eval_classifier_cache_refuses_a_pickle_that_runs_code(tmp_path):
    spec, auxiliary, folder = _tiny_spec(), _tiny_auxiliary(), tmp_path / "eval"
    weights, meta = spec.cache_files(folder)
    marker = tmp_path / "marker"
    _plant_torch(weights, marker, wrap=lambda payload: {"body.fc.weight": payload})
    meta.write_text(json.dumps({"metric": "planted"}))
    classifier = eval_classifier.train_or_load(spec, auxiliary, folder)
    assert not marker.exists()
    assert classifier.info["metric"] == spec.metric_name and "train_time_s" in classifier.info  # retrained
    again = eval_classifier.train_or_load(spec, auxiliary, folder)  # and stored safely
    assert again.info == classifier.info
    for name, value in classifier.net.state_dict().items():
        assert torch.equal(again.net.state_dict()[name], value)


def test_eval_classifier_cache_with_corrupt_info_is_retrained(tmp_path):
    spec, auxiliary, folder = _tiny_spec(), _tiny_auxiliary(), tmp_path / "eval"
    first = eval_classifier.train_or_load(spec, auxiliary, folder)
    spec.cache_files(folder)[1].write_text("not json")
    second = eval_classifier.train_or_load(spec, auxiliary, folder)
    assert second.info["train_time_s"] != first.info["train_time_s"]  # retrained, not served half an entry


@pytest.mark.parametrize("plant", ["npz-object-array", "raw-pickle"])
def test_dataset_cache_refuses_a_pickle_that_runs_code(tmp_path, plant):
    from privbench import datasets

    name, folder, marker = "synthetic-mri:40", tmp_path / "datasets", tmp_path / "marker"
    base, arg = datasets.parse_name(name)
    path = dataset_cache.cache_path(folder, base, arg, datasets.fingerprint(name), 16, 1)
    folder.mkdir()
    if plant == "raw-pickle":
        _plant_pickle(path, marker)
    else:
        with open(path, "wb") as f:
            np.savez(f, images=np.array([_Payload(marker)], dtype=object), labels=np.zeros(1, np.int64))
        with np.load(path, allow_pickle=True) as z:  # control: this file runs code under an unsafe load
            z["images"]
        assert marker.exists()
        marker.unlink()
    data = datasets.load(name, 16, 1, cache_dir=folder)
    assert not marker.exists()
    assert len(data) == 40 and data.image_shape == (1, 16, 16)  # rebuilt from the source
    assert dataset_cache.read(path) is not None  # and rewritten in the safe format


# -- (2) keys name the version, the data and the split ------------------------------------


def test_cache_key_changes_with_version_fingerprint_and_split_seed(monkeypatch):
    base = cache.cache_key("target", {"data": DATA, "seed": 0})
    assert base == cache.cache_key("target", {"seed": 0, "data": dict(reversed(list(DATA.items())))})
    assert len(base) == 64
    assert cache.cache_key("gascnn-stage", {"data": DATA, "seed": 0}) != base
    assert cache.cache_key("target", {"data": {**DATA, "data_fingerprint": "beef"}, "seed": 0}) != base
    assert cache.cache_key("target", {"data": {**DATA, "split_seed": 1}, "seed": 0}) != base
    assert cache.cache_key("target", {"data": {**DATA, "split": {**DATA["split"], "members": 10}}, "seed": 0}) != base
    monkeypatch.setattr(privbench, "__version__", "99.0.0")  # a release that leaves the cached code alone
    assert cache.cache_key("target", {"data": DATA, "seed": 0}) == base
    monkeypatch.setattr(cache, "CACHE_VERSION", "99.0.0")
    assert cache.cache_key("target", {"data": DATA, "seed": 0}) != base


def test_cache_key_refuses_reserved_names():
    for name in ("kind", "privbench"):
        with pytest.raises(ValueError, match="reserved"):
            cache.cache_key("target", {name: "x"})


def test_eval_classifier_key_changes_with_version_fingerprint_and_split(monkeypatch):
    from privbench.datasets.splits import SplitSpec

    base = _tiny_spec().key()
    assert _tiny_spec(split_seed=1).key() != base
    assert _tiny_spec(data_fingerprint="beef").key() != base
    assert _tiny_spec(split=SplitSpec(members=10)).key() != base
    monkeypatch.setattr(cache, "CACHE_VERSION", "99.0.0")
    assert _tiny_spec().key() != base


def test_gascnn_stage_key_names_the_data_the_seeds_and_the_initial_weights(bench_home):
    pytest.importorskip("snntorch")
    from privbench.defenses.base import FitContext
    from privbench.defenses.gascnn.defense import GASCNN, GASCNNParams, stage_cache_path

    defense = GASCNN(GASCNNParams())
    from privbench.datasets import ImageDataset

    members = ImageDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), ("a",), ("a/0", "a/1"))

    def path(data=DATA, seeds=None, target_seed=None, init=0):
        cfg = RunConfig(defense="gascnn", model="resnet", target_seed=target_seed)
        ctx = FitContext(config=cfg, build_model=lambda: None, nonmembers=None,
                         seeds=seeds or cfg.derived_seeds(), data_identity=data)
        torch.manual_seed(init)
        return stage_cache_path({"stage": "teacher", **defense._base_key(nn.Linear(2, 2), members, ctx)})

    base = path()
    assert path() == base
    variants = [path(data={**DATA, "data_fingerprint": "beef"}), path(data={**DATA, "split_seed": 1}),
                path(target_seed=7), path(seeds={**RunConfig().derived_seeds(), "train": 5}), path(init=1)]
    assert len({base, *variants}) == 1 + len(variants)


# -- (3) atomic writes --------------------------------------------------------------------


def test_atomic_write_leaves_no_temp_file_on_failure(tmp_path):
    path = tmp_path / "entry.bin"
    path.write_bytes(b"old")

    def half_then_fail(f):
        f.write(b"half written")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        cache.atomic_write(path, half_then_fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry.bin"]
    assert path.read_bytes() == b"old"  # the previous entry is untouched
    cache.atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["entry.bin"]


def test_atomic_write_raises_os_errors_to_the_caller(tmp_path):
    (tmp_path / "not-a-folder").write_text("")
    with pytest.raises(OSError):
        cache.atomic_write(tmp_path / "not-a-folder" / "entry.bin", lambda f: f.write(b"x"))
    with pytest.raises(OSError):  # save_torch / save_json pass them on too
        cache.save_json(tmp_path / "not-a-folder" / "entry.json", {})
