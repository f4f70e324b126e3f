"""Deep-equilibrium layer for flax nnx models."""

from __future__ import annotations

import inspect
from typing import Any

from flax import nnx

from .._fixed_point import fixed_point
from .. import _layers
from ..adjoint import AbstractAdjoint, ImplicitAdjoint
from ..solvers import AbstractFixedPointSolver, Anderson
from . import _deq


class DEQ(nnx.Module):
    """flax nnx deep-equilibrium layer: `z* = cell(z*, x)` with implicit gradients.

    `cell` is an `nnx.Module` called as `cell(z, x)`. Its state is split out
    (`nnx.split`) and passed to `fpx.fixed_point` as `args`, so `nnx.grad` of a loss
    reaches the cell's parameters through the implicit adjoint. Returns `(z*, stats)` as
    `fpx.nn.DEQ` does, and picks the starting state as it does: `z0=`, else
    `cell.init_state(x)`, else zeros of `x`'s shape when the cell maps such a state to one.

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
    z, stats = deq(jnp.ones(4))  # starts from zeros: the state has the shape of x
    grads = nnx.grad(lambda m: m(jnp.ones(4))[0].sum())(deq)
    assert z.shape == (4,) and bool(stats["converged"])
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
        has_aux: bool = False,
    ):
        self.cell = cell
        self.solver = solver
        self.adjoint = adjoint
        self.max_steps = max_steps
        self.throw = throw
        self.has_aux = has_aux

    def __call__(self, x, z0=None, backward_probe=None) -> tuple[Any, dict[str, Any]]:
        graphdef, state = nnx.split(self.cell)

        def fn(z, args):
            state, x = args
            return nnx.merge(graphdef, state)(z, x)

        state_only = (lambda z, x: fn(z, (state, x))[0]) if self.has_aux else (lambda z, x: fn(z, (state, x)))
        z0 = _deq.initial_state(self.cell, x, z0, call=state_only, what="fpx.nn.nnx.DEQ")

        sol = fixed_point(
            fn, z0, (state, x), solver=self.solver, adjoint=self.adjoint, max_steps=self.max_steps, throw=self.throw,
            has_aux=self.has_aux, backward_probe=backward_probe,
        )
        return sol.value, _layers.layer_stats(sol)


# nnx.Module's metaclass defines `__call__(*args, **kwargs)`, which `inspect.signature`
# (and so the API reference) would report for the class instead of `__init__`'s.
DEQ.__signature__ = inspect.signature(DEQ.__init__).replace(
    parameters=list(inspect.signature(DEQ.__init__).parameters.values())[1:]
)
