"""Safeguarded type-II Anderson acceleration."""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
from jaxtyping import PyTree, Scalar

from .. import _validate as checks
from .._misc import two_norm
from ._safeguard import AbstractMemorySolver


def spd_solve(a, b):
    """Solve `a x = b` for a small symmetric positive definite `a` by an unrolled Cholesky.

    Under `vmap` this is a few dozen fused elementwise operations over the batch, where
    `jnp.linalg.solve` would call LAPACK once per batch member (on CPU that was a third of
    an Anderson step for a batch of 128).
    """
    m = a.shape[0]
    if m > 16:
        return jnp.linalg.solve(a, b)
    chol = [[None] * m for _ in range(m)]
    for j in range(m):
        diag = a[j, j] - sum(chol[j][k] ** 2 for k in range(j))
        chol[j][j] = jnp.sqrt(jnp.maximum(diag, jnp.finfo(a.dtype).tiny))
        for i in range(j + 1, m):
            chol[i][j] = (a[i, j] - sum(chol[i][k] * chol[j][k] for k in range(j))) / chol[j][j]
    y = []
    for i in range(m):
        y.append((b[i] - sum(chol[i][k] * y[k] for k in range(i))) / chol[i][i])
    x = [None] * m
    for i in reversed(range(m)):
        x[i] = (y[i] - sum(chol[k][i] * x[k] for k in range(i + 1, m))) / chol[i][i]
    return jnp.stack(x)


class Anderson(AbstractMemorySolver):
    """Type-II Anderson acceleration with a scaled ridge and a residual safeguard.

    From the last `memory` secant pairs `dZ`, `dG` (differences of iterates and of
    residuals `g = T(z) - z`) it solves `min_c |g - dG c|^2 + lam |D c|^2`, with `D` the
    column norms of `dG` (so the ridge is relative to the residual differences, never an
    absolute constant), and steps to `z + beta g - (dZ + beta dG) c`.

    Safeguard: a memory step whose residual exceeds `safeguard` times the residual of the
    last accepted iterate is rejected; the memory is reset and a relaxed step
    `z + beta g` follows. Only memory steps are judged (the first step may raise the
    residual). `stats["num_rejected"]` counts rejections.

    On a linear `T` with `beta=1` it is equivalent to GMRES: with `memory >= n` it is
    exact after `n + 1` steps.

    **Arguments:** `memory` (number of secant pairs), `beta` (mixing, in (0, 1]),
    `regularization` (relative ridge `lam`; default 10 machine epsilons of the dtype),
    `safeguard` (allowed residual growth factor, >= 1; `None` disables it), `rtol`, `atol`,
    `norm`.

    ```python
    import jax.numpy as jnp, fpx
    fn = lambda z, _: z - jnp.arctan(z)
    sol = fpx.fixed_point(fn, jnp.array(10.0), solver=fpx.Anderson(memory=1, rtol=0, atol=1e-6))
    assert abs(sol.value) < 1e-2
    ```
    """

    memory: int = 5
    beta: float = 1.0
    regularization: float | None = None
    safeguard: float | None = 1.0
    rtol: float = 1e-5
    atol: float = 1e-6
    norm: Callable[[PyTree], Scalar] = two_norm

    def __check_init__(self):
        if self.regularization is not None:
            checks.real(
                "Anderson", "regularization", self.regularization, low=0,
                hint=" It is the ridge relative to the residual differences (default: 10 machine epsilons).",
            )

    def _new_pair(self, state, dz, dg):
        return dz, dg, jnp.array(True)

    def _propose(self, state):
        dz, dg, g = state.left, state.right, state.g_acc
        m = self.memory
        lam = self.regularization
        if lam is None:
            lam = 10 * jnp.finfo(g.dtype).eps
        gram = dg @ dg.T
        sq_norms = jnp.diagonal(gram)
        # A residual difference at rounding level carries no secant information (e.g. a
        # translation, whose "fixed point" is at infinity): leave that column out.
        # Also leave out a column whose secant slope |dg|/|dz| is at rounding level: along
        # it I - J is numerically singular and the step would be unbounded.
        dz_norms = jnp.linalg.norm(dz, axis=1)
        noise = 100 * jnp.finfo(g.dtype).eps * jnp.maximum(state.r_acc, dz_norms)
        valid = (jnp.arange(m) < state.count) & (jnp.sqrt(sq_norms) > noise)
        scale = jnp.where(valid, jnp.sqrt(jnp.where(valid, sq_norms, 1.0)), 1.0)
        both = valid[:, None] & valid[None, :]
        scaled = jnp.where(both, gram / (scale[:, None] * scale[None, :]), jnp.eye(m, dtype=g.dtype))
        rhs = jnp.where(valid, (dg @ g) / scale, 0.0)
        coeff = spd_solve(scaled + lam * jnp.eye(m, dtype=g.dtype), rhs)
        coeff = jnp.where(valid, coeff / scale, 0.0)
        coeff = jnp.where(jnp.isfinite(coeff), coeff, 0.0)
        return state.z_acc + self.beta * g - (dz + self.beta * dg).T @ coeff
