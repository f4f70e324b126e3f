"""How `fixed_point` is differentiated: implicit adjoints and their alternatives.

Adjoints here: `ImplicitAdjoint` (the default), `JFBAdjoint`, `PhantomAdjoint`,
`UnrolledAdjoint` and `ReversibleAdjoint` (which runs its own reversible iteration).

`ImplicitAdjoint` differentiates the fixed point `z* = T(z*, θ)` by the implicit function
theorem, in forward and reverse mode and to any order. The one new object is a linear
fixed-point solve, written as a JAX primitive (`_linear_fixed_point_p`) so that JAX can
differentiate, transpose and batch it:

- forward mode: `ż = J ż + ẏ` with `J = ∂T/∂z` at `z*` and `ẏ = ∂T/∂θ · θ̇` (a jvp);
- reverse mode is its transpose: `u = Jᵀ u + ḡ` (a vjp per step), then `θ̄ = (∂T/∂θ)ᵀ u`
  by JAX's own transposition of `ẏ`, outside the solve (under `vmap` one batched matmul
  for a shared weight, never one parameter gradient per member);
- higher orders (`jax.hessian`, `jax.jvp(jax.grad(...))`) differentiate the solve itself:
  `d[(I - L)⁻¹ b] = (I - L)⁻¹ (ḃ + L̇ u)`.
The forward iteration is never differentiated, so memory does not grow with `max_steps`.
"""

from __future__ import annotations

import abc
import dataclasses
import functools as ft
import numbers
from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Int, PyTree, Scalar

from . import _validate as checks
from ._errors import FixedPointError, unvmapped_worst
from ._misc import stop_gradient_arrays, tree_add, tree_sub, tree_where, two_norm, unguarded_norm
from ._solution import RESULTS, Solution, SolveInputs
from .solvers import AbstractFixedPointSolver, Anderson, Halpern, NewtonKrylov, Picard

Forward = Callable[..., Solution]


class AbstractAdjoint(eqx.Module):
    """Base class: `apply(forward, inputs)` runs `forward(inputs)` and attaches a differentiation rule.

    `inputs` is an `fpx.SolveInputs` bundle (the closure-converted `fn`, `z0`, the array
    part of `args`, the solver, `max_steps`, ...); `forward` is the driver's iteration.

    ```python
    import jax, jax.numpy as jnp, fpx
    class Delegating(fpx.AbstractAdjoint):        # an adjoint is an eqx.Module with `apply`
        inner: fpx.AbstractAdjoint = fpx.ImplicitAdjoint()
        def apply(self, forward, inputs):
            return self.inner.apply(forward, inputs)
    f = lambda a: fpx.fixed_point(lambda z, a: 0.5 * z + a, jnp.zeros(2), a, adjoint=Delegating()).value.sum()
    assert jnp.allclose(jax.grad(f)(jnp.ones(2)), 2.0, rtol=1e-4)   # z* = 2a
    ```
    """

    @abc.abstractmethod
    def apply(self, forward: Forward, inputs: SolveInputs) -> Solution: ...


def _undifferentiated(forward: Forward, inputs: SolveInputs) -> Solution:
    """The forward solve with every input cut from differentiation."""
    fn, z0, args = stop_gradient_arrays((inputs.fn, inputs.z0, inputs.args))
    return forward(dataclasses.replace(inputs, fn=fn, z0=z0, args=args))


