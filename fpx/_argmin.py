"""`argmin`: a minimiser as the fixed point of a gradient step, differentiated through stationarity.

`fpx.argmin(loss, w0, args)` finds `w* = argmin_w loss(w, args)` by running an fpx solver
on a gradient-type step map, and makes `w*` differentiable in the arrays of `args` (and in
what `loss` closes over) by the implicit function theorem applied to the stationarity
condition `∇_w L(w*, θ) = 0`:

    dw*/dθ = -H⁻¹ ∂²L/∂w∂θ,    H = ∇²_w L(w*, θ),

which does not depend on the step map, its step size or the solver that found `w*`. The
hypergradient of an outer loss `V(w*(θ))` (Lorraine, Vicol & Duvenaud 2020) is then
`-(∂²L/∂θ∂w) H⁻¹ ∇V` in reverse mode, `-H⁻¹ (∂²L/∂w∂θ) θ̇` in forward mode.

`H` is seen only through Hessian-vector products, forward over reverse (`jvp` of `grad`,
about the cost of two gradient evaluations each, linearised once per solve). The one new
object is a symmetric linear solve `u ≈ H⁻¹ b` by a selectable estimator, written as a JAX
primitive (`_hessian_solve_p`) like `ImplicitAdjoint`'s linear fixed point, so that JAX
can differentiate, transpose and batch it: forward mode binds it on the tangent, reverse
mode on the cotangent (`H` is symmetric and every estimator's approximation of `H⁻¹` is a
symmetric operator, so the transpose is the same solve), and `vmap` batches it.
"""

from __future__ import annotations

import abc
import math
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Bool, PyTree, Scalar

from . import _validate as checks
from ._errors import FixedPointError, failure_message, unvmapped_worst
from ._fixed_point import fixed_point
from ._misc import ravel, stop_gradient_arrays, tree_describe, tree_sub, two_norm
from ._solution import RESULTS, Solution
from .adjoint import AbstractAdjoint, Packed, first_entry
from .solvers import AbstractFixedPointSolver, Anderson, Picard

# Power iterations behind the default step size 1/λ̂ (λ̂ ≈ |λ|_max of the Hessian).
POWER_ITERATIONS = 20


# ----------------------------------------------------------------------------- estimators


class AbstractHypergradient(eqx.Module):
    """Base class of the hypergradient estimators: how `fpx.argmin` is differentiated.

    All but `HypergradientUnrolled` are *implicit*: they differentiate the stationarity
    condition `∇_w L(w*, θ) = 0`, so that `dw*/dθ = -H⁻¹ ∂²L/∂w∂θ`, and differ only in
    how they apply `H⁻¹` (`H = ∇²_w L` at `w*`) to a vector `b`:

    | estimator | approximation of `H⁻¹ b` | cost per solve (HVP: Hessian-vector product) |
    |---|---|---|
    | `HypergradientExact()` | dense `H`, LU solve | `n` HVPs (batched) + `O(n³)`, `O(n²)` memory |
    | `HypergradientLinearSolve(lineax.CG(...))` | CG (or any lineax solver) on `H` | one HVP per CG step, + 1 |
    | `HypergradientFixedPoint(fpx.Anderson())` | fpx solver on `u = u - α(Hu - b)` | one HVP per step, + 1 |
    | `HypergradientNeumann(terms=k)` | `α Σ_{j<k} (I - αH)^j b` | `k` HVPs (`k = 1`: JFB, `αb`) |
    | `HypergradientUnrolled(steps=k)` | derivative of `k` steps of the step map | `k` steps, `O(k)` memory |

    Each implicit estimator reports its own quality: the relative residual
    `|H u - b| / |b|` of the `u` it returns, its number of steps, and whether it failed,
    in `fpx.backward_probe()` layout `[num_steps, residual_norm, failed]`. A failed solve
    raises `FixedPointError` at run time with `throw=True` and gives a NaN hypergradient
    with `throw=False`; it is never returned silently.

    ```python
    import jax, jax.numpy as jnp, fpx
    loss = lambda w, lam: jnp.sum((w - 1.0) ** 2) + lam * jnp.sum(w ** 2)   # w* = 1 / (1 + lam)
    for adjoint in [fpx.HypergradientExact(), fpx.HypergradientLinearSolve()]:
        assert isinstance(adjoint, fpx.AbstractHypergradient)
        g = jax.grad(lambda lam: fpx.argmin(loss, jnp.zeros(3), lam, adjoint=adjoint).value.sum())(0.5)
        assert jnp.allclose(g, -3 / 1.5 ** 2, rtol=1e-3)
    ```
    """


class _AbstractInverseHessian(AbstractHypergradient):
    """An implicit estimator: a symmetric approximation `u ≈ H⁻¹ b`."""

    # Whether `u` is `H⁻¹ b` itself (to the solver's tolerance); if not, the approximation
    # is an explicit function of `H` that second derivatives differentiate directly.
    exact_inverse: ClassVar[bool] = True
    # Whether the estimator uses the step `α` (default: the argmin step size).
    uses_alpha: ClassVar[bool] = False

    @abc.abstractmethod
    def _solve(self, hvp: Callable, b: PyTree, alpha: Scalar) -> tuple[PyTree, Array, Array, Array, Array]:
        """`(u, num_steps, residual, failed, reason)` for a right-hand side of unit norm."""

    @abc.abstractmethod
    def _describe(self) -> str:
        """The estimator, for error messages."""

    @abc.abstractmethod
    def _explain(self, reason: int) -> str:
        """Why a solve failed, from the `reason` code `_solve` returned."""


def _tree_finite(tree) -> Bool[Array, ""]:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jtu.tree_leaves(tree)]))


def _size(tree) -> int:
    return sum(int(np.size(x)) for x in jtu.tree_leaves(tree))


def _dtype(tree):
    return jnp.result_type(*[x.dtype for x in jtu.tree_leaves(tree)])


def _axpy(a, x, y):
    """`a * x + y`, leafwise, in each leaf's dtype."""
    return jtu.tree_map(lambda u, v: (jnp.asarray(a, u.dtype) * u + v).astype(v.dtype), x, y)


def _scale(a, x):
    return jtu.tree_map(lambda u: jnp.asarray(a, u.dtype) * u, x)


