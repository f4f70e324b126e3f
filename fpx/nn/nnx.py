"""Deep-equilibrium layer for flax nnx models."""

from __future__ import annotations

from typing import Any

from flax import nnx

from .._fixed_point import fixed_point
from .._solution import RESULTS
from ..adjoint import AbstractAdjoint, ImplicitAdjoint
from ..solvers import AbstractFixedPointSolver, Anderson


class DEQ(nnx.Module):
    """flax nnx deep-equilibrium layer: `z* = cell(z*, x)` with implicit gradients.

    `cell` is an `nnx.Module` called as `cell(z, x)`. Its state is split out
    (`nnx.split`) and passed to `fpx.fixed_point` as `args`, so `nnx.grad` of a loss
    reaches the cell's parameters through the implicit adjoint. Returns `(z*, stats)` as
    `fpx.nn.DEQ` does.

    ```python
    import jax.numpy as jnp
    from flax import nnx
    import fpx

    class Cell(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(4, 4, rngs=rngs)
        def __call__(self, z, x):
            return jnp.tanh(0.5 * self.lin(z) + x)

    deq = fpx.nn.nnx.DEQ(Cell(nnx.Rngs(0)), solver=fpx.Anderson())
    z, stats = deq(jnp.ones(4), z0=jnp.zeros(4))
    grads = nnx.grad(lambda m: m(jnp.ones(4), z0=jnp.zeros(4))[0].sum())(deq)
    ```
    """

    def __init__(
        self,
        cell: nnx.Module,
        *,
        solver: AbstractFixedPointSolver = Anderson(),
        adjoint: AbstractAdjoint = ImplicitAdjoint(),
        max_steps: int = 100,
        throw: bool = False,
    ):
        self.cell = cell
        self.solver = solver
        self.adjoint = adjoint
        self.max_steps = max_steps
        self.throw = throw

    def __call__(self, x, z0=None, backward_probe=None) -> tuple[Any, dict[str, Any]]:
        if z0 is None:
            init_state = getattr(self.cell, "init_state", None)
            if init_state is None:
                raise ValueError(
                    f"DEQ needs a starting state: pass `z0=` or give {type(self.cell).__name__} an "
                    f"`init_state(x)` method."
                )
            z0 = init_state(x)
        graphdef, state = nnx.split(self.cell)

        def fn(z, args):
            state, x = args
            return nnx.merge(graphdef, state)(z, x)

        sol = fixed_point(
            fn, z0, (state, x), solver=self.solver, adjoint=self.adjoint, max_steps=self.max_steps, throw=self.throw,
            backward_probe=backward_probe,
        )
        stats = dict(sol.stats)
        stats["converged"] = sol.result == RESULTS.successful
        return sol.value, stats
