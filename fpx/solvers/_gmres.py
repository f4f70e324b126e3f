"""Restarted GMRES on flat vectors with a traced tolerance and a matvec count.

Written here (rather than `lineax.GMRES`) because Newton–Krylov needs a per-step relative
tolerance `||b - A x|| <= tol` in the Euclidean norm (Eisenstat–Walker forcing) and the
number of matrix-vector products it spent.
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular
from jaxtyping import Array, Float, Int, Scalar


class GMRESResult(eqx.Module):
    x: Float[Array, " n"]
    residual_norm: Scalar
    num_matvecs: Int[Array, ""]


def _givens(a, b):
    denom = jnp.hypot(a, b)
    safe = jnp.where(denom == 0, 1.0, denom)
    return jnp.where(denom == 0, 1.0, a / safe), jnp.where(denom == 0, 0.0, b / safe), denom


def gmres(
    matvec: Callable[[Array], Array],
    b: Float[Array, " n"],
    tol: Scalar,
    *,
    restart: int = 20,
    max_restarts: int = 5,
) -> GMRESResult:
    """Solve `A x = b` from `x = 0` until `||b - A x||_2 <= tol` (or the budget is spent)."""
    n = b.size
    dtype = b.dtype
    m = min(restart, n)
    idx = jnp.arange(m + 1)

    def arnoldi_cycle(x, r):
        beta = jnp.linalg.norm(r)
        v0 = r / jnp.where(beta == 0, 1.0, beta)
        basis = jnp.zeros((m + 1, n), dtype).at[0].set(v0)
        hess = jnp.zeros((m + 1, m), dtype)  # unrotated Hessenberg matrix
        rot = jnp.zeros((m + 1, m), dtype)  # its QR factor R (Givens-rotated)
        cs = jnp.ones((m,), dtype)
        sn = jnp.zeros((m,), dtype)
        rhs = jnp.zeros((m + 1,), dtype).at[0].set(beta)

        def cond(c):
            j, *_, res = c
            return (j < m) & (res > tol)

        def body(c):
            j, basis, hess, rot, cs, sn, rhs, _ = c
            w = matvec(basis[j])
            mask = idx <= j
            h = jnp.where(mask, basis @ w, 0.0)
            w = w - basis.T @ h
            h2 = jnp.where(mask, basis @ w, 0.0)  # second Gram–Schmidt pass (CGS2)
            w = w - basis.T @ h2
            h = h + h2
            hn = jnp.linalg.norm(w)
            basis = basis.at[j + 1].set(jnp.where(hn == 0, 0.0, w / jnp.where(hn == 0, 1.0, hn)))
            col = h.at[j + 1].set(hn)
            hess = hess.at[:, j].set(col)

            def apply_rotation(i, col):
                a, b_ = col[i], col[i + 1]
                new = jnp.where(i < j, jnp.stack([cs[i] * a + sn[i] * b_, -sn[i] * a + cs[i] * b_]), jnp.stack([a, b_]))
                return col.at[i].set(new[0]).at[i + 1].set(new[1])

            col = jax.lax.fori_loop(0, m, apply_rotation, col)
            c_j, s_j, d_j = _givens(col[j], col[j + 1])
            col = col.at[j].set(d_j).at[j + 1].set(0.0)
            rot = rot.at[:, j].set(col)
            cs, sn = cs.at[j].set(c_j), sn.at[j].set(s_j)
            rhs = rhs.at[j + 1].set(-s_j * rhs[j]).at[j].set(c_j * rhs[j])
            return j + 1, basis, hess, rot, cs, sn, rhs, jnp.abs(rhs[j + 1])

        j, basis, hess, rot, cs, sn, rhs, res = jax.lax.while_loop(
            cond, body, (jnp.array(0, jnp.int32), basis, hess, rot, cs, sn, rhs, beta)
        )
        used = jnp.arange(m) < j
        upper = jnp.where(used[:, None] & used[None, :], rot[:m], jnp.eye(m, dtype=dtype))
        upper = jnp.where(jnp.diag(used) & (upper == 0), 1.0, upper)
        y = solve_triangular(upper, jnp.where(used, rhs[:m], 0.0), lower=False)
        y = jnp.where(used & jnp.isfinite(y), y, 0.0)
        x = x + basis[:m].T @ y
        # r_new = b - A x = V_{j+1} (beta e1 - H y): no extra matvec needed to restart.
        r = basis.T @ (jnp.zeros((m + 1,), dtype).at[0].set(beta) - hess @ y)
        return x, r, res, j

    def outer_cond(c):
        _, _, res, k, _ = c
        return (k < max_restarts) & (res > tol)

    def outer_body(c):
        x, r, _, k, nmv = c
        x, r, res, j = arnoldi_cycle(x, r)
        return x, r, res, k + 1, nmv + j

    x0 = jnp.zeros_like(b)
    zero = jnp.array(0, jnp.int32)
    x, _, res, _, nmv = jax.lax.while_loop(outer_cond, outer_body, (x0, b, jnp.linalg.norm(b), zero, zero))
    return GMRESResult(x=x, residual_norm=res, num_matvecs=nmv)