class HypergradientExact(_AbstractInverseHessian):
    """The exact hypergradient from the dense Hessian: for small problems.

    Forms `H = ∇²_w L(w*)` as `jax.hessian` does (forward over reverse: the Hessian-vector
    products of the `n` unit vectors, batched), symmetrises it and solves `H u = b` by LU.
    Cost: `n` Hessian-vector products and `O(n³)` flops, `O(n²)` memory, for each
    hypergradient solve (once per `jax.grad`, once per tangent direction of `jax.jvp`).
    `H` only needs to be nonsingular (a saddle point is fine).

    **Quality.** The solve fails (raise with `throw=True`, NaN with `throw=False`) when the
    relative residual `|H u - b| / |b|` exceeds `rtol` (default `sqrt(eps)` of the dtype:
    1.5e-8 in float64, 3.5e-4 in float32) or is not finite: `H` is singular or too
    ill-conditioned for the dtype.

    ```python
    import jax, jax.numpy as jnp, fpx
    A = jnp.array([[3.0, 1.0], [1.0, 2.0]])
    loss = lambda w, b: 0.5 * w @ A @ w - b @ w          # w* = A^{-1} b
    w_star = lambda b: fpx.argmin(loss, jnp.zeros(2), b, adjoint=fpx.HypergradientExact()).value
    J = jax.jacrev(w_star)(jnp.ones(2))
    assert jnp.allclose(J, jnp.linalg.inv(A), atol=1e-4)
    ```
    """

    rtol: float | None = None

    def __check_init__(self):
        if self.rtol is not None:
            checks.real("HypergradientExact", "rtol", self.rtol, low=0, low_open=True)

    def _solve(self, hvp, b, alpha):
        del alpha
        flat, unravel = ravel(b)
        n = flat.size
        hessian = jax.vmap(lambda v: ravel(hvp(unravel(v)))[0])(jnp.eye(n, dtype=flat.dtype))
        hessian = 0.5 * (hessian + hessian.T)
        u = jnp.linalg.solve(hessian, flat)
        residual = two_norm(flat - hessian @ u)
        rtol = self.rtol if self.rtol is not None else math.sqrt(float(jnp.finfo(flat.dtype).eps))
        failed = ~jnp.isfinite(residual) | (residual > rtol)
        return unravel(u), jnp.asarray(n), residual, failed, jnp.asarray(0)

    def _describe(self):
        return "HypergradientExact (dense Hessian, LU)"

    def _explain(self, reason):
        return (
            "The Hessian of the loss at the minimiser is singular or too ill-conditioned for "
            "the dtype (the implicit function theorem needs it nonsingular): regularise the inner "
            "loss, work in float64, or loosen HypergradientExact(rtol=...)."
        )


def _default_cg():
    import lineax as lx

    return lx.CG(rtol=1e-6, atol=1e-6, max_steps=1000)


class HypergradientLinearSolve(_AbstractInverseHessian):
    """The implicit hypergradient by a lineax solver on the matrix-free Hessian: the default.

    `H` is a `lineax.FunctionLinearOperator` whose `mv` is a Hessian-vector product
    (forward over reverse), tagged symmetric, and also positive semidefinite for the
    solvers that need it (`lineax.CG`, `lineax.Cholesky`): CG assumes the inner problem is
    convex at `w*`. Any square lineax solver works: `lineax.GMRES` or `lineax.BiCGStab` for
    an indefinite (saddle-point) Hessian, dense ones (`lineax.LU`) on small problems.

    **Arguments:**

    - `linear_solver`: a lineax solver; default `lineax.CG(rtol=1e-6, atol=1e-6,
      max_steps=1000)`. Tolerances are relative to the right-hand side: it is scaled to
      unit norm, so they mean the same whatever the scale of the outer loss. The operator
      handed to lineax is `αH`, with `α` the gradient step size of `argmin` (`≈ 1/λ_max`),
      so that lineax's breakdown tests do not depend on the scale of the inner loss
      either.

    **Cost:** one Hessian-vector product per CG step (about two gradient evaluations),
    plus one to check the residual; CG needs about `sqrt(cond(H))` steps per digit.

    **Quality.** The solve fails when lineax reports failure, or when the true relative
    residual `|H u - b| / |b|`, recomputed after the solve, is not finite or exceeds
    `max(10 (rtol + sqrt(n) atol), sqrt(eps))` (`sqrt(eps)` for direct solvers): CG on
    an indefinite or singular Hessian can stop "successfully" at a wrong or NaN `u`, and
    so does a bare step budget (`lineax.CG(rtol=0, atol=0, max_steps=k)`, which lineax
    always calls a success; for a fixed-cost approximation use `HypergradientNeumann`).
    lineax's CG declares a breakdown (NaN, reported as a failure) when
    `pᵀ(αH)p <= 200 n eps rᵀr` for a search direction `p`, which in float32 with `n`
    weights can happen once `cond(H)` exceeds about `1/(200 n eps)` (about 65 for
    `n = 640`; it does on per-weight L2 logistic regression of sklearn digits with
    L2 strengths near 1e-3). There, work in float64 or
    use `HypergradientFixedPoint()` (Anderson) or `HypergradientExact()`.

    ```python
    import jax, jax.numpy as jnp, lineax as lx, fpx
    A = jnp.array([[3.0, 1.0], [1.0, 2.0]])
    loss = lambda w, b: 0.5 * w @ A @ w - b @ w          # w* = A^{-1} b
    cg = fpx.HypergradientLinearSolve(lx.CG(rtol=1e-6, atol=1e-6, max_steps=50))
    w_star = lambda b: fpx.argmin(loss, jnp.zeros(2), b, adjoint=cg).value
    g = jax.grad(lambda b: w_star(b).sum())(jnp.ones(2))
    assert jnp.allclose(g, jnp.linalg.solve(A, jnp.ones(2)), atol=1e-4)
    ```
    """

    linear_solver: Any = None
    uses_alpha: ClassVar[bool] = True

    def __check_init__(self):
        if self.linear_solver is not None:
            import lineax as lx

            if not isinstance(self.linear_solver, lx.AbstractLinearSolver):
                raise TypeError(
                    "`HypergradientLinearSolve(linear_solver=...)` must be a lineax solver such as "
                    f"lineax.CG(rtol=1e-6, atol=1e-6, max_steps=1000), got {self.linear_solver!r}. "
                    "For an fpx fixed-point solver use fpx.HypergradientFixedPoint(solver=...)."
                )

    def _lineax(self):
        return self.linear_solver if self.linear_solver is not None else _default_cg()

    def _solve(self, hvp, b, alpha):
        import lineax as lx

        solver = self._lineax()
        tags = [lx.symmetric_tag]
        if isinstance(solver, (lx.CG, lx.Cholesky)):
            tags.append(lx.positive_semidefinite_tag)
        # The solve is of (αH) v = b, u = αv, with α ≈ 1/λ_max(H): the same u, but lineax's
        # breakdown tests (CG stops at |pᵀ H p| <= 200 n eps |rᵀr|, an absolute threshold)
        # become relative to the curvature, so that they do not depend on the scale of the
        # loss (a mean rather than a sum over samples).
        # lineax's iterative solvers promote mixed-dtype pytrees (a float32 leaf times a
        # float64 scalar) and then call the operator with the wrong dtypes: solve on the
        # flattened vector (in the widest dtype) there.
        mixed = len({x.dtype for x in jtu.tree_leaves(b)}) > 1
        if mixed:
            vector, unravel = ravel(b)

            def mv(v):
                return ravel(_scale(alpha, hvp(unravel(v))))[0]
        else:
            vector, unravel = b, lambda v: v

            def mv(v):
                return _scale(alpha, hvp(v))

        operator = lx.FunctionLinearOperator(mv, jax.eval_shape(lambda: vector), tags=frozenset(tags))
        sol = lx.linear_solve(operator, vector, solver, throw=False)
        u = _scale(alpha, unravel(sol.value))
        residual = two_norm(tree_sub(b, hvp(u)))
        eps = float(jnp.finfo(_dtype(b)).eps)
        rtol, atol = getattr(solver, "rtol", None), getattr(solver, "atol", None)
        tol = math.sqrt(eps)
        if rtol is not None and atol is not None:
            tol = jnp.maximum(10.0 * (rtol + math.sqrt(_size(b)) * atol), tol)
        lineax_failed = sol.result != lx.RESULTS.successful
        failed = lineax_failed | ~jnp.isfinite(residual) | (residual > tol)
        reason = jnp.where(lineax_failed, sol.result._value, -1)
        num_steps = jnp.asarray(sol.stats.get("num_steps", 0))
        return u, num_steps, residual, failed, reason

    def _describe(self):
        return f"HypergradientLinearSolve with lineax.{type(self._lineax()).__name__}"

    def _explain(self, reason):
        import lineax as lx

        if reason >= 0:
            head = f"lineax reports: {lx.RESULTS._index_to_message[int(reason)] or 'failure'}"
            if isinstance(self._lineax(), lx.CG):
                head += (
                    "\nlineax's CG also stops with NaN (a 'breakdown') when p^T H p <= 200 n eps r^T r "
                    "for a search direction p: in float32 with n weights this can happen once cond(H) "
                    "exceeds about 1/(200 n eps) (about 65 for n = 640). Work in float64, or use "
                    "HypergradientFixedPoint() or HypergradientExact()."
                )
        else:
            head = "lineax reported success, but the recomputed residual is above the tolerance or not finite."
        return (
            f"{head}\nThe Hessian of the loss at the minimiser may be indefinite or singular (CG needs "
            "it positive definite): use HypergradientLinearSolve(lineax.GMRES(rtol=1e-6, atol=1e-6)) "
            "for a saddle point, HypergradientExact() on a small problem, raise the solver's max_steps, "
            "or regularise the inner loss."
        )


