"""Speed of the views: `bench leaderboard` and `bench report` over a store of 1,000 synthetic rows.

    python benchmarks/perf/views.py [--rows 1000] [--keep DIR]

Targets (issue 17): `bench leaderboard` under 3 s and `bench report` under 30 s, each timed as the command a user
runs (a fresh process, imports included). The rows are synthetic (privbench.views.synthetic.fill_suite): one per
job of a suite spec on the built-in synthetic data, 7 defense configurations x 5 attacks x 29 seeds = 1,015 jobs,
about 3% failed, per-image scores of a 4-image batch, written with Store.record as the runner writes them.
`--suite` loads and checks the spec (which imports the components, and torch): it is timed separately.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "privbench.cli", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--keep", type=Path, help="build the store and the outputs in this folder (kept)")
    args = parser.parse_args()
    from privbench.views.synthetic import fill_suite

    folder = args.keep or Path(tempfile.mkdtemp(prefix="privbench-views-"))
    folder.mkdir(parents=True, exist_ok=True)
    store_path, spec = folder / "privbench.sqlite", folder / "views-perf.toml"
    if store_path.exists():
        store_path.unlink()
    t0 = time.perf_counter()
    store = fill_suite(store_path, spec, args.rows)
    print(f"store: {store.counts()} written in {time.perf_counter() - t0:.1f} s at {store_path}")
    store_args = ["--store", str(store_path)]
    results = [
        ("bench leaderboard (Markdown to stdout)", 3.0, timed(["leaderboard", *store_args])),
        ("bench leaderboard --out DIR (md, json, csv, html)", 3.0,
         timed(["leaderboard", *store_args, "--out", str(folder / "leaderboard")])),
        ("bench leaderboard --suite SPEC --out DIR", 3.0,
         timed(["leaderboard", *store_args, "--suite", str(spec), "--out", str(folder / "leaderboard-suite")])),
        ("bench report --suite SPEC --out DIR", 30.0,
         timed(["report", *store_args, "--suite", str(spec), "--out", str(folder / "report")])),
    ]
    slow = False
    for name, target, seconds in results:
        slow |= seconds >= target
        print(f"{name}: {seconds:.2f} s (target < {target:.0f} s){'' if seconds < target else '  SLOW'}")
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
