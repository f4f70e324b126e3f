"""Combinators: `iterate` (weight-tied relaxed Picard, the PIGN scheme) and `deq` (solved fixed point)."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree

from .._fixed_point import fixed_point
from .._layers import layer_stats
from .._misc import same_structure, tree_describe
from ..adjoint import AbstractAdjoint, ImplicitAdjoint
from ..solvers import AbstractFixedPointSolver, Anderson
from ._operator import Operator


def _check_operator(op, what: str) -> None:
    if not (callable(getattr(op, "init", None)) and callable(getattr(op, "apply", None))):
        raise TypeError(f"{what} takes an Operator(init, apply), got {type(op).__name__}.")


def _check_state_map(step: Callable, z0: PyTree, what: str, hint: str) -> None:
    """Trace-time check that `step(z)` returns `z0`'s structure, shapes and dtypes."""
    in_struct = jax.eval_shape(lambda: z0)
    try:
        out_struct = jax.eval_shape(step, z0)
    except TypeError as e:
        e.add_note(f"(raised while {what} traced its operator; {hint})")
        raise
    if not same_structure(in_struct, out_struct):
        raise ValueError(
            f"{what} repeats its operator on the state, so the operator's output must have the state's "
            f"shape and dtype:\n  state:           {tree_describe(in_struct)}\n"
            f"  operator output: {tree_describe(out_struct)}\n{hint}"
        )


def _initial_state(init_state, x):
    return jtu.tree_map(jnp.zeros_like, x) if init_state is None else init_state(x)


def iterate(
    op: Operator,
    k: int,
    relax: float = 0.0,
    *,
    injection: bool = False,
    init_state: Callable[[Any], PyTree] | None = None,
    remat: bool = False,
) -> Operator:
    """`k` weight-tied relaxed Picard steps of an operator (the PIGN scheme).

    Two forms, one convention for the block:

    - `injection=False` (default): `op.apply(params, x)` maps `x` to the same shape and
      dtype; `apply(params, x)` runs `x <- relax * x + (1 - relax) * op.apply(params, x)`
      `k` times from `x` and returns the last iterate.
    - `injection=True`: `op` is a *block* `op.apply(params, z, x) -> z` (state `z`,
      injected input `x`, the signature `deq` solves); `apply(params, x)` runs
      `z <- relax * z + (1 - relax) * op.apply(params, z, x)` `k` times from
      `z0 = init_state(x)` (default `zeros_like(x)`) and returns `z_k`. So
      `iterate(block, k, injection=True)` is the unrolled, finite-depth version of
      `deq(block)`, with the same parameters.

    `params` are shared by all steps (`init` is `op.init`). The loop is a
    `lax.fori_loop` with a static trip count (a `scan`), so reverse-mode
    differentiation works; `remat=True` recomputes each step in the backward pass
    instead of storing its activations. The operator's output must have the state's
    shape and dtype (checked at trace time, with both printed).

    ```python
    import jax.numpy as jnp, jax.random as jr
    from fpx.operators import Operator, iterate
    halve = Operator(lambda key: (), lambda p, x: 0.5 * x)
    assert float(iterate(halve, k=3).apply((), jnp.array(8.0))) == 1.0
    assert float(iterate(halve, k=1, relax=0.5).apply((), jnp.array(8.0))) == 6.0
    ```
    """
    _check_operator(op, "iterate()")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"iterate(): `k` (the number of steps) must be a non-negative integer, got {k!r}.")
    if isinstance(relax, numbers.Real) and not 0.0 <= relax < 1.0:
        raise ValueError(
            f"iterate(): `relax` is the weight kept on the old iterate, x <- relax*x + (1-relax)*op(x), "
            f"and must lie in [0, 1), got {relax!r}."
        )
    if init_state is not None and not injection:
        raise ValueError("iterate(): `init_state` is only used with injection=True (without it the state starts at x).")

    if injection:
        hint = (
            "With injection=True the operator is a block `op.apply(params, z, x) -> z` and the state starts at "
            "`init_state(x)` (default zeros_like(x)); pass `init_state=` for a state of another shape."
        )
    else:
        hint = (
            "With injection=False the operator is called as `op.apply(params, x)` and must map x to x's shape and "
            "dtype (for an FNO: in_channels == out_channels). A block `op.apply(params, z, x)` needs injection=True."
        )

    def apply(params: PyTree, x: PyTree) -> PyTree:
        if injection:
            z0 = _initial_state(init_state, x)

            def step(z):
                return op.apply(params, z, x)

        else:
            z0 = x

            def step(z):
                return op.apply(params, z)

        _check_state_map(step, z0, "iterate()", hint)
        if remat:
            step = jax.checkpoint(step)

        def body(_, z):
            fz = step(z)
            if isinstance(relax, numbers.Real) and relax == 0.0:
                return fz
            return jtu.tree_map(lambda a, b: (relax * a + (1.0 - relax) * b).astype(a.dtype), z, fz)

        return jax.lax.fori_loop(0, k, body, z0)

    return Operator(op.init, apply)


