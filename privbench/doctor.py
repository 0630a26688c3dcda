"""``bench doctor``: what this machine has, offline: datasets, metric weights, libraries,
threads, devices and the results store. Reports; never fails on what is missing."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
from pathlib import Path

from privbench.metrics import weights
from privbench.provenance import default_threads
from privbench.store import default_store_path

LIBRARIES = {  # distribution -> what needs it (all but medmnist and scikit-image install with privbench)
    "lpips": "LPIPS metric",
    "pytorch-fid": "FID / KID (InceptionV3)",
    "scipy": "Frechet distance (matrix square root)",
    "torchvision": "LPIPS backbones",
    "opacus": "dp defense",
    "tenseal": "he defense (CKKS)",
    "phe": "he defense (Paillier)",
    "gmpy2": "he defense (Paillier's big-integer arithmetic, about 3x faster)",
    "snntorch": "gascnn defense",
    "adversarial-robustness-toolbox": "shadow membership attack",
    "scikit-learn": "shadow membership attack (ART's attack models)",
    "pandas": "leaderboards and reports",
    "seaborn": "report figures",
    "medmnist": "medmnist datasets (download)",
    "scikit-image": "tests (reference SSIM)",
}


def dataset_rows() -> list[dict]:
    rows = [{"dataset": "synthetic-mri", "status": "built in (generated, needs no files)", "where": "-"}]
    data_dir = os.environ.get("PRIVBENCH_DATA_DIR")
    if data_dir:
        path = Path(data_dir) / "brain-tumor-mri"
        found = path.is_dir()
        rows.append({
            "dataset": "brain-tumor-mri",
            "status": "found" if found else "missing",
            "where": str(path) if found else f"{path} (PRIVBENCH_DATA_DIR is set but the folder is not there)",
        })
    else:
        rows.append({
            "dataset": "brain-tumor-mri", "status": "not configured",
            "where": "set PRIVBENCH_DATA_DIR to the folder holding brain-tumor-mri/, or pass --data-root",
        })
    medmnist_dir = Path.home() / ".medmnist"
    files = sorted(p.name for p in medmnist_dir.glob("*.npz")) if medmnist_dir.is_dir() else []
    rows.append({
        "dataset": "medmnist:<flag>",
        "status": f"{len(files)} file(s): {', '.join(files)}" if files else "no files",
        "where": str(medmnist_dir),
    })
    return rows


def weights_rows() -> list[dict]:
    rows = []
    for key, w in weights.KNOWN.items():
        paths = weights.candidate_paths(w)
        found = next((p for p in paths if p.is_file()), None)
        rows.append({
            "key": key, "file": w.filename, "used by": w.used_by,
            "status": f"found at {found}" if found else f"missing (looked at {', '.join(map(str, paths))})",
        })
    return rows


def shipped_rows() -> list[dict]:
    spec = importlib.util.find_spec("lpips")
    rows = []
    for backbone in ("alex", "vgg", "squeeze"):
        if spec and spec.origin:
            path = Path(spec.origin).parent / "weights" / "v0.1" / f"{backbone}.pth"
            status = f"found at {path}" if path.is_file() else f"missing at {path}"
        else:
            status = "lpips not installed (pip install lpips)"
        rows.append({"file": f"lpips linear layers v0.1/{backbone}.pth", "status": status})
    return rows


def library_rows() -> list[dict]:
    from privbench.deps import REQUIREMENTS

    rows = []
    for dist, purpose in LIBRARIES.items():
        try:
            version = md.version(dist)
        except md.PackageNotFoundError:
            requirement = next((r for r in REQUIREMENTS.values() if r.split(">")[0].split("<")[0] == dist), dist)
            version = f"not installed: pip install '{requirement}'"
        rows.append({"library": dist, "version": version, "needed for": purpose})
    return rows


def runtime() -> dict:
    import torch

    from privbench.config import ConfigError

    try:
        threads: int | str = default_threads()
    except ConfigError as exc:  # a bad $PRIVBENCH_THREADS is reported, not fatal here
        threads = f"error: {exc}"
    return {
        "torch": torch.__version__,
        "intra-op threads (privbench default)": threads,
        "cpu count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
        "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
        "store": str(default_store_path()),
    }


def collect() -> dict:
    return {
        "datasets": dataset_rows(),
        "weights in the torch hub cache": weights_rows(),
        "weights shipped in packages": shipped_rows(),
        "libraries": library_rows(),
        "runtime": runtime(),
    }