class ImplicitAdjoint(AbstractAdjoint):
    """Implicit-function-theorem derivatives: reverse, forward and higher order.

    At the fixed point `z* = T(z*, θ)`, the tangent of `z*` solves `ż = J ż + ∂T/∂θ θ̇`
    (`J = ∂T/∂z`, one jvp of `T` per step) and the cotangent `ḡ` is pulled back by the
    transposed solve `u = Jᵀ u + ḡ` (one vjp per step), then `θ̄ = (∂T/∂θ)ᵀ u`. The
    Jacobian is never formed and memory does not grow with the number of forward
    iterations. Both linear solves work on the right-hand side scaled to unit norm, so
    `rtol`/`atol` mean the same thing whatever the scale of the loss.

    **Arguments:**

    - `solver`: fpx solver for the linear fixed points; default: the forward solver, except
      `Anderson` (same tolerances and norm) after `NewtonKrylov` or `Halpern` forward solves
      (the linear problem is best served by Anderson, which is GMRES on linear maps, not by
      Halpern's O(1/k) rate).
    - `linear_solver`: a lineax solver (e.g. `lineax.GMRES(rtol, atol)`) for
      `(I - J) ż = ẏ` and `(I - Jᵀ) u = ḡ` instead; overrides `solver`.
    - `max_steps`: step budget of each linear solve; default: the forward `max_steps`.

    A failed linear solve raises with `throw=True` (naming the lineax reason when a lineax
    solver is used); with `throw=False` the derivative is NaN (never a silent zero or an
    unconverged vector).

    ```python
    import jax, jax.numpy as jnp, fpx
    f = lambda a: fpx.fixed_point(lambda z, a: 0.5 * jnp.sin(z) + a, jnp.zeros(2), a,
                                  adjoint=fpx.ImplicitAdjoint(solver=fpx.Anderson())).value
    g = jax.grad(lambda a: f(a).sum())(jnp.ones(2))
    _, t = jax.jvp(f, (jnp.ones(2),), (jnp.ones(2),))
    assert jnp.allclose(g.sum(), t.sum(), rtol=1e-4)
    ```
    """

    solver: AbstractFixedPointSolver | None = None
    linear_solver: Any = None
    max_steps: int | None = None

    def __check_init__(self):
        checks.solver("ImplicitAdjoint", "solver", self.solver, allow_none=True)
        if self.max_steps is not None:
            checks.integer("ImplicitAdjoint", "max_steps", self.max_steps, minimum=1)
        if self.linear_solver is not None:
            import lineax as lx

            if not isinstance(self.linear_solver, lx.AbstractLinearSolver):
                raise TypeError(
                    f"`ImplicitAdjoint(linear_solver=...)` must be a lineax solver such as "
                    f"lineax.GMRES(rtol=1e-6, atol=1e-6), got {self.linear_solver!r}."
                )

    def backward_solver(self, forward_solver: AbstractFixedPointSolver) -> AbstractFixedPointSolver:
        """The fpx solver used for the linear (tangent and adjoint) fixed points."""
        if self.solver is not None:
            return self.solver
        if isinstance(forward_solver, (NewtonKrylov, Halpern)):
            return Anderson(rtol=forward_solver.rtol, atol=forward_solver.atol, norm=forward_solver.norm)
        return forward_solver

    def apply(self, forward, inputs):
        sol = _undifferentiated(forward, inputs)
        linear_solver = self.backward_solver(inputs.solver)
        linear_solver = eqx.tree_at(lambda s: s.norm, linear_solver, unguarded_norm(linear_solver.norm))
        config = _LinearConfig(
            forward=forward,
            solver=linear_solver,
            linear_solver=self.linear_solver,
            max_steps=self.max_steps if self.max_steps is not None else inputs.max_steps,
            throw=inputs.throw,
        )
        value = _implicit_value(jax.lax.stop_gradient(sol.value), inputs.fn, inputs.args, inputs.backward_probe, config)
        return Solution(value=value, result=sol.result, stats=sol.stats)


class _LinearConfig(eqx.Module):
    forward: Callable = eqx.field(static=True)
    solver: AbstractFixedPointSolver
    linear_solver: Any
    max_steps: int = eqx.field(static=True)
    throw: bool = eqx.field(static=True)


@eqx.filter_custom_jvp
def _implicit_value(z_star, fn, args, probe, config):
    """`z*` itself; its tangent is the linear solve `ż = J ż + ∂T/∂θ θ̇`."""
    del fn, args, probe, config
    return z_star


@_implicit_value.def_jvp
def _implicit_value_jvp(primals, tangents):
    z_star, fn, args, probe, config = primals
    _, t_fn, t_args, t_probe, _ = tangents
    # `args` holds arrays only (fixed_point closes over the rest), but JAX hands the primal
    # of a traced Python scalar to this rule as a bare float: make it an array again.
    args = jtu.tree_map(jnp.asarray, args)
    # Calling the rule's own function keeps higher derivatives implicit too.
    z = _implicit_value(z_star, fn, args, probe, config)
    t_fn, t_args = jtu.tree_map(eqxi.materialise_zeros, (fn, args), (t_fn, t_args), is_leaf=lambda x: x is None)
    _, y_dot = eqx.filter_jvp(lambda f, a: f(z, a), (fn, args), (t_fn, t_args))
    if probe is not None and eqx.is_array(probe):
        t_probe = eqxi.materialise_zeros(probe, t_probe)
        # Give the probe the batch dimension of the solve (under vmap), so that its
        # cotangent, the adjoint statistics of each member, is summed over members by the
        # transpose of this broadcast rather than refused by the batching rule.
        t_probe = t_probe + jax.lax.stop_gradient(jnp.where(True, 0.0, first_entry(z)).astype(t_probe.dtype))
    else:
        t_probe = None
    z_dot, _ = _bind((fn, z, args), y_dot, t_probe, config, False)
    return z, z_dot


