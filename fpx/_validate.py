"""Argument checks shared across fpx: every error names the argument, the value and what is allowed.

Hyperparameters may be JAX arrays (a vmapped sweep passes traced values): those are checked
for being real scalars only, their range cannot be known at trace time.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import numpy as np

INT32_MAX = 2**31 - 1


def _where(owner: str, name: str) -> str:
    return f"`{owner}({name}=...)`" if owner else f"`{name}`"


def is_traced_scalar(value) -> bool:
    return isinstance(value, jax.core.Tracer) and getattr(value, "ndim", None) == 0


def real(
    owner: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_inf: bool = False,
    hint: str = "",
):
    """Check a real scalar hyperparameter: a Python/NumPy number or a scalar JAX array.

    Concrete values must be finite (unless `allow_inf`) and lie in the given interval.
    Returns the value unchanged.
    """
    where = _where(owner, name)
    bounds = _describe_interval(low, high, low_open, high_open)
    if isinstance(value, (bool, np.bool_)) or isinstance(value, (str, bytes)) or value is None:
        raise TypeError(f"{where} must be a real number{bounds}, got {value!r} ({type(value).__name__}).{hint}")
    if isinstance(value, jax.core.Tracer):
        if value.ndim != 0 or not np.issubdtype(value.dtype, np.number) or np.issubdtype(value.dtype, np.complexfloating):
            raise TypeError(f"{where} must be a real scalar, got a traced array of shape {value.shape}, dtype {value.dtype}.")
        return value
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        if np.ndim(value) != 0 or not np.issubdtype(value.dtype, np.number) or np.issubdtype(value.dtype, np.complexfloating):
            raise TypeError(f"{where} must be a real scalar, got an array of shape {np.shape(value)}, dtype {value.dtype}.")
        number = float(value)
    elif isinstance(value, numbers.Real):
        number = float(value)
    else:
        raise TypeError(f"{where} must be a real number{bounds}, got {value!r} ({type(value).__name__}).{hint}")
    if math.isnan(number) or (math.isinf(number) and not allow_inf):
        raise ValueError(f"{where} must be a finite number{bounds}, got {value!r}.{hint}")
    ok = True
    if low is not None:
        ok &= number > low if low_open else number >= low
    if high is not None:
        ok &= number < high if high_open else number <= high
    if not ok:
        raise ValueError(f"{where} must be a number{bounds}, got {value!r}.{hint}")
    return value


def _describe_interval(low, high, low_open, high_open) -> str:
    if low is None and high is None:
        return ""
    if high is None:
        return f" {'>' if low_open else '>='} {low:g}"
    if low is None:
        return f" {'<' if high_open else '<='} {high:g}"
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    return f" in {left}{low:g}, {high:g}{right}"


def integer(owner: str, name: str, value: Any, *, minimum: int = 1, maximum: int = INT32_MAX) -> int:
    """A Python int in `[minimum, maximum]` (default at most int32's max: loop counters are int32)."""
    where = _where(owner, name)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{where} must be an integer >= {minimum}, got {value!r} ({type(value).__name__}).")
    if not minimum <= int(value) <= maximum:
        raise ValueError(f"{where} must be an integer in [{minimum}, {maximum}], got {value!r}.")
    return int(value)


def function(owner: str, name: str, value: Any, *, what: str = "a function") -> Any:
    if not callable(value):
        raise TypeError(f"{_where(owner, name)} must be {what}, got {value!r} ({type(value).__name__}).")
    return value


def solver(owner: str, name: str, value: Any, *, allow_none: bool = False) -> Any:
    """An fpx fixed-point solver instance (`fpx.Picard()`, `fpx.Anderson()`, ...)."""
    from .solvers import AbstractFixedPointSolver

    if value is None and allow_none:
        return value
    if isinstance(value, type) and issubclass(value, AbstractFixedPointSolver):
        raise TypeError(
            f"{_where(owner, name)} must be a solver instance, got the class {value.__name__}; "
            f"write {value.__name__}() with parentheses."
        )
    if not isinstance(value, AbstractFixedPointSolver):
        example = ""
        if isinstance(value, str):
            example = f" Strings are not accepted: write e.g. fpx.{_solver_name(value)}()."
        raise TypeError(
            f"{_where(owner, name)} must be an fpx solver such as fpx.Picard(), fpx.KM(), "
            f"fpx.Anderson(){' or None' if allow_none else ''}, got {value!r} ({type(value).__name__}).{example}"
        )
    return value


def _solver_name(text: str) -> str:
    names = {"picard": "Picard", "km": "KM", "halpern": "Halpern", "anderson": "Anderson",
             "broyden": "Broyden", "newton_krylov": "NewtonKrylov", "newtonkrylov": "NewtonKrylov"}
    return names.get(text.lower().replace("-", "_"), "Picard")
