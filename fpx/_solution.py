"""Result codes and the `Solution` every fpx solve returns."""

from __future__ import annotations

from typing import Any

import equinox as eqx
from jaxtyping import ArrayLike, PyTree


class RESULTS(eqx.Enumeration):
    """Outcome of a solve, usable inside `jax.jit` (an integer under the hood).

    `sol.result == fpx.RESULTS.successful` is a boolean array (one entry per vmapped
    member); `RESULTS[sol.result]` gives the message.
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
    backward_failed = (
        "The backward (adjoint) solve of the implicit gradient did not converge: "
        "I - dT/dz is (nearly) singular or the adjoint iteration diverged. Use a "
        "stronger adjoint solver (e.g. `ImplicitAdjoint(linear_solver=lineax.GMRES(...))`) "
        "or make the operator more contractive."
    )
    gap_not_closed = (
        "The iteration passed the fixed-point test, but its point is not within tolerance of "
        "every set (see `sol.stats['gap']`) and no verified certificate of infeasibility was "
        "found: the iterates may have run off (an accelerated solver on an infeasible "
        "problem). Use a drifting solver (Picard, KM, Halpern) with infeasibility detection."
    )
    breakdown = (
        "The solver broke down (a quasi-Newton or Krylov update became singular) and "
        "could not continue from its best iterate."
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
    """

    value: PyTree[Any]
    result: RESULTS
    stats: dict[str, PyTree[ArrayLike]]

    @property
    def converged(self):
        """Boolean array: `result == RESULTS.successful`."""
        return self.result == RESULTS.successful
