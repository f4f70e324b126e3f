r"""Iterative solves of the Darcy problem `-div(a grad u) = f`, `u = 0` on the boundary, in JAX.

The discretisation is exactly that of `fpx.data._darcy.darcy_matrix` (5-point finite
differences on the `(s-2)^2` interior nodes of an `s x s` grid, `h = 1/(s-1)`, the arithmetic
mean of `a` on each edge), applied matrix-free. On top of it:

- `pcg`: preconditioned conjugate gradients, jit-compiled and `vmap`-able, with an optional
  deflation space; every solve returns its true relative residual `|f - A u| / |f|`, its
  iteration count and an `fpx.RESULTS` code (`successful` only when that residual is at
  most `rtol`; `max_steps_reached`, `nonfinite`, or `breakdown` when a curvature
  `p^T A p` or `r^T M^-1 r` is not positive: the operator or preconditioner is not SPD).
- Preconditioners: Jacobi, and a geometric multigrid V-cycle (`multigrid`): bilinear
  interpolation `P` (coarse nodes on the odd fine nodes, so every grid size coarsens,
  `m -> m // 2` interior nodes per side), Galerkin coarse operators `A_c = P^T A P`
  (9-point stencils, built by probing with 9 coloured vectors; no averaging of `a` is
  needed), `nu` damped-Jacobi sweeps before and after the coarse correction with
  `omega = 1.6 / rho`, `rho` the Gershgorin bound of `D^-1 A` on that level (so
  `omega * lambda_max(D^-1 A) <= 1.6 < 2`), and a dense Cholesky solve on the coarsest
  grid. Pre- and post-smoothing are the same symmetric sweeps, so the V-cycle is a
  symmetric positive-definite operator, as CG needs.
- Sequences of related systems (`solve_sequence`): warm starts from the previous solution,
  and Krylov recycling by deflated CG (Saad, Yeung, Erhel and Guyomarc'h, "A deflated version
  of the conjugate gradient algorithm", SIAM J. Sci. Comput. 21(5), 2000: Def-CG(k, l)),
  the deflation space recycled from system to system: after each solve the `k` new vectors
  are the Ritz vectors of the smallest Ritz values of the pencil `(A, D)` (`D = diag(A)`) on
  the span of the old vectors and the first `l` preconditioned residuals of this solve,
  projected with the CG scalars alone (`ritz_update`). The order of the systems can be
  SKR's (`skr_order`: greedy nearest-neighbour ordering of the coefficient fields, Wang et
  al., "Accelerating Data Generation for Neural Operators via Krylov Subspace Recycling",
  ICLR 2024, code wanghong1700/NO-DataGen-SKR), who recycle with GCRO-DR (Parks, de
  Sturler et al. 2006); for these SPD systems deflated CG is the symmetric counterpart.
- Initial guesses: `solve_darcy_iterative(..., x0=guess)` iterates from any guess to the same
  tolerance and certificate (a previous solution, a neural operator's prediction); the
  differentiable unrolled iterations and the iteration-aware training loss of such a guess
  are in `fpx.data._warm_start` (`experiments/neural_warm_start`).
- SOR and SSOR (`sor_sweep`, `sor`, `sor_solve`): red-black (checkerboard) relaxation, each
  colour one vectorised update, as the fixed-point map that `fpx.fixed_point` iterates, with
  a stopping test on the true relative residual; `omega` traced, so a grid of values is one
  vmapped solve. In this ordering SSOR (red, black, black, red) merges into SOR with
  `omega (2 - omega) <= 1` and is never faster per sweep than Gauss-Seidel. `TsallisINF` and
  `play_bandit` choose `omega` per system over a sequence (Khodak, Chow, Balcan and Talwalkar,
  "Learning to Relax", ICLR 2024; `experiments/learned_relaxation`).

Measured (benchmarks/bench_pde_solvers.py, 2-core CPU, float64, rtol 1e-8): multigrid CG
needs 8-11 iterations at every `s` from 17 to 421 and is about 6x faster than the sparse
direct solve at `s = 211` and 421; Jacobi CG needs about `4 s` iterations and is no faster
than the direct solve; warm starts alone save nothing (the neighbour's solution is not
close enough); the recycled Jacobi solver needs 1.1-1.3x fewer iterations than Jacobi CG
from zero on windows of 12-16 systems, but each iteration costs `2k` more passes over long
vectors, so it is 2-4.5x slower; on top of multigrid there is nothing left to deflate.

Arrays of one system live on the interior nodes, shape `(m, m)`, `m = s - 2`; the
solvers return the full grid `(s, s)` with the zero boundary.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import cho_solve
from jaxtyping import Array, Float, Int

from .._fixed_point import fixed_point
from .._misc import two_norm
from .._solution import RESULTS
from ..adjoint import ImplicitAdjoint
from ..solvers import AbstractFixedPointSolver, Picard

# Largest coarsest grid (interior nodes per side) solved densely by Cholesky.
_COARSEST_MAX = 32
# The automatic hierarchy coarsens until the coarsest grid has at most this many nodes per side.
_COARSEST_AUTO = 8
METHODS = ("cg", "mg-cg")
SEQUENCE_METHODS = ("independent", "warm-start", "recycled")


# --------------------------------------------------------------------------------------------
# operators


class DarcyOperator(eqx.Module):
    """The 5-point operator of `-div(a grad u)` on the `m x m` interior nodes, matrix-free.

    `kx[p, j]` is `h^-2` times the coefficient on the edge between interior rows `p - 1` and
    `p` (rows `-1` and `m` are the boundary) in column `j`; `ky[i, q]` likewise between
    columns `q - 1` and `q`. `mv(u)` is `darcy_matrix(a) @ u.ravel()` (reshaped), to rounding.
    """

    kx: Float[Array, "m+1 m"]
    ky: Float[Array, "m m+1"]

    def mv(self, u: Float[Array, "m m"]) -> Float[Array, "m m"]:
        ux = jnp.pad(u, ((1, 1), (0, 0)))
        fx = self.kx * (ux[1:] - ux[:-1])
        uy = jnp.pad(u, ((0, 0), (1, 1)))
        fy = self.ky * (uy[:, 1:] - uy[:, :-1])
        return (fx[:-1] - fx[1:]) + (fy[:, :-1] - fy[:, 1:])

    def diagonal(self) -> Float[Array, "m m"]:
        return (self.kx[:-1] + self.kx[1:]) + (self.ky[:, :-1] + self.ky[:, 1:])

    def offdiagonal_abs_sum(self) -> Float[Array, "m m"]:
        """Sum over each row of the absolute values of its off-diagonal entries."""
        kx, ky = jnp.abs(self.kx), jnp.abs(self.ky)
        return _interior_pairs(kx, 0) + _interior_pairs(ky, 1)


def _interior_pairs(k, axis):
    """Sum of the two edge weights of each node that lead to interior neighbours."""
    k = jnp.moveaxis(k, axis, 0)
    lo = k[:-1].at[0].set(0.0)  # the edge to row -1 leads to the boundary
    hi = k[1:].at[-1].set(0.0)  # the edge to row m leads to the boundary
    return jnp.moveaxis(lo + hi, 0, axis)


def darcy_operator(a: Float[Array, "s s"]) -> DarcyOperator:
    """The matrix-free `DarcyOperator` of a nodal coefficient `a` on the `s x s` grid (boundary included)."""
    a = jnp.asarray(a)
    s = a.shape[-1]
    h2 = (s - 1.0) ** 2
    # The same arithmetic as `darcy_matrix`: h^-2 * (0.5 * (a_p + a_q)).
    kx = h2 * (0.5 * (a[:-1, 1:-1] + a[1:, 1:-1]))
    ky = h2 * (0.5 * (a[1:-1, :-1] + a[1:-1, 1:]))
    return DarcyOperator(kx, ky)


class Stencil9(eqx.Module):
    """A 9-point operator on an `m x m` grid: `w[1 + di, 1 + dj, i, j] = A[(i, j), (i + di, j + dj)]`."""

    w: Float[Array, "3 3 m m"]

    def mv(self, u: Float[Array, "m m"]) -> Float[Array, "m m"]:
        m = u.shape[-1]
        up = jnp.pad(u, 1)
        out = self.w[1, 1] * u
        for di in range(3):
            for dj in range(3):
                if (di, dj) != (1, 1):
                    out = out + self.w[di, dj] * up[di : di + m, dj : dj + m]
        return out

    def diagonal(self) -> Float[Array, "m m"]:
        return self.w[1, 1]

    def offdiagonal_abs_sum(self) -> Float[Array, "m m"]:
        return jnp.sum(jnp.abs(self.w), axis=(0, 1)) - jnp.abs(self.w[1, 1])


# --------------------------------------------------------------------------------------------
# multigrid


def coarse_size(m: int) -> int:
    """Interior nodes per side of the next coarser grid: the odd fine nodes `1, 3, 5, ...`."""
    return m // 2


def _restrict1(r, axis):
    """`P^T` along one axis (full weighting 1/2, 1, 1/2 without the factor 1/2)."""
    r = jnp.moveaxis(r, axis, 0)
    m = r.shape[0]
    mc = coarse_size(m)
    rp = jnp.pad(r, ((0, 2),) + ((0, 0),) * (r.ndim - 1))
    c = rp[1 : 2 * mc : 2] + 0.5 * (rp[0 : 2 * mc : 2] + rp[2 : 2 * mc + 1 : 2])
    return jnp.moveaxis(c, 0, axis)


def _prolong1(c, m, axis):
    """Linear interpolation `P` along one axis: coarse node `k` is fine node `2k + 1`."""
    c = jnp.moveaxis(c, axis, 0)
    mc = c.shape[0]
    rest = c.shape[1:]
    cp = jnp.pad(c, ((1, 1),) + ((0, 0),) * len(rest))
    even = 0.5 * (cp[:-1] + cp[1:])  # fine nodes 0, 2, ..., 2 mc
    inter = jnp.stack([even[:-1], c], axis=1).reshape((2 * mc,) + rest)
    fine = jnp.concatenate([inter, even[-1:]])[:m]
    return jnp.moveaxis(fine, 0, axis)


def restrict(r: Float[Array, "m m"]) -> Float[Array, "mc mc"]:
    return _restrict1(_restrict1(r, 0), 1)


def prolong(c: Float[Array, "mc mc"], m: int) -> Float[Array, "m m"]:
    return _prolong1(_prolong1(c, m, 0), m, 1)


def galerkin(op, m: int) -> Stencil9:
    """The 9-point stencil of `P^T A P` on the coarse grid, by probing with 9 coloured vectors.

    A coarse node couples only with its 3 x 3 neighbours, which have 9 distinct colours
    `(i mod 3, j mod 3)`: `P^T A P e_c` at a node is its coupling to the one neighbour of colour `c`.
    """
    mc = coarse_size(m)
    dtype = op.diagonal().dtype
    idx = jnp.arange(mc)
    colour = (idx[:, None] % 3) * 3 + (idx[None, :] % 3)
    e = (colour[None] == jnp.arange(9)[:, None, None]).astype(dtype)
    probes = jax.vmap(lambda v: restrict(op.mv(prolong(v, m))))(e)  # (9, mc, mc)
    # The neighbour at offset d of node p has colour c iff e_c(p + d) = 1, so
    # A[p, p + d] = sum_c probes_c(p) e_c(p + d): elementwise, no gathers (they compiled slowly).
    ep = jnp.pad(e, ((0, 0), (1, 1), (1, 1)))
    w = jnp.stack(
        [jnp.stack([jnp.sum(probes * ep[:, di : di + mc, dj : dj + mc], axis=0) for dj in range(3)]) for di in range(3)]
    )
    # Symmetrise (the probes give A[p, p + d] and A[p + d, p] by different sums).
    wp = jnp.pad(w, ((0, 0), (0, 0), (1, 1), (1, 1)))
    mirror = jnp.stack(
        [jnp.stack([wp[2 - di, 2 - dj, di : di + mc, dj : dj + mc] for dj in range(3)]) for di in range(3)]
    )
    return Stencil9(0.5 * (w + mirror))


def _dense(op, m: int):
    eye = jnp.eye(m * m, dtype=op.diagonal().dtype).reshape(m * m, m, m)
    cols = jax.vmap(op.mv)(eye).reshape(m * m, m * m)
    return 0.5 * (cols + cols.T)


class Multigrid(eqx.Module):
    """A symmetric V-cycle: `ops[l]` and the damped inverse diagonals `dinv[l]` per level, and
    the Cholesky factor of the coarsest operator. `__call__(r)` applies one V-cycle from zero."""

    ops: tuple
    dinv: tuple
    chol: Float[Array, "n n"]
    sizes: tuple[int, ...] = eqx.field(static=True)
    smoothing_steps: int = eqx.field(static=True)

    def __call__(self, r: Float[Array, "m m"]) -> Float[Array, "m m"]:
        return self._cycle(r, 0)

    def _cycle(self, r, level):
        if level == len(self.ops):
            m = self.sizes[level]
            return cho_solve((self.chol, True), r.reshape(m * m)).reshape(m, m)
        op, dinv = self.ops[level], self.dinv[level]
        # Sweeps in a fori_loop: unrolled, they made most of the compile time.
        sweep = lambda _, x: x + dinv * (r - op.mv(x))
        x = jax.lax.fori_loop(0, self.smoothing_steps - 1, sweep, dinv * r)
        x = x + prolong(self._cycle(restrict(r - op.mv(x)), level + 1), self.sizes[level])
        return jax.lax.fori_loop(0, self.smoothing_steps, sweep, x)


def multigrid_sizes(m: int, levels: int | None = None) -> tuple[int, ...]:
    """Interior nodes per side on each level (finest first). Raises `ValueError` when `m`
    cannot be coarsened `levels - 1` times or leaves a coarsest grid too large for the dense solve."""
    if levels is None:
        sizes = [m]
        while sizes[-1] > _COARSEST_AUTO:
            sizes.append(coarse_size(sizes[-1]))
        return tuple(sizes)
    if isinstance(levels, bool) or not isinstance(levels, numbers.Integral) or levels < 1:
        raise ValueError(f"`levels` must be a positive integer or None (automatic), got {levels!r}.")
    sizes = [m]
    for _ in range(int(levels) - 1):
        if sizes[-1] < 3:
            raise ValueError(
                f"`levels`={levels} is too deep for s={m + 2}: the grid of {m} interior nodes per side "
                f"coarsens only {len(sizes) - 1} times (down to {sizes[-1]} nodes per side; a grid "
                f"needs at least 3 to coarsen); use levels <= {len(sizes)} or levels=None."
            )
        sizes.append(coarse_size(sizes[-1]))
    if sizes[-1] > _COARSEST_MAX:
        least, size = 1, m
        while size > _COARSEST_MAX:
            least, size = least + 1, coarse_size(size)
        raise ValueError(
            f"`levels`={levels} is too shallow for s={m + 2}: the coarsest grid would have "
            f"{sizes[-1]}^2 unknowns, more than the dense coarsest solve takes ({_COARSEST_MAX}^2); "
            f"use levels >= {least} or levels=None."
        )
    return tuple(sizes)


def _smoother_dinv(op):
    diag = op.diagonal()
    rho = 1.0 + jnp.max(op.offdiagonal_abs_sum() / diag)  # Gershgorin bound of D^-1 A
    return (1.6 / rho) / diag


def multigrid(op: DarcyOperator, *, levels: int | None = None, smoothing_steps: int = 2) -> Multigrid:
    """The Galerkin V-cycle of `op` (see the module docstring). `levels=None` coarsens until
    the coarsest grid has at most 8 interior nodes per side."""
    m = op.kx.shape[-1]
    sizes = multigrid_sizes(m, levels)
    ops, dinv = [], []
    current = op
    for level in range(len(sizes) - 1):
        ops.append(current)
        dinv.append(_smoother_dinv(current))
        current = galerkin(current, sizes[level])
    chol = jnp.linalg.cholesky(_dense(current, sizes[-1]))
    return Multigrid(tuple(ops), tuple(dinv), chol, sizes, int(smoothing_steps))


class Jacobi(eqx.Module):
    dinv: Float[Array, "m m"]

    def __call__(self, r):
        return self.dinv * r


def make_preconditioner(op: DarcyOperator, kind: str | None, *, levels=None, smoothing_steps: int = 2):
    """`"jacobi"`, `"mg"` or `None` (identity) as a callable `r -> M^-1 r`."""
    if kind is None:
        return lambda r: r
    if kind == "jacobi":
        return Jacobi(1.0 / op.diagonal())
    if kind == "mg":
        return multigrid(op, levels=levels, smoothing_steps=smoothing_steps)
    raise ValueError(f"`preconditioner` must be 'jacobi', 'mg' or None, got {kind!r}.")


# --------------------------------------------------------------------------------------------
# conjugate gradients


class EllipticSolution(eqx.Module):
    """What the solvers return: `value` (the solution), `result` (an `fpx.RESULTS` member),
    `num_steps` (CG iterations, i.e. operator applications inside the loop),
    `residual_norm` (the true relative residual `|f - A u|_2 / |f|_2` of `value`).

    ```python
    import numpy as np, fpx
    a, u = fpx.data.darcy(1, s=29, cache=False)
    sol = fpx.data.solve_darcy_iterative(a[0], rtol=1e-5)     # multigrid-preconditioned CG
    assert isinstance(sol, fpx.data.EllipticSolution) and sol.result == fpx.RESULTS.successful
    assert sol.residual_norm <= 1e-5 and np.allclose(sol.value, u[0], rtol=1e-3, atol=1e-5)
    ```
    """

    value: Array
    result: RESULTS
    num_steps: Int[Array, ""]
    residual_norm: Float[Array, ""]

    @property
    def converged(self):
        return self.result == RESULTS.successful


class Deflation(eqx.Module):
    """A deflation space for `pcg`: `w` (k vectors), `aw = A w`, `e = w^T A w` and its Cholesky
    factor, and a mask of the vectors in use (unused ones are zero and skipped)."""

    w: Float[Array, "k m m"]
    aw: Float[Array, "k m m"]
    e: Float[Array, "k k"]
    chol: Float[Array, "k k"]
    valid: Array

    @staticmethod
    def build(mv, w, valid):
        w = jnp.where(valid[:, None, None], w, 0.0)
        aw = jax.vmap(mv)(w)
        g = jnp.tensordot(w, aw, axes=((1, 2), (1, 2)))
        g = 0.5 * (g + g.T)
        both = valid[:, None] & valid[None, :]
        g = jnp.where(both, g, jnp.eye(w.shape[0], dtype=g.dtype))
        return Deflation(w, aw, g, jnp.linalg.cholesky(g), valid)

    def coefficients(self, v):
        """`(w^T A w)^-1 w^T v` (zero on unused vectors)."""
        c = cho_solve((self.chol, True), jnp.tensordot(self.w, v, axes=2))
        return jnp.where(self.valid, c, 0.0)

    def project_out(self, z):
        """`(z - w (w^T A w)^-1 t, t)` with `t = (A w)^T z`: the part of `z` A-orthogonal to span(w)."""
        t = jnp.where(self.valid, jnp.tensordot(self.aw, z, axes=2), 0.0)
        mu = cho_solve((self.chol, True), t)
        return z - jnp.tensordot(jnp.where(self.valid, mu, 0.0), self.w, axes=1), t


class KrylovRecord(eqx.Module):
    """The first `l` iterations of a `pcg` run, for `ritz_update`: the preconditioned residuals
    `z_j`, `rz_j = r_j^T z_j`, `pq_j = p_j^T A p_j`, `beta_j` (`p_j = z_j - w mu_j + beta_j p_{j-1}`),
    `t_j = (A w)^T z_j`, and how many were recorded."""

    z: Float[Array, "l m m"]
    rz: Float[Array, " l"]
    pq: Float[Array, " l"]
    beta: Float[Array, " l"]
    t: Float[Array, "l k"]
    count: Int[Array, ""]


def _dot(a, b):
    return jnp.sum(a * b)


def _flag(nonfinite, broke):
    """0: running, 2: non-finite residual, 3: breakdown (a curvature that is not positive)."""
    return jnp.where(nonfinite, 2, jnp.where(broke, 3, 0)).astype(jnp.int32)


def pcg(
    mv,
    b: Float[Array, "m m"],
    x0: Float[Array, "m m"] | None = None,
    *,
    precond=None,
    rtol,
    max_steps: int,
    deflation: Deflation | None = None,
    store: int = 0,
    max_restarts: int = 4,
):
    """Preconditioned (deflated) CG for `A x = b`, traceable: jit it, vmap it.

    Stops when the recursive residual satisfies `|r|_2 <= rtol |b|_2`, then checks the true
    residual `b - A x` and restarts from `x` (at most `max_restarts` times) if rounding left
    it above the tolerance. With `deflation`, runs Def-CG (Saad et al. 2000): `x0` should
    already satisfy `w^T (b - A x0) = 0` (see `Deflation.coefficients`), and the search
    directions are kept A-orthogonal to `w`. `store > 0` also returns a `KrylovRecord` of
    the first `store` iterations (zero beyond the iterations done), for `ritz_update`.

    `mv` and `precond` are each traced once, inside the loop (the V-cycle is large: tracing
    it once more for the first step doubled the compile time).

    Returns the `EllipticSolution` on the interior, and with `store` also the `KrylovRecord`.
    """
    dtype = b.dtype
    if x0 is None:
        x0 = jnp.zeros_like(b)
    precond = (lambda r: r) if precond is None else precond
    bnorm = jnp.sqrt(_dot(b, b))
    target = rtol * bnorm
    safe_b = jnp.where(bnorm > 0, bnorm, 1.0)
    nk = 0 if deflation is None else deflation.w.shape[0]
    rec0 = KrylovRecord(
        jnp.zeros((store,) + b.shape, dtype), *(jnp.zeros((store,), dtype) for _ in range(3)),
        jnp.zeros((store, nk), dtype), jnp.array(0, jnp.int32),
    )

    def direction(z):
        if deflation is None:
            return z, jnp.zeros((0,), dtype)
        return deflation.project_out(z)

    def cond(c):
        k, _, _, _, _, rnorm, flag, _ = c
        return (rnorm > target) & (k < max_steps) & (flag == 0)

    def step(c):
        k, x, r, p, rz_old, _, _, first = c
        z = precond(r)
        rz = _dot(r, z)
        beta = jnp.where(first, 0.0, rz / jnp.where(rz_old != 0, rz_old, 1.0))
        dz, tz = direction(z)
        p = dz + beta * p
        q = mv(p)
        pq = _dot(p, q)
        ok = (rz > 0) & (pq > 0)
        alpha = jnp.where(ok, rz / jnp.where(ok, pq, 1.0), 0.0)
        x = x + alpha * p
        r = r - alpha * q
        rnorm = jnp.sqrt(_dot(r, r))
        flag = _flag(~jnp.isfinite(rnorm), ~ok)
        return (k + 1, x, r, p, rz, rnorm, flag, jnp.zeros((), bool)), (z, rz, pq, beta, tz)

    def body(c):
        return step(c)[0]

    def body_recording(cr):
        c, rec = cr
        k = c[0]
        c, (z, rz, pq, beta, tz) = step(c)
        put = lambda buf, v: jax.lax.dynamic_update_index_in_dim(buf, v, k, 0)
        rec = KrylovRecord(put(rec.z, z), put(rec.rz, rz), put(rec.pq, pq), put(rec.beta, beta), put(rec.t, tz), k + 1)
        return c, rec

    def cycle(x, k, rec):
        r = b - mv(x)
        rnorm = jnp.sqrt(_dot(r, r))
        c = (k, x, r, jnp.zeros_like(b), jnp.ones((), dtype), rnorm, _flag(~jnp.isfinite(rnorm), False), jnp.ones((), bool))
        if store:
            # The first `store` iterations record into `rec`, in a loop of their own: carried
            # through the whole solve, the record buffers were copied at every step.
            c, rec = jax.lax.while_loop(lambda cr: cond(cr[0]) & (cr[0][0] < store), body_recording, (c, rec))
        k, x, _, _, _, _, flag, _ = jax.lax.while_loop(cond, body, c)
        return x, k, flag, rec

    def true_residual(x):
        r = b - mv(x)
        return jnp.sqrt(_dot(r, r))

    def outer_cond(c):
        x, k, flag, restarts, res, _ = c
        return (res > target) & (k < max_steps) & (flag == 0) & (restarts <= max_restarts)

    def outer_body(c):
        x, k, flag, restarts, _, rec = c
        x, k, flag, rec = cycle(x, k, rec)
        return x, k, flag, restarts + 1, true_residual(x), rec

    zero = jnp.array(0, jnp.int32)
    init = (x0, zero, zero, zero, jnp.asarray(jnp.inf, dtype), rec0)
    x, k, flag, _, res, rec = jax.lax.while_loop(outer_cond, outer_body, init)
    finite = jnp.isfinite(res) & jnp.all(jnp.isfinite(x))
    result = RESULTS.where(
        ~finite | (flag == 2),
        RESULTS.nonfinite,
        RESULTS.where(
            flag == 3, RESULTS.breakdown, RESULTS.where(res <= target, RESULTS.successful, RESULTS.max_steps_reached)
        ),
    )
    sol = EllipticSolution(x, result, k, res / safe_b)
    if store:
        return sol, rec
    return sol


def ritz_update(defl: Deflation, rec: KrylovRecord, d: Float[Array, "m m"], k: int, *, jacobi: bool):
    """The `k` Ritz vectors of the smallest Ritz values of the pencil `(A, D)` on
    span(w, z_0, ..., z_{l-1}), D-orthonormal, and a mask of those that exist (the update of
    Def-CG(k, l), Saad et al. 2000, with the preconditioned residuals `z_j` of this solve).

    The projected `A` comes from the CG scalars alone (exact arithmetic: the `p_j` are
    A-conjugate and A-orthogonal to `w`, and `z_j = p_j - beta_j p_{j-1} + w mu_j`), so
    it costs no inner products of long vectors: a tridiagonal matrix plus `t_i^T e^-1 t_j`.
    With Jacobi (`jacobi=True`, `D` the preconditioner) the `z_j` are also D-orthogonal
    (`z_i^T D z_j = r_i^T z_j = 0`) and D-orthogonal to `w` (`w^T r_j = 0`), so only `w^T D w`
    is formed; otherwise `[w, z]^T D [w, z]` is. Directions that are numerically dependent
    (eigenvalues of the projected `D` below `1e-10` of the largest) are dropped.
    """
    ell = rec.z.shape[0]
    kw = defl.w.shape[0]
    dtype = rec.rz.dtype
    used = jnp.arange(ell) < rec.count
    scale = jnp.where(used & (rec.rz > 0), 1.0 / jnp.sqrt(jnp.where(rec.rz > 0, rec.rz, 1.0)), 0.0)
    # z_j^T A z_j', then scaled to the Lanczos vectors v_j = z_j / sqrt(rz_j).
    pq_prev = jnp.concatenate([jnp.zeros((1,), dtype), rec.pq[:-1]])
    off = -rec.beta[1:] * rec.pq[:-1]
    tri = jnp.diag(rec.pq + rec.beta**2 * pq_prev) + jnp.diag(off, -1) + jnp.diag(off, 1)
    einv_t = cho_solve((defl.chol, True), rec.t.T)  # (kw, l)
    g_vv = (tri + rec.t @ einv_t) * scale[:, None] * scale[None, :]
    g_wv = rec.t.T * scale[None, :]
    g = jnp.block([[defl.e, g_wv], [g_wv.T, g_vv]])
    wf = defl.w.reshape(kw, -1)
    df = d.reshape(1, -1)
    if jacobi:
        h_ww = (wf * df) @ wf.T
        h = jnp.block([[h_ww, jnp.zeros((kw, ell), dtype)], [jnp.zeros((ell, kw), dtype), jnp.diag(jnp.where(used, 1.0, 0.0))]])
    else:
        basis = jnp.concatenate([wf, rec.z.reshape(ell, -1) * scale[:, None]])
        h = (basis * df) @ basis.T
    mask = jnp.concatenate([defl.valid, used])
    both = mask[:, None] & mask[None, :]
    g = jnp.where(both, 0.5 * (g + g.T), 0.0)
    h = jnp.where(both, 0.5 * (h + h.T), 0.0)
    lam, u = jnp.linalg.eigh(h)
    keep = lam > 1e-10 * jnp.max(lam)
    tr = u * jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, lam, 1.0)), 0.0)[None, :]
    ghat = tr.T @ g @ tr
    big = jnp.asarray(1e300 if dtype == jnp.float64 else 1e30, dtype)
    ghat = jnp.where(keep[:, None] & keep[None, :], ghat, 0.0) + jnp.diag(jnp.where(keep, 0.0, big))
    theta, v = jnp.linalg.eigh(0.5 * (ghat + ghat.T))
    y = tr @ v[:, :k]  # (kw + l, k)
    w_new = jnp.tensordot(y[:kw].T, defl.w, axes=1) + jnp.tensordot((y[kw:] * scale[:, None]).T, rec.z, axes=1)
    return w_new, theta[:k] < 0.5 * big


# --------------------------------------------------------------------------------------------
# checks and high-level solves


def _dtype_of(a):
    dtype = jnp.asarray(a).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)
    return dtype


def check_rtol(rtol, dtype, name: str = "rtol") -> float:
    """`rtol` as a float; `ValueError` unless `10 eps(dtype) <= rtol < 1`."""
    if isinstance(rtol, bool) or not isinstance(rtol, numbers.Real) or not (0 < float(rtol) < 1):
        raise ValueError(f"`{name}` must be a number in (0, 1), got {rtol!r}.")
    eps = float(jnp.finfo(dtype).eps)
    if float(rtol) < 10 * eps:
        hint = " (enable float64 with `jax.enable_x64(True)` for tighter tolerances)" if dtype != jnp.float64 else ""
        raise ValueError(
            f"`{name}`={rtol!r} is below the resolution of {jnp.dtype(dtype).name} (10 eps = {10 * eps:.1e}): "
            f"the residual cannot be resolved that finely{hint}."
        )
    return float(rtol)


def check_coefficient(a) -> np.ndarray:
    """`a` as a NumPy array of shape `(..., s, s)` with `s >= 3`; `ValueError` unless `a > 0` and finite."""
    arr = np.asarray(a)
    if arr.ndim < 2 or arr.shape[-1] != arr.shape[-2] or arr.shape[-1] < 3:
        raise ValueError(f"`a` must have shape (..., s, s) with s >= 3 (nodes, boundary included), got {arr.shape}.")
    if not np.all(np.isfinite(arr)):
        raise ValueError("`a` must be finite everywhere.")
    low = float(arr.min())
    if low <= 0:
        raise ValueError(
            f"`a` must be > 0 everywhere (its minimum is {low!r}): -div(a grad u) is symmetric positive "
            f"definite only for a positive coefficient, and CG needs that; refusing."
        )
    return arr


def check_initial_guess(x0, shape: tuple[int, ...], dtype, name: str = "x0") -> Array:
    """`x0` as an array of `dtype`; `ValueError` unless it has exactly `shape` (that of `a`) and is finite.

    No broadcasting: a single `(s, s)` guess for a batch `(n, s, s)` is refused rather than
    silently reused (`np.broadcast_to(x0, a.shape)` says so explicitly)."""
    arr = jnp.asarray(x0)
    if arr.shape != tuple(shape):
        hint = ""
        if arr.ndim == len(shape) - 1 and arr.shape == tuple(shape[1:]):
            hint = f" (one guess for the whole batch: pass `np.broadcast_to({name}, a.shape)`)"
        raise ValueError(
            f"`{name}`, the initial guess, must have the shape of `a`, {tuple(shape)} (the full grid, boundary "
            f"included and ignored), got {arr.shape}{hint}."
        )
    if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)) or arr.dtype == bool:
        raise ValueError(f"`{name}`, the initial guess, must be a real array, got dtype {arr.dtype}.")
    arr = arr.astype(dtype)
    if not isinstance(arr, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(arr))):
        bad = int(jnp.sum(~jnp.isfinite(arr)))
        raise ValueError(f"`{name}`, the initial guess, must be finite; it has {bad} non-finite entries.")
    return arr


def default_max_steps(method: str, s: int) -> int:
    """`mg-cg`: 200 (its iteration counts hardly depend on `s`); Jacobi CG: `20 s + 200`."""
    return 200 if method == "mg-cg" else 20 * s + 200


def _check_method(method, allowed, name="method"):
    if method not in allowed:
        raise ValueError(f"`{name}` must be one of {', '.join(repr(m) for m in allowed)}, got {method!r}.")
    return method


def _precond_kind(method):
    return "mg" if method == "mg-cg" else "jacobi"


def _rhs(f, a):
    s = a.shape[-1]
    f = jnp.asarray(f, a.dtype)
    if f.ndim == 0:
        return jnp.full((s - 2, s - 2), f, a.dtype)
    return f[1:-1, 1:-1]


def _full(u):
    return jnp.pad(u, 1)


@functools.partial(jax.jit, static_argnames=("method", "max_steps", "levels", "smoothing_steps", "batch"))
def _solve_batch(a, f, x0, rtol, active, *, method, max_steps, levels, smoothing_steps, batch):
    def solve(a, f, x0):
        op = darcy_operator(a)
        pre = make_preconditioner(op, _precond_kind(method), levels=levels, smoothing_steps=smoothing_steps)
        b = _rhs(f, a)
        sol = pcg(op.mv, b, x0[1:-1, 1:-1], precond=pre, rtol=rtol, max_steps=max_steps)
        return eqx.tree_at(lambda s: s.value, sol, _full(sol.value))

    def skip(a, f, x0):  # padding: no work (a real branch when unbatched)
        zero = jnp.zeros((), jnp.int32)
        return EllipticSolution(jnp.zeros_like(a), RESULTS.successful, zero, jnp.zeros((), a.dtype))

    def one(args):
        a, f, x0, act = args
        return jax.lax.cond(act, solve, skip, a, f, x0)

    xs = (a, f, x0, active)
    if batch == 1:
        return jax.lax.map(one, xs)  # one sample after another, unbatched loops
    if batch >= a.shape[0]:
        return jax.vmap(one)(xs)
    return jax.lax.map(one, xs, batch_size=batch)


def default_batch(n: int) -> int:
    """Samples solved at once under `vmap`: 1 on a CPU, all `n` on an accelerator.

    Measured on a 2-core CPU (one XLA thread): Jacobi CG vmapped over 12-16 samples took 1.4x
    (s = 211) and 3x (s = 421) longer per sample than one sample after another (the batched
    vectors no longer fit in cache); multigrid CG took about the same either way (+-20 %)."""
    return 1 if jax.default_backend() == "cpu" else n


def solve_darcy_iterative(
    a,
    f=1.0,
    *,
    method: str = "mg-cg",
    rtol: float = 1e-8,
    max_steps: int | None = None,
    x0=None,
    levels: int | None = None,
    smoothing_steps: int = 2,
    batch: int | None = None,
    active=None,
) -> EllipticSolution:
    """Solve `-div(a grad u) = f`, `u = 0` on the boundary, for one or a batch of coefficients.

    `a`: shape `(s, s)` or `(n, s, s)`, nodal values (boundary included), > 0; its dtype sets
    the precision (float64 needs `jax_enable_x64`). `f`: a number or an `(s, s)` array.
    `method`: `"cg"` (Jacobi-preconditioned CG) or `"mg-cg"` (multigrid-preconditioned).
    The samples are solved `batch` at a time under `jax.vmap` (`None`: `default_batch`, i.e.
    one at a time on a CPU, all at once on an accelerator), jit-compiled (one compilation per
    shape and settings). `x0`: the initial guess, an array of exactly the shape of `a`
    (boundary values ignored; default zero; a wrong shape or a non-finite entry is a
    `ValueError`). `levels`,
    `smoothing_steps`: of the multigrid V-cycle (`multigrid`). `active`: a boolean mask over
    the batch; inactive samples are skipped (zero value, `successful`, 0 steps), for padding.

    Returns an `EllipticSolution` whose `value` has the shape of `a` (zero boundary).

    **Warm starts.** Whatever `x0` is (zero, the previous sample's solution, a neural
    operator's prediction: "predict, then iterate to tolerance"), the solve stops only when
    the true relative residual of `value` is at most `rtol` and reports `successful` only
    then, so a guess changes the iteration count, never the accuracy or the certificate
    (`result`, `residual_norm`); a solve that runs out of `max_steps` from a guess is
    `max_steps_reached`. CG from a guess minimises the energy error over the Krylov space of
    the guess's residual: a guess helps by the log of how much it shrinks that error (a
    guess with rough errors, such as a network's at the jumps of `a`, can have a larger
    residual than zero and still save iterations). `experiments/neural_warm_start` measures
    an FNO's prediction as `x0` against zero and the previous sample, and the
    iteration-aware training loss (`iteration_aware_loss`, through `unrolled_pcg`).

    ```python
    import numpy as np
    from fpx.data._elliptic import solve_darcy_iterative
    from fpx.data._darcy import solve_darcy

    a = np.where(np.random.default_rng(0).standard_normal((17, 17)) > 0, 12.0, 3.0).astype(np.float32)
    sol = solve_darcy_iterative(a, rtol=1e-5)
    assert bool(sol.converged) and float(sol.residual_norm) <= 1e-5
    assert np.abs(np.asarray(sol.value) - solve_darcy(a)).max() < 1e-5 * np.abs(solve_darcy(a)).max()

    guess = solve_darcy(a) * 1.05                               # e.g. a network's prediction
    warm = solve_darcy_iterative(a, rtol=1e-5, x0=guess)
    assert bool(warm.converged) and float(warm.residual_norm) <= 1e-5 and warm.num_steps < sol.num_steps
    ```
    """
    _check_method(method, METHODS)
    arr = check_coefficient(a)
    dtype = _dtype_of(jnp.asarray(arr[(0,) * (arr.ndim - 2)]))
    rtol = check_rtol(rtol, dtype)
    s = arr.shape[-1]
    multigrid_sizes(s - 2, levels)  # validates `levels` against `s`
    if max_steps is None:
        max_steps = default_max_steps(method, s)
    single = arr.ndim == 2
    a_b = jnp.asarray(arr.reshape((-1, s, s)), dtype)
    f_arr = jnp.asarray(f, dtype)
    if f_arr.ndim not in (0, 2) or (f_arr.ndim == 2 and f_arr.shape != (s, s)):
        raise ValueError(f"`f` must be a number or an array of shape {(s, s)}, got shape {f_arr.shape}.")
    fb = jnp.broadcast_to(f_arr, (a_b.shape[0],) + f_arr.shape)
    x0b = jnp.zeros_like(a_b) if x0 is None else check_initial_guess(x0, arr.shape, dtype).reshape(a_b.shape)
    if batch is None:
        batch = default_batch(a_b.shape[0])
    elif isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:
        raise ValueError(f"`batch` must be a positive integer or None, got {batch!r}.")
    if active is None:
        active = np.ones(a_b.shape[0], bool)
    active = jnp.asarray(np.asarray(active, bool).reshape(a_b.shape[0]))
    sol = _solve_batch(a_b, fb, x0b, jnp.asarray(rtol, dtype), active, method=method, max_steps=int(max_steps),
                       levels=levels, smoothing_steps=int(smoothing_steps), batch=int(batch))
    if single:
        sol = jax.tree_util.tree_map(lambda v: v[0], sol)
    else:
        sol = jax.tree_util.tree_map(lambda v: v.reshape(arr.shape[:-2] + v.shape[1:]), sol)
    return sol


# --------------------------------------------------------------------------------------------
# sequences: warm starts, recycling, SKR ordering


def skr_order(a, features: int | None = 32, start: int = 0) -> np.ndarray:
    """SKR's greedy nearest-neighbour order of the coefficient fields `a` (shape `(n, s, s)`).

    Starting from sample `start`, repeatedly appends the unvisited sample nearest (Frobenius
    distance) to the last one (Wang et al. 2024, the sorting step of SKR). With `features`,
    the distance is taken between block averages of `a` on a `features x features` grid
    (a low-pass proxy, like the truncated-FFT distance the SKR code also offers),
    which makes the sort `O(n^2 features^2)` instead of `O(n^2 s^2)`; `None`: full fields.

    ```python
    import numpy as np
    from fpx.data._elliptic import skr_order

    x = np.array([0.0, 5.0, 1.0, 4.0, 2.0]).reshape(5, 1, 1) * np.ones((5, 3, 3))
    assert skr_order(x).tolist() == [0, 2, 4, 3, 1]  # each step to the nearest unvisited field
    ```
    """
    arr = np.asarray(a)
    n, s = arr.shape[0], arr.shape[-1]
    if features is not None and features < s:
        edges = np.linspace(0, s, features + 1).round().astype(int)
        widths = np.diff(edges).astype(np.float64)
        x = np.empty((n, features, features))
        for i in range(0, n, 64):  # in blocks: no float64 copy of all the fields at once
            block = arr[i : i + 64].astype(np.float64)
            rows = np.add.reduceat(block, edges[:-1], axis=1) / widths[None, :, None]
            x[i : i + 64] = np.add.reduceat(rows, edges[:-1], axis=2) / widths[None, None, :]
    else:
        x = arr.astype(np.float64)
    x = x.reshape(n, -1)
    sq = np.einsum("ij,ij->i", x, x)
    order = np.empty(n, np.int64)
    visited = np.zeros(n, bool)
    cur = int(start)
    for i in range(n):
        order[i] = cur
        visited[cur] = True
        if i == n - 1:
            break
        d = sq - 2.0 * (x @ x[cur])  # |x_j - x_cur|^2 - |x_cur|^2
        d[visited] = np.inf
        cur = int(np.argmin(d))
    return order


@functools.partial(
    jax.jit, static_argnames=("method", "precond", "max_steps", "k", "ell", "levels", "smoothing_steps")
)
def _solve_chain(a_seq, f, rtol, *, method, precond, max_steps, k, ell, levels, smoothing_steps):
    s = a_seq.shape[-1]
    m = s - 2
    dtype = a_seq.dtype

    def step(carry, a):
        x_prev, w, valid = carry
        op = darcy_operator(a)
        pre = make_preconditioner(op, precond, levels=levels, smoothing_steps=smoothing_steps)
        b = _rhs(f, a)
        if method == "independent":
            sol = pcg(op.mv, b, None, precond=pre, rtol=rtol, max_steps=max_steps)
            return carry, sol
        if method == "warm-start":
            sol = pcg(op.mv, b, x_prev, precond=pre, rtol=rtol, max_steps=max_steps)
            return (sol.value, w, valid), sol
        defl = Deflation.build(op.mv, w, valid)
        x0 = x_prev + jnp.tensordot(defl.coefficients(b - op.mv(x_prev)), defl.w, axes=1)
        sol, rec = pcg(op.mv, b, x0, precond=pre, rtol=rtol, max_steps=max_steps, deflation=defl, store=ell)
        w_new, valid_new = ritz_update(defl, rec, op.diagonal(), k, jacobi=precond == "jacobi")
        return (sol.value, w_new, valid_new), sol

    init = (jnp.zeros((m, m), dtype), jnp.zeros((k, m, m), dtype), jnp.zeros((k,), bool))
    _, sols = jax.lax.scan(step, init, a_seq)
    return eqx.tree_at(lambda t: t.value, sols, jax.vmap(_full)(sols.value))


def solve_sequence(
    a,
    f=1.0,
    *,
    method: str = "recycled",
    preconditioner: str = "jacobi",
    order=None,
    rtol: float = 1e-8,
    max_steps: int | None = None,
    k: int = 16,
    ell: int = 48,
    levels: int | None = None,
    smoothing_steps: int = 2,
) -> EllipticSolution:
    """Solve the Darcy systems of `a` (shape `(n, s, s)`) one after another, in `order`.

    `method`: `"independent"` (each from zero), `"warm-start"` (each from the previous
    solution in the order), `"recycled"` (warm start plus Def-CG with a deflation space of
    `k` Ritz vectors recycled from system to system, refreshed from the first `ell` search
    directions of each solve). `preconditioner`: `"jacobi"` or `"mg"`. `order`: `None`
    (as given), `"skr"` (`skr_order(a)`), or a permutation. The whole sequence runs as one
    jit-compiled `lax.scan`; `vmap` it over several independent chains if needed.

    Returns an `EllipticSolution` with a leading axis of `n` in the ORIGINAL order of `a`.

    ```python
    import numpy as np
    from fpx.data._elliptic import solve_sequence

    rng = np.random.default_rng(0)
    a = np.where(rng.standard_normal((4, 17, 17)) > 0, 12.0, 3.0).astype(np.float32)
    sol = solve_sequence(a, method="recycled", order="skr", rtol=1e-5, k=4, ell=8)
    assert sol.value.shape == (4, 17, 17) and bool(sol.converged.all())
    ```
    """
    _check_method(method, SEQUENCE_METHODS)
    if preconditioner not in ("jacobi", "mg"):
        raise ValueError(f"`preconditioner` must be 'jacobi' or 'mg', got {preconditioner!r}.")
    arr = check_coefficient(a)
    if arr.ndim != 3:
        raise ValueError(f"`a` must have shape (n, s, s), got {arr.shape}.")
    n, s = arr.shape[0], arr.shape[-1]
    dtype = _dtype_of(jnp.asarray(arr[0]))
    rtol = check_rtol(rtol, dtype)
    multigrid_sizes(s - 2, levels)
    for name, v in (("k", k), ("ell", ell)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {v!r}.")
    if order is None:
        perm = np.arange(n)
    elif isinstance(order, str):
        if order != "skr":
            raise ValueError(f"`order` must be None, 'skr' or a permutation, got {order!r}.")
        perm = skr_order(arr)
    else:
        perm = np.asarray(order)
        if perm.shape != (n,) or not np.array_equal(np.sort(perm), np.arange(n)):
            raise ValueError(f"`order` must be a permutation of range({n}).")
    if max_steps is None:
        max_steps = default_max_steps("mg-cg" if preconditioner == "mg" else "cg", s)
    f_arr = jnp.asarray(f, dtype)
    sols = _solve_chain(
        jnp.asarray(arr[perm], dtype), f_arr, jnp.asarray(rtol, dtype), method=method, precond=preconditioner,
        max_steps=int(max_steps), k=int(k), ell=int(ell), levels=levels, smoothing_steps=int(smoothing_steps),
    )
    inverse = np.empty(n, np.int64)
    inverse[perm] = np.arange(n)
    return jax.tree_util.tree_map(lambda v: v[inverse], sols)


# --------------------------------------------------------------------------------------------
# the generator's back end


# Samples per vmapped batch: about this many unknowns (and at most 64 samples).
_BATCH_UNKNOWNS = 2**20


def batch_size(n: int, s: int) -> int:
    return max(1, min(n, 64, _BATCH_UNKNOWNS // (s * s)))


def _raise_failures(sol: EllipticSolution, index, solver: str, rtol: float, n: int):
    ok = np.asarray(sol.converged)
    if ok.all():
        return
    j = int(np.flatnonzero(~ok)[0])
    code = int(np.asarray(sol.result._value)[j])
    name = next(k for k, item in RESULTS._name_to_item.items() if int(item._value) == code)
    raise RuntimeError(
        f"fpx.data.darcy: solver={solver!r} did not converge on sample {int(index[j])} (of {n}): "
        f"relative residual {float(np.asarray(sol.residual_norm)[j]):.3e} (rtol={rtol:g}) after "
        f"{int(np.asarray(sol.num_steps)[j])} iterations, result {name!r}. {RESULTS._index_to_message[code]}"
    )


def darcy_solutions(a: np.ndarray, solver: str, rtol: float, *, progress: bool = False, **options) -> np.ndarray:
    """Float64 solutions `u` (shape `(n, s, s)`) of the Darcy problems with coefficients `a`, `f = 1`.

    `solver`: `"cg"`, `"mg-cg"` (calls of `batch_size(n, s)` samples, solved one after another
    on a CPU and under `vmap` on an accelerator; the last call padded with skipped entries so
    that every call has one compiled shape) or `"recycled"` (`solve_sequence(...,
    method="recycled", order="skr")`).
    `options` go to the solver. Raises `RuntimeError` naming the first sample that did not
    converge. Runs with `jax_enable_x64` switched on.
    """
    import sys

    from tqdm import tqdm

    n, s = a.shape[0], a.shape[-1]
    out = np.empty((n, s, s), np.float64)
    with jax.enable_x64(True):
        a64 = np.asarray(a, np.float64)
        if solver == "recycled":
            opts = dict(method="recycled", preconditioner="jacobi", order="skr")
            opts.update(options)
            sol = solve_sequence(a64, rtol=rtol, **opts)
            _raise_failures(sol, np.arange(n), solver, rtol, n)
            return np.asarray(sol.value)
        _check_method(solver, METHODS, "solver")
        bs = batch_size(n, s)
        with tqdm(total=n, desc="fpx.data.darcy", unit="sample", file=sys.stderr, disable=not progress) as bar:
            for start in range(0, n, bs):
                chunk = a64[start : start + bs]
                m = chunk.shape[0]
                active = np.arange(bs) < m
                if m < bs:
                    chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - m, axis=0)])
                sol = solve_darcy_iterative(chunk, method=solver, rtol=rtol, active=active, **options)
                sol = jax.tree_util.tree_map(lambda v: v[:m], sol)
                _raise_failures(sol, np.arange(start, start + m), solver, rtol, n)
                out[start : start + m] = np.asarray(sol.value)
                bar.update(m)
    return out


# --------------------------------------------------------------------------------------------
# SOR and SSOR (red-black ordering) as fixed-point iterations, and a bandit over omega


def checkerboard(m: int, dtype=float) -> Float[Array, "m m"]:
    """The red nodes of the `m x m` interior grid: 1 where `i + j` is even, 0 on the black nodes.

    Under the 5-point stencil every neighbour of a red node is black and vice versa, so each
    colour can be relaxed all at once (the red-black or checkerboard ordering).
    """
    i = jnp.arange(m)
    return ((i[:, None] + i[None, :]) % 2 == 0).astype(dtype)


def sor_sweep(op, b: Float[Array, "m m"], x: Float[Array, "m m"], omega, *, symmetric: bool = False):
    r"""One red-black SOR sweep for `A x = b` from `x` (SSOR with `symmetric=True`); traceable.

    Ordering: all red nodes (`i + j` even, `checkerboard`), then all black ones. With the
    5-point stencil a red node couples only with black nodes, so updating every red node at
    once, `x_R <- x_R + omega D_R^-1 (b - A x)_R`, is exactly the sequential Gauss-Seidel
    update of the red nodes in any order; the black half-sweep then sees the new red values.
    This is SOR for the red-black permutation `P A P^T = [[D_R, -C], [-C^T, D_B]]`:
    `x <- (D + omega L)^-1 (omega b - (omega U + (omega - 1) D) x)` with `L`, `U` the
    strict lower and upper triangles in that order. The red-black ordering is consistently
    ordered (Young's property A), so Young's theory holds: for the constant-coefficient
    Poisson problem the optimal `omega` is `2 / (1 + sin(pi h))` and the asymptotic rate
    `omega_opt - 1`, as for the lexicographic order.

    `symmetric=True` follows the forward sweep by the backward one (black, then red): one
    SSOR step, red-black-black-red. In this ordering two relaxations of one colour in a row
    merge into one with `omega (2 - omega)` (the colour's residual falls by `(1 - omega)^2`),
    so SSOR iterates like SOR with `omega (2 - omega) <= 1`, never faster per sweep than
    Gauss-Seidel: it is there for its symmetry (e.g. as a CG preconditioner), not for speed
    (natural-order SSOR, Khodak et al.'s preconditioner, does not merge).

    `op` needs `mv` and `diagonal()` and a 5-point sparsity pattern (`DarcyOperator`; not
    `Stencil9`, whose diagonal neighbours share a colour). Each half-sweep applies `op.mv` once to the whole grid (the unused colour's
    residual is computed and discarded: twice the minimal arithmetic, in exchange for one
    vectorised update).

    A fixed point of the sweep solves `A x = b` (for `omega != 0` and a nonzero diagonal):
    it is the map `fpx.fixed_point` iterates in `sor`.

    ```python
    import numpy as np, jax.numpy as jnp
    from fpx.data._elliptic import darcy_operator, sor_sweep
    from fpx.data._darcy import solve_darcy

    a = jnp.ones((9, 9))
    op, b = darcy_operator(a), jnp.ones((7, 7))
    x = jnp.zeros((7, 7))
    for _ in range(60):
        x = sor_sweep(op, b, x, 1.5)
    assert np.allclose(x, solve_darcy(np.ones((9, 9)))[1:-1, 1:-1], rtol=1e-8)
    ```
    """
    if isinstance(op, Stencil9):
        raise TypeError(
            "sor_sweep needs a 5-point operator (red-black ordering); a 9-point Stencil9 couples nodes of one colour."
        )
    d = op.diagonal()
    red = checkerboard(b.shape[-1], b.dtype)
    black = 1.0 - red

    def half(x, colour):
        return x + (omega * colour) * ((b - op.mv(x)) / d)

    x = half(half(x, red), black)
    if symmetric:
        x = half(half(x, black), red)
    return x


def _sor_residual(op, b, x):
    r = b - op.mv(x)
    return jnp.sqrt(_dot(r, r))


class _ResidualStop(AbstractFixedPointSolver):
    """Picard steps `x <- T(x)` on the SOR sweep, stopping on the true residual `|b - A x| <= rtol |b|`.

    `args` of the solve is `(op, b, omega, target)` with `target = rtol |b|`; the state is
    `(|b - A x|, target)` at the current iterate. (The driver's own test, on the update
    `|x - T(x)|`, does not say that the system is solved.) The `rtol`/`atol` fields are not
    used by the test and are 0.
    """

    vmap_free_running: ClassVar[bool] = True  # scalar state, no inner loops

    rtol: float = 0.0
    atol: float = 0.0
    norm: Callable = two_norm

    def init(self, fn, z0, fz0, args):
        op, b, _, target = args
        return _sor_residual(op, b, z0), target

    def step(self, fn, z, fz, args, state):
        op, b, _, target = args
        return fz, fn(fz, args), (_sor_residual(op, b, fz), target)

    def terminate(self, z, fz, residual_norm, state):
        rnorm, target = state
        return rnorm <= target, RESULTS.successful

    def stats(self, state):
        return {"true_residual": state[0]}


def check_omega(omega, name: str = "omega"):
    """`omega` unchanged when it lies in (0, 2); `ValueError` otherwise (traced values: `equinox.error_if`).

    SOR and SSOR converge for every symmetric positive definite `A` exactly when
    `0 < omega < 2` (Ostrowski-Reich); outside, the spectral radius of the iteration is at
    least `|omega - 1| >= 1` (Kahan) and the iteration does not converge.
    """
    why = (
        f"`{name}` must lie in (0, 2): SOR/SSOR converge for a symmetric positive definite matrix exactly "
        f"for 0 < {name} < 2 (Ostrowski-Reich) and cannot converge outside (Kahan: spectral radius >= |{name} - 1|)"
    )
    if isinstance(omega, jax.core.Tracer):
        return eqx.error_if(omega, ~((omega > 0) & (omega < 2)), why + "; a traced value is outside.")
    arr = np.asarray(omega)
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{why}; got {omega!r} (not a real number).")
    if arr.ndim != 0:
        raise ValueError(f"{why}; got an array of shape {arr.shape} (one value per solve; jax.vmap over a grid of values).")
    if not (0.0 < float(arr) < 2.0):
        raise ValueError(f"{why}; got {omega!r}.")
    return omega


def sor(
    op,
    b: Float[Array, "m m"],
    x0: Float[Array, "m m"] | None = None,
    *,
    omega,
    rtol,
    max_steps: int,
    symmetric: bool = False,
) -> EllipticSolution:
    """Red-black SOR (or SSOR) for `A x = b`, run by `fpx.fixed_point`; traceable: jit it, vmap it (over `omega` too).

    The fixed-point map is one `sor_sweep`; `fpx.fixed_point` iterates it (Picard steps)
    with a stopping test on the true relative residual `|b - A x|_2 / |b|_2 <= rtol`,
    evaluated at every iterate (one more `op.mv` a sweep). `num_steps` counts sweeps
    (an SSOR sweep, forward and backward, is one). Under `jax.vmap` each member stops on
    its own test (the driver's batching rule) and reports its own count.

    `result`: `successful` only when that residual is at most `rtol` (the driver also asks
    the update `|x - T(x)|` to have halved since `x0`, which for a converging SOR holds long
    before); `max_steps_reached` when it never got there, `diverged` (the update grew a
    millionfold, e.g. an indefinite `A`) or `nonfinite`. `residual_norm` is the true
    relative residual of `value` (on failure, the iterate with the smallest update seen).
    `omega` must lie in (0, 2) (`check_omega`: `ValueError`, or a run-time error when traced).

    Differentiating `value` goes through `fpx.ImplicitAdjoint` with a Picard solve of the
    transposed iteration (same spectral radius, so it converges whenever SOR does).
    """
    dtype = b.dtype
    omega = jnp.asarray(check_omega(omega), dtype)
    if x0 is None:
        x0 = jnp.zeros_like(b)
    bnorm = jnp.sqrt(_dot(b, b))
    safe_b = jnp.where(bnorm > 0, bnorm, 1.0)
    target = jnp.asarray(rtol, dtype) * bnorm

    def sweep(x, args):
        op_, b_, omega_, _ = args
        return sor_sweep(op_, b_, x, omega_, symmetric=symmetric)

    adjoint = ImplicitAdjoint(solver=Picard(rtol=1e-10 if dtype == jnp.float64 else 1e-5, atol=0.0))
    sol = fixed_point(
        sweep, x0, (op, b, omega, target), solver=_ResidualStop(), adjoint=adjoint,
        max_steps=int(max_steps), throw=False,
    )
    converged = sol.result == RESULTS.successful
    # On success the state holds the residual of `value` itself; otherwise `value` is the best
    # iterate by update size, whose residual is computed here.
    res = jnp.where(converged, sol.stats["true_residual"], _sor_residual(op, b, sol.value))
    return EllipticSolution(sol.value, sol.result, sol.stats["num_steps"], res / safe_b)


def default_sor_max_steps(s: int) -> int:
    """`10 s^2`: Gauss-Seidel on Poisson needs about `ln(1/rtol) / (pi h)^2` sweeps (`h = 1/(s-1)`), 1900 at
    `s = 31`, `rtol = 1e-8`; a coefficient contrast raises that."""
    return 10 * s * s


@functools.partial(jax.jit, static_argnames=("symmetric", "max_steps"))
def _sor_solve_jit(a, f, x0, omega, rtol, *, symmetric, max_steps):
    op = darcy_operator(a)
    sol = sor(op, _rhs(f, a), x0[1:-1, 1:-1], omega=omega, rtol=rtol, max_steps=max_steps, symmetric=symmetric)
    return eqx.tree_at(lambda t: t.value, sol, _full(sol.value))


def sor_solve(
    a,
    f=1.0,
    *,
    omega,
    symmetric: bool = False,
    rtol: float = 1e-8,
    max_steps: int | None = None,
    x0=None,
) -> EllipticSolution:
    r"""Solve the Darcy problem `-div(a grad u) = f`, `u = 0` on the boundary, by SOR or SSOR.

    The 5-point system of `fpx.data.darcy` (matrix-free, `DarcyOperator`) is relaxed in the
    red-black (checkerboard) ordering: all nodes with `i + j` even at once, then all the
    others, each a vectorised update `x <- x + omega D^-1 (b - A x)` on one colour, which is
    exact Gauss-Seidel for that ordering since a colour couples only with the other one
    (`sor_sweep`). `symmetric=True` runs SSOR (red, black, black, red), which in this ordering
    iterates like SOR with `omega (2 - omega)`: never faster than Gauss-Seidel. The sweep is the
    fixed-point map of `fpx.fixed_point`, which iterates it until the true relative residual
    `|f - A u|_2 / |f|_2 <= rtol` (checked at every sweep).

    **Arguments:** `a`: nodal coefficient of shape `(s, s)` (boundary included), > 0; its
    dtype sets the precision. `f`: a number or an `(s, s)` array. `omega`: the relaxation
    parameter, in (0, 2) (`ValueError` otherwise; SOR cannot converge outside); `omega=1`
    is Gauss-Seidel. It is traced, not static: `jax.vmap(lambda w: sor_solve(a, omega=w))`
    over a grid of values is one compiled loop in which every member stops on its own test.
    `rtol`: relative-residual tolerance, at least `10 eps` of the dtype. `max_steps`:
    sweeps allowed (default `default_sor_max_steps(s) = 10 s^2`). `x0`: starting guess like
    `a` (boundary ignored; default zero).

    **Returns** an `EllipticSolution`: `value` of shape `(s, s)` with the zero boundary,
    `result` (`fpx.RESULTS.successful` only when the residual is at most `rtol`;
    `max_steps_reached`, `diverged` or `nonfinite` otherwise, never an exception),
    `num_steps` (sweeps) and `residual_norm` (the true relative residual of `value`).

    For the constant-coefficient Poisson problem the best `omega` is `2 / (1 + sin(pi h))`,
    `h = 1/(s-1)`, with asymptotic rate `omega - 1` per sweep against `cos(pi h)^2` for
    Gauss-Seidel (measured in `tests/test_relaxation.py`); choosing `omega` over a
    sequence of systems is what `TsallisINF` and `experiments/learned_relaxation` do.

    ```python
    import numpy as np, jax, jax.numpy as jnp, fpx
    a = np.ones((33, 33))                                        # Poisson, h = 1/32
    omega_opt = 2 / (1 + np.sin(np.pi / 32))
    gs = fpx.data.sor_solve(a, omega=1.0, rtol=1e-5)             # Gauss-Seidel
    best = fpx.data.sor_solve(a, omega=omega_opt, rtol=1e-5)
    assert gs.converged and best.converged and best.residual_norm <= 1e-5
    assert best.num_steps < gs.num_steps / 10
    grid = jnp.linspace(1.0, 1.95, 8)
    steps = jax.vmap(lambda w: fpx.data.sor_solve(a, omega=w, rtol=1e-5).num_steps)(grid)
    assert abs(float(grid[int(jnp.argmin(steps))]) - omega_opt) < 0.1
    ```
    """
    traced = isinstance(a, jax.core.Tracer)
    if traced:
        if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 3:
            raise ValueError(f"`a` must have shape (s, s) with s >= 3 (nodes, boundary included), got {a.shape}.")
        a_arr = a
    else:
        a_np = check_coefficient(a)
        if a_np.ndim != 2:
            raise ValueError(
                f"`a` must have shape (s, s) (one system), got {a_np.shape}; jax.vmap sor_solve over a batch."
            )
        a_arr = jnp.asarray(a_np, _dtype_of(jnp.asarray(a_np)))
    dtype = a_arr.dtype if jnp.issubdtype(a_arr.dtype, jnp.floating) else jnp.result_type(float)
    a_arr = a_arr.astype(dtype)
    s = a_arr.shape[-1]
    rtol = check_rtol(rtol, dtype)
    if not isinstance(omega, jax.core.Tracer):
        check_omega(omega)  # traced values are checked inside (equinox.error_if)
    if not isinstance(symmetric, (bool, np.bool_)):
        raise TypeError(f"`symmetric` must be True (SSOR) or False (SOR), got {symmetric!r}.")
    if max_steps is None:
        max_steps = default_sor_max_steps(s)
    elif isinstance(max_steps, bool) or not isinstance(max_steps, numbers.Integral) or max_steps < 1:
        raise ValueError(f"`max_steps` must be a positive integer (sweeps), got {max_steps!r}.")
    f_arr = jnp.asarray(f, dtype)
    if f_arr.ndim not in (0, 2) or (f_arr.ndim == 2 and f_arr.shape != (s, s)):
        raise ValueError(f"`f` must be a number or an array of shape {(s, s)}, got shape {f_arr.shape}.")
    x0 = jnp.zeros((s, s), dtype) if x0 is None else jnp.asarray(x0, dtype)
    if x0.shape != (s, s):
        raise ValueError(f"`x0` must have the shape of `a`, {(s, s)}, got {x0.shape}.")
    return _sor_solve_jit(a_arr, f_arr, x0, jnp.asarray(omega, dtype), jnp.asarray(rtol, dtype),
                          symmetric=bool(symmetric), max_steps=int(max_steps))


class TsallisINF:
    r"""Tsallis-INF (Zimmert and Seldin, JMLR 2021) over a finite grid of arms: `choose()`, then `update(loss)`.

    The bandit of Khodak et al., "Learning to Relax" (ICLR 2024), for choosing SOR's `omega`
    per instance from the iteration counts alone. Follow-the-regularised-leader with the
    1/2-Tsallis entropy and learning rate `eta_t = 2 / sqrt(t)`: the arm probabilities are
    `p_i = 4 / (eta_t (L_i - x))^2`, `L` the cumulative loss estimates and `x < min L` the
    normaliser (Newton's method on `sum p = 1`, monotone from `x = min L - 2 / eta_t`); the
    chosen arm `i` adds `loss / p_i` to `L_i` (the importance-weighted estimator).

    `scale`: a number `c` (default 1): losses lie in `[0, c]` and are divided by `c`, so that
    `TsallisINF(grid, scale=max_steps)` fed raw iteration counts plays the normalised losses
    `iterations / max_steps` in [0, 1] of the paper's analysis, with expected regret against
    the best fixed arm at most `4 sqrt(K T) + 1` in those units (any loss sequence) and
    `O(sum_i log(T) / Delta_i)` for i.i.d. losses with gaps `Delta_i`. `"mean"`: losses are
    any non-negative numbers and the estimates are divided by the running mean of the losses
    seen so far (what the authors' MATLAB code does, `TsallisINF.m`, up to its baseline of
    one iteration); no regret bound, but when the best arm's loss is far below the cap (SOR's
    iteration counts at a good `omega` against the cap) the normalised gaps, and so the
    learning, are far larger.

    Seeded (`numpy.random.default_rng(seed)`): the same losses give the same choices.

    ```python
    import numpy as np
    from fpx.data._elliptic import TsallisINF

    rng = np.random.default_rng(0)
    means = np.array([0.9, 0.5, 0.2, 0.6])                   # arm 2 is best
    bandit = TsallisINF(np.arange(4), seed=1)
    total = 0.0
    for t in range(5000):
        i = bandit.choose()
        loss = float(np.clip(means[i] + 0.1 * rng.standard_normal(), 0, 1))
        bandit.update(loss)
        total += loss
    regret = total - 5000 * means.min()
    assert regret < 4 * np.sqrt(4 * 5000) + 1 and regret < 0.1 * 5000 * means.min()
    assert np.argmax(bandit.probabilities()) == 2
    ```
    """

    def __init__(self, arms, *, seed: int = 0, scale: float | str = 1.0):
        arms = np.asarray(arms)
        if arms.ndim != 1 or arms.shape[0] < 2:
            raise ValueError(f"`arms` must be a 1-D sequence of at least 2 choices, got shape {arms.shape}.")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"`seed` must be a non-negative integer, got {seed!r}.")
        if scale != "mean" and (
            isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 0 < float(scale) < np.inf
        ):
            raise ValueError(
                f"`scale` must be a positive number (losses lie in [0, scale], e.g. the iteration cap) "
                f"or 'mean' (the running mean of the losses), got {scale!r}."
            )
        self.arms = arms
        self.scale = scale if scale == "mean" else float(scale)
        self._estimates = np.zeros(arms.shape[0])
        self._seen = 0.0  # sum of the losses fed back
        self._t = 1
        self._rng = np.random.default_rng(seed)
        self._pending: tuple[int, float] | None = None

    @property
    def round(self) -> int:
        """The round about to be played (1-based)."""
        return self._t

    def probabilities(self) -> np.ndarray:
        """The distribution over the arms this round."""
        eta = 2.0 / np.sqrt(self._t)
        gap = self._estimates - self._estimates.min()
        if self.scale == "mean":
            mean = self._seen / (self._t - 1) if self._t > 1 else 0.0
            gap = gap / mean if mean > 0 else np.zeros_like(gap)
        else:
            gap = gap / self.scale
        x = -2.0 / eta  # the best arm then has weight 1, so sum(w) >= 1: Newton moves left, monotonically
        for _ in range(100):
            w = 4.0 / (eta * (gap - x)) ** 2
            excess = w.sum() - 1.0
            if abs(excess) <= 1e-12:
                break
            x -= excess / (eta * np.sum(w**1.5))
        return w / w.sum()

    def choose(self) -> int:
        """Draw this round's arm (its index into `arms`); `update` must follow before the next `choose`."""
        if self._pending is not None:
            raise RuntimeError("TsallisINF.choose: call update(loss) for the arm chosen last before choosing again.")
        p = self.probabilities()
        i = int(self._rng.choice(p.shape[0], p=p))
        self._pending = (i, float(p[i]))
        return i

    def update(self, loss: float) -> None:
        """Feed back the loss of the arm chosen last: in `[0, scale]` (e.g. iterations with `scale` the
        iteration cap), or any non-negative number with `scale="mean"`."""
        if self._pending is None:
            raise RuntimeError("TsallisINF.update: no arm is pending; call choose() first.")
        high = np.inf if self.scale == "mean" else self.scale
        if isinstance(loss, bool) or not isinstance(loss, numbers.Real) or not 0.0 <= float(loss) <= high:
            raise ValueError(
                f"`loss` must be a number in [0, {high:g}] (`scale`: e.g. iterations with scale = the iteration cap), got {loss!r}."
            )
        i, p = self._pending
        self._estimates[i] += float(loss) / p
        self._seen += float(loss)
        self._pending = None
        self._t += 1


def play_bandit(costs, *, seed: int = 0, scale: float | str = 1.0) -> np.ndarray:
    """The arms `TsallisINF(..., scale=scale)` chooses over a table `costs[t, k]` of every arm's loss on
    every instance (e.g. SOR iterations per instance and grid `omega`); returns the chosen indices,
    shape `(T,)`. The bandit sees only the chosen arm's loss, round by round.

    ```python
    import numpy as np
    from fpx.data._elliptic import play_bandit

    costs = np.tile([800.0, 300.0, 500.0], (500, 1))        # iterations; cap 1000
    chosen = play_bandit(costs, seed=0, scale=1000.0)
    assert (chosen[-100:] == 1).mean() > 0.8
    ```
    """
    costs = np.asarray(costs, np.float64)
    if costs.ndim != 2 or costs.shape[1] < 2:
        raise ValueError(f"`costs` must have shape (T, K) with K >= 2 arms, got {costs.shape}.")
    bandit = TsallisINF(np.arange(costs.shape[1]), seed=seed, scale=scale)
    chosen = np.empty(costs.shape[0], np.int64)
    for t in range(costs.shape[0]):
        chosen[t] = bandit.choose()
        bandit.update(float(costs[t, chosen[t]]))
    return chosen
