"""`feasible_point`: feasibility problems as fixed points of projection splittings."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree

from .._fixed_point import DisplacementTest, fixed_point, raise_if_failed
from .._misc import tree_add, tree_scale, tree_sub
from .._solution import RESULTS, Solution
from ..solvers import AbstractFixedPointSolver, Picard

Projection = Callable[[PyTree], PyTree]
METHODS = ("ap", "dr", "dm", "cyclic")


def _lerp(x, y, t):
    return jtu.tree_map(lambda a, b: a + t * (b - a), x, y)


def splitting(projections: Sequence[Projection], method: str, *, relaxation: float = 1.0, beta: float = 1.0):
    """The fixed-point operator `T(z)` of a splitting and the map from `z` to its solution point.

    - `"ap"`: alternating projections `T = P_A P_B`; the point is `z` itself (in A).
    - `"cyclic"`: `T = P_m ... P_1`; the point is `z` (in the last set).
    - `"dr"`: Douglas–Rachford `T z = z + λ (P_B(2 P_A z - z) - P_A z)`; the point is the
      shadow `P_A z`, not the governing iterate `z`.
    - `"dm"`: Elser's difference map with parameter β:
      `T z = z + β (P_A(f_B z) - P_B(f_A z))`, `f_A z = P_A z - (P_A z - z)/β`,
      `f_B z = P_B z + (P_B z - z)/β`; the point is `P_A(f_B z)`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}.")
    m = len(projections)
    if method in ("ap", "dr", "dm") and m != 2:
        raise ValueError(f"method={method!r} takes exactly two projections (got {m}); use method='cyclic' for m sets.")
    if method == "cyclic" and m < 2:
        raise ValueError("method='cyclic' needs at least two projections.")
    if not 0 < relaxation < 2:
        raise ValueError(f"DR relaxation must lie in (0, 2), got {relaxation!r}.")
    if beta == 0:
        raise ValueError("the difference map needs beta != 0.")

    if method == "ap":
        pa, pb = projections
        return (lambda z, _: pa(pb(z))), (lambda z: z)
    if method == "cyclic":

        def cyclic(z, _):
            for p in projections:
                z = p(z)
            return z

        return cyclic, (lambda z: z)
    pa, pb = projections
    if method == "dr":

        def dr(z, _):
            a = pa(z)
            reflected = tree_sub(tree_scale(2.0, a), z)
            return tree_add(z, tree_scale(relaxation, tree_sub(pb(reflected), a)))

        return dr, pa

    def f_a(z):
        a = pa(z)
        return tree_sub(a, tree_scale(1.0 / beta, tree_sub(a, z)))

    def f_b(z):
        b = pb(z)
        return tree_add(b, tree_scale(1.0 / beta, tree_sub(b, z)))

    def dm(z, _):
        return tree_add(z, tree_scale(beta, tree_sub(pa(f_b(z)), pb(f_a(z)))))

    return dm, (lambda z: pa(f_b(z)))


def _norm(x):
    return jnp.sqrt(sum(jnp.sum(leaf**2) for leaf in jtu.tree_leaves(x)))


def _dist(p, x):
    return _norm(tree_sub(p(x), x))


def _gap_tolerance(solver, value):
    """A point is in a set when its distance is within the solver's `atol + rtol |value|`."""
    return solver.atol + solver.rtol * _norm(value)


class _GapTerminated(AbstractFixedPointSolver):
    """Wraps a solver so that it stops only when the point is also close to every set.

    AP and cyclic projections reach their fixed point on disjoint sets too, and near a
    feasible fixed point their residual can be far smaller than the constraint gap. So the
    stopping test is: fixed-point test passed *and* (every gap within tolerance, or — two
    sets — the point and its projection form a verified best-approximation pair).
    """

    inner: AbstractFixedPointSolver
    projections: tuple
    point: Callable
    certificate_rtol: float

    @property
    def rtol(self):
        return self.inner.rtol

    @property
    def atol(self):
        return self.inner.atol

    @property
    def norm(self):
        return self.inner.norm

    @property
    def fn_evals_per_step(self):
        return self.inner.fn_evals_per_step

    def init(self, fn, z0, fz0, args):
        return self.inner.init(fn, z0, fz0, args)

    def step(self, fn, z, fz, args, state):
        return self.inner.step(fn, z, fz, args, state)

    def stats(self, state):
        return self.inner.stats(state)

    def drift_scale(self, state, num_steps):
        return self.inner.drift_scale(state, num_steps)

    def terminate(self, z, fz, residual_norm, state):
        converged, result = self.inner.terminate(z, fz, residual_norm, state)
        # The gap checks cost several projections: only pay for them once the residual
        # test passes (under vmap the cond becomes a select and both sides run).
        settled = jax.lax.cond(converged, self._settled, lambda z, r: jnp.array(False), z, residual_norm)
        return converged & settled, result

    def _settled(self, z, residual_norm):
        value = self.point(z)
        tol = _gap_tolerance(self.inner, value)
        gaps = jnp.stack([_dist(p, value) for p in self.projections])
        settled = jnp.all(gaps <= tol)
        if len(self.projections) == 2:
            _, _, verified = _best_approximation_pair(self.projections, value, tol, self.certificate_rtol)
        else:
            verified = _stationary_cycle(gaps, residual_norm, tol, self.certificate_rtol)
        return settled | verified