class HypergradientFixedPoint(_AbstractInverseHessian):
    """The implicit hypergradient by an fpx solver on the adjoint fixed point `u = u - α(Hu - b)`.

    Runs `fpx.fixed_point` (any fpx solver, its stopping test and result codes) on the
    Richardson map `u ↦ u - α(Hu - b)`, whose fixed point is `H⁻¹ b`, from `u0 = αb`.
    Picard on it converges when `0 < α < 2/λ_max(H)` and `H` is positive definite (rate
    `1 - α λ_min`); `fpx.Anderson()` (the default) is GMRES on this linear map, so it is
    insensitive to `α` and also solves indefinite systems.

    **Arguments:**

    - `solver`: an fpx solver; default `fpx.Anderson(rtol=1e-6, atol=1e-7)`. Its stopping
      test `|u - T(u)| <= atol + rtol |u|` applies to `|u - T(u)| = α |Hu - b|` with
      `|b| = 1`; the `rtol` term is what float32 can resolve when `|u| = |H⁻¹ b|` is large.
    - `alpha`: the step `α`; default the gradient step size of `argmin` (its `step`,
      or `1/λ̂` of the Hessian when `step` is omitted or an optax transform).
    - `max_steps`: step budget of the solve.

    **Cost:** one Hessian-vector product per step, plus one to check the residual.

    **Quality.** The solve fails when `fixed_point` does not end with
    `RESULTS.successful` (or the residual is not finite); the report carries the
    relative residual `|H u - b| / |b|`.

    ```python
    import jax, jax.numpy as jnp, fpx
    A = jnp.array([[3.0, 1.0], [1.0, 2.0]])
    loss = lambda w, b: 0.5 * w @ A @ w - b @ w          # w* = A^{-1} b
    est = fpx.HypergradientFixedPoint(solver=fpx.Anderson(rtol=1e-6, atol=1e-7))
    w_star = lambda b: fpx.argmin(loss, jnp.zeros(2), b, adjoint=est).value
    g = jax.grad(lambda b: w_star(b).sum())(jnp.ones(2))
    assert jnp.allclose(g, jnp.linalg.solve(A, jnp.ones(2)), atol=1e-4)
    ```
    """

    solver: AbstractFixedPointSolver = Anderson(rtol=1e-6, atol=1e-7)
    alpha: float | None = None
    max_steps: int = 256
    uses_alpha: ClassVar[bool] = True

    def __check_init__(self):
        checks.solver("HypergradientFixedPoint", "solver", self.solver)
        checks.integer("HypergradientFixedPoint", "max_steps", self.max_steps, minimum=1)
        if self.alpha is not None:
            checks.real("HypergradientFixedPoint", "alpha", self.alpha, low=0, low_open=True)

    def _solve(self, hvp, b, alpha):
        def richardson(u, b):
            return jtu.tree_map(
                lambda x, hx, y: (x - jnp.asarray(alpha, x.dtype) * (hx - y)).astype(x.dtype), u, hvp(u), b
            )

        sol = fixed_point(richardson, _scale(alpha, b), b, solver=self.solver, max_steps=self.max_steps, throw=False)
        residual = two_norm(tree_sub(b, hvp(sol.value)))
        failed = (sol.result != RESULTS.successful) | ~jnp.isfinite(residual)
        return sol.value, sol.stats["num_steps"], residual, failed, sol.result._value

    def _describe(self):
        return f"HypergradientFixedPoint with fpx.{type(self.solver).__name__}"

    def _explain(self, reason):
        return (
            f"{type(self.solver).__name__} on u = u - alpha (H u - b) ended with: "
            f"{RESULTS._index_to_message[int(reason)] or 'a non-finite residual'}\n"
            "With Picard or KM, alpha must lie below 2/lambda_max(H) and H must be positive definite; "
            "fpx.Anderson() does not depend on alpha. Raise HypergradientFixedPoint(max_steps=...), or use "
            "HypergradientLinearSolve() / HypergradientExact()."
        )


