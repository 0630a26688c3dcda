"""Declared ranges of numeric parameters, checked wherever a configuration is parsed.

A component's ``Params`` dataclass declares each numeric field's valid range with :func:`bounded`::

    @dataclass(frozen=True)
    class MyParams:
        steps: int = bounded(300, ge=1, le=10**7)
        lr: float = bounded(0.1, gt=0, le=1e3)
        epsilon: float = bounded(8.0, gt=0, allow_inf=True)   # inf means "no noise"

Besides the declared range, every numeric value obeys two rules of its own: a float is never NaN and
never infinite (unless the field says ``allow_inf``), and an integer fits a signed 64-bit integer (what
SQLite stores). Optional fields accept None; a tuple field's range applies to each element. A subclass
that only changes a field's default keeps the range its base class declared.

:func:`check_values` applies all of this; ``privbench.config.coerce_params`` calls it for every component
parameter, so a violation is a ``ConfigError`` (exit 2) before anything runs. This module imports
nothing heavy.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

RANGE = "privbench.range"  # the dataclass field metadata key
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class Range:
    """``low``/``high`` bounds (None: none), open or closed; ``allow_inf``: +inf is also valid (beyond ``high``)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    allow_inf: bool = False

    def describe(self) -> str:
        return self._bounds() + (" (or inf)" if self.allow_inf else "")

    def _bounds(self) -> str:
        if self.low is None and self.high is None:
            return "any finite number"
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return f"in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}{')' if self.high_open else ']'}"

    def contains(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True


def _num(x: float) -> str:
    """A bound as people write it: 0.5, 100, 65536, 10^6, 1e-12."""
    if float(x).is_integer():
        value = int(x)
        exponent = len(str(abs(value))) - 1
        if abs(value) >= 10_000 and abs(value) == 10**exponent:
            return f"{'-' if value < 0 else ''}10^{exponent}"
        return str(value)
    return f"{x:g}"


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None, allow_inf: bool = False) -> Any:
    """A dataclass field with ``default`` whose value must lie in the given range.

    Args:
        default: the field's default (immutable: a number, None or a tuple).
        ge, gt: lower bound, closed (``ge``) or open (``gt``); give at most one.
        le, lt: upper bound, closed (``le``) or open (``lt``); give at most one.
        allow_inf: +inf is a meaningful value of this field besides the range (e.g. DP's ``epsilon=inf``: no
            noise); -inf and NaN never are.

    Example:
        >>> @dataclass(frozen=True)
        ... class P:
        ...     lr: float = bounded(0.1, gt=0, le=10)
        >>> check_values(P, {"lr": 0.0})
        Traceback (most recent call last):
        ...
        ValueError: 'lr' must be in (0, 10], got 0.0
    """
    if ge is not None and gt is not None or le is not None and lt is not None:
        raise TypeError("give at most one lower bound (ge or gt) and one upper bound (le or lt)")
    low, high = (gt if gt is not None else ge), (lt if lt is not None else le)
    spec = Range(low, high, low_open=gt is not None, high_open=lt is not None, allow_inf=allow_inf)
    return dataclasses.field(default=default, metadata={RANGE: spec})


def declared_range(params_cls: type, name: str) -> Range | None:
    """The range declared for field ``name`` of ``params_cls`` or of the nearest base class that declares one."""
    for cls in getattr(params_cls, "__mro__", (params_cls,)):
        if not dataclasses.is_dataclass(cls):
            continue
        for f in dataclasses.fields(cls):
            if f.name == name and RANGE in f.metadata:
                return f.metadata[RANGE]
    return None


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def problem(value: Any, spec: Range | None) -> str | None:
    """Why ``value`` (a number, None, or a tuple / list of them) is out of range, or None if it is fine."""
    if isinstance(value, (tuple, list)):
        for item in value:
            if (why := problem(item, spec)) is not None:
                return f"{why} (element {item!r})"
        return None
    if not is_number(value):
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return "must be a number, not NaN"
        if math.isinf(value):
            if spec is not None and spec.allow_inf and value > 0:
                return None
            return "must be finite" + (f" and {spec.describe()}" if spec else "")
    elif not INT64_MIN <= value <= INT64_MAX:
        return f"must fit a signed 64-bit integer ({INT64_MIN} .. {INT64_MAX})" + (
            f" and be {spec.describe()}" if spec else "")
    if spec is not None and not spec.contains(value):
        return f"must be {spec.describe()}"
    return None


def check_values(params_cls: type, values: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first value of ``values`` (field name -> value) outside its range."""
    for name, value in values.items():
        why = problem(value, declared_range(params_cls, name))
        if why is not None:
            raise ValueError(f"{name!r} {why}, got {value!r}")


def check_instance(instance: Any) -> None:
    """:func:`check_values` over every field of a Params dataclass instance."""
    check_values(type(instance), {f.name: getattr(instance, f.name) for f in dataclasses.fields(instance)})
