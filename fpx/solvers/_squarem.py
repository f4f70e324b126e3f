"""SQUAREM: squared polynomial extrapolation (Varadhan & Roland 2008)."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PyTree, Scalar

from .. import _validate as checks
from .._misc import ravel, two_norm
from ._base import AbstractFixedPointSolver


class _SquaremState(eqx.Module):
    step_max: Scalar  # current upper bound on the step length (adapted)
    num_rejected: Int[Array, ""]


def _step_length(scheme: int, r: Float[Array, " n"], v: Float[Array, " n"]) -> Scalar:
    # Inner products of r, v rescaled by their largest entry, so that they cannot overflow.
    scale = jnp.maximum(jnp.max(jnp.abs(r)), jnp.max(jnp.abs(v)))
    scale = jnp.where(scale > 0, scale, 1.0)
    r, v = r / scale, v / scale
    rr, rv, vv = r @ r, r @ v, v @ v
    if scheme == 1:
        return -rv / vv
    if scheme == 2:
        return -rr / rv
    return jnp.sqrt(rr / vv)


class SQUAREM(AbstractFixedPointSolver[_SquaremState]):
    """SQUAREM, the squared extrapolation accelerator of EM-type iterations.

    One step (Varadhan & Roland 2008, Scand. J. Statist. 35, "Simple and globally
    convergent methods for accelerating the convergence of any EM algorithm") from `z`:
    `z1 = T z`, `z2 = T z1`, `r = z1 - z`, `v = z2 - 2 z1 + z`, a step length `s >= 1`, the
    extrapolation `z' = z + 2 s r + s^2 v`, and the stabilising step `z_next = T z'`.
    (The paper writes `alpha = -s <= -1` and `z - 2 alpha r + alpha^2 v`.) On `T z = lam z`
    the extrapolation is `(1 + s (lam - 1))^2 z`, so `s = 1` is two Picard steps and
    `s = 1/(1 - lam)` is exact; the schemes estimate it:

    - `scheme=1` (SqS1): `s = -<r, v> / <v, v>`;
    - `scheme=2` (SqS2): `s = -<r, r> / <r, v>`;
    - `scheme=3` (SqS3, the default, as in the R package `SQUAREM`): `s = |r| / |v|`,
      which the authors found the most reliable.

    Safeguards for global convergence (as in the R package): `s` is clipped to
    `[step_min, step_max]` (`s = 1` is plain Picard); `step_max` starts at its given value,
    grows by `mstep` each time a step at the bound is accepted and shrinks by `mstep`
    (down to its starting value) when one is rejected; a step is rejected, and the plain
    iterate `z2` taken instead, when `T z'` is non-finite or the residual `|z' - T z'|`
    exceeds the plain iterate's residual `|z2 - z1|` by more than `kr (1 + rms(z2))` (the
    R package's rule without an objective; `kr=0` makes the residual monotone, which is
    about 10x slower on EM, where a long step that raises the residual tenfold typically
    sets up one that cuts it a hundredfold). `stats["num_rejected"]` counts rejections.

    Each step costs 3 evaluations of `fn` (`z2`, `T z'`, and `fn` at the next iterate for
    the driver's stopping test), always, also under `vmap`: `num_steps` counts SQUAREM
    cycles and `stats["num_fn_evals"] = 1 + 3 num_steps`. Like Anderson it extrapolates, so
    it has no drift law and refuses `detect_infeasible`.

    **Arguments:** `scheme` (1, 2 or 3), `step_min` (>= 1), `step_max` (starting bound,
    >= `step_min`; grows adaptively), `mstep` (> 1), `kr` (>= 0), `rtol`, `atol`, `norm`.

    ```python
    import jax.numpy as jnp, fpx
    # A slow linear contraction (rate 0.99): Picard needs about 1400 evaluations.
    fn = lambda z, _: 0.99 * z + jnp.array([0.01, 0.02])
    sol = fpx.fixed_point(fn, jnp.zeros(2), solver=fpx.SQUAREM(rtol=0.0, atol=1e-8))
    assert jnp.allclose(sol.value, jnp.array([1.0, 2.0]), atol=1e-5)
    assert sol.stats["num_fn_evals"] < 40
    ```
    """

    vmap_free_running: ClassVar[bool] = True  # counters-only stats, no inner loops

    scheme: int = 3
    step_min: float = 1.0
    step_max: float = 1.0
    mstep: float = 4.0
    kr: float = 1.0
    rtol: float = 1e-5
    atol: float = 1e-6
    norm: Callable[[PyTree], Scalar] = two_norm

    fn_evals_per_step: ClassVar[int | None] = 3

    def __check_init__(self):
        if self.scheme not in (1, 2, 3) or isinstance(self.scheme, bool):
            raise ValueError(
                f"`SQUAREM(scheme=...)` must be 1, 2 or 3 (the step lengths SqS1, SqS2, SqS3 of "
                f"Varadhan & Roland), got {self.scheme!r}."
            )
        hint = " Step lengths are >= 1: s = 1 is two plain Picard steps."
        checks.real("SQUAREM", "step_min", self.step_min, low=1, hint=hint)
        checks.real("SQUAREM", "step_max", self.step_max, low=1, hint=hint)
        checks.real(
            "SQUAREM", "mstep", self.mstep, low=1, low_open=True,
            hint=" It is the factor by which step_max grows after an accepted step at the bound.",
        )
        checks.real(
            "SQUAREM", "kr", self.kr, low=0, allow_inf=True,
            hint=" It is the residual growth an extrapolation may cause before it is rejected (0: monotone, inf: never rejected).",
        )
        traced = checks.is_traced_scalar(self.step_min) or checks.is_traced_scalar(self.step_max)
        if not traced and float(self.step_max) < float(self.step_min):
            raise ValueError(f"`SQUAREM(step_max=...)` must be >= step_min={self.step_min!r}, got {self.step_max!r}.")

    def init(self, fn, z0, fz0, args):
        zf, _ = ravel(z0)
        return _SquaremState(step_max=jnp.asarray(self.step_max, zf.dtype), num_rejected=jnp.array(0, jnp.int32))

    def step(self, fn, z, fz, args, state):
        zf, unravel = ravel(z)
        z1 = ravel(fz)[0]
        z2 = ravel(fn(fz, args))[0]
        r = z1 - zf
        v = (z2 - z1) - r
        dtype = zf.dtype
        step_min = jnp.asarray(self.step_min, dtype)
        step_max = state.step_max
        s = _step_length(self.scheme, r, v)
        # inf (v = 0: a translation, or an exact step) clips to step_max; NaN (0/0) too.
        s = jnp.where(jnp.isfinite(s), jnp.clip(s, step_min, step_max), step_min)
        z_ext = zf + 2 * s * r + s**2 * v
        t_ext = ravel(fn(unravel(z_ext), args))[0]
        norm = lambda flat: jnp.asarray(self.norm(unravel(flat))).astype(dtype)
        residual_ext = norm(t_ext - z_ext)
        # Non-monotone on purpose (see the docstring): only a jump beyond the slack is rejected.
        rms = jnp.sqrt(jnp.mean(z2**2))
        allowed = norm(z2 - z1) + self.kr * (1 + rms)
        # NaN compares false, so a non-finite extrapolation is rejected as well.
        accept = jnp.isfinite(residual_ext) & ((s <= 1) | (residual_ext <= allowed))
        z_next = jnp.where(accept, t_ext, z2)

        at_bound = s >= step_max
        start = jnp.asarray(self.step_max, dtype)
        grown = jnp.minimum(self.mstep * step_max, 1 / jnp.finfo(dtype).eps)  # s^2 stays finite
        shrunk = jnp.maximum(start, step_max / self.mstep)
        step_max = jnp.where(at_bound, jnp.where(accept, grown, shrunk), step_max)
        new_state = _SquaremState(step_max=step_max, num_rejected=state.num_rejected + (~accept).astype(jnp.int32))
        z_next = unravel(z_next)
        return z_next, fn(z_next, args), new_state

    def stats(self, state):
        return {"num_rejected": state.num_rejected}