class HypergradientNeumann(_AbstractInverseHessian):
    """Lorraine et al.'s truncated Neumann series: `H⁻¹ b ≈ α Σ_{j<k} (I - αH)^j b`.

    The `k`-term series (`v ← v - αHv`, summed) is the derivative of `k` gradient steps of
    size `α` taken from the minimiser itself. Its error is `H⁻¹ (I - αH)^k b`, shrinking
    like `(1 - α λ_min)^k` when `0 < α < 2/λ_max(H)` and `H` is positive definite.
    `terms=1` is **JFB** (Jacobian-free backpropagation, Fung et al. 2022): the identity
    approximation `H⁻¹ ≈ αI`, i.e. differentiating one gradient step at `w*`, with no
    Hessian at all in the hypergradient itself (a descent direction for a convex loss).

    **Arguments:**

    - `terms`: the number of terms `k >= 1`.
    - `alpha`: the step `α`; default the gradient step size of `argmin` (its `step`,
      or `1/λ̂` of the Hessian when `step` is omitted or an optax transform).

    **Cost:** `k` Hessian-vector products: `k - 1` for the sum, and one more whose result
    `(I - αH)^k b` is the residual `b - Hu` of the returned `u` (the quality report).

    **Quality.** An approximation by definition: a truncated series does not "fail", and
    its relative residual `|(I - αH)^k b| / |b|` is reported. It fails only when the
    series diverges, i.e. that residual exceeds 1 (`u = 0` would do better: `α` is above
    `2/λ_max(H)`, or `H` has negative curvature), or is not finite.

    ```python
    import jax, jax.numpy as jnp, fpx
    A = jnp.array([[3.0, 1.0], [1.0, 2.0]])
    loss = lambda w, b: 0.5 * w @ A @ w - b @ w          # w* = A^{-1} b
    exact = jnp.linalg.solve(A, jnp.ones(2))
    def hypergradient(k):
        est = fpx.HypergradientNeumann(terms=k, alpha=0.25)
        return jax.grad(lambda b: fpx.argmin(loss, jnp.zeros(2), b, adjoint=est).value.sum())(jnp.ones(2))
    jfb, g8, g64 = hypergradient(1), hypergradient(8), hypergradient(64)
    assert jnp.allclose(jfb, 0.25 * jnp.ones(2))                     # JFB: alpha * b
    errors = [float(jnp.linalg.norm(g - exact)) for g in (jfb, g8, g64)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-4
    ```
    """

    terms: int = 20
    alpha: float | None = None
    exact_inverse: ClassVar[bool] = False
    uses_alpha: ClassVar[bool] = True

    def __check_init__(self):
        checks.integer("HypergradientNeumann", "terms", self.terms, minimum=1)
        if self.alpha is not None:
            checks.real("HypergradientNeumann", "alpha", self.alpha, low=0, low_open=True)

    def _series(self, hvp, b, alpha):
        """`(α Σ_{j<k} (I - αH)^j b, (I - αH)^k b)`: the approximation and its residual."""

        def body(_, carry):
            v, total = carry
            total = jtu.tree_map(lambda t, x: t + x, total, v)
            v = _axpy(-alpha, hvp(v), v)
            return v, total

        v, total = jax.lax.fori_loop(0, self.terms, body, (b, jtu.tree_map(jnp.zeros_like, b)))
        return _scale(alpha, total), v

    def _approximate(self, hvp, b, alpha):
        return self._series(hvp, b, alpha)[0]

    def _solve(self, hvp, b, alpha):
        u, residual_vector = self._series(hvp, b, alpha)
        residual = two_norm(residual_vector)
        failed = ~jnp.isfinite(residual) | (residual > 1)
        return u, jnp.asarray(self.terms), residual, failed, jnp.asarray(0)

    def _describe(self):
        return f"HypergradientNeumann(terms={self.terms})"

    def _explain(self, reason):
        return (
            "The Neumann series diverges: its residual (I - alpha H)^k b grew beyond |b|, so alpha "
            "is above 2/lambda_max(H) or H has negative curvature at the minimiser. Pass a smaller "
            "HypergradientNeumann(alpha=...) (it must lie below 2/lambda_max), or use "
            "HypergradientLinearSolve(lineax.GMRES(...)) for an indefinite Hessian."
        )


class HypergradientUnrolled(AbstractHypergradient):
    """The derivative of `steps` iterations of the step map from `w0`: unrolled differentiation, for comparison.

    Differentiates `w_k`, the `k`-th iterate of the inner step map started at `w0` (the
    gradient step `w - η∇L`, or the optax transform with its state from `init(w0)`), as
    backpropagating through `k` steps of training does (Maclaurin et al. 2015). The
    returned `value` is still the minimiser found by the solver; only its derivative is
    that of `w_k`. An approximation by definition (it never "fails" and reports nothing):
    it approaches the implicit hypergradient as `k` grows when the step map contracts to
    `w*`, its error mixing the distance of `w_k` from `w*` and the truncation of the
    derivative's own series. Unlike the implicit estimators it differentiates the step
    size too (a traced `step` gets the learning-rate hypergradient `dw_k/dη`).

    **Arguments:** `steps`, the number `k` of unrolled steps.

    **Cost:** `k` forward steps inside the derivative; reverse mode stores the `k` iterates
    (memory `O(k)`, where the implicit estimators need `O(1)` in the number of steps).
    Forward and reverse mode both work (`lax.scan`).

    ```python
    import jax, jax.numpy as jnp, fpx
    A = jnp.array([[3.0, 1.0], [1.0, 2.0]])
    loss = lambda w, b: 0.5 * w @ A @ w - b @ w          # w* = A^{-1} b
    def hypergradient(k):
        est = fpx.HypergradientUnrolled(steps=k)
        f = lambda b: fpx.argmin(loss, jnp.zeros(2), b, step=0.25, adjoint=est).value.sum()
        return jax.grad(f)(jnp.ones(2))
    exact = jnp.linalg.solve(A, jnp.ones(2))
    assert jnp.linalg.norm(hypergradient(10) - exact) > jnp.linalg.norm(hypergradient(100) - exact)
    assert jnp.allclose(hypergradient(100), exact, atol=1e-4)
    ```
    """

    steps: int = 100

    def __check_init__(self):
        checks.integer("HypergradientUnrolled", "steps", self.steps, minimum=1)


# ------------------------------------------------------------------- the Hessian solve


class _Objective(eqx.Module):
    """The closure-converted `loss(w, args)` (its closed-over arrays are its leaves)."""

    fn: Callable
    has_aux: bool = eqx.field(static=True)

    def value(self, w, args):
        out = self.fn(w, args)
        return out[0] if self.has_aux else out

    def grad(self, w, args):
        return jax.grad(lambda v: self.value(v, args))(w)


class _SolveConfig(eqx.Module):
    estimator: _AbstractInverseHessian
    alpha: Any
    throw: bool = eqx.field(static=True)


def _hvp(residuals):
    """`v ↦ H v` at `(objective, w, args)`: forward over reverse, linearised once."""
    objective, w, args = residuals.unpack() if isinstance(residuals, Packed) else residuals
    _, hvp = jax.linearize(lambda v: objective.grad(v, args), w)
    return hvp


def _raise_if_solve_failed(failed, num_steps, residual, reason, config: _SolveConfig):
    estimator = config.estimator

    def check(any_failed, num_steps, residual, reason):
        if not bool(any_failed):
            return
        raise FixedPointError(
            f"fpx.argmin: the hypergradient solve H u = b ({estimator._describe()}, H the Hessian of "
            f"the loss at the minimiser) failed after {int(num_steps)} steps: relative residual "
            f"|H u - b| / |b| = {float(residual):.3e}.\n{estimator._explain(int(reason))}\n"
            "Pass throw=False to get a NaN hypergradient instead, and fpx.backward_probe() to read "
            "[num_steps, residual_norm, failed] of the solve."
        )

    any_failed, (worst_steps, worst_residual, worst_reason) = unvmapped_worst(
        failed, jnp.asarray(num_steps), jnp.asarray(residual), jnp.asarray(reason)
    )
    jax.debug.callback(check, any_failed, worst_steps, worst_residual, worst_reason)


def _solve_impl(residuals, rhs, probe, config):
    """`u ≈ H⁻¹ rhs` and its report, solved for the unit-norm `rhs / |rhs|`, then scaled back."""
    del probe
    hvp = _hvp(residuals)
    rhs_norm = two_norm(rhs)
    scale = jnp.where(rhs_norm > 0, rhs_norm, 1.0)
    b = jtu.tree_map(lambda x: x / scale.astype(x.dtype), rhs)
    dtype = _dtype(rhs)
    alpha = jnp.asarray(config.alpha, dtype)
    u, num_steps, residual, failed, reason = config.estimator._solve(hvp, b, alpha)
    # A zero right-hand side (an outer loss that does not depend on w*, a zero tangent) has
    # the solution zero, even where H is singular.
    zero = rhs_norm == 0
    u = jtu.tree_map(lambda x: jnp.where(zero, 0.0, x).astype(x.dtype), u)
    residual = jnp.where(zero, 0.0, residual)
    failed = (failed | ~_tree_finite(u)) & ~zero
    if config.throw:
        _raise_if_solve_failed(failed, num_steps, residual, reason, config)
    u = jtu.tree_map(lambda x: jnp.where(failed, jnp.nan, x * scale.astype(x.dtype)), u)
    report = jnp.stack(
        [jnp.asarray(num_steps).astype(dtype), jnp.asarray(residual).astype(dtype), failed.astype(dtype)]
    )
    return u, report