def first_entry(tree):
    leaf = jtu.tree_leaves(tree)[0]
    return jnp.reshape(leaf, (-1,))[0]


def _linear_map(residuals, transposed: bool):
    """`u -> J u` (tangent problem) or `u -> Jᵀ u` (adjoint problem), `J = ∂T/∂z` at `z`."""
    fn, z, args = residuals.unpack()
    if transposed:
        _, vjp = jax.vjp(lambda v: fn(v, args), z)
        return lambda u: vjp(u)[0]
    _, jvp = jax.linearize(lambda v: fn(v, args), z)
    return jvp


class _Report(eqx.Module):
    num_steps: Any
    residual: Any
    failed: Any
    reason: Any


def _solve_linear(residuals, rhs, config: _LinearConfig, transposed: bool):
    """Solve `u = L u + rhs` for the unit-norm `rhs / |rhs|`, then scale back."""
    apply_l = _linear_map(residuals, transposed)
    rhs_norm = two_norm(rhs)
    scale = jnp.where(rhs_norm > 0, rhs_norm, 1.0)
    b = jtu.tree_map(lambda x: x / scale.astype(x.dtype), rhs)
    if config.linear_solver is not None:
        import lineax as lx

        operator = lx.FunctionLinearOperator(lambda u: tree_sub(u, apply_l(u)), jax.eval_shape(lambda: b))
        lin = lx.linear_solve(operator, b, config.linear_solver, throw=False)
        u = lin.value
        reason = lin.result._value
        failed = lin.result != lx.RESULTS.successful
        num_steps = jnp.asarray(lin.stats.get("num_steps", 0))
        residual = two_norm(tree_sub(b, operator.mv(u)))
    else:
        inputs = SolveInputs(
            fn=lambda u, b: tree_add(apply_l(u), b),
            z0=b,
            args=b,
            solver=config.solver,
            max_steps=config.max_steps,
            infeasibility=None,
            trace_length=0,
            throw=False,
        )
        sol = config.forward(inputs)
        u = sol.value
        reason = sol.result._value
        failed = sol.result != RESULTS.successful
        num_steps = sol.stats["num_steps"]
        residual = sol.stats["residual_norm"]
    if config.throw:
        _raise_if_linear_failed(failed, num_steps, residual, reason, transposed, config)
    else:
        u = jtu.tree_map(lambda x: jnp.where(failed, jnp.nan, x), u)
    u = jtu.tree_map(lambda x: x * scale.astype(x.dtype), u)
    dtype = jnp.result_type(*[x.dtype for x in jtu.tree_leaves(rhs)])
    report = jnp.stack([jnp.asarray(num_steps).astype(dtype), jnp.asarray(residual).astype(dtype), failed.astype(dtype)])
    return u, report


def _raise_if_linear_failed(failed, num_steps, residual, reason, transposed, config):
    which = "backward (adjoint) solve of the implicit gradient" if transposed else "tangent (forward-mode) solve"

    def check(any_failed, num_steps, residual, reason):
        if not bool(any_failed):
            return
        if config.linear_solver is not None:
            import lineax as lx

            why = f"lineax reports: {lx.RESULTS._index_to_message[int(reason)] or 'failure'}"
        else:
            why = f"{type(config.solver).__name__} ended with: {RESULTS._index_to_message[int(reason)]}"
        raise FixedPointError(
            f"fpx.fixed_point: the {which} failed after {int(num_steps)} steps, residual "
            f"{float(residual):.3e} relative to the right-hand side.\n{why}\n{RESULTS[RESULTS.backward_failed]}"
        )

    any_failed, (worst_steps, worst_residual, worst_reason) = unvmapped_worst(
        failed, jnp.asarray(num_steps), jnp.asarray(residual), jnp.asarray(reason)
    )
    jax.debug.callback(check, any_failed, worst_steps, worst_residual, worst_reason)


# The primitive: inputs (residuals, rhs, probe, config, transposed); `rhs` and `probe` are
# its linear inputs (the probe only receives the adjoint report as its cotangent).


def _linear_impl(residuals, rhs, probe, config, transposed):
    del probe
    return _solve_linear(residuals, rhs, config, transposed)


