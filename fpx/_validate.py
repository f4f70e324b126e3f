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
    label: str | None = None,
    context: str = "",
):
    """Check a real scalar hyperparameter: a Python/NumPy number or a scalar JAX array.

    Concrete values must be finite (unless `allow_inf`) and lie in the given interval.
    Returns the value unchanged. `label` replaces the default "`owner(name=...)`";
    `context` follows the offending value in the message.
    """
    where = label or _where(owner, name)
    phrase = _phrase(low, high, low_open, high_open)
    kind = "real number" if phrase.startswith("lie") else phrase.split(" ", 1)[1].removeprefix("a ")
    interval = phrase.removeprefix("lie ") if phrase.startswith("lie") else ""
    if isinstance(value, (bool, np.bool_)) or isinstance(value, (str, bytes)) or value is None:
        raise TypeError(f"{where} must be a {kind}{' ' + interval if interval else ''}, got {value!r} ({type(value).__name__}){context}.{hint}")
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
        raise TypeError(f"{where} must be a {kind}{' ' + interval if interval else ''}, got {value!r} ({type(value).__name__}){context}.{hint}")
    ok = not math.isnan(number) and (allow_inf or not math.isinf(number))
    if low is not None:
        ok &= number > low if low_open else number >= low
    if high is not None:
        ok &= number < high if high_open else number <= high
    if not ok:
        if math.isnan(number) or math.isinf(number):
            phrase = f"{phrase} and be finite"
        raise ValueError(f"{where} must {phrase}, got {value!r}{context}.{hint}")
    return value


def _phrase(low, high, low_open, high_open) -> str:
    if low is None and high is None:
        return "be a number"
    if high is None:
        if low == 0 and not low_open:
            return "be a non-negative number"
        return f"be a number {'>' if low_open else '>='} {low:g}"
    if low is None:
        return f"be a number {'<' if high_open else '<='} {high:g}"
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    return f"lie in {left}{low:g}, {high:g}{right}"


def integer(owner: str, name: str, value: Any, *, minimum: int = 1, maximum: int = INT32_MAX) -> int:
    """A Python int in `[minimum, maximum]` (default at most int32's max: loop counters are int32)."""
    where = _where(owner, name)
    what = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        raise ValueError(f"{where} must be {what}, got {value!r} ({type(value).__name__}).")
    if not minimum <= int(value) <= maximum:
        raise ValueError(f"{where} must be {what} (at most {maximum}), got {value!r}.")
    return int(value)


def float_tree(
    label: str, tree: Any, *, empty: str, kind: str = "floating-point", why: str = "", example: str | None = None
) -> Any:
    """`tree` with every leaf an array of a floating dtype (Python and NumPy numbers converted).

    `label` names the argument as the message shows it (`` `z0` ``, `` `feasible_point(z0=...)` ``);
    `empty` says what is needed when the tree has no leaves; `why` follows the dtype (", ..."
    or ". ..."), `example` is the name in the suggested cast.
    """
    import jax.numpy as jnp
    import jax.tree_util as jtu

    if not jtu.tree_leaves(tree):
        raise ValueError(f"{label} has no array leaves: {empty}")
    name = example or label.strip("`")
    out = []
    for path, leaf in jtu.tree_flatten_with_path(tree)[0]:
        where = jtu.keystr(path) or name
        try:
            arr = leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf)
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"{label} must be a pytree of {kind} arrays, but the leaf at {where} is {leaf!r} "
                f"({type(leaf).__name__}), which is not an array."
            ) from e
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise TypeError(
                f"{label} must contain {kind} arrays only, but the leaf at {where} has dtype {arr.dtype}"
                f"{why}. Cast it, e.g. `jnp.asarray({name}, jnp.float32)`."
            )
        out.append(arr)
    return jtu.tree_unflatten(jtu.tree_structure(tree), out)


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
