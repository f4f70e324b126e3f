"""Halpern (anchored) iteration and its optimal-contractive variant."""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, PyTree, Scalar

from .. import _validate as checks
from .._misc import tree_lerp, two_norm
from ._base import AbstractFixedPointSolver


class _HalpernState(eqx.Module):
    anchor: PyTree
    k: Array


class Halpern(AbstractFixedPointSolver[_HalpernState]):
    """Halpern iteration `z_{k+1} = b_k z_0 + (1 - b_k) T(z_k)`, anchored at `z_0`.

    With `contraction=None`, `b_k = 1/(k+2)`: the optimal method for a merely
    nonexpansive `T` with a fixed point. Its residual obeys the tight bound
    `|z_k - T z_k| <= 2 |z_0 - z*| / (k+1)` (attained by the 90° rotation), where Picard
    may not converge at all and KM only achieves `O(1/sqrt(k))`.

    With `contraction=rho` (`T` is `rho`-Lipschitz, `rho < 1`) it is the optimal-contractive
    Halpern method (OC-Halpern, Park & Ryu 2022): `b_k = 1/phi_{k+1}`,
    `phi_k = sum_{i<=k} rho^(-2i)`, with residual bound
    `(1 + rho) |z_0 - z*| / sum_{i<=k} rho^(-i)`. It beats Picard's `2 rho^k |z_0 - z*|`
    in the worst case and, for `k -> inf`, turns into Picard.

    On a contraction plain Halpern is slower than Picard (its residual falls like 1/k);
    give it `contraction=rho` there.

    ```python
    import jax.numpy as jnp, fpx
    rot = lambda z, _: jnp.stack([-z[1], z[0]])
    sol = fpx.fixed_point(rot, jnp.array([1.0, 0.0]), solver=fpx.Halpern())
    assert sol.stats["num_steps"] == 3   # z_3 = 0 (up to rounding) on the rotation
    ```
    """

    contraction: float | None = None
    rtol: float = 1e-5
    atol: float = 1e-6
    norm: Callable[[PyTree], Scalar] = two_norm

    def __check_init__(self):
        if self.contraction is not None:
            checks.real(
                "Halpern", "contraction", self.contraction, low=0, high=1,
                hint=" It is the Lipschitz constant of T; use contraction=None for a merely nonexpansive T.",
            )

    def init(self, fn, z0, fz0, args):
        return _HalpernState(anchor=z0, k=jnp.array(0, jnp.int32))

    def anchor_weight(self, k: Array) -> Array:
        """`b_k`, the weight of the anchor in the step from `z_k` to `z_{k+1}`."""
        kf = k.astype(jnp.result_type(float))
        if self.contraction is None or self.contraction == 1:
            return 1.0 / (kf + 2.0)
        rho2 = jnp.asarray(self.contraction, kf.dtype) ** 2
        # 1 / sum_{i=0}^{k+1} rho^(-2i), written to stay finite for large k.
        return (1.0 - rho2) * rho2 ** (kf + 1.0) / (1.0 - rho2 ** (kf + 2.0))

    def step(self, fn, z, fz, args, state):
        beta = self.anchor_weight(state.k)
        z_next = tree_lerp(fz, state.anchor, beta)
        return z_next, fn(z_next, args), _HalpernState(state.anchor, state.k + 1)

    def drift_scale(self, state, num_steps):
        # Under a translation T z = z - v the iterates satisfy z_0 - z_k = (k/2) v.
        if self.contraction is not None:
            return None
        return jnp.asarray(num_steps) / 2.0