def _linear_abstract_eval(residuals, rhs, probe, config, transposed):
    # The solution has the structure of the right-hand side, the report three entries of
    # its dtype: no need to trace the solve for that.
    del residuals, probe, config, transposed
    leaves = jtu.tree_leaves(rhs)
    dtype = jnp.result_type(*[x.dtype for x in leaves])
    u = jtu.tree_map(lambda x: jax.core.ShapedArray(x.shape, x.dtype), rhs)
    return u, jax.core.ShapedArray((3,), dtype)


def _linear_jvp(primals, tangents):
    residuals, rhs, probe, config, transposed = primals
    t_residuals, t_rhs, _, _, _ = tangents
    u, report = _bind(residuals, rhs, probe, config, transposed)
    rhs_dot = jtu.tree_map(eqxi.materialise_zeros, rhs, t_rhs, is_leaf=lambda x: x is None)
    if any(t is not None for t in jtu.tree_leaves(t_residuals, is_leaf=lambda x: x is None)):
        # d[(I - L)^{-1} b] = (I - L)^{-1} (ḃ + L̇ u): differentiate u -> L u in the residuals.
        t_residuals = jtu.tree_map(eqxi.materialise_zeros, residuals, t_residuals, is_leaf=lambda x: x is None)
        u_fixed = jax.lax.stop_gradient(u)
        _, l_dot_u = eqx.filter_jvp(lambda r: _linear_map(r, transposed)(u_fixed), (residuals,), (t_residuals,))
        rhs_dot = tree_add(rhs_dot, l_dot_u)
    u_dot, _ = _bind(residuals, rhs_dot, None, config, transposed)
    return (u, report), (u_dot, None)


def _linear_transpose(inputs, cts_out):
    residuals, rhs, probe, config, transposed = inputs
    undefined = jax.interpreters.ad.UndefinedPrimal
    ct_u, _ = cts_out
    ct_u = jtu.tree_map(
        lambda r, c: (jnp.zeros(r.aval.shape, r.aval.dtype) if isinstance(r, undefined) else jnp.zeros_like(r)) if c is None else c,
        rhs,
        ct_u,
        is_leaf=lambda x: isinstance(x, undefined) or x is None,
    )
    ct_rhs, report = _bind(residuals, ct_u, None, config, not transposed)
    # Only undefined (linear) inputs receive cotangents: `rhs` is a constant when only the
    # probe is differentiated.
    ct_rhs = jtu.tree_map(lambda r, c: c if isinstance(r, undefined) else None, rhs, ct_rhs, is_leaf=lambda x: isinstance(x, undefined))
    ct_probe = None
    if isinstance(probe, undefined):
        ct_probe = report.astype(probe.aval.dtype)
    return jtu.tree_map(lambda _: None, residuals), ct_rhs, ct_probe, jtu.tree_map(lambda _: None, config), None


class Packed(eqx.Module):
    """The residuals `(fn, z*, args)` with every scalar array stored with shape `(1,)`.

    JAX inlines scalar constants into jaxprs as literals and hands them back to transpose
    rules as bare Python numbers, which would no longer count as operands of the
    primitive; arrays of shape `(1,)` are never inlined.
    """

    arrays: list
    static: Any = eqx.field(static=True)
    scalar: tuple = eqx.field(static=True)

    @staticmethod
    def pack(tree) -> "Packed":
        tree = jtu.tree_map(lambda x: jnp.asarray(x) if isinstance(x, numbers.Number) else x, tree)
        dynamic, static = eqx.partition(tree, eqx.is_array)
        leaves, treedef = jtu.tree_flatten(dynamic)
        scalar = tuple(jnp.ndim(x) == 0 for x in leaves)
        arrays = [jnp.reshape(x, (1,)) if s else x for x, s in zip(leaves, scalar)]
        return Packed(arrays=arrays, static=(static, treedef), scalar=scalar)

    def unpack(self):
        static, treedef = self.static
        leaves = [jnp.reshape(x, ()) if s else x for x, s in zip(self.arrays, self.scalar)]
        return eqx.combine(jtu.tree_unflatten(treedef, leaves), static)


def _bind(residuals, rhs, probe, config, transposed):
    packed = residuals if isinstance(residuals, Packed) else Packed.pack(residuals)
    return eqxi.filter_primitive_bind(_linear_fixed_point_p, packed, rhs, probe, config, transposed)


_linear_fixed_point_p = eqxi.create_vprim(
    "fpx_linear_fixed_point",
    eqxi.filter_primitive_def(_linear_impl),
    eqxi.filter_primitive_def(_linear_abstract_eval),
    eqxi.filter_primitive_jvp(_linear_jvp),
    eqxi.filter_primitive_transpose(_linear_transpose),
)


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


