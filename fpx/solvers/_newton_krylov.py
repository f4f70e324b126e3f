"""Matrix-free inexact Newton–Krylov for z = T(z)."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int, PyTree, Scalar

from .. import _validate as checks
from .._misc import ravel, two_norm
from .._solution import RESULTS
from ._base import AbstractFixedPointSolver
from ._gmres import gmres


class _NKState(eqx.Module):
    eta: Scalar
    stalls: Int[Array, ""]
    num_fn_evals: Int[Array, ""]
    num_jvps: Int[Array, ""]
    num_backtracks: Int[Array, ""]


class NewtonKrylov(AbstractFixedPointSolver[_NKState]):
    """Inexact Newton on `F(z) = z - T(z)`: Jacobian-vector products + GMRES, no Jacobian.

    Each step linearises `T` at `z` (`jax.linearize`), solves `(I - T'(z)) d = -F(z)` with
    restarted GMRES to the relative accuracy `eta_k` (Eisenstat–Walker choice 2:
    `eta_k = 0.9 (|F_k| / |F_{k-1}|)^2`, safeguarded and capped at `eta_max`), then
    backtracks `z + t d`, `t = 1, 1/2, ...`, until
    `|F(z + t d)| <= (1 - 1e-4 t (1 - eta)) |F(z)|`. Quadratic local convergence where
    `I - T'` is invertible, without assuming `T` is a contraction.

    A step whose line search finds no decrease at all is a stall; `max_stalls` stalls in a
    row end the solve with `RESULTS.breakdown` (the Newton direction cannot make progress,
    e.g. `I - T'` is singular, as for a translation `T z = z + c`).

    Stats: `num_fn_evals` (evaluations of `fn`, the linearisation included), `num_jvps`
    (GMRES matvecs), `num_backtracks`.

    ```python
    import jax.numpy as jnp, fpx
    fn = lambda z, c: 1.5 * jnp.tanh(z) + c      # Lipschitz constant 1.5: Picard may fail
    sol = fpx.fixed_point(fn, jnp.zeros(4), jnp.linspace(-1, 1, 4), solver=fpx.NewtonKrylov())
    assert sol.converged
    ```
    """

    rtol: float = 1e-5
    atol: float = 1e-6
    norm: Callable[[PyTree], Scalar] = two_norm
    eta_max: float = 0.9
    restart: int = 20
    max_restarts: int = 5
    max_backtracks: int = 10
    max_stalls: int = 3

    fn_evals_per_step: ClassVar[int | None] = None

    def __check_init__(self):
        checks.real("NewtonKrylov", "eta_max", self.eta_max, low=0, high=1, low_open=True, high_open=True)
        checks.integer("NewtonKrylov", "restart", self.restart, minimum=1, maximum=10_000)
        checks.integer("NewtonKrylov", "max_restarts", self.max_restarts, minimum=1, maximum=10_000)
        checks.integer("NewtonKrylov", "max_backtracks", self.max_backtracks, minimum=0, maximum=1000)
        checks.integer("NewtonKrylov", "max_stalls", self.max_stalls, minimum=1, maximum=1000)

    def init(self, fn, z0, fz0, args):
        zf, _ = ravel(z0)
        one = jnp.array(1, jnp.int32)
        zero = jnp.array(0, jnp.int32)
        return _NKState(
            eta=jnp.asarray(self.eta_max, zf.dtype),
            stalls=zero,
            num_fn_evals=one,
            num_jvps=zero,
            num_backtracks=zero,
        )

    def step(self, fn, z, fz, args, state):
        zf, unravel = ravel(z)
        fzf, _ = ravel(fz)
        residual = zf - fzf
        res_norm = self._norm(unravel, residual)

        def t_flat(x):
            return ravel(fn(unravel(x), args))[0]

        _, t_lin = jax.linearize(t_flat, zf)
        solve = gmres(
            lambda v: v - t_lin(v),
            -residual,
            # GMRES works in the Euclidean norm whatever `norm` the stopping test uses.
            state.eta * jnp.linalg.norm(residual),
            restart=self.restart,
            max_restarts=self.max_restarts,
        )
        direction = solve.x
        c = 1e-4

        def trial(t):
            z_try = zf + t * direction
            fz_try = fn(unravel(z_try), args)
            return z_try, fz_try, self._norm(unravel, z_try - ravel(fz_try)[0])

        def cond(carry):
            t, _, _, r_try, k = carry
            sufficient = r_try <= (1 - c * t * (1 - state.eta)) * res_norm
            return (~sufficient) & (k < self.max_backtracks)

        def body(carry):
            t, *_, k = carry
            t = 0.5 * t
            return (t, *trial(t), k + 1)

        one = jnp.asarray(1.0, zf.dtype)
        t, z_new, fz_new, r_new, num_backtracks = jax.lax.while_loop(
            cond, body, (one, *trial(one), jnp.array(0, jnp.int32))
        )
        # Eisenstat–Walker choice 2 with its safeguard, and no over-solving near the end.
        gamma, alpha = 0.9, 2.0
        eta = gamma * (r_new / jnp.where(res_norm == 0, 1.0, res_norm)) ** alpha
        floor = gamma * state.eta**alpha
        eta = jnp.where(floor > 0.1, jnp.maximum(eta, floor), eta)
        tol = self.atol + self.rtol * self._norm(unravel, z_new)
        eta = jnp.maximum(eta, 0.5 * tol / jnp.where(r_new == 0, 1.0, r_new))
        eta = jnp.clip(jnp.where(jnp.isfinite(eta), eta, self.eta_max), 0.0, self.eta_max)
        # The full line search found no decrease at all: the Newton direction is useless
        # here (GMRES failed, or I - T' is singular). Once may be bad luck (the next point,
        # Jacobian and forcing term differ); `max_stalls` times in a row is a breakdown.
        stalled = ~(r_new < res_norm) & (res_norm > 0)
        stalls = jnp.where(stalled, state.stalls + 1, 0)
        new_state = _NKState(
            eta=eta.astype(state.eta.dtype),
            stalls=stalls,
            num_fn_evals=state.num_fn_evals + 2 + num_backtracks,
            num_jvps=state.num_jvps + solve.num_matvecs,
            num_backtracks=state.num_backtracks + num_backtracks,
        )
        return unravel(z_new), fz_new, new_state

    def _norm(self, unravel, flat):
        return jnp.asarray(self.norm(unravel(flat))).astype(flat.dtype)

    def terminate(self, z, fz, residual_norm, state):
        converged, _ = super().terminate(z, fz, residual_norm, state)
        # Stop on breakdown only where the iterate is not already good enough.
        broken = (state.stalls >= self.max_stalls) & ~converged
        return converged | broken, RESULTS.where(broken, RESULTS.breakdown, RESULTS.successful)

    def stats(self, state):
        return {
            "num_fn_evals": state.num_fn_evals,
            "num_jvps": state.num_jvps,
            "num_backtracks": state.num_backtracks,
        }
