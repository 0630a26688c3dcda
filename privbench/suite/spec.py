"""Suite specs: a TOML file that names a grid of defenses x attacks x datasets x models x seeds.

A spec is checked whole before anything runs (:func:`load`): unknown keys, unknown components,
ill-typed parameters, bad seed ranges and empty grids raise :class:`SpecError` naming the file, the
line where it can be found, and a did-you-mean. Layout::

    [suite]
    name = "quick"                   # required; rows record it with the spec's hash
    description = "..."
    seeds = "0-4"                    # or [0, 1, 2]: each seed is one victim / attack start
    datasets = ["brain-tumor-mri"]   # default: [run].dataset
    models = ["convnet"]             # default: each defense's own default architecture

    [run]                            # RunConfig fields shared by every job
    image_size = 32
    channels = 1
    target_seed = 0                  # one trained target per cell, attacked through every seed
    [run.budget]
    max_grad_evals = 500
    [run.grid]                       # every combination of these RunConfig fields (protocol settings)
    victim_batch = [1, 4]
    bn_mode = ["train", "eval"]

    [[defenses]]                     # a defense may appear several times
    name = "dp"
    params = { epochs = 3 }
    grid = { epsilon = [1.0, 8.0, inf] }   # every combination, on top of params
    models = ["lenet"]               # optional: replaces [suite].models for this entry

    [[attacks]]
    name = "dlg-mple"
    params = {}
    grid = {}

    [[exclude]]                      # drop every job that matches all the given keys
    defense = "dp"
    attack = ["dlg-mple", "invgrad-mple"]

    [[only]]                         # jobs of this attack (or, without attack, this defense) run
    attack = "invgrad-mple"          # only where the other keys match
    defense = "mple"

Rule keys are ``defense``, ``attack``, ``model`` and ``dataset``, each a name or a list of names, and
the keys of ``[run.grid]``, each a value or a list of values.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from privbench import registry
from privbench.config import Budget, ConfigError, RunConfig, digest, resolve
from privbench.datasets.splits import SplitSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SUITE_KEYS = ("name", "description", "seeds", "datasets", "models")
RUN_KEYS = tuple(f.name for f in dataclasses.fields(RunConfig)
                 if f.name not in ("defense", "attack", "defense_params", "attack_params", "seed"))
COMPONENT_KEYS = ("name", "params", "grid", "models")
RULE_KEYS = ("defense", "attack", "model", "dataset")
GRID_RUN_KEYS = tuple(k for k in RUN_KEYS if k not in ("budget", "split", "model_params", "dataset", "model"))
TOP_KEYS = ("suite", "run", "defenses", "attacks", "exclude", "only")
MAX_SEEDS = 100_000


class SpecError(ValueError):
    """A malformed suite spec; the message names the file, the line or key, and the fix."""


@dataclass(frozen=True)
class Job:
    """One cell of the grid: the config as requested (what ``bench run`` would be given)."""

    config: RunConfig

    @property
    def name(self) -> str:
        c = self.config
        params = ",".join(f"{k}={v}" for k, v in c.defense_params)
        attack_params = ",".join(f"{k}={v}" for k, v in c.attack_params)
        defense = f"{c.defense}[{params}]" if params else c.defense
        attack = f"{c.attack}[{attack_params}]" if attack_params else c.attack
        setting = "".join(f" {label}={getattr(c, key)}" for key, label, default in _SETTING_LABELS
                          if getattr(c, key) != default)
        return f"{defense} x {attack} {c.dataset}/{c.model or 'default'}{setting} seed {c.seed}"


# Run settings a job's name shows when they differ from the default (what a [run.grid] varies most often).
_SETTING_LABELS = (("victim_batch", "B", 1), ("bn_mode", "bn", "train"), ("bn_buffers", "buffers", "shared"),
                   ("gradient_round", "round", "init"))


@dataclass(frozen=True)
class SuiteSpec:
    """A checked spec: its name, the file it came from, the hash of its content and its jobs in order."""

    name: str
    path: Path
    spec_hash: str
    description: str
    jobs: tuple[Job, ...] = field(repr=False)
    raw: Mapping[str, Any] = field(repr=False, default_factory=dict)

    def configs(self) -> list[RunConfig]:
        return [job.config for job in self.jobs]

    def request_keys(self, data_root: str | None = None) -> dict[str, Job]:
        """Each job's request key (the key its stored row carries) -> the job; reads only the datasets'
        fingerprints (raises DatasetError when a dataset is missing)."""
        from privbench import datasets as datasetlib

        prints: dict[tuple[str, int], str] = {}
        out: dict[str, Job] = {}
        for job in self.jobs:
            c = job.config
            if (c.dataset, c.image_size) not in prints:
                prints[(c.dataset, c.image_size)] = datasetlib.fingerprint(c.dataset, data_root, c.image_size)
            out[c.cache_key(prints[(c.dataset, c.image_size)])] = job
        return out


def load(path: str | Path, *, resolve_components: bool = True) -> SuiteSpec:
    """Read, check and expand the spec at ``path``.

    With ``resolve_components`` every job's parameters are type-checked against its components (this
    imports them, and torch); without, only names are checked.

    Raises:
        SpecError: the file is missing, not TOML, or malformed; nothing has run.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"cannot read suite spec {path}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: not valid TOML: {exc}. Fix the syntax at that line") from None
    where = _Locator(path, text)
    _check_keys(data, TOP_KEYS, where, "the top level")
    suite = _table(data, "suite", where, required=True)
    _check_keys(suite, SUITE_KEYS, where, "[suite]")
    name = suite.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
        raise where.error("name", f"[suite].name must be a short name (letters, digits, . _ -), got {name!r}")
    run = dict(_table(data, "run", where))
    _check_keys(run, (*RUN_KEYS, "grid"), where, "[run]")
    run_grid = _run_grid(run.pop("grid", {}), where)
    seeds = parse_seeds(suite.get("seeds", [0]), where)
    datasets = _names(suite.get("datasets", [run.pop("dataset", RunConfig.dataset)]), where, "datasets")
    run.pop("dataset", None)
    suite_models = suite.get("models")
    if "model" in run:
        suite_models = suite_models or [run.pop("model")]
    defenses = _components(data, "defenses", registry.defenses, where, resolve_components)
    attacks = _components(data, "attacks", registry.attacks, where, resolve_components)
    for dataset in datasets:
        _check_dataset(dataset, where)
    rules = {kind: _rules(data, kind, where, tuple(run_grid)) for kind in ("exclude", "only")}
    base = _base_config(run, where)
    variants = [dict(zip(run_grid, values, strict=True)) for values in itertools.product(*run_grid.values())]

    jobs: list[Job] = []
    for dataset in datasets:
        for d_name, d_params, d_models in defenses:
            models = d_models or suite_models or [None]
            for model in _names(models, where, "models", allow_none=True):
                if model is not None:
                    _check_name(registry.models, model, where)
                rule_model = model if model is not None else _default_model(d_name, rules)
                for a_name, a_params, _ in attacks:
                    for variant in variants:
                        if not _kept(rules, defense=d_name, attack=a_name, model=rule_model, dataset=dataset,
                                     **{k: str(v) for k, v in variant.items()}):
                            continue
                        for seed in seeds:
                            config = _config({**base, **variant}, where, defense=d_name, defense_params=d_params,
                                             attack=a_name, attack_params=a_params, dataset=dataset, model=model,
                                             seed=seed)
                            jobs.append(Job(config))
    if not jobs:
        raise SpecError(f"{path}: the grid is empty (no defense x attack pair is left after [[exclude]] and "
                        f"[[only]], or a list is empty); name at least one defense, one attack and one seed")
    unique = list(dict.fromkeys(jobs))
    if resolve_components:
        _check_types(unique, where)
    return SuiteSpec(name=name, path=path, spec_hash=digest(data), description=str(suite.get("description", "")),
                     jobs=tuple(unique), raw=data)


