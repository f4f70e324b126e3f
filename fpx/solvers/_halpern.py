"""Halpern (anchored) iteration, its optimal-contractive variant and its adaptive restart."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Int, PyTree, Scalar

from .. import _validate as checks
from .._misc import tree_lerp, tree_sub, tree_where, two_norm
from ._base import AbstractFixedPointSolver


class _HalpernState(eqx.Module):
    anchor: PyTree
    k: Int[Array, ""]  # steps since the anchor was set
    anchor_residual: Scalar  # |a - T a| at the anchor (restarted variant only)
    num_restarts: Int[Array, ""]


class Halpern(AbstractFixedPointSolver[_HalpernState]):
    """Halpern iteration `z_{k+1} = b_k a + (1 - b_k) T(z_k)`, anchored at `a = z_0`.

    With `contraction=None`, `b_k = 1/(k+2)`: the optimal method for a merely
    nonexpansive `T` with a fixed point. Its residual obeys the tight bound
    `|z_k - T z_k| <= 2 |z_0 - z*| / (k+1)` (attained by the 90° rotation), where Picard
    may not converge at all and KM only achieves `O(1/sqrt(k))` (Lieder 2021, Optim.
    Lett. 15; Sabach & Shtern 2017).

    With `contraction=rho` (`T` is `rho`-Lipschitz, `rho < 1`) it is the optimal-contractive
    Halpern method (OC-Halpern, Park & Ryu 2022, ICML): `b_k = 1/phi_{k+1}`,
    `phi_k = sum_{i<=k} rho^(-2i)`, with residual bound
    `(1 + rho) |z_0 - z*| / sum_{i<=k} rho^(-i)`. It beats Picard's `2 rho^k |z_0 - z*|`
    in the worst case and, for `k -> inf`, turns into Picard.

    On a contraction plain Halpern is slower than Picard (its residual falls like 1/k).
    If `rho` is known, give `contraction=rho`; if not, `restart=theta` (e.g. 0.5):

    **Adaptive restart** (`restart=theta` in (0, 1)): whenever the residual of the current
    iterate has fallen to `theta` times the residual at the anchor, the anchor moves to
    the current iterate and the weights start again from `b_0 = 1/2`: the
    residual-decay restart of restarted Halpern PDHG (Lu & Yang 2024, arXiv 2407.16144;
    the parameter-free analogue of Park & Ryu's fixed-schedule restart, whose period needs
    `rho`). Guarantees:

    - *nonexpansive `T`* (worst case): Halpern iterates never move further from any fixed
      point than their anchor, and each epoch ends (by the bound above) within
      `2 |z_0 - z*| / (theta r_a)` steps of its anchor residual `r_a`; summing the
      geometric epoch lengths, the best residual among the first `k` iterates is at most
      `2 |z_0 - z*| / (theta (1 - theta) k)`, i.e. `8 |z_0 - z*| / k` for `theta = 1/2`:
      still O(1/k), with 4 times plain Halpern's constant.
    - *`rho`-contraction* (`rho` unknown): `|a - z*| <= r_a / (1 - rho)`, so an epoch
      lasts at most `2 / (theta (1 - rho))` steps and the residual falls by `theta` per
      epoch: a linear rate, `O(log(1/eps) / (1 - rho))` steps, as Picard's up to a
      constant (200 steps against Picard's 82 to 1e-10 on the T1 problem of the tests).

    `stats["num_restarts"]` counts the restarts. Infeasibility detection works with it:
    on a translation `T z = z - v` every Halpern step moves by `v/2`, restart or not, so
    the drift law `z_0 - z_k ~ (k/2) v` of plain Halpern holds unchanged.

    ```python
    import jax.numpy as jnp, fpx
    rot = lambda z, _: jnp.stack([-z[1], z[0]])
    sol = fpx.fixed_point(rot, jnp.array([1.0, 0.0]), solver=fpx.Halpern())
    assert sol.stats["num_steps"] == 3   # z_3 = 0 (up to rounding) on the rotation
    # A contraction of unknown rate: the restarted variant converges linearly.
    contraction = lambda z, _: 0.9 * jnp.sin(z) + 1.0
    sol = fpx.fixed_point(contraction, jnp.zeros(3), solver=fpx.Halpern(restart=0.5, rtol=1e-8))
    assert sol.converged and sol.stats["num_steps"] < 200 and sol.stats["num_restarts"] > 5
    ```
    """

    vmap_free_running: ClassVar[bool] = True  # counters-only stats, no inner loops

    contraction: float | None = None
    restart: float | None = None
    rtol: float = 1e-5
    atol: float = 1e-6
    norm: Callable[[PyTree], Scalar] = two_norm

    def __check_init__(self):
        if self.contraction is not None:
            checks.real(
                "Halpern", "contraction", self.contraction, low=0, high=1,
                hint=" It is the Lipschitz constant of T; use contraction=None for a merely nonexpansive T.",
            )
        if self.restart is not None:
            checks.real(
                "Halpern", "restart", self.restart, low=0, high=1, low_open=True, high_open=True,
                hint=" It is the residual decay that moves the anchor (e.g. 0.5); None disables restarts.",
            )
            if self.contraction is not None:
                raise ValueError(
                    "`Halpern(restart=...)` and `Halpern(contraction=...)` exclude each other: the "
                    "restart recovers a linear rate when rho is unknown; with rho known, OC-Halpern "
                    "(contraction=rho) is already optimal."
                )

    def init(self, fn, z0, fz0, args):
        int0 = jnp.array(0, jnp.int32)
        if self.restart is None:
            residual = jnp.zeros(())
        else:
            residual = jnp.asarray(self.norm(tree_sub(z0, fz0)))
        return _HalpernState(anchor=z0, k=int0, anchor_residual=residual, num_restarts=int0)

    def anchor_weight(self, k: Array) -> Array:
        """`b_k`, the weight of the anchor in the step from `z_k` to `z_{k+1}`."""
        kf = k.astype(jnp.result_type(float))
        if self.contraction is None or self.contraction == 1:
            return 1.0 / (kf + 2.0)
        rho2 = jnp.asarray(self.contraction, kf.dtype) ** 2
        # 1 / sum_{i=0}^{k+1} rho^(-2i), written to stay finite for large k.
        return (1.0 - rho2) * rho2 ** (kf + 1.0) / (1.0 - rho2 ** (kf + 2.0))

    def step(self, fn, z, fz, args, state):
        anchor, k, anchor_residual, num_restarts = state.anchor, state.k, state.anchor_residual, state.num_restarts
        if self.restart is not None:
            residual = jnp.asarray(self.norm(tree_sub(z, fz))).astype(anchor_residual.dtype)
            # NaN compares false: a non-finite residual never moves the anchor.
            restart = residual <= self.restart * anchor_residual
            anchor = tree_where(restart, z, anchor)
            k = jnp.where(restart, 0, k)
            anchor_residual = jnp.where(restart, residual, anchor_residual)
            num_restarts = num_restarts + restart.astype(jnp.int32)
        z_next = tree_lerp(fz, anchor, self.anchor_weight(k))
        return z_next, fn(z_next, args), _HalpernState(anchor, k + 1, anchor_residual, num_restarts)

    def stats(self, state):
        return {} if self.restart is None else {"num_restarts": state.num_restarts}

    def drift_scale(self, state, num_steps):
        # Under a translation T z = z - v every step moves by v/2 (also the first step
        # after a restart, a KM(1/2) step), so z_0 - z_k = (k/2) v with or without restarts.
        if self.contraction is not None:
            return None
        return jnp.asarray(num_steps) / 2.0
