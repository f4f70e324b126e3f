"""Deep-equilibrium layer for equinox models."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree

from .._fixed_point import fixed_point
from .._layers import layer_stats as layer_stats
from .._misc import same_structure, tree_describe
from ..adjoint import AbstractAdjoint, ImplicitAdjoint
from ..solvers import AbstractFixedPointSolver, Anderson
from ._cells import CellShapeError


def _call_cell(z, cell_and_x):
    cell, x = cell_and_x
    return cell(z, x)


def _describe(tree) -> str:
    return tree_describe(jax.eval_shape(lambda: tree))


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0].rstrip('.') if text else ''}"


def _zero_state(call: Callable, x: PyTree):
    """`(zeros_like(x), None)` if `call(zeros_like(x), x)` has `x`'s structure, shapes and dtypes, else `(None, why)`."""
    try:
        zeros = jtu.tree_map(jnp.zeros_like, x)
        out = jax.eval_shape(call, zeros, x)
    except Exception as e:  # any failure only means: no zero state of x's shape
        return None, f"`cell(zeros_like(x), x)` raised {_first_line(e)}"
    if same_structure(out, jax.eval_shape(lambda: zeros)):
        return zeros, None
    return None, f"`cell(zeros_like(x), x)` returns {tree_describe(out)}"


def initial_state(cell, x, z0, call: Callable | None = None, what: str = "fpx.nn.DEQ"):
    """The starting state of a DEQ solve, checked against the cell before solving.

    `z0` if given, else `cell.init_state(x)` if the cell defines it, else a zero state of
    `x`'s shape when `jax.eval_shape` shows that `cell(zeros_like(x), x)` has the
    structure, shapes and dtypes of `x`; otherwise a `ValueError` asking for `z0=`. The
    cell (`call(z, x)`, default `cell`) is traced once on the chosen state (shapes only), so
    a state or input of the wrong shape is an error naming both shapes and the expected
    state, instead of one from inside the cell's matrix products.
    """
    call = cell if call is None else call
    name = type(cell).__name__
    init_state = getattr(cell, "init_state", None)
    if z0 is None and init_state is None:
        zeros, why = _zero_state(call, x)
        if zeros is None:
            raise ValueError(
                f"{what} needs a starting state: pass `z0=` or give {name} an `init_state(x)` method. "
                f"A zero state shaped like the input x: {_describe(x)} does not fit: {why}."
            )
        return zeros
    source = "`z0`" if z0 is not None else f"{name}.init_state(x)"
    if z0 is None:
        z0 = init_state(x)
    state = jax.eval_shape(lambda: z0)
    try:
        out = jax.eval_shape(call, z0, x)
    except CellShapeError:
        raise  # the cell's own message names the shapes it expects
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"{what}: {name}(z, x) cannot be evaluated on the state {source}: {tree_describe(state)} and the "
            f"input x: {_describe(x)}:\n  {_first_line(e)}.\n{_expected_state(cell, call, x, z0 is not None)}"
        ) from e
    if not same_structure(out, state):
        raise ValueError(
            f"{what}: {name}(z, x) must return the state's structure, shapes and dtypes (a fixed point "
            f"z = cell(z, x)), but for the state {source}: {tree_describe(state)} and the input "
            f"x: {_describe(x)} it returns {tree_describe(out)}.\n{_expected_state(cell, call, x, z0 is not None)}"
        )
    return z0


def _expected_state(cell, call, x, given: bool) -> str:
    """What state the cell does accept, for the error messages."""
    init_state = getattr(cell, "init_state", None)
    if given and init_state is not None:
        try:
            return f"The state the cell starts from, {type(cell).__name__}.init_state(x), is {_describe(init_state(x))}."
        except Exception:
            pass
    zeros, _ = _zero_state(call, x)
    if zeros is not None:
        return f"A state of x's shape, {_describe(zeros)}, fits: pass `z0=` of that shape, or none (zeros)."
    return "Check the shapes of the input x (and of `z0`) against the cell's parameters."


class DEQ(eqx.Module):
    """A deep-equilibrium layer: `z* = cell(z*, x)`, differentiated implicitly.

    `cell` is any callable `cell(z, x) -> z` (typically an `eqx.Module`, whose arrays are
    the trainable parameters); `DEQ(cell)(x)` returns `(z*, stats)` where `stats` has
    `num_steps`, `residual_norm`, `num_fn_evals`, `converged` and the solver's own
    entries, one value per sample when vmapped. Vmap the layer over a batch: each sample
    is solved and stopped on its own.

    `z0` (warm start, e.g. the previous step's fixed point) defaults to
    `cell.init_state(x)` when the cell defines it, else to `zeros_like(x)` when the cell
    maps such a state to one of the same structure, shapes and dtypes (checked with
    `jax.eval_shape`, e.g. `tanh(W z + x)`); otherwise pass `z0=`. The cell is traced on
    the starting state before the solve, so a `z0` or an `x` of the wrong shape is a
    `ValueError` that names the shapes. `backward_probe` (an `fpx.backward_probe()` you
    differentiate with respect to) reports the backward solve. With `has_aux=True` the
    cell returns `(z, aux)` and `stats["aux"]` is the aux at the fixed point.

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
    has_aux: bool = eqx.field(static=True, default=False)

    def __call__(self, x: PyTree, z0: PyTree | None = None, backward_probe=None) -> tuple[PyTree, dict[str, Any]]:
        call = (lambda z, x: self.cell(z, x)[0]) if self.has_aux else None
        sol = fixed_point(
            _call_cell,
            initial_state(self.cell, x, z0, call=call),
            (self.cell, x),
            solver=self.solver,
            adjoint=self.adjoint,
            max_steps=self.max_steps,
            throw=self.throw,
            has_aux=self.has_aux,
            backward_probe=backward_probe,
        )
        return sol.value, layer_stats(sol)