def deq(
    op: Operator,
    solver: AbstractFixedPointSolver = Anderson(),
    adjoint: AbstractAdjoint = ImplicitAdjoint(),
    max_steps: int = 100,
    throw: bool = False,
    *,
    init_state: Callable[[Any], PyTree] | None = None,
    return_stats: bool = False,
) -> Operator:
    """The fixed point of a weight-tied block: `apply(params, x) = z*` with `z* = op.apply(params, z*, x)`.

    `op` is a block `op.apply(params, z, x) -> z` (state `z`, injected input `x`), the
    same signature `iterate(op, k, injection=True)` unrolls, so one block gives both the
    equilibrium model and its finite-depth counterpart. The solve is
    `fpx.fixed_point(lambda z, a: op.apply(a[0], z, a[1]), z0, (params, x), solver=...,
    adjoint=..., max_steps=..., throw=...)` from `z0 = init_state(x)` (default
    `zeros_like(x)`); gradients with respect to `params` and `x` come from `adjoint`
    (implicit by default: memory independent of the number of iterations).

    `apply(params, x, z0=None)`: `z0` warm-starts the solve (e.g. with the previous
    fixed point). With `return_stats=True` it returns `(z*, stats)` with the solver
    statistics and a per-sample `converged` flag (as `fpx.nn.DEQ`); otherwise `z*`.
    With `throw=False` (the default, as in `fpx.nn.DEQ`) an unconverged solve returns its
    best iterate without raising: check `stats["converged"]`. Put an encoder in front
    and a decoder behind with `chain(encoder, deq(block), decoder)`.

    ```python
    import jax, jax.numpy as jnp, jax.random as jr, fpx
    from fpx.operators import Operator, deq, iterate
    block = Operator(lambda key: {"w": jnp.full((), 0.5)}, lambda p, z, x: p["w"] * jnp.tanh(z) + x)
    solved, unrolled = deq(block, solver=fpx.Picard(rtol=0.0, atol=1e-12)), iterate(block, 60, injection=True)
    params, x = block.init(jr.PRNGKey(0)), jnp.ones(3)
    assert jnp.allclose(solved.apply(params, x), unrolled.apply(params, x))
    g = jax.grad(lambda p: solved.apply(p, x).sum())(params)
    g_ref = jax.grad(lambda p: unrolled.apply(p, x).sum())(params)
    assert jnp.allclose(g["w"], g_ref["w"])
    ```
    """
    _check_operator(op, "deq()")
    if not isinstance(solver, AbstractFixedPointSolver):
        raise TypeError(f"deq(): `solver` must be an fpx solver such as fpx.Anderson(), got {type(solver).__name__}.")
    if not isinstance(adjoint, AbstractAdjoint):
        raise TypeError(f"deq(): `adjoint` must be an fpx adjoint such as fpx.ImplicitAdjoint(), got {type(adjoint).__name__}.")
    hint = (
        "deq() calls its block as `op.apply(params, z, x) -> z` from z0 = init_state(x) (default zeros_like(x)); "
        "pass `init_state=` for a state of another shape. To solve a one-input operator `f(params, x)` as "
        "z = f(z) + x, wrap it: `Operator(f.init, lambda p, z, x: f.apply(p, z) + x)`."
    )

    def fn(z, args):
        params, x = args
        return op.apply(params, z, x)

    def apply(params: PyTree, x: PyTree, z0: PyTree | None = None):
        if z0 is None:
            z0 = _initial_state(init_state, x)
        _check_state_map(lambda z: fn(z, (params, x)), z0, "deq()", hint)
        sol = fixed_point(fn, z0, (params, x), solver=solver, adjoint=adjoint, max_steps=max_steps, throw=throw)
        return (sol.value, layer_stats(sol)) if return_stats else sol.value

    return Operator(op.init, apply)
