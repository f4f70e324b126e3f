"""Picard and Krasnoselskii–Mann iteration."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import jax.numpy as jnp
from jaxtyping import PyTree, Scalar

from .._misc import tree_lerp, two_norm
from ._base import AbstractFixedPointSolver, _check_unit_interval


class Picard(AbstractFixedPointSolver[None]):
    """Plain fixed-point iteration `z <- T(z)`.

    Converges linearly on contractions (Banach). On merely nonexpansive operators it may
    cycle (a rotation); use `KM` or `Halpern` there.

    ```python
    import jax.numpy as jnp, fpx
    sol = fpx.fixed_point(lambda z, a: 0.5 * z + a, jnp.zeros(3), jnp.ones(3), solver=fpx.Picard())
    assert jnp.allclose(sol.value, 2.0, atol=1e-4)
    ```
    """

    vmap_free_running: ClassVar[bool] = True  # counters-only stats, no inner loops

    rtol: float = 1e-5
    atol: float = 1e-6
    norm: Callable[[PyTree], Scalar] = two_norm

    def init(self, fn, z0, fz0, args):
        return None

    def step(self, fn, z, fz, args, state):
        return fz, fn(fz, args), None

    def drift_scale(self, state, num_steps):
        return num_steps


class KM(AbstractFixedPointSolver[None]):
    """Krasnoselskii–Mann (averaged) iteration `z <- z + alpha (T(z) - z)`.

    Converges weakly to a fixed point of any nonexpansive `T` that has one, for
    `alpha` in (0, 1); `alpha=1` is `Picard`. The residual of the averaged operator decays
    like `O(1/sqrt(k))` in the worst case (for the 90° rotation, exactly
    `sqrt(2) * 2**(-k/2)` with `alpha=0.5`).

    ```python
    import jax.numpy as jnp, fpx
    rot = lambda z, _: jnp.stack([-z[1], z[0]])
    sol = fpx.fixed_point(rot, jnp.array([1.0, 0.0]), solver=fpx.KM(alpha=0.5), max_steps=100)
    assert sol.converged
    ```
    """

    vmap_free_running: ClassVar[bool] = True  # counters-only stats, no inner loops

    alpha: float = 0.5
    rtol: float = 1e-5
    atol: float = 1e-6
    norm: Callable[[PyTree], Scalar] = two_norm

    def __check_init__(self):
        _check_unit_interval("KM", "alpha", self.alpha)

    def init(self, fn, z0, fz0, args):
        return None

    def step(self, fn, z, fz, args, state):
        z_next = tree_lerp(z, fz, self.alpha)
        return z_next, fn(z_next, args), None

    def drift_scale(self, state, num_steps):
        return self.alpha * jnp.asarray(num_steps)
