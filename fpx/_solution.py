"""Result codes and the `Solution` every fpx solve returns."""

from __future__ import annotations

from typing import Any

import equinox as eqx
from jaxtyping import ArrayLike, PyTree


class RESULTS(eqx.Enumeration):
    """Outcome of a solve, usable inside `jax.jit` (an integer under the hood).

    `sol.result == fpx.RESULTS.successful` is a boolean array (one entry per vmapped
    member); `RESULTS[sol.result]` gives the message.

    ```python
    import jax, jax.numpy as jnp, fpx
    solve = lambda c: fpx.fixed_point(lambda z, c: c * z + 1.0, jnp.zeros(1), c, max_steps=100, throw=False)
    sols = jax.vmap(solve)(jnp.array([0.5, 1.5]))                # a contraction and an expansion
    assert (sols.result == fpx.RESULTS.successful).tolist() == [True, False]
    assert (sols.result == fpx.RESULTS.diverged).tolist() == [False, True]
    print(fpx.RESULTS[solve(1.5).result])                       # the message of one solve's result
    ```
    """

    successful = ""
    max_steps_reached = (
        "The maximum number of steps was reached before the residual fell below the "
        "tolerance. Increase `max_steps`, loosen `rtol`/`atol`, or use an accelerated "
        "solver such as `fpx.Anderson()`."
    )
    nonfinite = (
        "A non-finite value (NaN or inf) appeared in the iterates or in fn(z). The "
        "operator may be expansive (the iteration diverged); try a damped solver such as "
        "`fpx.KM(alpha=0.5)` or `fpx.Anderson()`, or check fn for overflow."
    )
    infeasible = (
        "The operator has no fixed point: the iterates drift along a nonzero displacement "
        "vector (see `sol.stats['displacement']`). For a feasibility problem the sets do "
        "not intersect."
    )
    diverged = (
        "The iteration diverged: the residual |z - T(z)| grew to more than a million times "
        "its starting value, or the iterate drifted away while no iterate improved on the "
        "starting residual (T has no fixed point near the iterates, or is expansive "
        "there). Check fn, start closer to a fixed point, or damp the iteration (e.g. "
        "`fpx.KM(alpha=0.5)`); for a problem that may have no fixed point at all, pass "
        "`detect_infeasible=True` with Picard, KM or Halpern."
    )
    backward_failed = (
        "A linear solve of the implicit derivative (the adjoint u = J^T u + g of reverse mode, "
        "or the tangent of forward mode) did not converge: I - dT/dz is (nearly) singular at "
        "the fixed point or the linear iteration diverged. Use a stronger solver for it (e.g. "
        "`ImplicitAdjoint(solver=fpx.Anderson())` or `ImplicitAdjoint(linear_solver="
        "lineax.GMRES(rtol=1e-6, atol=1e-6))`), raise `ImplicitAdjoint(max_steps=...)`, or make "
        "the operator more contractive."
    )
    breakdown = (
        "The solver broke down: its Newton direction does not reduce the residual (the "
        "linear solve of (I - dT/dz) d = -(z - T(z)) failed, e.g. I - dT/dz is singular "
        "there, or the line search found no decrease). Try another starting point or a "
        "fixed-point solver such as `fpx.Anderson()`."
    )


class Solution(eqx.Module):
    """What `fpx.fixed_point` returns.

    **Attributes:**

    - `value`: the solution, a pytree like `z0`. When the solve did not converge this is
      the iterate with the smallest residual seen, and `result` says why it stopped.
    - `result`: an `fpx.RESULTS` member.
    - `stats`: a dict with at least `num_steps`, `residual_norm` (of `value`) and
      `num_fn_evals`, plus solver-specific entries (e.g. `num_rejected` for Anderson) and
      `residual_trace` / `displacement` when requested.
    - `aux`: with `fixed_point(..., has_aux=True)`, the auxiliary output of `fn` at `value`
      (`fn(value, args)[1]`); otherwise `None`.

    ```python
    import jax.numpy as jnp, fpx
    sol = fpx.fixed_point(lambda z, a: (0.5 * z + a, jnp.sum(z)), jnp.zeros(2), jnp.ones(2), has_aux=True)
    assert isinstance(sol, fpx.Solution) and sol.converged      # converged: result == RESULTS.successful
    assert jnp.allclose(sol.value, 2.0, atol=1e-4) and jnp.allclose(sol.aux, 4.0, atol=1e-3)
    assert sol.stats["num_steps"] > 0 and sol.stats["num_fn_evals"] == sol.stats["num_steps"] + 1
    ```
    """

    value: PyTree[Any]
    result: RESULTS
    stats: dict[str, PyTree[ArrayLike]]
    aux: PyTree[Any] = None

    @property
    def converged(self):
        """Boolean array: `result == RESULTS.successful`."""
        return self.result == RESULTS.successful


class SolveInputs(eqx.Module):
    """Everything one solve needs, handed from `fixed_point` to an adjoint's `apply`.

    `fn(z, args)` is closure-converted and `args` holds only arrays (the static parts of
    the user's `args` are closed over), so every array leaf of `(fn, args)` is something
    the solve may be differentiated with respect to.
    """

    fn: Any
    z0: PyTree[Any]
    args: PyTree[Any]
    solver: Any
    max_steps: int = eqx.field(static=True)
    infeasibility: Any
    trace_length: int = eqx.field(static=True)
    throw: bool = eqx.field(static=True)
    backward_probe: Any = None
