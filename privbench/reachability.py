"""What an object lets its holder reach, and whether forbidden values are among it.

``reachable(root)`` walks every object an attack could get to from an observation: attributes,
dataclass fields, module parameters and buffers, container items, closure cells, default
arguments, bound ``self``, ``functools.partial`` arguments. ``find_leaks(root, forbidden)`` reports
every path at which a forbidden value is found: a tensor equal to a forbidden tensor (or a batch
holding it as a row), a forbidden string, or an object a forbidden predicate accepts (a private
key). The conformance kit and the threat-model tests use it on every defense's observations.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch

_SKIP = (types.ModuleType, type, torch.Generator, torch.dtype, torch.device, torch.Size)
_LEAVES = (str, bytes, int, float, bool, complex, type(None), np.generic)


def reachable(root: Any, max_objects: int = 500_000) -> Iterator[tuple[str, Any]]:
    """(path, object) for every object reachable from ``root``, each once, depth first."""
    seen: set[int] = set()
    stack: list[tuple[str, Any]] = [("observation", root)]
    while stack:
        path, obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _SKIP):
            continue
        seen.add(id(obj))
        if len(seen) > max_objects:
            raise RuntimeError(f"more than {max_objects} objects reachable from the observation; refusing to walk on")
        yield path, obj
        if isinstance(obj, (_LEAVES, torch.Tensor, np.ndarray)):
            continue
        stack.extend(_children(path, obj))


def _children(path: str, obj: Any) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            out += [(f"{path}[{key!r}]", value), (f"{path}.<key>", key)]
    elif isinstance(obj, (list, tuple, set, frozenset)):
        out += [(f"{path}[{i}]", value) for i, value in enumerate(obj)]
    elif isinstance(obj, functools.partial):
        out += [(f"{path}.func", obj.func), (f"{path}.args", obj.args), (f"{path}.keywords", obj.keywords)]
    elif isinstance(obj, types.MethodType):
        out += [(f"{path}.__self__", obj.__self__), (f"{path}.__func__", obj.__func__)]
    elif isinstance(obj, types.FunctionType):
        for name, cell in zip(obj.__code__.co_freevars, obj.__closure__ or (), strict=False):
            try:
                out.append((f"{path}.<closure {name}>", cell.cell_contents))
            except ValueError:  # an empty cell
                pass
        out += [(f"{path}.__defaults__", obj.__defaults__), (f"{path}.__kwdefaults__", obj.__kwdefaults__)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out += [(f"{path}.{f.name}", getattr(obj, f.name, None)) for f in dataclasses.fields(obj)]
    attributes = getattr(obj, "__dict__", None)
    if isinstance(attributes, dict) and not isinstance(obj, types.FunctionType):
        out += [(f"{path}.{name}", value) for name, value in attributes.items()]
    for name in getattr(type(obj), "__slots__", ()) or ():
        if hasattr(obj, name):
            out.append((f"{path}.{name}", getattr(obj, name)))
    return out


@dataclass
class Forbidden:
    """What must not be reachable: ``tensors`` (name -> value; also found as a row of a larger batch),
    ``strings`` (name -> value, e.g. member ids) and ``objects`` (name -> predicate, e.g. "is a secret key")."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    strings: dict[str, str] = field(default_factory=dict)
    objects: dict[str, Callable[[Any], bool]] = field(default_factory=dict)


def find_leaks(root: Any, forbidden: Forbidden) -> list[str]:
    """``"<forbidden name> at <path>"`` for every forbidden value reachable from ``root``."""
    wanted = {name: t.detach().flatten() for name, t in forbidden.tensors.items() if t.numel()}
    strings = {value: name for name, value in forbidden.strings.items()}
    leaks = []
    for path, obj in reachable(root):
        if isinstance(obj, str) and obj in strings:
            leaks.append(f"{strings[obj]} at {path}")
        elif isinstance(obj, (torch.Tensor, np.ndarray)):
            leaks += [f"{name} at {path}" for name, value in wanted.items() if _holds(obj, value)]
        for name, predicate in forbidden.objects.items():
            try:
                hit = predicate(obj)
            except Exception:  # a predicate that does not apply to this object's type
                hit = False
            if hit:
                leaks.append(f"{name} at {path}")
    return leaks


def _holds(candidate: torch.Tensor | np.ndarray, value: torch.Tensor) -> bool:
    """Does ``candidate`` equal ``value`` or, for a floating ``value`` (an image, a matrix), hold it as one row
    of a batch, within float32 rounding? Integer values (labels, permutations) must match exactly in size:
    a short integer pattern recurs by chance inside any long integer tensor."""
    if isinstance(candidate, np.ndarray):
        if candidate.dtype == object or candidate.size == 0:
            return False
        candidate = torch.from_numpy(np.ascontiguousarray(candidate))
    floating = value.is_floating_point()
    size = value.numel()
    if candidate.is_complex() or candidate.numel() < size or candidate.numel() % size:
        return False
    if not floating and candidate.numel() != size:
        return False
    rows = candidate.detach().reshape(-1, size).double()
    target = value.double()
    tolerance = 1e-6 * (1 + float(target.abs().max())) if floating else 0.0
    return bool(((rows - target).abs().amax(dim=1) <= tolerance).any())