def parse_seeds(value: Any, where: "_Locator | None" = None) -> list[int]:
    """``"0-9"``, ``"3"``, ``[0, 1, 5]`` or ``["0-4", 9]`` -> the seeds in order, each once."""
    items = value if isinstance(value, list) else [value]
    seeds: list[int] = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
            seeds.append(item)
            continue
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", item) if isinstance(item, str) else None
        if match is None:
            raise _seed_error(where, f"seed {item!r} is not a non-negative integer or a range like \"0-9\"")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise _seed_error(where, f"seed range {item!r} runs backwards; write it low-high, e.g. \"{high}-{low}\"")
        if high - low >= MAX_SEEDS:
            raise _seed_error(where, f"seed range {item!r} has more than {MAX_SEEDS} seeds")
        seeds.extend(range(low, high + 1))
    if not seeds:
        raise _seed_error(where, "seeds is empty; give at least one seed, e.g. seeds = \"0-4\"")
    return list(dict.fromkeys(seeds))


def _seed_error(where: "_Locator | None", message: str) -> SpecError:
    return where.error("seeds", f"[suite].seeds: {message}") if where else SpecError(message)


class _Locator:
    """Finds the line of a key or value in the spec's text, for error messages."""

    def __init__(self, path: Path, text: str):
        self.path, self.lines = path, text.splitlines()

    def line_of(self, needle: str) -> int | None:
        pattern = re.compile(rf"(^|[\s{{,\[]){re.escape(needle)}\s*=|[\"']{re.escape(needle)}[\"']")
        for number, line in enumerate(self.lines, 1):
            if pattern.search(line.split("#", 1)[0]):
                return number
        return None

    def error(self, needle: str, message: str) -> SpecError:
        line = self.line_of(needle)
        return SpecError(f"{self.path}{f', line {line}' if line else ''}: {message}")


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.5)
    return f" Did you mean {', '.join(map(repr, close))}?" if close else ""


