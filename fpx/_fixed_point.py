"""`fixed_point`: the one `lax.while_loop` driver every fpx solver runs in."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Bool, Int, PyTree, Scalar

from . import _validate as checks
from ._errors import FixedPointError as FixedPointError, raise_if_failed
from ._misc import dtype_eps, residual_norm, tree_describe, tree_sub, tree_where
from ._solution import RESULTS, Solution, SolveInputs
from .adjoint import AbstractAdjoint, ImplicitAdjoint
from .solvers import AbstractFixedPointSolver, Picard


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

    ```python
    import jax.numpy as jnp, fpx
    shift = lambda z, _: z + jnp.array([1.0, 0.0])          # T z = z + (1, 0) has no fixed point
    sol = fpx.fixed_point(shift, jnp.zeros(2), solver=fpx.Picard(), throw=False,
                          detect_infeasible=fpx.DisplacementTest(min_steps=16))
    assert sol.result == fpx.RESULTS.infeasible
    assert jnp.allclose(sol.stats["displacement"], jnp.array([-1.0, 0.0]), atol=1e-2)
    ```
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
    r0: Scalar
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


# A residual this many times its starting value means the iteration is running away.
DIVERGENCE_GROWTH = 1e6
# Success after step 0 needs the residual to have fallen to this fraction of its starting
# value: a relative test `rtol * |z|` is otherwise met by iterates that drift off to
# infinity with a constant residual (`T(z) = z + 1`).
PROGRESS_FRACTION = 0.5


def _iterate(inputs: SolveInputs, while_loop: Callable = jax.lax.while_loop) -> Solution:
    """The forward iteration, without any differentiation rule.

    `while_loop` is `lax.while_loop`, or equinox's checkpointed loop when the iterations
    themselves are differentiated (`UnrolledAdjoint`). With `lax.while_loop` the solve has
    its own batching rule (see `_iterate_batched`).
    """
    if while_loop is not jax.lax.while_loop:
        return _Driver(inputs).run(while_loop)
    # Every adjoint but `UnrolledAdjoint` (the checkpointed loop above) differentiates the
    # solve by a rule of its own, never through this loop, and `custom_vmap` has no
    # reverse-mode rule: what reaches here is cut from differentiation.
    # The batching rule below must see every array the solve depends on as an input:
    # arrays `fn` closes over (the adjoint's linear solves build such closures) become
    # constants of its closure-converted form.
    inputs = dataclasses.replace(inputs, fn=eqx.filter_closure_convert(inputs.fn, inputs.z0, inputs.args))
    dynamic, static = eqx.partition(inputs, eqx.is_array)
    dynamic = jax.lax.stop_gradient(dynamic)

    @jax.custom_batching.custom_vmap
    def solve(dynamic):
        return _Driver(eqx.combine(dynamic, static)).run(jax.lax.while_loop)

    @solve.def_vmap
    def solve_batched(axis_size, in_batched, dynamic):
        (in_batched,) = in_batched
        sol = _iterate_batched(dynamic, static, in_batched)
        return sol, jtu.tree_map(lambda _: True, sol)

    if not any(isinstance(leaf, jax.core.Tracer) for leaf in jtu.tree_leaves(dynamic)):
        # Called eagerly, `custom_vmap` would evaluate its jaxpr one primitive at a time,
        # compiling each; one compiled call instead.
        return jax.jit(solve)(dynamic)
    return solve(dynamic)


def _iterate_batched(dynamic, static, in_batched) -> Solution:
    """The solves of a `vmap`ped batch in one loop, masking only what a finished member must keep.

    JAX's batching rule for a `while_loop` with a per-member stopping test keeps every
    finished member where it stopped by selecting the *whole* loop state each step: the
    iterate, `fn(iterate)` and a solver's memory (Anderson's 2m+2 vectors) are all read
    twice and rewritten. Here a finished member keeps stepping instead, harmlessly, and only
    what the solution is read from is frozen: the step count, the result, the best iterate
    (which holds the converged iterate itself on success), the residual trace, the
    infeasibility estimates and the solver's counters and scalars (`_frozen_leaves`).
    The members' results are identical to solving them one by one.
    """
    leaves, treedef = jtu.tree_flatten(dynamic)
    axes = [0 if batched else None for batched in jtu.tree_leaves(in_batched)]

    def per_member(method):
        def run(leaves, *carry):
            return getattr(_Driver(eqx.combine(jtu.tree_unflatten(treedef, leaves), static)), method)(*carry)

        return lambda *carry: jax.vmap(run, in_axes=(axes,) + (0,) * len(carry))(leaves, *carry)

    carry0 = per_member("start")()
    frozen = _frozen_leaves(carry0, free_running=type(static.solver).vmap_free_running)
    max_steps = static.max_steps

    def active(c):
        return ~c.done & (c.step < max_steps)

    def body(c):
        new = per_member("advance")(c)
        keep = active(c)

        def merge(freeze, n, o):
            if not freeze:
                return n
            return jnp.where(jnp.reshape(keep, keep.shape + (1,) * (n.ndim - 1)), n, o)

        return jtu.tree_map(merge, frozen, new, c)

    final = jax.lax.while_loop(lambda c: jnp.any(active(c)), body, carry0)
    return per_member("finish")(final)


def _frozen_leaves(carry: _Carry, free_running: bool) -> _Carry:
    """Which leaves of the batched loop state a finished member must not change (True).

    Free-running: the iterate, `fn(iterate)` and the solver state's floating-point arrays
    with at least as many entries per member as `z` (its vector memory). Everything else
    (counters, flags, scalars, small matrices such as a Gram matrix) is frozen, so
    `solver.stats(state)` reports the member's own solve. Without `free_running` (the
    solver's `vmap_free_running`) everything is frozen, as JAX's own rule does.
    """
    if not free_running:
        return jtu.tree_map(lambda _: True, carry)
    size = sum(int(np.prod(leaf.shape[1:])) for leaf in jtu.tree_leaves(carry.z))

    def state_leaf(leaf):
        per_member = int(np.prod(leaf.shape[1:]))
        return not (jnp.issubdtype(leaf.dtype, jnp.inexact) and leaf.ndim > 1 and per_member >= size)

    fields = {f.name: jtu.tree_map(lambda _: True, getattr(carry, f.name)) for f in dataclasses.fields(carry)}
    fields["z"] = jtu.tree_map(lambda _: False, carry.z)
    fields["fz"] = jtu.tree_map(lambda _: False, carry.fz)
    fields["state"] = jtu.tree_map(state_leaf, carry.state)
    return _Carry(**fields)


class _Driver:
    """One member's solve in three parts (`start`, `advance` one step, `finish`), so that
    `_iterate` can run them in one `while_loop` and `_iterate_batched` under its own masks."""

    def __init__(self, inputs: SolveInputs):
        self.inputs = inputs
        self.fn, self.args, self.solver = inputs.fn, inputs.args, inputs.solver
        self.norm = self.solver.norm

    def run(self, while_loop) -> Solution:
        max_steps = self.inputs.max_steps
        final = while_loop(lambda c: ~c.done & (c.step < max_steps), self.advance, self.start())
        return self.finish(final)

    def start(self) -> _Carry:
        fn, args, solver, norm, inputs = self.fn, self.args, self.solver, self.norm, self.inputs
        z0 = inputs.z0
        fz0 = fn(z0, args)
        r0 = jnp.asarray(residual_norm(norm, z0, fz0))
        rdtype = r0.dtype
        state0 = solver.init(fn, z0, fz0, args)
        converged0, result0 = solver.terminate(z0, fz0, r0, state0)
        finite0 = jnp.isfinite(r0)
        result0 = RESULTS.where(finite0, RESULTS.where(converged0, result0, RESULTS.successful), RESULTS.nonfinite)
        trace = None
        if inputs.trace_length > 0:
            # NaN marks "no such step"; under jax_debug_nans (which would trip on it) inf does.
            pad = jnp.inf if jax.config.jax_debug_nans else jnp.nan
            trace = jnp.full((inputs.trace_length,), pad, rdtype).at[0].set(r0)
        displacement = None
        if inputs.infeasibility is not None:
            displacement = _Displacement(
                z0=z0,
                z_ref=z0,
                scale_ref=jnp.zeros((), rdtype),
                mismatch_ref=jnp.asarray(jnp.inf, rdtype),
                estimate=jtu.tree_map(jnp.zeros_like, z0),
            )
        return _Carry(
            step=jnp.array(0, jnp.int32),
            z=z0,
            fz=fz0,
            residual=r0,
            r0=r0,
            state=state0,
            best_z=z0,
            best_residual=jnp.where(finite0, r0, jnp.asarray(jnp.inf, rdtype)),
            done=converged0 | ~finite0,
            result=result0,
            trace=trace,
            displacement=displacement,
        )

    def advance(self, c: _Carry) -> _Carry:
        fn, args, solver, norm = self.fn, self.args, self.solver, self.norm
        infeasibility, r0 = self.inputs.infeasibility, c.r0
        z, fz, state = solver.step(fn, c.z, c.fz, args, c.state)
        k = c.step + 1
        residual = jnp.asarray(residual_norm(norm, z, fz)).astype(r0.dtype)
        finite = jnp.isfinite(residual)
        stop, result = solver.terminate(z, fz, residual, state)
        claims_success = stop & (result == RESULTS.successful)
        # A solver may also stop with a failure of its own (e.g. Newton–Krylov's breakdown).
        solver_failed = stop & ~claims_success & finite
        converged = claims_success & finite & (residual <= PROGRESS_FRACTION * r0)
        diverged = finite & ~converged & ~solver_failed & (residual > DIVERGENCE_GROWTH * r0)
        # The converged iterate is returned as it is, even if an earlier one had a smaller
        # residual (possible with a relative tolerance), so it always becomes the "best".
        better = finite & ((residual < c.best_residual) | converged)
        done = converged | solver_failed | diverged | ~finite
        result = RESULTS.where(
            converged,
            RESULTS.successful,
            RESULTS.where(
                solver_failed,
                result,
                RESULTS.where(diverged, RESULTS.diverged, RESULTS.where(finite, RESULTS.successful, RESULTS.nonfinite)),
            ),
        )
        displacement = c.displacement
        if infeasibility is not None:
            tol = solver.atol + solver.rtol * norm(z)
            infeasible, displacement = _check_infeasible(
                infeasibility, solver, c, k, z, fz, tree_sub(z, fz), residual, tol
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
            r0=r0,
            state=state,
            best_z=tree_where(better, z, c.best_z),
            best_residual=jnp.where(better, residual, c.best_residual),
            done=done,
            result=result,
            trace=trace,
            displacement=displacement,
        )

    def finish(self, final: _Carry) -> Solution:
        solver, norm, r0 = self.solver, self.norm, final.r0
        result = RESULTS.where(final.done, final.result, RESULTS.max_steps_reached)
        # Out of steps with no iterate better than z0, while the iterate moved away at a rate
        # comparable to the residual: the signature of a map without a fixed point, such as
        # z + 1. (A slowly converging contraction also moves at that rate, but its residual
        # falls, however slowly; a cycling map, such as a rotation, stays bounded.) Only a
        # member that ran every step reads `final.z`, which is its last iterate.
        drift = norm(tree_sub(final.z, self.inputs.z0))
        drifted = (
            (not solver.map_has_fixed_point)
            & (final.step >= 16)
            & (final.best_residual >= r0)
            & (drift >= 0.25 * final.step.astype(r0.dtype) * r0)
        )
        result = RESULTS.where((result == RESULTS.max_steps_reached) & drifted, RESULTS.diverged, result)
        # On success the best iterate is the converged one; otherwise the best one seen.
        stats: dict[str, Any] = {
            "num_steps": final.step,
            "residual_norm": final.best_residual,
        }
        per_step = solver.fn_evals_per_step
        if per_step is not None:
            stats["num_fn_evals"] = 1 + per_step * final.step
        stats.update(solver.stats(final.state))
        if final.trace is not None:
            stats["residual_trace"] = final.trace
        if final.displacement is not None:
            stats["displacement"] = final.displacement.estimate
        return Solution(value=final.best_z, result=result, stats=stats)


def _check_output(fn, z0, args, has_aux: bool) -> None:
    in_struct = eqx.filter_eval_shape(lambda: z0)
    try:
        out_struct = eqx.filter_eval_shape(fn, z0, args)
    except Exception as e:
        e.add_note(f"(raised while tracing fn(z0, args) with z0: {tree_describe(in_struct)})")
        raise
    if has_aux:
        if not (isinstance(out_struct, tuple) and len(out_struct) == 2):
            raise ValueError(
                "With has_aux=True, fn(z, args) must return a pair (z_next, aux); got "
                f"{type(out_struct).__name__}{'' if not isinstance(out_struct, tuple) else f' of length {len(out_struct)}'}."
            )
        out_struct = out_struct[0]
    if jtu.tree_structure(in_struct) != jtu.tree_structure(out_struct):
        raise ValueError(
            "fn(z, args) must return a pytree with the same structure as z0"
            + (" (pass has_aux=True if fn returns (z, aux))" if not has_aux else "")
            + ".\n"
            f"  z0:             {tree_describe(in_struct)}\n"
            f"  fn(z0, args):   {tree_describe(out_struct)}"
        )
    for path, leaf in jtu.tree_flatten_with_path(out_struct)[0]:
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            where = jtu.keystr(path) or "the output"
            raise TypeError(
                f"fn(z, args) must return JAX arrays shaped like z0, but {where} is {leaf!r} "
                f"({type(leaf).__name__}). Return `jnp.asarray(...)` of z's dtype"
                f"{' (with has_aux=True, return a pair (z_next, aux))' if not has_aux else ''}."
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


def _warn_below_resolution(solver, z0) -> None:
    """A relative tolerance finer than the dtype can resolve is met only by rounding luck."""
    rtol = solver.rtol
    if isinstance(rtol, jax.core.Tracer) or not np.ndim(rtol) == 0:
        return
    eps = dtype_eps(z0)
    if 0 < float(rtol) < eps:
        dtype = jnp.result_type(*jtu.tree_leaves(z0))
        warnings.warn(
            f"{type(solver).__name__}(rtol={float(rtol):g}) is below the resolution of {dtype} "
            f"(machine epsilon {eps:.2g}): |z - T(z)| cannot be resolved below about "
            f"{eps:.2g} * |z|, so success means only that the iterate stopped changing in "
            f"{dtype}. Use rtol >= {eps:.2g} (e.g. {10 * eps:.2g}) or a wider dtype.",
            stacklevel=3,
        )


def fixed_point(
    fn: Callable[[PyTree, Any], PyTree],
    z0: PyTree,
    args: PyTree = None,
    *,
    solver: AbstractFixedPointSolver = Picard(),
    adjoint: AbstractAdjoint = ImplicitAdjoint(),
    max_steps: int = 256,
    throw: bool = True,
    has_aux: bool = False,
    detect_infeasible: bool | DisplacementTest = False,
    trace_length: int = 0,
    backward_probe: Array | None = None,
) -> Solution:
    """Find `z` with `z = fn(z, args)`.

    **Arguments:**

    - `fn`: the operator `T`, `fn(z, args) -> z'`, with `z'` of the same pytree structure,
      shapes and dtypes as `z0` (checked at trace time). It may close over traced arrays.
      With `has_aux=True`, `fn(z, args) -> (z', aux)`.
    - `z0`: initial iterate, any pytree of floating-point arrays.
    - `args`: any pytree, passed to `fn`: arrays, Python scalars, `None`, static objects.
      `fixed_point` is differentiable with respect to its arrays (and to arrays `fn`
      closes over) through `adjoint`, in reverse and (with `ImplicitAdjoint`) forward mode.
      The gradient with respect to `z0` is zero (implicit function theorem: `z*` does not
      depend on where we start).
    - `solver`: an `fpx.AbstractFixedPointSolver` (`Picard()`, `KM()`, `Halpern()`,
      `Anderson()`, `Broyden()`, `NewtonKrylov()`, `SQUAREM()`); it carries `rtol`,
      `atol`, `norm`.
    - `adjoint`: how to differentiate; default `fpx.ImplicitAdjoint()`; also
      `JFBAdjoint`, `PhantomAdjoint`, `UnrolledAdjoint`, `ReversibleAdjoint`.
    - `max_steps`: maximum number of solver steps.
    - `throw`: if True, a failed solve raises `FixedPointError` at run time (under `jit`
      wrapped in JAX's runtime error) with the residual reached and what to try; under
      `vmap` one check covers the whole batch. If False, never raises: check
      `sol.result`. Under `vmap` every member reports its own result.
    - `has_aux`: if True, `fn` returns `(z', aux)` and `sol.aux` is the `aux` of the
      returned iterate (`fn(sol.value, args)[1]`, one extra evaluation of `fn`).
    - `detect_infeasible`: `True` or an `fpx.DisplacementTest` to stop with
      `RESULTS.infeasible` when an averaged operator has no fixed point (see
      `DisplacementTest`); needs a solver with a drift law (Picard, KM, Halpern, also
      restarted).
    - `trace_length`: if positive, `sol.stats["residual_trace"]` holds the residual norm of
      iterates `0 .. trace_length-1` (NaN after the last step; inf under `jax_debug_nans`).
    - `backward_probe`: optional `fpx.backward_probe()`; differentiate with respect to it
      to receive the adjoint solve's `[num_steps, residual_norm, failed]` as its gradient.

    **Success means solved.** `sol.result` is `RESULTS.successful` only at an iterate with
    `norm(z - fn(z)) <= atol + rtol * norm(z)` (norms computed without overflow) whose
    residual has also fallen to at most half of the starting residual (or at `z0` itself).
    A residual that grows a millionfold ends the solve as `RESULTS.diverged`; so does
    running out of steps without any iterate improving on the residual of `z0` while the
    iterate drifts away (a map without a fixed point, such as `z + 1`). Non-finite values end it as
    `RESULTS.nonfinite`.

    **Under `jax.vmap`** one loop serves the whole batch and runs until its slowest member
    stops; each member still stops on its own test and reports its own `value`, `result`
    and `stats`, exactly as if solved alone. Finished members keep stepping unmasked (their
    answer is already stored), which spares the loop a masked rewrite of its whole state
    every step.

    **Returns:** an `fpx.Solution` with `value`, `result`, `stats` (`num_steps`,
    `residual_norm`, `num_fn_evals`, and solver-specific entries) and `aux`.

    ```python
    import jax, jax.numpy as jnp, fpx
    W = 0.5 * jnp.eye(3)
    cell = lambda z, x: jnp.tanh(W @ z + x)
    sol = fpx.fixed_point(cell, jnp.zeros(3), jnp.ones(3), solver=fpx.Anderson())
    assert sol.converged and sol.stats["residual_norm"] < 1e-4
    grad = jax.grad(lambda x: fpx.fixed_point(cell, jnp.zeros(3), x).value.sum())(jnp.ones(3))
    tangent = jax.jvp(lambda x: fpx.fixed_point(cell, jnp.zeros(3), x).value, (jnp.ones(3),), (jnp.ones(3),))[1]
    assert jnp.allclose(tangent.sum(), grad.sum(), rtol=1e-3)
    ```
    """
    checks.function("", "fn", fn, what="a function fn(z, args) -> z")
    checks.solver("", "solver", solver)
    if not isinstance(adjoint, AbstractAdjoint):
        raise TypeError(
            f"`adjoint` must be an fpx adjoint (e.g. fpx.ImplicitAdjoint(), fpx.JFBAdjoint()), got {adjoint!r}."
        )
    max_steps = checks.integer("", "max_steps", max_steps, minimum=1)
    trace_length = checks.integer("", "trace_length", trace_length, minimum=0)
    if not isinstance(throw, (bool, np.bool_)):
        raise TypeError(f"`throw` must be True or False, got {throw!r}.")
    if not isinstance(has_aux, (bool, np.bool_)):
        raise TypeError(f"`has_aux` must be True or False, got {has_aux!r}.")
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
    z0 = checks.float_tree(
        "`z0`", z0, empty="fixed_point needs at least one floating-point array.",
        why=": fixed points are found by continuous iteration",
    )
    _check_output(fn, z0, args, bool(has_aux))
    _warn_below_resolution(solver, z0)
    # Only the arrays of `args` travel through the solve (and its differentiation rule);
    # Python scalars, None and other static leaves are closed over.
    dynamic_args, static_args = eqx.partition(args, eqx.is_array)

    def fn_dynamic(z, dynamic):
        out = fn(z, eqx.combine(dynamic, static_args))
        return out[0] if has_aux else out

    converted = eqx.filter_closure_convert(fn_dynamic, z0, dynamic_args)
    inputs = SolveInputs(
        fn=converted,
        z0=z0,
        args=dynamic_args,
        solver=solver,
        max_steps=max_steps,
        infeasibility=detect_infeasible,
        trace_length=trace_length,
        throw=bool(throw),
        backward_probe=backward_probe,
    )
    sol = adjoint.apply(_iterate, inputs)
    if has_aux:
        sol = dataclasses.replace(sol, aux=fn(sol.value, args)[1])
    if throw:
        sol = raise_if_failed(sol, solver, max_steps)
    return sol
