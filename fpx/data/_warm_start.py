r"""Warm starts for the iterative Darcy solvers: unrolled PCG and the iteration-aware loss.

A learned map (e.g. an FNO) that predicts `u` from `a` can serve as the initial guess of
`solve_darcy_iterative(a, x0=guess)`: the solve then iterates to its tolerance from the
guess, so its answer keeps the solver's accuracy and certificate (true relative residual,
`result`), however good or bad the guess was; the guess only changes how many iterations
that takes (`experiments/neural_warm_start`).

Trained on the error of its raw prediction, such a network spends its capacity on whatever
dominates that error, not on what slows the solver down. Arisaka and Li ("Principled
Acceleration of Iterative Numerical Methods Using Machine Learning", ICML 2023, arXiv
2206.08594) train it instead on the error left after the solver has run a few iterations
from its prediction, differentiating through those iterations: `iteration_aware_loss`, on
top of `unrolled_pcg`, the first `steps` iterations of the very PCG that
`solve_darcy_iterative` runs, unrolled (no stopping test), so that reverse-mode derivatives
exist.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Scalar

from ._elliptic import METHODS, _check_method, _precond_kind, _rhs, darcy_operator, make_preconditioner, multigrid_sizes

MEASURES = ("error", "residual")


def _check_steps(steps, minimum: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < minimum:
        raise ValueError(f"`steps` must be an integer >= {minimum} (PCG iterations to unroll), got {steps!r}.")
    return int(steps)


def _check_one_system(a, x0, what: str):
    a, x0 = jnp.asarray(a), jnp.asarray(x0)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 3:
        raise ValueError(
            f"{what}: `a` must have shape (s, s) with s >= 3 (one system, boundary included), got {a.shape}; "
            f"jax.vmap {what} over a batch."
        )
    if x0.shape != a.shape:
        raise ValueError(
            f"{what}: the initial guess `x0` must have the shape of `a`, {a.shape} (the full grid, boundary "
            f"included and ignored), got {x0.shape}."
        )
    if not isinstance(a, jax.core.Tracer) and not bool(jnp.all(a > 0)):
        raise ValueError(
            f"{what}: `a` must be > 0 everywhere (its minimum is {float(jnp.min(a))!r}): the operator is "
            f"symmetric positive definite only then, and CG needs that; refusing."
        )
    dtype = jnp.result_type(a.dtype, x0.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)
    return a.astype(dtype), x0.astype(dtype)


def unrolled_pcg(
    a: Float[ArrayLike, "s s"],
    x0: Float[ArrayLike, "s s"],
    f=1.0,
    *,
    steps: int,
    method: str = "mg-cg",
    levels: int | None = None,
    smoothing_steps: int = 2,
) -> Float[Array, "s s"]:
    r"""The iterate after `steps` PCG iterations from `x0` for `-div(a grad u) = f`, unrolled; differentiable.

    Exactly the iterations of `solve_darcy_iterative(a, x0=x0, method=method)` (same operator,
    preconditioner and recurrences) for a fixed number of steps, without the stopping test,
    the true-residual check or restarts, as a `lax.scan`, so that `jax.grad` and `jax.vjp`
    go through it (the solver's `while_loop` admits forward mode only). A curvature that is
    not positive (an exact solution, `r = 0`) makes the remaining steps stand still, with
    finite derivatives. The iterates are a nonlinear function of `x0` (the CG step lengths
    depend on the residual); it is the preconditioned residual `M^-1 (f - A x)` whose Krylov
    space they minimise the energy error over.

    **Arguments:** `a`: nodal coefficient of shape `(s, s)` (one system; `jax.vmap` for a
    batch), > 0. `x0`: the initial guess, shape `(s, s)` (its boundary values are ignored;
    the returned iterate has the zero boundary). `f`: a number or an `(s, s)` array.
    `steps`: iterations, >= 0. `method`: `"cg"` (Jacobi preconditioner) or `"mg-cg"`
    (multigrid V-cycle, `levels` and `smoothing_steps` as in `solve_darcy_iterative`).

    ```python
    import jax, jax.numpy as jnp, numpy as np, fpx
    from fpx.data import unrolled_pcg, solve_darcy_iterative
    a = np.where(np.random.default_rng(0).standard_normal((17, 17)) > 0, 12.0, 3.0)
    x0 = jnp.zeros((17, 17))
    x3 = unrolled_pcg(a, x0, steps=3, method="cg")
    solve = solve_darcy_iterative(a, x0=x0, method="cg", rtol=1e-5, max_steps=3)   # stopped after 3 iterations
    assert np.allclose(x3, solve.value, rtol=1e-5) and int(solve.num_steps) == 3 and not solve.converged
    g = jax.grad(lambda x: jnp.sum(unrolled_pcg(a, x, steps=3) ** 2))(x0)
    assert g.shape == (17, 17) and bool(jnp.all(jnp.isfinite(g)))
    ```
    """
    what = "unrolled_pcg"
    _check_method(method, METHODS)
    steps = _check_steps(steps, 0)
    a, x0 = _check_one_system(a, x0, what)
    s = a.shape[-1]
    multigrid_sizes(s - 2, levels)  # validates `levels` against `s`
    f = jnp.asarray(f, a.dtype)
    if f.ndim not in (0, 2) or (f.ndim == 2 and f.shape != (s, s)):
        raise ValueError(f"{what}: `f` must be a number or an array of shape {(s, s)}, got shape {f.shape}.")
    op = darcy_operator(a)
    pre = make_preconditioner(op, _precond_kind(method), levels=levels, smoothing_steps=int(smoothing_steps))
    b = _rhs(f, a)
    x = x0[1:-1, 1:-1]
    r = b - op.mv(x)

    def step(carry, _):
        x, r, p, rz_old, first = carry
        z = pre(r)
        rz = jnp.sum(r * z)
        # The safe divisions keep the derivatives finite once the residual is exactly zero.
        beta = jnp.where(first, 0.0, rz / jnp.where(rz_old != 0, rz_old, 1.0))
        p = z + beta * p
        q = op.mv(p)
        pq = jnp.sum(p * q)
        ok = (rz > 0) & (pq > 0)
        alpha = jnp.where(ok, rz / jnp.where(ok, pq, 1.0), 0.0)
        return (x + alpha * p, r - alpha * q, p, rz, jnp.zeros((), bool)), None

    init = (x, r, jnp.zeros_like(b), jnp.ones((), a.dtype), jnp.ones((), bool))
    (x, *_), _ = jax.lax.scan(step, init, None, length=steps)
    return jnp.pad(x, 1)


def _safe_norm(v):
    """`|v|_2` with a finite derivative at `v = 0` (there: zero)."""
    sq = jnp.sum(v * v)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def iteration_aware_loss(
    a: Float[ArrayLike, "s s"],
    x0: Float[ArrayLike, "s s"],
    u: Float[ArrayLike, "s s"],
    f=1.0,
    *,
    steps: int,
    method: str = "mg-cg",
    measure: str = "error",
    levels: int | None = None,
    smoothing_steps: int = 2,
) -> Scalar:
    r"""How far `steps` solver iterations from the guess `x0` leave from the solution `u`: the loss of Arisaka & Li.

    With `x_k = unrolled_pcg(a, x0, f, steps=steps, method=method)`:
    `measure="error"`: `|x_k - u|_2 / |u|_2` (on the interior nodes; the relative L2 error of the FNO
    papers, so `steps=0` is the plain regression loss `relative_l2(x0, u)` of the raw
    prediction); `measure="residual"`: `|f - A x_k|_2 / |f|_2`, the quantity the solver's
    stopping test measures (`u` is then not used). One system; `jax.vmap` it over a batch and
    average. Differentiable in `x0` (and so in the parameters of a network that predicts
    it) through the unrolled iterations: "Principled Acceleration of Iterative Numerical
    Methods Using Machine Learning" (Arisaka and Li, ICML 2023) train the initial-guess
    network on such a loss after `k` iterations rather than on the raw error, because the
    raw error weighs every component of the guess alike, while the iteration count to a
    tolerance depends on the components the solver removes slowly.

    ```python
    import jax, jax.numpy as jnp, numpy as np
    from fpx.data import iteration_aware_loss
    from fpx.data._darcy import solve_darcy
    from fpx.operators import relative_l2
    a = np.where(np.random.default_rng(0).standard_normal((17, 17)) > 0, 12.0, 3.0)
    u = jnp.asarray(solve_darcy(a))                                  # the sparse direct solve
    guess = u * (1 + 0.1 * jnp.cos(jnp.linspace(0, 9, 17)))[:, None]
    raw = iteration_aware_loss(a, guess, u, steps=0)
    assert np.isclose(raw, relative_l2(guess[1:-1, 1:-1], u[1:-1, 1:-1]), rtol=1e-5)
    after = iteration_aware_loss(a, guess, u, steps=2)        # multigrid PCG: far smaller
    assert after < 1e-2 * raw
    g = jax.grad(iteration_aware_loss, argnums=1)(a, guess, u, steps=2)
    assert g.shape == (17, 17) and bool(jnp.all(jnp.isfinite(g)))
    ```
    """
    what = "iteration_aware_loss"
    if measure not in MEASURES:
        raise ValueError(f"{what}: `measure` must be one of {', '.join(map(repr, MEASURES))}, got {measure!r}.")
    a, x0 = _check_one_system(a, x0, what)
    u = jnp.asarray(u, a.dtype)
    if u.shape != a.shape:
        raise ValueError(f"{what}: the solution `u` must have the shape of `a`, {a.shape}, got {u.shape}.")
    xk = unrolled_pcg(a, x0, f, steps=steps, method=method, levels=levels, smoothing_steps=smoothing_steps)
    if measure == "error":
        return _safe_norm((xk - u)[1:-1, 1:-1]) / jnp.linalg.norm(u[1:-1, 1:-1])
    op = darcy_operator(a)
    b = _rhs(f, a)
    return _safe_norm(b - op.mv(xk[1:-1, 1:-1])) / jnp.linalg.norm(b)