def backward_result(report) -> RESULTS:
    """The `fpx.RESULTS` member of a backward solve, from the report a `backward_probe` received.

    `RESULTS.backward_failed` if any (vmapped) member's adjoint solve failed, else
    `RESULTS.successful`. The forward `sol.result` cannot say this: the backward solve runs
    after it, when the loss is differentiated.

    ```python
    import jax, jax.numpy as jnp, fpx
    # z - z**3 + a at a = 0: dT/dz = 1 at the fixed point, so I - J is singular.
    loss = lambda a, probe: fpx.fixed_point(lambda z, a: z - z**3 + a, jnp.zeros(2), a, throw=False,
                                            backward_probe=probe).value.sum()
    _, report = jax.grad(loss, argnums=(0, 1))(jnp.zeros(2), fpx.backward_probe())
    assert fpx.backward_result(report) == fpx.RESULTS.backward_failed
    ```
    """
    return RESULTS.where(jnp.asarray(report)[2] > 0, RESULTS.backward_failed, RESULTS.successful)


class PhantomAdjoint(AbstractAdjoint):
    """Phantom gradient (Geng et al. 2021): backprop through a few damped steps at `z*`.

    The forward solve is not differentiated. From the fixed point `z*` it takes `steps`
    damped iterations `z <- (1 - damping) z + damping T(z)` and differentiates those; the
    returned value is exactly `z*`. The gradient is that of a truncated, damped Neumann
    series of `(I - J)^{-1}`: cheap and biased, with the bias shrinking as `steps` grows
    (measured in `tests/test_adjoint.py` and BENCHMARKS.md, not assumed). Works in forward
    and reverse mode.

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
        checks.integer("PhantomAdjoint", "steps", self.steps, minimum=1)
        checks.real("PhantomAdjoint", "damping", self.damping, low=0, high=1, low_open=True)

    def apply(self, forward, inputs):
        return _phantom(forward, inputs, self.steps, self.damping)


def _phantom(forward, inputs, steps, damping):
    sol = _undifferentiated(forward, inputs)
    fn, args = inputs.fn, inputs.args
    z_star = jax.lax.stop_gradient(sol.value)
    z = z_star
    for _ in range(steps):
        fz = fn(z, args)
        z = jtu.tree_map(lambda a, b: (1 - damping) * a + damping * b, z, fz)
    # The value stays exactly z*; only the derivative comes from the phantom steps.
    value = jtu.tree_map(lambda s, p: s + (p - jax.lax.stop_gradient(p)), z_star, z)
    return Solution(value=value, result=sol.result, stats=sol.stats)


class JFBAdjoint(AbstractAdjoint):
    """Jacobian-free backpropagation (Fung et al. 2022): differentiate one step `T(z*)`.

    The gradient is `(∂T/∂θ)^T ḡ`, i.e. `(I - J)^{-1}` replaced by the identity: no
    backward solve at all. A descent direction when `T` is sufficiently contractive; its
    error against the implicit gradient is measured, not assumed. Works in forward and
    reverse mode.

    ```python
    import jax, jax.numpy as jnp, fpx
    f = lambda a: fpx.fixed_point(lambda z, a: 0.5 * jnp.sin(z) + a, jnp.zeros(2), a,
                                  adjoint=fpx.JFBAdjoint()).value.sum()
    g = jax.grad(f)(jnp.ones(2))
    ```
    """

    def apply(self, forward, inputs):
        return _phantom(forward, inputs, 1, 1.0)


class UnrolledAdjoint(AbstractAdjoint):
    """Backpropagation through the solver's iterations (checkpointed), for comparison.

    Uses equinox's checkpointed while loop (`checkpoints` saved states, recomputing the
    rest; default: about log2(max_steps)), so memory grows only logarithmically with
    `max_steps` but compute roughly doubles. Differentiates whatever the solver did,
    including an unconverged iterate. Reverse mode only: a checkpointed loop cannot be
    differentiated in forward mode (use `ImplicitAdjoint` for `jax.jvp`).

    ```python
    import jax, jax.numpy as jnp, fpx
    f = lambda a: fpx.fixed_point(lambda z, a: 0.5 * jnp.sin(z) + a, jnp.zeros(2), a,
                                  adjoint=fpx.UnrolledAdjoint(), max_steps=100).value.sum()
    g = jax.grad(f)(jnp.ones(2))
    ```
    """

    checkpoints: int | None = None

    def __check_init__(self):
        if self.checkpoints is not None:
            checks.integer("UnrolledAdjoint", "checkpoints", self.checkpoints, minimum=1)

    def apply(self, forward, inputs):
        loop = ft.partial(eqxi.while_loop, kind="checkpointed", max_steps=inputs.max_steps, checkpoints=self.checkpoints)
        inputs = dataclasses.replace(inputs, z0=jax.lax.stop_gradient(inputs.z0))
        try:
            return forward(inputs, loop)
        except TypeError as e:
            if "forward-mode" not in str(e):
                raise
            raise TypeError(
                "fpx.UnrolledAdjoint supports reverse mode only (jax.grad, jax.vjp): its "
                "checkpointed loop cannot be differentiated forwards. For jax.jvp, "
                "jax.jacfwd or jax.hessian use adjoint=fpx.ImplicitAdjoint() (the default), "
                "fpx.JFBAdjoint() or fpx.PhantomAdjoint()."
            ) from None


def _relax(a, fa, beta):
    return jtu.tree_map(lambda u, f: (1 - beta) * u + beta * f, a, fa)


def _unrelax(a_next, fa, beta):
    """Inverse of `_relax` in its first argument: `a` from `(1 - beta) a + beta fa`."""
    return jtu.tree_map(lambda u, f: (u - beta * f) / (1 - beta), a_next, fa)


class _CoupledState(eqx.Module):
    y: PyTree
    step: Int[Array, ""]
    # The driver returns its best iterate when a solve fails; the backward pass must
    # reverse from exactly that iterate, so its partner `y` and its step are kept too.
    best_z: PyTree
    best_y: PyTree
    best_step: Int[Array, ""]
    best_residual: Scalar


class _CoupledIteration(AbstractFixedPointSolver[_CoupledState]):
    """The reversible two-state iteration, run by the driver on the `z` component.

    `y+ = (1-β) y + β f(z)`, `z+ = (1-β) z + β f(y+)`, `y0 = z0`: the driver's `fz` is
    `f(z_n)`, so a step costs two evaluations and the stopping test, the result codes and
    the residual trace are the driver's own, applied to `z` (the returned iterate).
    """

    beta: float
    rtol: float
    atol: float
    norm: Callable[[PyTree], Scalar]
    fn_evals_per_step: ClassVar[int] = 2

    def init(self, fn, z0, fz0, args):
        # The same best-residual bookkeeping as the driver's, on the same values.
        r0 = jnp.asarray(self.norm(tree_sub(z0, fz0)))
        zero = jnp.array(0, jnp.int32)
        best_residual = jnp.where(jnp.isfinite(r0), r0, jnp.asarray(jnp.inf, r0.dtype))
        return _CoupledState(y=z0, step=zero, best_z=z0, best_y=z0, best_step=zero, best_residual=best_residual)

    def step(self, fn, z, fz, args, state):
        y = _relax(state.y, fz, self.beta)
        z = _relax(z, fn(y, args), self.beta)
        fz = fn(z, args)
        k = state.step + 1
        residual = jnp.asarray(self.norm(tree_sub(z, fz))).astype(state.best_residual.dtype)
        better = residual < state.best_residual
        state = _CoupledState(
            y=y,
            step=k,
            best_z=tree_where(better, z, state.best_z),
            best_y=tree_where(better, y, state.best_y),
            best_step=jnp.where(better, k, state.best_step),
            best_residual=jnp.where(better, residual, state.best_residual),
        )
        return z, fz, state

    def stats(self, state):
        return {_COUPLED_KEY: state}


_COUPLED_KEY = "_reversible_state"


class ReversibleAdjoint(AbstractAdjoint):
    """Reversible DEQ (McCallum, Arora & Foster 2025): the exact gradient of the computed iterate in O(1) memory.

    The forward solve is the coupled iteration (`y_0 = z_0`)

        y_{n+1} = (1 - β) y_n + β f(z_n),    z_{n+1} = (1 - β) z_n + β f(y_{n+1}),

    which is algebraically invertible: `z_n = (z_{n+1} - β f(y_{n+1})) / (1 - β)`, then
    `y_n = (y_{n+1} - β f(z_n)) / (1 - β)`. The backward pass runs it backwards from the
    returned iterate for exactly the number of steps taken, reconstructing each state and
    accumulating two vector-Jacobian products per step, in a `lax.while_loop`: no
    trajectory is stored, so memory does not grow with the number of steps, and the
    gradient is that of the iterate actually returned (converged or not), equal to
    backpropagation through the unrolled iteration up to rounding. It costs about
    twice a forward step per backward step (two evaluations and two vjps).

    **Rounding.** The reversal recovers the states of a *contracting* iteration, so
    information lost to rounding in the forward pass is amplified backwards (about
    `1/(1-β)` per step and more), while the cotangents shrink only at the forward rate:
    the gradient error grows exponentially with the number of steps. Measured against
    backprop through the unrolled coupled iteration (`tests/test_reversible_adjoint.py`,
    0.9-contractive tanh cell, β = 0.8, float64): 3e-13 after 5 steps, 7e-8 after 10,
    3e-2 after 20; in float32 about 2e-4 after 5 and 6e-2 after 10. It is exact to
    rounding for short solves (a few to a dozen steps, the regime of the paper); for
    tight, long solves prefer `ImplicitAdjoint`. When the reconstructed states overflow
    (e.g. float32, a 0.99-contraction, 74 steps), `throw=True` raises instead of returning
    a NaN gradient.

    **The solver.** The coupled iteration *is* the solver: `fixed_point(...,
    solver=fpx.Picard(rtol, atol, norm))` (the default) only supplies the stopping test,
    which the driver applies to `z_n` exactly as for any solver (same `RESULTS`: success
    only at an iterate that passes it; divergence, non-finite values, `max_steps`), and
    `stats["num_fn_evals"]` counts two evaluations per step. Any other solver is an
    error (its steps would not be reversible). On failure the returned value is, as
    always, the iterate with the smallest residual seen, and the backward pass reverses
    from that one. Under `vmap` every member stops at its own step and is reversed
    exactly that many steps (the batched while loop freezes finished members).
    `detect_infeasible` is not supported.

    **Arguments:**

    - `beta`: the relaxation `β`, in (0, 1); default 0.8. Smaller values damp the
      iteration more (it converges more slowly, and its reversal divides by a larger
      `1 / (1 - β)`).

    Reverse mode only (`jax.grad`, `jax.vjp`): the reversed iteration is a reverse-mode
    algorithm, and `jax.jvp` raises a `TypeError` saying so (use `ImplicitAdjoint` for
    forward mode). The derivative with respect to `z0` is zero, as for the
    other adjoints; `backward_probe` is not filled. Under `vmap`, a parameter shared by
    the members gets one cotangent accumulator per member inside the backward loop.

    ```python
    import jax, jax.numpy as jnp, fpx
    def f(a, adjoint):
        T = lambda z, a: 0.5 * jnp.sin(z) + a
        return fpx.fixed_point(T, jnp.zeros(2), a, solver=fpx.Picard(rtol=1e-8, atol=0.0), adjoint=adjoint).value.sum()
    g = jax.grad(f)(jnp.ones(2), fpx.ReversibleAdjoint(beta=0.8))
    assert jnp.allclose(g, jax.grad(f)(jnp.ones(2), fpx.ImplicitAdjoint()), rtol=1e-4)
    ```
    """

    beta: float = 0.8

    def __check_init__(self):
        checks.real(
            "ReversibleAdjoint", "beta", self.beta, low=0, high=1, low_open=True, high_open=True,
            hint=" The reverse step divides by 1 - beta, and beta = 0 never moves.",
        )

    def apply(self, forward, inputs):
        solver = inputs.solver
        if type(solver) is not Picard:
            raise ValueError(
                f"fpx.ReversibleAdjoint runs its own reversible iteration and takes only the "
                f"stopping test (rtol, atol, norm) from `solver=`, which must be fpx.Picard(...) "
                f"(the default); got {type(solver).__name__}. Pass e.g. "
                f"solver=fpx.Picard(rtol={solver.rtol!r}, atol={solver.atol!r})."
            )
        if inputs.infeasibility is not None:
            raise ValueError(
                "fpx.ReversibleAdjoint does not support detect_infeasible: its coupled iteration "
                "has no drift law. Use detect_infeasible with the other adjoints."
            )
        coupled = _CoupledIteration(beta=self.beta, rtol=solver.rtol, atol=solver.atol, norm=solver.norm)
        rest = dataclasses.replace(inputs, fn=None, z0=None, args=None, solver=coupled, backward_probe=None)
        z0 = stop_gradient_arrays(inputs.z0)
        try:
            return _reversible((inputs.fn, inputs.args), z0, rest, forward)
        except TypeError as e:
            if "forward-mode" not in str(e):
                raise
            raise TypeError(
                "fpx.ReversibleAdjoint supports reverse mode only (jax.grad, jax.vjp): its "
                "gradient is a reversed loop, not a tangent rule. For jax.jvp, jax.jacfwd or "
                "jax.hessian use adjoint=fpx.ImplicitAdjoint() (the default), fpx.JFBAdjoint() "
                "or fpx.PhantomAdjoint()."
            ) from None


def _reversible_solve(fn_args, z0, rest, forward):
    """The solve, and the returned iterate's `(z, y, step)` to reverse from."""
    fn, args = fn_args
    sol = forward(dataclasses.replace(rest, fn=fn, z0=z0, args=args))
    stats = dict(sol.stats)
    state = stats.pop(_COUPLED_KEY)
    solved = sol.result == RESULTS.successful
    # On success the driver returns the last iterate, else its best one, which this
    # state tracks identically; take z from the state too, so value and gradient agree.
    z = tree_where(solved, sol.value, state.best_z)
    y = tree_where(solved, state.y, state.best_y)
    k = jnp.where(solved, state.step, state.best_step)
    return Solution(value=z, result=sol.result, stats=stats), (z, y, k)


