"""Limited-memory (good) Broyden method on F(z) = z - T(z)."""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
from jaxtyping import PyTree, Scalar

from .._misc import two_norm
from ._safeguard import AbstractSecantSolver


class Broyden(AbstractSecantSolver):
    """Limited-memory inverse ("good") Broyden quasi-Newton method for `z = T(z)`.

    Solves `F(z) = z - T(z) = 0` with steps `z <- z - beta H F(z)`, where the inverse
    Jacobian estimate `H = I + U V^T` starts at the identity (so the first step is a
    relaxed Picard step) and receives one Sherman–Morrison rank-one update per accepted
    step. The last `memory` updates are kept (oldest overwritten), the form used by
    deep-equilibrium models. An update whose denominator `s^T H y` is negligible is
    skipped. Steps are safeguarded as in `Anderson` (default growth factor 2);
    `stats["num_rejected"]` counts rejections.

    ```python
    import jax.numpy as jnp, fpx
    fn = lambda z, a: jnp.cos(z) * a
    sol = fpx.fixed_point(fn, jnp.zeros(3), jnp.ones(3), solver=fpx.Broyden(memory=10))
    assert sol.converged
    ```
    """

    memory: int = 10
    beta: float = 1.0
    # Broyden's residuals are typically non-monotone: a factor 1 rejects useful steps.
    safeguard: float | None = 2.0
    rtol: float = 1e-5
    atol: float = 1e-6
    norm: Callable[[PyTree], Scalar] = two_norm

    def _apply(self, state, u, v, x):
        # H x = x + U^T (V x), over the valid memory slots only.
        valid = jnp.arange(self.memory) < state.count
        return x + u.T @ jnp.where(valid, v @ x, 0.0)

    def _new_pair(self, state, dz, dg):
        # s = dz, y = dF = -dg.  H_new = H + (s - H y) (H^T s)^T / (s^T H y).
        u, v = state.left, state.right
        s, y = dz, -dg
        hy = self._apply(state, u, v, y)
        hts = self._apply(state, v, u, s)
        denom = jnp.dot(s, hy)
        eps = jnp.finfo(s.dtype).eps
        ok = jnp.abs(denom) > eps * jnp.linalg.norm(s) * jnp.linalg.norm(hy)
        safe = jnp.where(ok, denom, 1.0)
        return (s - hy) / safe, hts, ok & jnp.all(jnp.isfinite(hy))

    def _propose(self, state):
        # z - beta H F = z + beta H g.
        return state.z_acc + self.beta * self._apply(state, state.left, state.right, state.g_acc)
