"""Safeguarded type-II Anderson acceleration."""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PyTree, Scalar

from .. import _validate as checks
from .._misc import ravel, tree_sub, two_norm
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

    # The step below is the generic safeguarded step of `AbstractSecantSolver` (same
    # acceptance, memory and reset rules), restructured for speed under `vmap`, where the
    # driver's loop selects every carried array for every member at every step. Measured
    # (benchmarks/bench_solvers.py, per-step section): the cost is set by how many full
    # passes over the (m, n) memory and how many parallel kernels a step makes, not by
    # the flops. So the whole state is one (2 + 2m, n) array [z_acc, g_acc, dZ, dG] that is
    # written in one pass (fused with the driver's select) and only *read* otherwise: the
    # new Gram row and the right-hand side come from the old memory (the overwritten slot
    # patched), the Gram matrix is kept and updated by one row and column, and the
    # residual norm of the incoming iterate is the driver's own expression evaluated at
    # the end of the previous step (XLA merges the two, so the guarded norm runs once).

    def init(self, fn, z0, fz0, args):
        z, _ = ravel(z0)
        n, m = z.size, self.memory
        return _AndersonState(
            vecs=jnp.zeros((2 + 2 * m, n), z.dtype).at[0].set(z),
            gram=jnp.zeros((m, m), z.dtype),
            # per slot |dz_i|, then r_acc (inf: nothing accepted yet), then |z - T z| of
            # the iterate the next step receives
            norms=jnp.concatenate(
                [jnp.zeros((m,), z.dtype), jnp.full((1,), jnp.inf, z.dtype), self._residual(z0, fz0, z.dtype)[None]]
            ),
            ints=jnp.zeros((5,), jnp.int32),
        )

    def _residual(self, z, fz, dtype):
        # Exactly the driver's `norm(tree_sub(z, fz))`, so that XLA computes it once.
        return jnp.asarray(self.norm(tree_sub(z, fz))).astype(dtype)

    def step(self, fn, z, fz, args, state):
        m, beta = self.memory, self.beta
        zf, unravel = ravel(z)
        fzf, _ = ravel(fz)
        g = fzf - zf
        dtype = g.dtype
        vecs = state.vecs
        r, r_acc, dz_norms = state.norms[m + 1], state.norms[m], state.norms[:m]
        count, pos, num_rejected, num_accepted = state.ints[0], state.ints[1], state.ints[2], state.ints[3]
        from_memory = state.ints[4] > 0
        if self.safeguard is None:
            accept = jnp.array(True)
        else:
            accept = ~from_memory | (r <= self.safeguard * r_acc)
        store = accept & (num_accepted > 0)
        z_old, g_old = vecs[0], vecs[1]
        dz, dg = zf - z_old, g - g_old
        z_acc = jnp.where(accept, zf, z_old)
        g_acc = jnp.where(accept, g, g_old)
        r_acc = jnp.where(accept, r, r_acc)
        slot = (jnp.arange(m) == pos) & store  # the memory slot the new pair goes to
        rows = jnp.concatenate([jnp.array([True, True]), slot, slot])
        new_rows = jnp.concatenate(
            [jnp.stack([z_acc, g_acc]), jnp.broadcast_to(dz, (m, dz.size)), jnp.broadcast_to(dg, (m, dg.size))]
        )
        new_vecs = jnp.where(rows[:, None], new_rows, vecs)
        count = jnp.where(store, jnp.minimum(count + 1, m), count)
        pos = jnp.where(store, (pos + 1) % m, pos)
        count = jnp.where(accept, count, 0)
        pos = jnp.where(accept, pos, 0)

        # dG_new . dg (the new Gram row) and dG_new . g_acc, from the old memory.
        row = jnp.where(slot, jnp.sum(dg * dg), (vecs @ dg)[m + 2 :])
        rhs = jnp.where(slot, jnp.sum(dg * g_acc), (vecs @ g_acc)[m + 2 :])
        gram = jnp.where(slot[:, None], row[None, :], jnp.where(slot[None, :], row[:, None], state.gram))
        dz_norms = jnp.where(slot, jnp.sqrt(jnp.sum(dz * dz)), dz_norms)

        coeff = self._coefficients(gram, rhs, dz_norms, r_acc, count, dtype)
        # z_acc + beta g_acc - sum_i c_i (dZ_i + beta dG_i) over the new memory.
        c_new = jnp.sum(jnp.where(slot, coeff, 0.0))
        c_old = jnp.where(slot, 0.0, coeff)
        weights = jnp.concatenate([jnp.zeros((2,), dtype), c_old, beta * c_old])
        z_next = z_acc + beta * g_acc - weights @ vecs - c_new * (dz + beta * dg)

        z_next = unravel(z_next)
        fz_next = fn(z_next, args)
        new_state = _AndersonState(
            vecs=new_vecs,
            gram=gram,
            norms=jnp.concatenate([dz_norms, r_acc[None], self._residual(z_next, fz_next, dtype)[None]]),
            ints=jnp.stack(
                [
                    count,
                    pos,
                    num_rejected + (~accept).astype(jnp.int32),
                    num_accepted + accept.astype(jnp.int32),
                    (count > 0).astype(jnp.int32),
                ]
            ),
        )
        return z_next, fz_next, new_state

    def _coefficients(self, gram, rhs, dz_norms, r_acc, count, dtype):
        m = self.memory
        lam = self.regularization
        if lam is None:
            lam = 10 * jnp.finfo(dtype).eps
        sq_norms = jnp.diagonal(gram)
        # A residual difference at rounding level carries no secant information (e.g. a
        # translation, whose "fixed point" is at infinity): leave that column out.
        # Also leave out a column whose secant slope |dg|/|dz| is at rounding level: along
        # it I - J is numerically singular and the step would be unbounded.
        noise = 100 * jnp.finfo(dtype).eps * jnp.maximum(r_acc, dz_norms)
        valid = (jnp.arange(m) < count) & (jnp.sqrt(sq_norms) > noise)
        scale = jnp.where(valid, jnp.sqrt(jnp.where(valid, sq_norms, 1.0)), 1.0)
        both = valid[:, None] & valid[None, :]
        scaled = jnp.where(both, gram / (scale[:, None] * scale[None, :]), jnp.eye(m, dtype=dtype))
        b = jnp.where(valid, rhs / scale, 0.0)
        coeff = spd_solve(scaled + lam * jnp.eye(m, dtype=dtype), b)
        coeff = jnp.where(valid, coeff / scale, 0.0)
        return jnp.where(jnp.isfinite(coeff), coeff, 0.0)

    def stats(self, state):
        return {"num_rejected": state.ints[2]}


class _AndersonState(eqx.Module):
    vecs: Float[Array, "2+2*m n"]  # z_acc, g_acc (last accepted iterate, its residual), dZ, dG (ring)
    gram: Float[Array, "m m"]  # dG dG^T over the slots (stale beyond `count`)
    norms: Float[Array, " m+2"]  # |dz_i| per slot, r_acc = |g_acc|, |z - T z| of the incoming iterate
    ints: Int[Array, " 5"]  # count, pos (next slot), num_rejected, num_accepted, from_memory
