"""`fixed_point`: the one `lax.while_loop` driver every fpx solver runs in."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Bool, Int, PyTree, Scalar

from ._misc import dtype_eps, tree_describe, tree_sub, tree_where
from ._solution import RESULTS, Solution
from .solvers._base import AbstractFixedPointSolver
from .solvers._picard import Picard


class DisplacementTest(eqx.Module):
    """Infeasibility detection for averaged (or nonexpansive, under Halpern) operators.

    If `T` has no fixed point, the iterates of an averaged iteration drift: both
    `z_k - T z_k` and the normalised drift `(z_0 - z_k) / s_k` (`s_k = k` for Picard,
    `alpha k` for KM, `k/2` for Halpern) converge to the infimal displacement vector
    `v`, the minimal-norm element of the closure of the range of `I - T` (Pazy;
    Baillon–Bruck–Reich). The driver stops with `RESULTS.infeasible` when, after at least
    `min_steps` steps,

    - the residual, the drift since `z_0` and the drift over the recent window (the last
      half of the iterations) agree to `rtol` of their norm;
    - their disagreement is no longer growing (on a slowly converging *feasible*
      problem the disagreement grows like `k (1 - rho)`, on an infeasible one it shrinks
      like `1/k`);
    - `|v|` is clearly nonzero: more than `margin` times the stopping tolerance.

    `sol.stats["displacement"]` then holds the recent-window drift `v̂`. A problem
    whose residual changes by less than about `rtol` over `min_steps` iterations cannot
    be told apart from an infeasible one within that window; raise `min_steps` there.
    """

    rtol: float = 1e-2
    min_steps: int = 16
    margin: float = 10.0

    def __check_init__(self):
        if not (isinstance(self.rtol, (int, float)) and 0 < self.rtol < 1):
            raise ValueError(f"`DisplacementTest(rtol=...)` must lie in (0, 1), got {self.rtol!r}.")
        if not isinstance(self.min_steps, int) or self.min_steps < 2:
            raise ValueError(f"`DisplacementTest(min_steps=...)` must be an integer >= 2, got {self.min_steps!r}.")


class _Displacement(eqx.Module):
    z0: PyTree
    z_ref: PyTree
    scale_ref: Scalar
    mismatch_ref: Scalar
    estimate: PyTree


class _Carry(eqx.Module):
    step: Int[Array, ""]
    z: PyTree
    fz: PyTree
    residual: Scalar
    state: Any
    best_z: PyTree
    best_residual: Scalar
    done: Bool[Array, ""]
    result: RESULTS
    trace: Array | None
    displacement: _Displacement | None


def _is_pow2(k):
    return (k > 0) & ((k & (k - 1)) == 0)


def _check_infeasible(test, solver, carry, k, z, fz, diff, residual, tol):
    """One update of the displacement estimates; returns (infeasible, new estimates)."""
    disp = carry.displacement
    scale = solver.drift_scale(carry.state, k)
    dtype = residual.dtype
    scale = jnp.asarray(scale, dtype)
    norm = solver.norm
    drift = jtu.tree_map(lambda a, b: (a - b) / scale, disp.z0, z)
    window = jnp.maximum(scale - disp.scale_ref, jnp.finfo(dtype).tiny)
    recent = jtu.tree_map(lambda a, b: (a - b) / window, disp.z_ref, z)
    safe = jnp.where(residual > 0, residual, 1.0)
    mismatch = norm(tree_sub(diff, drift)) / safe
    mismatch_recent = norm(tree_sub(diff, recent)) / safe
    floor = 100.0 * dtype_eps(diff)
    settled = mismatch <= jnp.maximum(disp.mismatch_ref, floor)
    infeasible = (
        (k >= test.min_steps)
        & (mismatch <= test.rtol)
        & (mismatch_recent <= test.rtol)
        & settled
        & (residual > test.margin * tol)
        & jnp.isfinite(residual)
    )
    # Restart the recent window at every power of two, so it always covers the last half.
    checkpoint = _is_pow2(k)
    new = _Displacement(
        z0=disp.z0,
        z_ref=tree_where(checkpoint, z, disp.z_ref),
        scale_ref=jnp.where(checkpoint, scale, disp.scale_ref),
        mismatch_ref=jnp.where(checkpoint, mismatch, disp.mismatch_ref),
        estimate=recent,
    )
    return infeasible, new


def _iterate(
    fn: Callable,
    z0: PyTree,
    args: Any,
    solver: AbstractFixedPointSolver,
    max_steps: int,
    infeasibility: DisplacementTest | None,
    trace_length: int,
    while_loop: Callable = jax.lax.while_loop,
) -> Solution:
    """The forward iteration, without any differentiation rule.

    `while_loop` is `lax.while_loop`, or equinox's checkpointed loop when the iterations
    themselves are differentiated (`UnrolledAdjoint`).
    """
    norm = solver.norm
    fz0 = fn(z0, args)
    diff0 = tree_sub(z0, fz0)
    r0 = norm(diff0)
    rdtype = r0.dtype
    state0 = solver.init(fn, z0, fz0, args)
    converged0, result0 = solver.terminate(z0, fz0, r0, state0)
    finite0 = jnp.isfinite(r0)
    result0 = RESULTS.where(finite0, RESULTS.where(converged0, result0, RESULTS.successful), RESULTS.nonfinite)
    trace = None
    if trace_length > 0:
        trace = jnp.full((trace_length,), jnp.nan, rdtype).at[0].set(r0)
    displacement = None
    if infeasibility is not None:
        displacement = _Displacement(
            z0=z0,
            z_ref=z0,
            scale_ref=jnp.zeros((), rdtype),
            mismatch_ref=jnp.asarray(jnp.inf, rdtype),
            estimate=jtu.tree_map(jnp.zeros_like, z0),
        )
    carry0 = _Carry(
        step=jnp.array(0, jnp.int32),
        z=z0,
        fz=fz0,
        residual=r0,
        state=state0,
        best_z=z0,
        best_residual=jnp.where(finite0, r0, jnp.asarray(jnp.inf, rdtype)),
        done=converged0 | ~finite0,
        result=result0,
        trace=trace,
        displacement=displacement,
    )

    def cond(c):
        return ~c.done & (c.step < max_steps)

    def body(c):
        z, fz, state = solver.step(fn, c.z, c.fz, args, c.state)
        k = c.step + 1
        diff = tree_sub(z, fz)
        residual = norm(diff).astype(rdtype)
        finite = jnp.isfinite(residual)
        converged, result = solver.terminate(z, fz, residual, state)
        converged = converged & finite
        better = residual < c.best_residual
        done = converged | ~finite
        result = RESULTS.where(converged, result, RESULTS.where(finite, RESULTS.successful, RESULTS.nonfinite))
        displacement = c.displacement
        if infeasibility is not None:
            tol = solver.atol + solver.rtol * norm(z)
            infeasible, displacement = _check_infeasible(
                infeasibility, solver, c, k, z, fz, diff, residual, tol
            )
            infeasible = infeasible & ~done
            done = done | infeasible
            result = RESULTS.where(infeasible, RESULTS.infeasible, result)
        trace = c.trace
        if trace is not None:
            trace = trace.at[k].set(residual, mode="drop")
        return _Carry(
            step=k,
            z=z,
            fz=fz,
            residual=residual,
            state=state,
            best_z=tree_where(better, z, c.best_z),
            best_residual=jnp.where(better, residual, c.best_residual),
            done=done,
            result=result,
            trace=trace,
            displacement=displacement,
        )

    final = while_loop(cond, body, carry0)
    result = RESULTS.where(final.done, final.result, RESULTS.max_steps_reached)
    # On success return the converged iterate itself; otherwise the best one seen.
    value = tree_where(result == RESULTS.successful, final.z, final.best_z)
    residual = jnp.where(result == RESULTS.successful, final.residual, final.best_residual)
    stats: dict[str, Any] = {
        "num_steps": final.step,
        "residual_norm": residual,
    }
    per_step = solver.fn_evals_per_step
    if per_step is not None:
        stats["num_fn_evals"] = 1 + per_step * final.step
    stats.update(solver.stats(final.state))
    if trace is not None:
        stats["residual_trace"] = final.trace
    if infeasibility is not None:
        stats["displacement"] = final.displacement.estimate
    return Solution(value=value, result=result, stats=stats)


def _check_z0(z0) -> PyTree:
    leaves, _ = jtu.tree_flatten(z0)
    if not leaves:
        raise ValueError("`z0` has no array leaves: fixed_point needs at least one floating-point array.")
    out = []
    for path, leaf in jtu.tree_flatten_with_path(z0)[0]:
        arr = leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf)
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            where = jtu.keystr(path) or "z0"
            raise TypeError(
                f"`z0` must contain floating-point arrays only, but the leaf at {where} has dtype "
                f"{arr.dtype}. Fixed points are found by continuous iteration; cast it, e.g. "
                f"`jnp.asarray(z0, jnp.float32)`."
            )
        out.append(arr)
    return jtu.tree_unflatten(jtu.tree_structure(z0), out)


def _check_output(fn, z0, args) -> None:
    in_struct = eqx.filter_eval_shape(lambda: z0)
    try:
        out_struct = eqx.filter_eval_shape(fn, z0, args)
    except Exception as e:
        e.add_note(f"(raised while tracing fn(z0, args) with z0: {tree_describe(in_struct)})")
        raise
    if jtu.tree_structure(in_struct) != jtu.tree_structure(out_struct):
        raise ValueError(
            "fn(z, args) must return a pytree with the same structure as z0.\n"
            f"  z0:             {tree_describe(in_struct)}\n"
            f"  fn(z0, args):   {tree_describe(out_struct)}"
        )
    problems = []
    for (path, a), b in zip(jtu.tree_flatten_with_path(in_struct)[0], jtu.tree_leaves(out_struct)):
        where = jtu.keystr(path) or "z0"
        if a.shape != b.shape:
            problems.append(f"{where}: shape {a.shape} in z0 but {b.shape} in fn's output")
        elif a.dtype != b.dtype:
            problems.append(f"{where}: dtype {a.dtype} in z0 but {b.dtype} in fn's output")
    if problems:
        raise ValueError(
            "fn(z, args) must return arrays with the same shapes and dtypes as z0:\n  "
            + "\n  ".join(problems)
            + f"\n  z0:           {tree_describe(in_struct)}\n  fn(z0, args): {tree_describe(out_struct)}"
            + "\nCast fn's output (e.g. `.astype(z.dtype)`) or start from a z0 of the right shape."
        )


class FixedPointError(RuntimeError):
    """Raised (at run time, also under `jax.jit`) by `fixed_point(..., throw=True)`."""


def _failure_message(result: int, steps: int, residual: float, max_steps: int, solver) -> str:
    name = type(solver).__name__
    head = {
        int(RESULTS.max_steps_reached._value): f"did not converge within max_steps={max_steps}",
        int(RESULTS.nonfinite._value): "hit a non-finite value (NaN or inf)",
        int(RESULTS.infeasible._value): "found that the operator has no fixed point",
        int(RESULTS.breakdown._value): "broke down",
        int(RESULTS.backward_failed._value): "failed in its backward (adjoint) solve",
    }.get(int(result), "failed")
    message = RESULTS._index_to_message[int(result)]
    return (
        f"fpx.fixed_point with {name} {head}: after {steps} steps the best residual "
        f"|z - T(z)| was {residual:.3e} (tolerance atol + rtol*|z| with rtol={solver.rtol}, "
        f"atol={solver.atol}).\n{message}\nPass throw=False to inspect `sol.result` and "
        f"`sol.stats` instead of raising."
    )


def unvmapped_worst(failed, *values):
    """Reduce over every `vmap`ped axis: (any failed, and each value's max over failed members).

    `equinox.internal.unvmap_*` leave the vmapped world, so a host callback built on the
    results runs once per call instead of once per batch member (which under `vmap` of
    a 128-sample batch cost a few times the solve itself).
    """
    import equinox.internal as eqxi

    any_failed = eqxi.unvmap_any(failed)
    worst = []
    for v in jax.lax.stop_gradient(values):
        low = jnp.asarray(-jnp.inf if jnp.issubdtype(v.dtype, jnp.floating) else jnp.iinfo(v.dtype).min, v.dtype)
        worst.append(eqxi.unvmap_max(jnp.where(failed, v, low)))
    return any_failed, worst


def raise_if_failed(sol: Solution, solver, max_steps: int) -> Solution:
    """Attach a run-time check that raises `FixedPointError` if `sol` failed.

    Eagerly the error is a `FixedPointError`; under `jit` JAX re-raises it as a
    `JaxRuntimeError` carrying the same message. Under `vmap` the figures are the worst
    over the failed members (largest result code, steps and residual).
    """

    def check(failed, result, steps, residual):
        if bool(failed):
            raise FixedPointError(_failure_message(int(result), int(steps), float(residual), max_steps, solver))

    failed = sol.result != RESULTS.successful
    any_failed, (result, steps, residual) = unvmapped_worst(
        failed, sol.result._value, sol.stats["num_steps"], sol.stats["residual_norm"]
    )
    jax.debug.callback(check, any_failed, result, steps, residual)
    return sol


def fixed_point(
    fn: Callable[[PyTree, Any], PyTree],
    z0: PyTree,
    args: PyTree = None,
    *,
    solver: AbstractFixedPointSolver = Picard(),
    adjoint=None,
    max_steps: int = 256,
    throw: bool = True,
    detect_infeasible: bool | DisplacementTest = False,
    trace_length: int = 0,
    backward_probe: Array | None = None,
) -> Solution:
    """Find `z` with `z = fn(z, args)`.

    **Arguments:**

    - `fn`: the operator `T`, `fn(z, args) -> z'`, with `z'` of the same pytree structure,
      shapes and dtypes as `z0` (checked at trace time). It may close over traced arrays.
    - `z0`: initial iterate, any pytree of floating-point arrays.
    - `args`: any pytree, passed to `fn`; `fixed_point` is differentiable with respect to
      it (and to arrays `fn` closes over) through `adjoint`. The gradient with respect to
      `z0` is zero (implicit function theorem: `z*` does not depend on where we start).
    - `solver`: an `fpx.AbstractFixedPointSolver` (`Picard()`, `KM()`, `Halpern()`,
      `Anderson()`, `Broyden()`, `NewtonKrylov()`); it carries `rtol`, `atol`, `norm`.
    - `adjoint`: how to differentiate; default `fpx.ImplicitAdjoint()`.
    - `max_steps`: maximum number of solver steps.
    - `throw`: if True, a failed solve raises `FixedPointError` at run time (under `jit`
      wrapped in JAX's runtime error) with the residual reached and what to try; under
      `vmap` one check covers the whole batch. If False, never raises: check
      `sol.result`. Under `vmap` every member reports its own result.
    - `detect_infeasible`: `True` or an `fpx.DisplacementTest` to stop with
      `RESULTS.infeasible` when an averaged operator has no fixed point (see
      `DisplacementTest`); needs a solver with a drift law (Picard, KM, Halpern).
    - `trace_length`: if positive, `sol.stats["residual_trace"]` holds the residual norm of
      iterates `0 .. trace_length-1` (NaN after the last step).
    - `backward_probe`: optional `fpx.backward_probe()`; differentiate with respect to it
      to receive the adjoint solve's `[num_steps, residual_norm, failed]` as its gradient.

    **Returns:** an `fpx.Solution` with `value`, `result` and `stats` (`num_steps`,
    `residual_norm`, `num_fn_evals`, and solver-specific entries).

    ```python
    import jax, jax.numpy as jnp, fpx
    W = 0.5 * jnp.eye(3)
    cell = lambda z, x: jnp.tanh(W @ z + x)
    sol = fpx.fixed_point(cell, jnp.zeros(3), jnp.ones(3), solver=fpx.Anderson())
    assert sol.converged and sol.stats["residual_norm"] < 1e-4
    grad = jax.grad(lambda x: fpx.fixed_point(cell, jnp.zeros(3), x).value.sum())(jnp.ones(3))
    ```
    """
    from .adjoint import AbstractAdjoint, ImplicitAdjoint

    if not isinstance(solver, AbstractFixedPointSolver):
        raise TypeError(
            f"`solver` must be an fpx solver (e.g. fpx.Picard(), fpx.Anderson()), got {type(solver).__name__}."
        )
    if adjoint is None:
        adjoint = ImplicitAdjoint()
    if not isinstance(adjoint, AbstractAdjoint):
        raise TypeError(f"`adjoint` must be an fpx adjoint (e.g. fpx.ImplicitAdjoint()), got {type(adjoint).__name__}.")
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
        raise ValueError(f"`max_steps` must be an integer >= 1, got {max_steps!r}.")
    if isinstance(trace_length, bool) or not isinstance(trace_length, (int, np.integer)) or trace_length < 0:
        raise ValueError(f"`trace_length` must be a non-negative integer, got {trace_length!r}.")
    if detect_infeasible is True:
        detect_infeasible = DisplacementTest()
    elif detect_infeasible is False or detect_infeasible is None:
        detect_infeasible = None
    elif not isinstance(detect_infeasible, DisplacementTest):
        raise TypeError("`detect_infeasible` must be a bool or an fpx.DisplacementTest.")
    if detect_infeasible is not None and solver.drift_scale(None, jnp.array(1)) is None:
        raise ValueError(
            f"detect_infeasible needs a solver whose iterates drift along the displacement "
            f"vector at a known rate (Picard, KM, Halpern without `contraction`); "
            f"{type(solver).__name__} has none (multi-secant and Newton steps extrapolate "
            f"towards a fixed point at infinity instead of drifting)."
        )
    z0 = _check_z0(z0)
    _check_output(fn, z0, args)
    fn = eqx.filter_closure_convert(fn, z0, args)
    sol = adjoint.apply(
        _iterate,
        fn,
        z0,
        args,
        solver=solver,
        max_steps=int(max_steps),
        infeasibility=detect_infeasible,
        trace_length=int(trace_length),
        throw=throw,
        backward_probe=backward_probe,
    )
    if throw:
        sol = raise_if_failed(sol, solver, int(max_steps))
    return sol

