"""How `fixed_point` is differentiated: implicit (custom_vjp) adjoints."""

from __future__ import annotations

import abc
import functools as ft
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx

from ._misc import tree_add, tree_sub, two_norm
from ._solution import RESULTS, Solution
from .solvers._anderson import Anderson
from .solvers._base import AbstractFixedPointSolver
from .solvers._newton_krylov import NewtonKrylov


class AbstractAdjoint(eqx.Module):
    """Base class: `apply` runs the forward iteration and attaches a differentiation rule."""

    @abc.abstractmethod
    def apply(
        self,
        forward: Callable[..., Solution],
        fn,
        z0,
        args,
        *,
        solver: AbstractFixedPointSolver,
        max_steps: int,
        infeasibility,
        trace_length: int,
        throw: bool,
        backward_probe=None,
    ) -> Solution: ...


class ImplicitAdjoint(AbstractAdjoint):
    """Implicit-function-theorem gradients through `jax.custom_vjp`.

    At the fixed point `z* = T(z*, θ)`, the cotangent `ḡ` of `z*` is pulled back by solving
    the adjoint fixed point `u = (∂T/∂z)^T u + ḡ` (matrix-free: one vjp of `T` per step, the
    Jacobian is never formed) and returning `(∂T/∂θ)^T u`. Memory does not grow with the
    number of forward iterations.

    **Arguments:**

    - `solver`: fpx solver for the adjoint fixed point; default: the forward solver
      (Anderson for a `NewtonKrylov` forward, since the adjoint problem is linear).
    - `linear_solver`: a lineax solver (e.g. `lineax.GMRES(rtol, atol)`) for
      `(I - ∂T/∂z^T) u = ḡ` instead; overrides `solver`.
    - `max_steps`: step budget of the adjoint solve; default: the forward `max_steps`.

    A failed adjoint solve raises with `throw=True`; with `throw=False` the gradient is
    NaN (never a silent zero or an unconverged vector).

    ```python
    import jax, jax.numpy as jnp, fpx
    f = lambda a: fpx.fixed_point(lambda z, a: 0.5 * jnp.sin(z) + a, jnp.zeros(2), a,
                                  adjoint=fpx.ImplicitAdjoint(solver=fpx.Anderson())).value.sum()
    g = jax.grad(f)(jnp.ones(2))
    ```
    """

    solver: AbstractFixedPointSolver | None = None
    linear_solver: lx.AbstractLinearSolver | None = None
    max_steps: int | None = None

    def backward_solver(self, forward_solver: AbstractFixedPointSolver) -> AbstractFixedPointSolver:
        if self.solver is not None:
            return self.solver
        if isinstance(forward_solver, NewtonKrylov):
            return Anderson(rtol=forward_solver.rtol, atol=forward_solver.atol, norm=forward_solver.norm)
        return forward_solver

    def apply(self, forward, fn, z0, args, *, solver, max_steps, infeasibility, trace_length, throw, backward_probe=None):
        sol = _forward_without_gradient(forward, fn, z0, args, solver, max_steps, infeasibility, trace_length)
        z_star = jax.lax.stop_gradient(sol.value)
        # Gradients reach `args` through one ordinary evaluation y = T(z*, args); the custom
        # rule below only replaces y's cotangent ḡ by the adjoint solution u. Keeping the
        # parameter vjp outside the custom_vjp matters under vmap: there JAX transposes the
        # batched program (one matmul for a shared weight) instead of materialising one
        # parameter gradient per batch member and summing them.
        y = fn(z_star, args)
        config = _AdjointConfig(
            forward=forward,
            solver=self.backward_solver(solver),
            linear_solver=self.linear_solver,
            max_steps=self.max_steps if self.max_steps is not None else max_steps,
            throw=throw,
        )
        if backward_probe is None:
            backward_probe = jnp.zeros((BACKWARD_PROBE_SIZE,), jnp.result_type(float))
        value = _implicit_identity((y, backward_probe), z_star, _stop_gradient_arrays((fn, args)), config)
        return Solution(value=value, result=sol.result, stats=sol.stats)


class _AdjointConfig(eqx.Module):
    forward: Callable = eqx.field(static=True)
    solver: AbstractFixedPointSolver
    linear_solver: Any
    max_steps: int = eqx.field(static=True)
    throw: bool = eqx.field(static=True)


BACKWARD_PROBE_SIZE = 3