def _check_keys(table: Mapping[str, Any], known: tuple[str, ...], where: _Locator, what: str) -> None:
    for key in table:
        if key not in known:
            raise where.error(key, f"unknown key {key!r} in {what}.{_did_you_mean(key, known)} "
                                   f"Known keys: {', '.join(known)}")


def _table(data: Mapping[str, Any], key: str, where: _Locator, required: bool = False) -> Mapping[str, Any]:
    value = data.get(key)
    if value is None:
        if required:
            raise SpecError(f"{where.path}: missing the [{key}] table (it needs at least name = \"...\")")
        return {}
    if not isinstance(value, dict):
        raise where.error(key, f"{key} must be a table ([{key}]), got {type(value).__name__}")
    return value


def _names(value: Any, where: _Locator, key: str, allow_none: bool = False) -> list[Any]:
    items = value if isinstance(value, list) else [value]
    for item in items:
        if not (isinstance(item, str) or (allow_none and item is None)):
            raise where.error(key, f"{key} must be a name or a list of names, got {item!r}")
    return items


def _check_name(reg: registry.Registry, name: str, where: _Locator, load: bool = True) -> None:
    """``name`` is registered (``load``: and its component imports); an unknown name raises with did-you-mean."""
    if not load and name in reg:  # a known name: nothing imported (the views read specs without torch)
        return
    try:
        reg.get(name)
    except registry.RegistryError as exc:
        raise where.error(name, str(exc)) from None


def _check_dataset(name: str, where: _Locator) -> None:
    from privbench import datasets as datasetlib

    try:
        datasetlib.parse_name(name)
        datasetlib.source(name)
    except (datasetlib.DatasetError, registry.RegistryError) as exc:
        raise where.error(name, str(exc)) from None


def _components(data: Mapping[str, Any], key: str, reg: registry.Registry, where: _Locator, load: bool = True
                ) -> list[tuple[str, dict[str, Any], list[str] | None]]:
    """Each ``[[key]]`` entry expanded over its grid: (name, params, models or None)."""
    entries = data.get(key)
    if not isinstance(entries, list) or not entries:
        raise SpecError(f"{where.path}: the grid is empty: no [[{key}]] entry; add at least one, e.g. "
                        f"[[{key}]] name = \"none\"" if key == "defenses" else
                        f"{where.path}: the grid is empty: no [[{key}]] entry; add at least one, e.g. "
                        f"[[{key}]] name = \"dlg\"")
    out = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise where.error(key, f"each [[{key}]] entry must be a table, got {entry!r}")
        _check_keys(entry, COMPONENT_KEYS, where, f"a [[{key}]] entry")
        name = entry.get("name")
        if not isinstance(name, str):
            raise where.error(key, f"a [[{key}]] entry has no name = \"...\"")
        _check_name(reg, name, where, load)
        params, grid = entry.get("params", {}), entry.get("grid", {})
        for what, table in (("params", params), ("grid", grid)):
            if not isinstance(table, dict):
                raise where.error(name, f"[[{key}]] {name}: {what} must be a table, got {table!r}")
        for grid_key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise where.error(grid_key, f"[[{key}]] {name}: grid.{grid_key} must be a non-empty list of values")
        models = entry.get("models")
        if models is not None:
            models = _names(models, where, "models")
        for values in itertools.product(*grid.values()):
            out.append((name, {**params, **dict(zip(grid, values, strict=True))}, models))
    return out