def _solve_abstract_eval(residuals, rhs, probe, config):
    del residuals, probe, config
    u = jtu.tree_map(lambda x: jax.core.ShapedArray(x.shape, x.dtype), rhs)
    return u, jax.core.ShapedArray((3,), _dtype(rhs))


def _materialise(primal, tangent):
    return jtu.tree_map(eqxi.materialise_zeros, primal, tangent, is_leaf=lambda x: x is None)


def _solve_jvp(primals, tangents):
    residuals, rhs, probe, config = primals
    t_residuals, t_rhs, _, _ = tangents
    u, report = _bind(residuals, rhs, probe, config)
    rhs_dot = _materialise(rhs, t_rhs)
    perturbed = any(t is not None for t in jtu.tree_leaves(t_residuals, is_leaf=lambda x: x is None))
    if not perturbed:
        u_dot, _ = _bind(residuals, rhs_dot, None, config)
    elif config.estimator.exact_inverse:
        # d[H⁻¹ b] = H⁻¹ (ḃ - Ḣ u): differentiate v ↦ H v in (objective, w, args).
        t_residuals = _materialise(residuals, t_residuals)
        u_fixed = jax.lax.stop_gradient(u)
        _, h_dot_u = eqx.filter_jvp(lambda r: _hvp(r)(u_fixed), (residuals,), (t_residuals,))
        u_dot, _ = _bind(residuals, tree_sub(rhs_dot, h_dot_u), None, config)
    else:
        # An explicit polynomial in H (Neumann): differentiate the polynomial itself.
        t_residuals = _materialise(residuals, t_residuals)
        alpha = jnp.asarray(config.alpha, _dtype(rhs))

        def approximation(r, b):
            return config.estimator._approximate(_hvp(r), b, alpha)

        _, u_dot = eqx.filter_jvp(approximation, (residuals, rhs), (t_residuals, rhs_dot))
    return (u, report), (u_dot, None)


def _solve_transpose(inputs, cts_out):
    residuals, rhs, probe, config = inputs
    undefined = jax.interpreters.ad.UndefinedPrimal
    ct_u, _ = cts_out
    ct_u = jtu.tree_map(
        lambda r, c: (jnp.zeros(r.aval.shape, r.aval.dtype) if isinstance(r, undefined) else jnp.zeros_like(r)) if c is None else c,
        rhs,
        ct_u,
        is_leaf=lambda x: isinstance(x, undefined) or x is None,
    )
    # H is symmetric and so is every estimator's approximation of H⁻¹: the transpose is the
    # same solve, on the cotangent.
    ct_rhs, report = _bind(residuals, ct_u, None, config)
    ct_rhs = jtu.tree_map(lambda r, c: c if isinstance(r, undefined) else None, rhs, ct_rhs, is_leaf=lambda x: isinstance(x, undefined))
    ct_probe = report.astype(probe.aval.dtype) if isinstance(probe, undefined) else None
    return jtu.tree_map(lambda _: None, residuals), ct_rhs, ct_probe, jtu.tree_map(lambda _: None, config)


def _bind(residuals, rhs, probe, config):
    packed = residuals if isinstance(residuals, Packed) else Packed.pack(residuals)
    return eqxi.filter_primitive_bind(_hessian_solve_p, packed, rhs, probe, config)


_hessian_solve_p = eqxi.create_vprim(
    "fpx_hessian_solve",
    eqxi.filter_primitive_def(_solve_impl),
    eqxi.filter_primitive_def(_solve_abstract_eval),
    eqxi.filter_primitive_jvp(_solve_jvp),
    eqxi.filter_primitive_transpose(_solve_transpose),
)


@eqx.filter_custom_jvp
def _implicit_minimiser(w_star, objective, args, probe, config):
    """`w*` itself; its tangent is `-H⁻¹ ∂(∇_w L)/∂θ · θ̇` by the stationarity condition."""
    del objective, args, probe, config
    return w_star


@_implicit_minimiser.def_jvp
def _implicit_minimiser_jvp(primals, tangents):
    w_star, objective, args, probe, config = primals
    _, t_objective, t_args, t_probe, _ = tangents
    # A traced Python scalar reaches the rule as a bare float: make it an array again.
    args = jtu.tree_map(jnp.asarray, args)
    # Calling the function itself keeps higher derivatives implicit too.
    w = _implicit_minimiser(w_star, objective, args, probe, config)
    t_objective, t_args = _materialise((objective, args), (t_objective, t_args))
    # ġ = ∂(∇_w L)/∂θ · θ̇: a jvp of the gradient (forward over reverse).
    _, g_dot = eqx.filter_jvp(lambda o, a: o.grad(w, a), (objective, args), (t_objective, t_args))
    rhs = jtu.tree_map(jnp.negative, g_dot)
    if probe is not None and eqx.is_array(probe):
        t_probe = eqxi.materialise_zeros(probe, t_probe)
        # Give the probe the batch dimension of the solve (under vmap), so that its cotangent
        # is summed over members by the transpose of this broadcast (as ImplicitAdjoint does).
        t_probe = t_probe + jax.lax.stop_gradient(jnp.where(True, 0.0, first_entry(w)).astype(t_probe.dtype))
    else:
        t_probe = None
    w_dot, _ = _bind((objective, w, args), rhs, t_probe, config)
    return w, w_dot


@jax.custom_jvp
def _nan_tangent_unless(x, ok):
    """`x`, with its tangent (and so its cotangent) multiplied by NaN where `ok` is False."""
    del ok
    return x


@_nan_tangent_unless.defjvp
def _nan_tangent_unless_jvp(primals, tangents):
    x, ok = primals
    tx, _ = tangents
    # A product with a primal-only mask is linear in the tangent, so reverse mode (its
    # transpose) multiplies the cotangent by the same mask: NaN in both modes.
    mask = jnp.where(ok, 1.0, jnp.nan)
    return x, jtu.tree_map(lambda t: t * mask.astype(t.dtype), tx)


# ------------------------------------------------------------------------- checks