def backward_probe(dtype=None):
    """A zero vector whose gradient reports the implicit adjoint solve.

    Pass it as `fixed_point(..., backward_probe=probe)` (or to `fpx.nn.DEQ`) and
    differentiate the loss with respect to it too: its cotangent is
    `[num_steps, residual_norm, failed]` of the backward solve (summed over `vmap`ped
    members, since the probe is shared). Only `ImplicitAdjoint` fills it. This is how a
    training loop logs backward statistics without leaving `jit`.

    ```python
    import jax, jax.numpy as jnp, fpx
    def loss(a, probe):
        sol = fpx.fixed_point(lambda z, a: 0.5 * jnp.cos(z) + a, jnp.zeros(3), a, backward_probe=probe)
        return jnp.sum(sol.value ** 2)
    grad_a, (steps, residual, failed) = jax.grad(loss, argnums=(0, 1))(jnp.ones(3), fpx.backward_probe())
    assert steps > 0 and failed == 0
    ```
    """
    return jnp.zeros((BACKWARD_PROBE_SIZE,), dtype or jnp.result_type(float))


@eqx.filter_custom_vjp
def _implicit_identity(y_and_probe, z_star, fn_args, config):
    """Returns `z*` (exactly); pulls a cotangent ḡ of `z*` back to `u = (I - J^T)^{-1} ḡ` on `y`."""
    del y_and_probe
    return z_star


@_implicit_identity.def_fwd
def _implicit_identity_fwd(perturbed, y_and_probe, z_star, fn_args, config):
    del perturbed, y_and_probe
    return z_star, None


@_implicit_identity.def_bwd
def _implicit_identity_bwd(residuals, gbar, perturbed, y_and_probe, z_star, fn_args, config):
    del residuals
    probe = y_and_probe[1]
    from ._fixed_point import FixedPointError

    fn, args = fn_args
    gbar = jtu.tree_map(
        lambda g, z: jnp.zeros_like(z) if g is None else g,
        gbar,
        z_star,
        is_leaf=lambda x: x is None,
    )
    _, vjp_z = eqx.filter_vjp(lambda z: fn(z, args), z_star)
    # The adjoint equation is linear in ḡ, whose scale is arbitrary (it depends on how the
    # loss is normalised): solve for ḡ / |ḡ| so that `atol` means the same thing for
    # every loss, then scale back.
    gbar_norm = two_norm(gbar)
    scale = jnp.where(gbar_norm > 0, gbar_norm, 1.0)
    gbar = jtu.tree_map(lambda g: g / scale.astype(g.dtype), gbar)

    if config.linear_solver is not None:
        operator = lx.FunctionLinearOperator(
            lambda u: jtu.tree_map(lambda a, b: a - b, u, vjp_z(u)[0]), jax.eval_shape(lambda: gbar)
        )
        lin = lx.linear_solve(operator, gbar, config.linear_solver, throw=False)
        u = lin.value
        failed = lin.result != lx.RESULTS.successful
        num_steps = lin.stats.get("num_steps", jnp.array(0))
        operator_residual = tree_sub(gbar, operator.mv(u))
        residual = two_norm(operator_residual)
    else:
        adjoint_sol = config.forward(
            lambda u, _: tree_add(vjp_z(u)[0], gbar), gbar, None, config.solver, config.max_steps, None, 0
        )
        u = adjoint_sol.value
        failed = adjoint_sol.result != RESULTS.successful
        num_steps = adjoint_sol.stats["num_steps"]
        residual = adjoint_sol.stats["residual_norm"]

    if config.throw:
        from ._fixed_point import unvmapped_worst

        def check(any_failed, num_steps, residual):
            if bool(any_failed):
                raise FixedPointError(
                    f"fpx.fixed_point: the backward (adjoint) solve of the implicit gradient failed "
                    f"(steps {int(num_steps)}, residual {float(residual):.3e} relative to |ḡ|).\n"
                    f"{RESULTS._index_to_message[int(RESULTS.backward_failed._value)]}"
                )

        any_failed, (worst_steps, worst_residual) = unvmapped_worst(failed, jnp.asarray(num_steps), jnp.asarray(residual))
        jax.debug.callback(check, any_failed, worst_steps, worst_residual)
    else:
        u = jtu.tree_map(lambda x: jnp.where(failed, jnp.nan, x), u)
    u = jtu.tree_map(lambda x: x * scale.astype(x.dtype), u)
    stats = jnp.stack([num_steps.astype(probe.dtype), residual.astype(probe.dtype), failed.astype(probe.dtype)])
    return u, (stats if perturbed[1] else None)


def _stop_gradient_arrays(tree):
    return jtu.tree_map(lambda x: jax.lax.stop_gradient(x) if eqx.is_array(x) else x, tree)


def _forward_without_gradient(forward, fn, z0, args, solver, max_steps, infeasibility, trace_length):
    fn_ng, args_ng = _stop_gradient_arrays((fn, args))
    return forward(fn_ng, jax.lax.stop_gradient(z0), args_ng, solver, max_steps, infeasibility, trace_length)