def _run_grid(grid: Any, where: _Locator) -> dict[str, list[Any]]:
    """``[run.grid]``: RunConfig fields -> the values each job combination takes (checked non-empty lists)."""
    if not isinstance(grid, dict):
        raise where.error("grid", f"[run.grid] must be a table of field = [values], got {grid!r}")
    _check_keys(grid, GRID_RUN_KEYS, where, "[run.grid]")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise where.error(key, f"[run.grid].{key} must be a non-empty list of values, got {values!r}")
    return dict(grid)


def _rules(data: Mapping[str, Any], kind: str, where: _Locator, grid_keys: tuple[str, ...] = ()
           ) -> list[dict[str, list[str]]]:
    rules = data.get(kind, [])
    if not isinstance(rules, list):
        raise where.error(kind, f"{kind} must be a list of tables ([[{kind}]])")
    keys = (*RULE_KEYS, *grid_keys)
    out = []
    for rule in rules:
        if not isinstance(rule, dict) or not rule:
            raise where.error(kind, f"each [[{kind}]] must be a table with some of {', '.join(keys)}")
        _check_keys(rule, keys, where, f"[[{kind}]]")
        out.append({k: _names(v, where, k) if k in RULE_KEYS else [str(x) for x in (v if isinstance(v, list) else [v])]
                    for k, v in rule.items()})
    for rule in out:
        for key, names in rule.items():
            reg = {"defense": registry.defenses, "attack": registry.attacks, "model": registry.models}.get(key)
            for name in names:
                if reg is not None:
                    _check_name(reg, name, where)
    return out


def _default_model(defense: str, rules: Mapping[str, list[dict[str, list[str]]]]) -> str | None:
    """The architecture a defense runs on when the spec names none, if a rule asks about models (finding
    it imports the defense; a spec that lists its models never does)."""
    if not any("model" in rule for kind in rules.values() for rule in kind):
        return None
    from privbench.config import default_model

    return default_model(registry.defenses.get(defense))


def _matches(rule: Mapping[str, list[str]], **job: Any) -> bool:
    return all(job.get(key) in names for key, names in rule.items())


def _kept(rules: Mapping[str, list[dict[str, list[str]]]], **job: Any) -> bool:
    if any(_matches(rule, **job) for rule in rules["exclude"]):
        return False
    for rule in rules["only"]:
        subject = "attack" if "attack" in rule else "defense" if "defense" in rule else None
        if subject is None:
            if not _matches(rule, **job):
                return False
        elif job[subject] in rule[subject] and not _matches(rule, **job):
            return False
    return True


def _base_config(run: dict[str, Any], where: _Locator) -> dict[str, Any]:
    base = dict(run)
    try:
        if "budget" in base:
            budget = base["budget"]
            if not isinstance(budget, dict):
                raise ConfigError("[run.budget] must be a table")
            for key in budget:
                if key not in {f.name for f in dataclasses.fields(Budget)}:
                    raise ConfigError(f"unknown key {key!r} in [run.budget].{_did_you_mean(key, ['max_grad_evals'])}")
            base["budget"] = Budget(**budget)
        if "split" in base:
            if not isinstance(base["split"], dict):
                raise ConfigError("[run.split] must be a table")
            base["split"] = SplitSpec(**base["split"])
        if "model_params" in base and not isinstance(base["model_params"], dict):
            raise ConfigError("[run].model_params must be a table")
    except (ConfigError, TypeError, ValueError) as exc:
        key = next(iter(k for k in ("budget", "split", "model_params") if k in base), "run")
        raise where.error(key, f"[run]: {exc}") from None
    return base


def _config(base: Mapping[str, Any], where: _Locator, **fields: Any) -> RunConfig:
    try:
        return RunConfig(**{**base, **fields})
    except (ConfigError, TypeError, ValueError) as exc:
        bad = next((k for k in base if k in str(exc)), "run")
        raise where.error(bad, f"[run]: {exc}") from None


def _check_types(jobs: list[Job], where: _Locator) -> None:
    """Resolve one job per distinct component-parameter set: every parameter has its component's type."""
    seen: set[tuple] = set()
    for job in jobs:
        c = job.config
        key = (c.defense, c.defense_params, c.attack, c.attack_params, c.model, c.model_params)
        if key in seen:
            continue
        seen.add(key)
        try:
            resolve(c)
        except (ConfigError, registry.RegistryError) as exc:
            needle = next((k for k, _ in (*c.defense_params, *c.attack_params) if repr(k) in str(exc)), c.defense)
            raise where.error(needle, f"{exc}") from None
