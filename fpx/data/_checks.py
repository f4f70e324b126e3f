"""Argument checks shared by the generators: each error names the argument, the value and what is allowed."""

from __future__ import annotations

import numbers


def positive_int(fn: str, name: str, value) -> int:
    """`value` as a Python int, or a ValueError if it is not an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"fpx.data.{fn}: `{name}` must be a positive integer, got {value!r}.")
    return int(value)


def nonnegative_int(fn: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"fpx.data.{fn}: `{name}` must be a non-negative integer, got {value!r}.")
    return int(value)


def positive_float(fn: str, name: str, value) -> float:
    """`value` as a Python float, or a ValueError if it is not a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0 < float(value) < float("inf")):
        raise ValueError(f"fpx.data.{fn}: `{name}` must be a finite number > 0, got {value!r}.")
    return float(value)


def open_unit(fn: str, name: str, value) -> float:
    """`value` as a Python float in the open interval (0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0 < float(value) < 1):
        raise ValueError(f"fpx.data.{fn}: `{name}` must lie in the open interval (0, 1), got {value!r}.")
    return float(value)


def seed(fn: str, value) -> int:
    return nonnegative_int(fn, "seed", value)


def power_of_two(fn: str, name: str, value, minimum: int = 1) -> int:
    value = positive_int(fn, name, value)
    if value & (value - 1) or value < minimum:
        raise ValueError(f"fpx.data.{fn}: `{name}` must be a power of two >= {minimum}, got {value!r}.")
    return value


def int_range(fn: str, name: str, value, minimum: int = 1) -> tuple[int, int]:
    """A half-open range `(lo, hi)` of integers with `minimum <= lo < hi`."""
    ok = isinstance(value, (tuple, list)) and len(value) == 2
    if ok:
        lo, hi = value
        ok = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (lo, hi)) and minimum <= lo < hi
    if not ok:
        raise ValueError(
            f"fpx.data.{fn}: `{name}` must be a pair (lo, hi) of integers with {minimum} <= lo < hi "
            f"(sizes are drawn from [lo, hi)), got {value!r}."
        )
    return int(value[0]), int(value[1])