@eqx.filter_custom_vjp
def _reversible(fn_args, z0, rest, forward):
    return _reversible_solve(fn_args, z0, rest, forward)[0]


@_reversible.def_fwd
def _reversible_fwd(perturbed, fn_args, z0, rest, forward):
    del perturbed
    return _reversible_solve(fn_args, z0, rest, forward)


@_reversible.def_bwd
def _reversible_bwd(residuals, grad_sol, perturbed, fn_args, z0, rest, forward):
    del z0, forward
    z, y, k = residuals
    beta = rest.solver.beta
    # Only the perturbed leaves of (fn, args) get vjps and accumulators.
    diff, nondiff = eqx.partition(fn_args, perturbed)
    g_z = jtu.tree_map(lambda g, v: jnp.zeros_like(v) if g is None else g, grad_sol.value, z, is_leaf=lambda g: g is None)

    def call(d, v):
        f, a = eqx.combine(d, nondiff)
        return f(v, a)

    def pullback(v):
        return eqx.filter_vjp(call, diff, v)

    def body(carry):
        k, z1, y1, g_z1, g_y1, g_theta = carry
        # Step n -> n+1 was y1 = relax(y0, f(z0)), z1 = relax(z0, f(y1)); undo and pull back.
        fy1, vjp_y1 = pullback(y1)
        z0 = _unrelax(z1, fy1, beta)
        g_theta_z, g_fy1 = vjp_y1(g_z1)
        g_y1 = jtu.tree_map(lambda a, b: a + beta * b, g_y1, g_fy1)
        fz0, vjp_z0 = pullback(z0)
        y0 = _unrelax(y1, fz0, beta)
        g_theta_y, g_fz0 = vjp_z0(g_y1)
        g_z0 = _relax(g_z1, g_fz0, beta)
        g_y0 = jtu.tree_map(lambda a: (1 - beta) * a, g_y1)
        g_theta = jtu.tree_map(lambda t, a, b: t + beta * (a + b), g_theta, g_theta_z, g_theta_y)
        return k - 1, z0, y0, g_z0, g_y0, g_theta

    g_theta = jtu.tree_map(jnp.zeros_like, eqx.filter(diff, eqx.is_inexact_array))
    carry = (k, z, y, g_z, jtu.tree_map(jnp.zeros_like, y), g_theta)
    _, z_start, y_start, _, _, g_theta = jax.lax.while_loop(lambda c: c[0] > 0, body, carry)
    if rest.throw:
        # The reversal divides by 1 - beta at every step; over many steps the reconstructed
        # states can overflow to inf/NaN. Then the gradient is noise: say so, never a silent
        # NaN. (How far the reversal misses z0 is no test: it overstates the gradient's
        # error by orders of magnitude, as early states carry contracted cotangents.)
        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(leaf)) for leaf in jtu.tree_leaves((z_start, y_start, g_theta))]))
        g_theta = eqx.error_if(
            g_theta, ~finite,
            "fpx.ReversibleAdjoint: reversing the forward iteration overflowed (the reconstructed "
            "states or the gradient are not finite): rounding errors grow about 1/(1 - beta) per "
            "reversed step. Solve in fewer steps (looser rtol/atol, a smaller max_steps), in float64, "
            "or use adjoint=fpx.ImplicitAdjoint(); throw=False returns the non-finite gradient.",
        )
    return g_theta