class PhantomAdjoint(AbstractAdjoint):
    """Phantom gradient (Geng et al. 2021): backprop through a few damped steps at `z*`.

    The forward solve is not differentiated. From the fixed point `z*` it takes `steps`
    damped iterations `z <- (1 - damping) z + damping T(z)` and differentiates those; the
    returned value is exactly `z*`. The gradient is that of a truncated, damped Neumann
    series of `(I - J)^{-1}`: cheap and biased, with the bias shrinking as `steps` grows
    (measured in `tests/test_adjoints.py` and BENCHMARKS.md, not assumed).

    ```python
    import jax, jax.numpy as jnp, fpx
    f = lambda a: fpx.fixed_point(lambda z, a: 0.5 * jnp.sin(z) + a, jnp.zeros(2), a,
                                  adjoint=fpx.PhantomAdjoint(steps=5, damping=0.8)).value.sum()
    g = jax.grad(f)(jnp.ones(2))
    ```
    """

    steps: int = 5
    damping: float = 0.5

    def __check_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"`PhantomAdjoint(steps=...)` must be a positive integer, got {self.steps!r}.")
        if not (isinstance(self.damping, (int, float)) and 0 < self.damping <= 1):
            raise ValueError(f"`PhantomAdjoint(damping=...)` must lie in (0, 1], got {self.damping!r}.")

    def apply(self, forward, fn, z0, args, *, solver, max_steps, infeasibility, trace_length, throw, backward_probe=None):
        del throw, backward_probe
        return _phantom(forward, fn, z0, args, solver, max_steps, infeasibility, trace_length, self.steps, self.damping)


def _phantom(forward, fn, z0, args, solver, max_steps, infeasibility, trace_length, steps, damping):
    sol = _forward_without_gradient(forward, fn, z0, args, solver, max_steps, infeasibility, trace_length)
    z_star = jax.lax.stop_gradient(sol.value)
    z = z_star
    for _ in range(steps):
        fz = fn(z, args)
        z = jtu.tree_map(lambda a, b: (1 - damping) * a + damping * b, z, fz)
    # The value stays exactly z*; only the gradient comes from the phantom steps.
    value = jtu.tree_map(lambda s, p: s + (p - jax.lax.stop_gradient(p)), z_star, z)
    return Solution(value=value, result=sol.result, stats=sol.stats)


class JFBAdjoint(AbstractAdjoint):
    """Jacobian-free backpropagation (Fung et al. 2022): differentiate one step `T(z*)`.

    The gradient is `(∂T/∂θ)^T ḡ`, i.e. `(I - J)^{-1}` replaced by the identity: no
    backward solve at all. A descent direction when `T` is sufficiently contractive; its
    error against the implicit gradient is measured, not assumed.

    ```python
    import jax, jax.numpy as jnp, fpx
    f = lambda a: fpx.fixed_point(lambda z, a: 0.5 * jnp.sin(z) + a, jnp.zeros(2), a,
                                  adjoint=fpx.JFBAdjoint()).value.sum()
    g = jax.grad(f)(jnp.ones(2))
    ```
    """

    def apply(self, forward, fn, z0, args, *, solver, max_steps, infeasibility, trace_length, throw, backward_probe=None):
        del throw, backward_probe
        return _phantom(forward, fn, z0, args, solver, max_steps, infeasibility, trace_length, 1, 1.0)


class UnrolledAdjoint(AbstractAdjoint):
    """Backpropagation through the solver's iterations (checkpointed), for comparison.

    Uses equinox's checkpointed while loop (`checkpoints` saved states, recomputing the
    rest), so memory grows only logarithmically with `max_steps` but compute roughly
    doubles. Differentiates whatever the solver did, including an unconverged iterate.

    ```python
    import jax, jax.numpy as jnp, fpx
    f = lambda a: fpx.fixed_point(lambda z, a: 0.5 * jnp.sin(z) + a, jnp.zeros(2), a,
                                  adjoint=fpx.UnrolledAdjoint(), max_steps=100).value.sum()
    g = jax.grad(f)(jnp.ones(2))
    ```
    """

    checkpoints: int | None = None

    def apply(self, forward, fn, z0, args, *, solver, max_steps, infeasibility, trace_length, throw, backward_probe=None):
        del throw, backward_probe
        import equinox.internal as eqxi

        loop = ft.partial(eqxi.while_loop, kind="checkpointed", max_steps=max_steps, checkpoints=self.checkpoints)
        return forward(fn, jax.lax.stop_gradient(z0), args, solver, max_steps, infeasibility, trace_length, loop)