def _check_loss(loss, w0, args, has_aux: bool, call: str = "loss(w, args)", entry: str = "fpx.argmin") -> None:
    """Trace `loss(w0, args)` once and check it returns one real floating-point scalar (`call`: how errors name it)."""
    try:
        out = eqx.filter_eval_shape(loss, w0, args)
    except Exception as e:
        e.add_note(f"(raised while tracing {call.replace('(w,', '(w0,')} in {entry} with w0: {_describe_struct(w0)})")
        raise
    if has_aux:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ValueError(
                f"With has_aux=True, {call} must return a pair (loss_value, aux); got {_describe_struct(out)}."
            )
        out = out[0]
    elif isinstance(out, tuple):
        raise ValueError(
            f"{call} must return a scalar, got a tuple {_describe_struct(out)}. If it returns "
            "(loss_value, aux), pass has_aux=True."
        )
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise TypeError(
            f"{call} must return a JAX scalar computed from w, got {out!r} ({type(out).__name__})."
        )
    if jnp.issubdtype(out.dtype, jnp.complexfloating):
        raise TypeError(
            f"{call} must return a real scalar, got dtype {out.dtype}: a complex loss has no "
            "minimiser. Minimise a real quantity such as jnp.abs(z) ** 2 or jnp.real(z)."
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(
            f"{call} must return a floating-point scalar, got dtype {out.dtype}: an integer or "
            "boolean loss has zero gradient everywhere."
        )
    if out.shape != ():
        raise ValueError(
            f"{call} must return a scalar, got shape {out.shape}. Reduce it, e.g. with jnp.sum(...) "
            f"or jnp.mean(...) over samples; {entry} minimises one real number."
        )


def _describe_struct(tree) -> str:
    return tree_describe(eqx.filter_eval_shape(lambda: tree))


def _is_optax(step) -> bool:
    return callable(getattr(step, "init", None)) and callable(getattr(step, "update", None))


def _check_step(step):
    """`(kind, eta, transform)` with kind "auto", "fixed" or "optax"."""
    if step is None:
        return "auto", None, None
    if _is_optax(step):
        return "optax", None, step
    if isinstance(step, AbstractFixedPointSolver):
        raise TypeError(
            f"`step` is the inner step size (or an optax transform), got the fpx solver {type(step).__name__}; "
            f"pass it as `solver=fpx.{type(step).__name__}(...)`."
        )
    checks.real(
        "",
        "step",
        step,
        low=0,
        low_open=True,
        hint=(
            " `step` is the step size η of the gradient step w - η ∇loss(w, args) (below 2/L for an "
            "L-smooth loss), or an optax GradientTransformation such as optax.sgd(0.1); omit it for "
            "η = 1/λ_max of the Hessian at w0."
        ),
    )
    return "fixed", step, None


_SUGGESTIONS = {
    "ImplicitAdjoint": "fpx.HypergradientLinearSolve() (CG on the Hessian) or fpx.HypergradientFixedPoint(solver=...)",
    "JFBAdjoint": "fpx.HypergradientNeumann(terms=1) (JFB: the identity approximation of the inverse Hessian)",
    "PhantomAdjoint": "fpx.HypergradientNeumann(terms=k) (k damped steps at the solution are a Neumann series)",
    "UnrolledAdjoint": "fpx.HypergradientUnrolled(steps=k)",
}
_ESTIMATORS = (
    "fpx.HypergradientLinearSolve() (CG, the default), fpx.HypergradientExact(), "
    "fpx.HypergradientNeumann(terms, alpha), fpx.HypergradientFixedPoint(solver, alpha), "
    "fpx.HypergradientUnrolled(steps)"
)


def _check_adjoint(adjoint) -> AbstractHypergradient:
    if adjoint is None:
        return HypergradientLinearSolve()
    if isinstance(adjoint, AbstractHypergradient):
        if type(adjoint) in (AbstractHypergradient, _AbstractInverseHessian):
            raise TypeError(f"`adjoint` must be a concrete hypergradient estimator: {_ESTIMATORS}.")
        return adjoint
    if isinstance(adjoint, type) and issubclass(adjoint, AbstractHypergradient):
        raise TypeError(
            f"`adjoint` must be an estimator instance, got the class {adjoint.__name__}; write {adjoint.__name__}()."
        )
    if isinstance(adjoint, AbstractAdjoint):
        name = type(adjoint).__name__
        instead = _SUGGESTIONS.get(name, "one of " + _ESTIMATORS)
        raise TypeError(
            f"`adjoint` of fpx.argmin must be a hypergradient estimator, got fpx.{name}, an adjoint of "
            f"fpx.fixed_point (it differentiates a step map, not the stationarity condition of the loss). "
            f"Use {instead}."
        )
    if isinstance(adjoint, AbstractFixedPointSolver):
        raise TypeError(
            f"`adjoint` must be a hypergradient estimator, got the fpx solver {type(adjoint).__name__}; "
            f"wrap it: fpx.HypergradientFixedPoint(solver=fpx.{type(adjoint).__name__}(...))."
        )
    try:
        import lineax as lx

        is_lineax = isinstance(adjoint, lx.AbstractLinearSolver)
    except ImportError:  # pragma: no cover - lineax is a dependency
        is_lineax = False
    if is_lineax:
        raise TypeError(
            f"`adjoint` must be a hypergradient estimator, got the lineax solver {type(adjoint).__name__}; "
            f"wrap it: fpx.HypergradientLinearSolve(lineax.{type(adjoint).__name__}(...))."
        )
    raise TypeError(f"Unknown hypergradient estimator `adjoint={adjoint!r}`: use {_ESTIMATORS}.")


def _unreached_args(objective: _Objective, w0, dynamic_args) -> list[str]:
    """Paths of the floating-point arrays of `args` that `∇_w loss` does not depend on.

    Found at trace time from the jaxpr of the tangent `θ̇ ↦ ∂(∇_w L)/∂θ · θ̇` (dead-code
    elimination: an input the tangent does not use contributes zero to every
    hypergradient). Best effort: if the trace fails (e.g. a `custom_vjp` inside the loss,
    which the Hessian-vector products will report themselves), nothing is reported.
    """
    flat, _ = jtu.tree_flatten_with_path(dynamic_args)
    leaves = [leaf for _, leaf in flat]
    index = [i for i, leaf in enumerate(leaves) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    if not index:
        return []
    obj_dynamic, obj_static = eqx.partition(objective, eqx.is_array)
    tree = jtu.tree_structure(dynamic_args)

    def tangent(obj_dynamic, w, leaves, t):
        obj = eqx.combine(obj_dynamic, obj_static)

        def grad_of(selected):
            full = list(leaves)
            for i, x in zip(index, selected):
                full[i] = x
            return obj.grad(w, jtu.tree_unflatten(tree, full))

        return jax.jvp(grad_of, ([leaves[i] for i in index],), (t,))[1]

    try:
        from jax._src.interpreters import partial_eval as pe

        structs = jax.eval_shape(lambda: (obj_dynamic, w0, leaves, [leaves[i] for i in index]))
        closed = jax.make_jaxpr(tangent)(*structs)
        _, used = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
    except Exception:  # noqa: BLE001 - a diagnostic only; never stop the solve for it
        return []
    used_t = used[len(used) - len(index):]
    return ["args" + jtu.keystr(flat[i][0]) for i, u in zip(index, used_t) if not u]


# ----------------------------------------------------------------------- step maps


def _power_curvature(hvp, like, iterations: int = POWER_ITERATIONS) -> Scalar:
    """`|λ|_max` of the Hessian, estimated by power iteration from a fixed random vector."""
    leaves, treedef = jtu.tree_flatten(like)
    keys = jr.split(jr.PRNGKey(0), len(leaves))
    v = jtu.tree_unflatten(treedef, [jr.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
    norm = two_norm(v)
    v = jtu.tree_map(lambda x: x / norm.astype(x.dtype), v)

    def body(_, carry):
        v, _ = carry
        hv = hvp(v)
        lam = two_norm(hv)
        safe = jnp.where(lam > 0, lam, 1.0)
        return jtu.tree_map(lambda x: x / safe.astype(x.dtype), hv), lam

    _, lam = jax.lax.fori_loop(0, iterations, body, (v, jnp.zeros((), norm.dtype)))
    return lam


def _step_from_curvature(lam, dtype):
    """`1/λ̂`, or 1 where the curvature vanishes or is not finite (e.g. a linear loss)."""
    ok = jnp.isfinite(lam) & (lam > 0)
    return jnp.where(ok, 1.0 / jnp.where(ok, lam, 1.0), 1.0).astype(dtype)


def _check_optax_state(transform, w0):
    state = transform.init(w0)
    for path, leaf in jtu.tree_flatten_with_path(state)[0]:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                f"fpx.argmin iterates the pair (w, opt_state) of a stateful optax transform to its fixed "
                f"point, but this transform's state has a non-floating leaf at {jtu.keystr(path) or 'state'} "
                f"({dtype if dtype is not None else type(leaf).__name__}), typically a step count (adam's bias "
                f"correction, a schedule): it grows at every step, so the pair has no fixed point. Use a "
                f"stateless transform (optax.sgd(lr)), one with floating-point state only (optax.sgd(lr, "
                f"momentum=0.9)), or a float `step`: the implicit hypergradient does not "
                f"depend on the inner optimiser."
            )
    return state


def _make_step_map(kind, eta, transform, state0):
    """The inner step map `T(z, objective, args)` and whether `z` is the pair `(w, opt_state)`."""
    if kind != "optax":

        def gradient_step(w, objective, args):
            return jtu.tree_map(
                lambda x, g: (x - jnp.asarray(eta, x.dtype) * g).astype(x.dtype), w, objective.grad(w, args)
            )

        return gradient_step, False
    import optax

    stateful = bool(jtu.tree_leaves(state0))

    def optax_step(z, objective, args):
        w, state = z if stateful else (z, state0)
        updates, state = transform.update(objective.grad(w, args), state, w)
        w = optax.apply_updates(w, updates)
        return (w, state) if stateful else w

    return optax_step, stateful


def _raise_if_inner_failed(sol: Solution, solver, max_steps: int, kind: str):
    hint = {
        "auto": "The default step size is 1/lambda_max of the Hessian at w0; where the loss curves more "
        "steeply elsewhere, pass a smaller `step`.",
        "fixed": "If the residual grew, the step size is too large for the curvature (a gradient step "
        "needs `step` below 2/L for an L-smooth loss): pass a smaller `step`, or omit it.",
        "optax": "If the residual grew, lower the optax learning rate.",
    }[kind]

    def check(failed, result, steps, residual):
        if bool(failed):
            message = failure_message(int(result), int(steps), float(residual), max_steps, solver)
            raise FixedPointError(
                "fpx.argmin: the inner solve (the fixed point of the step map, |w - T(w)| = step * "
                f"|grad loss| for a gradient step) failed.\n{message}\n{hint} A loss without a minimiser "
                "(unbounded below, e.g. linear) has no fixed point either."
            )

    failed = sol.result != RESULTS.successful
    any_failed, (result, steps, residual) = unvmapped_worst(
        failed, sol.result._value, sol.stats["num_steps"], sol.stats["residual_norm"]
    )
    jax.debug.callback(check, any_failed, result, steps, residual)


# --------------------------------------------------------------------------- argmin


def argmin(
    loss: Callable[..., Any],
    w0: PyTree,
    args: PyTree = None,
    *,
    solver: AbstractFixedPointSolver | None = None,
    adjoint: AbstractHypergradient | None = None,
    step: Any = None,
    max_steps: int = 1000,
    throw: bool = True,
    has_aux: bool = False,
    backward_probe: Array | None = None,
) -> Solution:
    """Minimise `loss(w, args)` over `w`; the minimiser is differentiable in `args` (hypergradients).

    The minimiser `w*` is found as the fixed point of a gradient-type step map `T` by
    `fpx.fixed_point`, and differentiated by the implicit function theorem on the
    stationarity condition `∇_w L(w*, θ) = 0`:

        dw*/dθ = -H⁻¹ ∂²L/∂w∂θ,    H = ∇²_w L(w*, θ),

    which depends neither on `T`, its step size nor the solver: `H` enters only through
    Hessian-vector products (forward over reverse), and `adjoint` selects how `H⁻¹` is
    applied (exact, CG, Neumann series, an fpx solver, JFB, or unrolled steps for
    comparison; see `fpx.AbstractHypergradient`). `θ` is the arrays of `args` and the arrays
    `loss` closes over; reverse mode (`jax.grad`) and forward mode (`jax.jvp`) both work,
    under `jax.jit` and `jax.vmap`, and so do second derivatives with the implicit
    estimators. The derivative with respect to `w0` is zero, and so is that with respect
    to the step size (except for `HypergradientUnrolled`).

    **Arguments:**

    - `loss`: `loss(w, args) -> scalar` (a real floating-point scalar; with `has_aux=True`
      a pair `(scalar, aux)`). It may close over traced arrays. Hessian-vector products
      are forward over reverse, so `loss` must support `jax.jvp` of `jax.grad`.
    - `w0`: the starting point, any pytree of real floating-point arrays.
    - `args`: any pytree passed to `loss`: arrays (differentiable), Python scalars, `None`,
      static objects (closed over).
    - `solver`: the fpx solver of the inner fixed point; default `fpx.Anderson()` for a
      gradient step, `fpx.Picard()` (the optimiser itself) for an optax `step`. Its
      stopping test `|z - T(z)| <= atol + rtol |z|` applies to the step map, i.e. to
      `η |∇_w L|` for a gradient step.
    - `adjoint`: the hypergradient estimator; default
      `fpx.HypergradientLinearSolve()` (CG on the Hessian, for convex inner problems).
    - `step`: the step map. A positive number `η`: the gradient step
      `T(w) = w - η ∇_w L(w, args)` (it needs `η < 2/L` for an `L`-smooth loss to converge
      with Picard). `None` (default): the same with `η = 1/λ̂`, `λ̂ ≈ |λ|_max(∇²L(w0))`
      from 20 power iterations (20 Hessian-vector products). An optax
      `GradientTransformation`: `T` is one optimiser step. A stateless transform
      (`optax.sgd(lr)`) iterates `w`; one with floating-point state only (`optax.sgd(lr,
      momentum=0.9)`) iterates the pair `(w, opt_state)`, whose fixed points are those with
      `∇_w L = 0` (the momentum vanishes there). Transforms with an integer state (a step
      count: `optax.adam`, schedules) have no fixed point and are an error; adaptive ones
      with floating state (`optax.rmsprop`) have one, but near it they step like sign
      descent and at a constant learning rate do not converge to it (reported as
      `RESULTS.max_steps_reached`). Whatever the step map, the hypergradient is the
      implicit one of `∇_w L = 0`. The estimators' default step `α` is `η` (or, with optax, `1/λ̂` at `w*`).
    - `max_steps`: the step budget of the inner solve.
    - `throw`: if True, a failed inner solve raises `FixedPointError` at run time (under
      `jit` wrapped in JAX's runtime error), and so does a failed hypergradient solve when
      differentiating. If False, nothing raises: check `sol.result`; the hypergradient is
      NaN wherever the inner solve or the hypergradient solve failed (under `vmap`, per
      member).
    - `has_aux`: whether `loss` returns `(value, aux)`; `sol.aux` is `aux` at the returned
      minimiser (differentiable).
    - `backward_probe`: an optional `fpx.backward_probe()`; differentiate with respect to it
      to receive the hypergradient solve's `[num_steps, residual_norm, failed]`.

    **Success means solved.** `sol.result` is the inner solve's (`fpx.fixed_point`'s):
    `RESULTS.successful` only when the step map converged. A step size too large for the
    curvature diverges and is reported (`RESULTS.diverged` or `RESULTS.nonfinite`), and
    so is a loss without a minimiser (no fixed point). The stopping test measures the
    step `η |∇L|`, so with `η = 1/λ_max` the distance to `w*` can be up to `cond(H)` times
    the tolerance: tighten `rtol`/`atol` for ill-conditioned problems, and read
    `sol.stats["grad_norm"]`. The accuracy of the hypergradient is that of `w*` (an error
    `δ` in `w*` gives an error `O(δ)`) and of the estimator.

    A floating-point array of `args` that `∇_w loss` does not depend on (a hyperparameter
    that does not reach the inner problem, or only shifts the loss) has zero hypergradient
    by construction: this is detected at trace time and warned about.

    **Returns:** an `fpx.Solution`: `value` (the minimiser, a pytree like `w0`), `result`,
    `stats` (the inner solve's `num_steps`, `residual_norm`, `num_fn_evals`, ...; plus
    `grad_norm`, `|∇_w L|` at `value`, and `step_size`, the `η` of a gradient step) and
    `aux`.

    ```python
    import jax, jax.numpy as jnp, fpx
    X = jnp.array([[1.0, 0.5], [0.0, 1.0], [1.0, 1.0]])
    y = jnp.array([1.0, 2.0, 4.0])
    loss = lambda w, lam: 0.5 * jnp.sum((X @ w - y) ** 2) + 0.5 * lam * jnp.sum(w ** 2)  # ridge
    ridge = lambda lam: jnp.linalg.solve(X.T @ X + lam * jnp.eye(2), X.T @ y)           # closed form
    w_star = lambda lam: fpx.argmin(loss, jnp.zeros(2), lam).value
    sol = fpx.argmin(loss, jnp.zeros(2), 0.5)
    assert sol.converged and jnp.allclose(sol.value, ridge(0.5), atol=1e-4)
    assert jnp.allclose(jax.jacrev(w_star)(0.5), jax.jacrev(ridge)(0.5), atol=1e-4)   # reverse mode
    _, tangent = jax.jvp(w_star, (0.5,), (1.0,))                                        # forward mode
    assert jnp.allclose(tangent, jax.jacfwd(ridge)(0.5), atol=1e-4)
    ```
    """
    checks.function("", "loss", loss, what="a function loss(w, args) -> scalar")
    checks.solver("", "solver", solver, allow_none=True)
    adjoint = _check_adjoint(adjoint)
    max_steps = checks.integer("", "max_steps", max_steps, minimum=1)
    if not isinstance(throw, (bool, np.bool_)):
        raise TypeError(f"`throw` must be True or False, got {throw!r}.")
    if not isinstance(has_aux, (bool, np.bool_)):
        raise TypeError(f"`has_aux` must be True or False, got {has_aux!r}.")
    kind, eta, transform = _check_step(step)
    w0 = checks.float_tree(
        "`w0`", w0, empty="fpx.argmin needs at least one floating-point array to minimise over.",
        kind="real floating-point",
        why=": the minimiser is found by gradient steps, which need real floating-point weights",
    )
    _check_loss(loss, w0, args, bool(has_aux))
    dtype = _dtype(w0)

    # Only the arrays of `args` are differentiated; the rest is closed over.
    dynamic_args, static_args = eqx.partition(args, eqx.is_array)

    def loss_dynamic(w, dynamic):
        return loss(w, eqx.combine(dynamic, static_args))

    objective = _Objective(eqx.filter_closure_convert(loss_dynamic, w0, dynamic_args), bool(has_aux))
    unreached = _unreached_args(objective, w0, dynamic_args)
    if unreached:
        warnings.warn(
            f"fpx.argmin: {', '.join(unreached)} does not reach the gradient of the inner loss, so the "
            f"minimiser does not depend on it and its hypergradient is zero by construction (a "
            f"hyperparameter that is unused, or only shifts the loss by a constant). Make the loss "
            f"depend on it through w, or, if it is data that is not differentiated, close over it "
            f"instead of passing it in `args`.",
            stacklevel=2,
        )

    w0 = stop_gradient_arrays(w0)
    frozen = stop_gradient_arrays((objective, dynamic_args))
    if kind == "auto":
        eta = _step_from_curvature(_power_curvature(_hvp((frozen[0], w0, frozen[1])), w0), dtype)
    state0 = _check_optax_state(transform, w0) if kind == "optax" else None
    step_map, stateful = _make_step_map(kind, eta, transform, state0)
    z0 = (w0, state0) if stateful else w0

    # The inner solve, cut from differentiation (also what the step map closes over: a
    # traced step size, an optax transform's hyperparameters).
    forward = eqx.filter_closure_convert(lambda z, a: step_map(z, *a), z0, frozen)
    forward = stop_gradient_arrays(forward)
    if solver is None:
        solver = Picard() if kind == "optax" else Anderson()
    sol = fixed_point(forward, stop_gradient_arrays(z0), frozen, solver=solver, max_steps=max_steps, throw=False)
    if throw:
        _raise_if_inner_failed(sol, solver, max_steps, kind)
    w_star = jax.lax.stop_gradient(sol.value[0] if stateful else sol.value)
    solved = sol.result == RESULTS.successful

    stats = dict(sol.stats)
    stats["grad_norm"] = two_norm(frozen[0].grad(w_star, frozen[1]))
    if kind != "optax":
        stats["step_size"] = jax.lax.stop_gradient(jnp.asarray(eta, dtype))

    if isinstance(adjoint, HypergradientUnrolled):
        # The derivative of k live steps from w0; the value stays the solver's w*.
        def body(z, _):
            return step_map(z, objective, dynamic_args), None

        z_k, _ = jax.lax.scan(body, z0, None, length=adjoint.steps)
        w_k = z_k[0] if stateful else z_k
        value = jtu.tree_map(lambda s, k: s + (k - jax.lax.stop_gradient(k)), w_star, w_k)
    else:
        alpha = getattr(adjoint, "alpha", None)
        if alpha is None and adjoint.uses_alpha:
            if kind == "optax":
                alpha = _step_from_curvature(_power_curvature(_hvp((frozen[0], w_star, frozen[1])), w_star), dtype)
            else:
                alpha = eta
        alpha = jax.lax.stop_gradient(jnp.asarray(1.0 if alpha is None else alpha, dtype))
        config = _SolveConfig(estimator=adjoint, alpha=alpha, throw=bool(throw))
        value = _implicit_minimiser(w_star, objective, dynamic_args, backward_probe, config)
    # A hypergradient at a point that is not a minimiser is never returned silently.
    value = _nan_tangent_unless(value, solved)
    aux = objective.fn(value, dynamic_args)[1] if has_aux else None
    return Solution(value=value, result=sol.result, stats=stats, aux=aux)
