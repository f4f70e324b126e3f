"""Deep-equilibrium layer for equinox models."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
from jaxtyping import PyTree

from .._fixed_point import fixed_point
from .._solution import RESULTS
from ..adjoint import AbstractAdjoint, ImplicitAdjoint
from ..solvers import AbstractFixedPointSolver, Anderson


def _call_cell(z, cell_and_x):
    cell, x = cell_and_x
    return cell(z, x)


def initial_state(cell, x, z0):
    """`z0` if given, else `cell.init_state(x)`; a clear error when neither exists."""
    if z0 is not None:
        return z0
    init_state = getattr(cell, "init_state", None)
    if init_state is None:
        raise ValueError(
            f"DEQ needs a starting state: pass `z0=` or give {type(cell).__name__} an `init_state(x)` method."
        )
    return init_state(x)


def layer_stats(sol) -> dict[str, Any]:
    """The solver statistics a DEQ layer returns, plus a per-sample `converged` flag."""
    return {**sol.stats, "converged": sol.result == RESULTS.successful}


class DEQ(eqx.Module):
    """A deep-equilibrium layer: `z* = cell(z*, x)`, differentiated implicitly.

    `cell` is any callable `cell(z, x) -> z` (typically an `eqx.Module`, whose arrays are
    the trainable parameters); `DEQ(cell)(x)` returns `(z*, stats)` where `stats` has
    `num_steps`, `residual_norm`, `num_fn_evals`, `converged` and the solver's own
    entries, one value per sample when vmapped. Vmap the layer over a batch: each sample
    is solved and stopped on its own.

    `z0` (warm start, e.g. the previous step's fixed point) defaults to
    `cell.init_state(x)` when the cell defines it. `backward_probe` (an
    `fpx.backward_probe()` you differentiate with respect to) reports the backward solve.

    ```python
    import jax, jax.numpy as jnp, jax.random as jr, fpx
    cell = fpx.nn.ContractiveCell(jr.PRNGKey(0), state_size=8, input_size=3, gamma=0.9)
    deq = fpx.nn.DEQ(cell, solver=fpx.Anderson(), max_steps=100)
    z, stats = jax.vmap(deq)(jnp.ones((4, 3)))
    assert z.shape == (4, 8) and bool(stats["converged"].all())
    ```
    """

    cell: Callable
    solver: AbstractFixedPointSolver = Anderson()
    adjoint: AbstractAdjoint = ImplicitAdjoint()
    max_steps: int = eqx.field(static=True, default=100)
    throw: bool = eqx.field(static=True, default=False)

    def __call__(self, x: PyTree, z0: PyTree | None = None, backward_probe=None) -> tuple[PyTree, dict[str, Any]]:
        sol = fixed_point(
            _call_cell,
            initial_state(self.cell, x, z0),
            (self.cell, x),
            solver=self.solver,
            adjoint=self.adjoint,
            max_steps=self.max_steps,
            throw=self.throw,
            backward_probe=backward_probe,
        )
        return sol.value, layer_stats(sol)