def _stationary_cycle(gaps, residual, tol, rtol):
    """m > 2 sets: the cycle of projections has stopped moving (residual below `rtol` of the
    largest gap) while some gap stays open: a limit cycle, so the convex sets are disjoint."""
    largest = jnp.max(gaps)
    return (largest > tol) & (residual <= rtol * largest)


def _best_approximation_pair(projections, value, tol, rtol):
    """(a, b - a, verified): a = P_A(value), b = P_B(a); verified if also a = P_A(b), |b - a| > tol."""
    pa, pb = projections
    a = pa(value)
    b = pb(a)
    gap = tree_sub(b, a)
    size = _norm(gap)
    mismatch = _norm(tree_sub(pa(b), a))
    return a, gap, (size > tol) & (mismatch <= rtol * size)


def feasible_point(
    projections: Sequence[Projection],
    z0: PyTree,
    *,
    method: str = "dr",
    solver: AbstractFixedPointSolver = Picard(),
    max_steps: int = 1000,
    throw: bool = True,
    relaxation: float = 1.0,
    beta: float = 1.0,
    detect_infeasible: bool | DisplacementTest | None = None,
    certificate_rtol: float = 1e-2,
) -> Solution:
    """Find a point in the intersection of sets given by their projections, or prove there is none.

    The splitting (`method`: `"dr"`, `"ap"`, `"dm"`, `"cyclic"`) is an operator for
    `fpx.fixed_point`, so every fpx solver applies. The returned `sol.value` is the
    solution point (the shadow `P_A z` for DR/DM, never the governing iterate), and
    `sol.stats["gap"]` its distance to each set. Success requires every gap to be within
    `atol + rtol |value|` of the solver's tolerances, so a method that "converges" on
    disjoint sets (AP does) is never reported feasible.

    Infeasible problems end with `RESULTS.infeasible` and `sol.stats["certificate"]`, the
    gap vector `b - a` from A to B (its norm is `dist(A, B)`), in two ways:

    - AP and cyclic projections converge to a fixed point that is not in every set, which
      for convex sets proves the intersection empty; for two sets `(a, P_B a)` is then a
      best-approximation pair; for m > 2 sets the cycle must have stopped moving (fixed-point
      residual below `certificate_rtol` of the largest gap);
    - DR/DM iterates drift: with a drifting solver (Picard, KM, Halpern; on by default for
      them) the displacement test estimates `v` and the certificate is `-v`.

    For two sets the certificate is preferably a checked pair: `a = P_A(b)` and
    `b = P_B(a)` to `certificate_rtol` of `|b - a|` (mutual nearest points prove
    `dist(A, B) = |b - a| > 0` for convex sets); such a pair also ends the iteration. The
    stopping test of every method requires the gaps to close (or such a pair), not just a
    small fixed-point residual.

    ```python
    import jax.numpy as jnp, fpx
    line = lambda c: (lambda z: z.at[0].set(c))          # the line x1 = c
    sol = fpx.feasible_point([line(0.0), line(1.0)], jnp.array([0.3, -2.0]), throw=False)
    assert sol.result == fpx.RESULTS.infeasible
    assert jnp.allclose(sol.stats["certificate"], jnp.array([1.0, 0.0]))
    ```
    """
    T, point = splitting(projections, method, relaxation=relaxation, beta=beta)
    if detect_infeasible is None:
        detect_infeasible = method in ("dr", "dm") and solver.drift_scale(None, jnp.array(1)) is not None
    wrapped = _GapTerminated(solver, tuple(projections), point, certificate_rtol)
    sol = fixed_point(T, z0, None, solver=wrapped, max_steps=max_steps, throw=False, detect_infeasible=detect_infeasible)
    value = point(sol.value)
    gaps = jnp.stack([_dist(p, value) for p in projections])
    tol = _gap_tolerance(solver, value)
    feasible = jnp.all(gaps <= tol)

    certificate = jtu.tree_map(jnp.zeros_like, value)
    if len(projections) == 2:
        _, certificate, proven = _best_approximation_pair(projections, value, tol, certificate_rtol)
        if "displacement" in sol.stats:
            # Not yet at the pair but drifting: b - a = -v/λ for DR, v/β for the difference map.
            scale = -1.0 / relaxation if method == "dr" else 1.0 / beta
            drift = tree_scale(scale, sol.stats["displacement"])
            use_drift = (sol.result == RESULTS.infeasible) & ~proven
            certificate = jtu.tree_map(lambda c, d: jnp.where(use_drift, d, c), certificate, drift)
            proven = proven | (sol.result == RESULTS.infeasible)
    else:
        # A fixed point of P_m...P_1 outside some set proves (convex) sets disjoint.
        proven = (sol.result == RESULTS.successful) & _stationary_cycle(
            gaps, sol.stats["residual_norm"], tol, certificate_rtol
        )
    result = RESULTS.where(feasible, RESULTS.successful, sol.result)
    result = RESULTS.where(~feasible & proven, RESULTS.infeasible, result)
    result = RESULTS.where(~feasible & ~proven & (sol.result == RESULTS.successful), RESULTS.gap_not_closed, result)
    stats: dict[str, Any] = dict(sol.stats)
    stats.update(gap=gaps, certificate=certificate, iterate=sol.value)
    out = Solution(value=value, result=result, stats=stats)
    if throw:
        out = raise_if_failed(out, solver, max_steps)
    return out
