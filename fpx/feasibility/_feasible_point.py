"""`feasible_point`: feasibility problems as fixed points of projection splittings."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, PyTree

from .. import _validate as checks
from .._errors import raise_if_failed
from .._fixed_point import DisplacementTest, fixed_point
from .._misc import same_structure, tree_add, tree_describe, tree_scale, tree_sub
from .._solution import RESULTS, Solution
from ..adjoint import ImplicitAdjoint
from ..solvers import AbstractFixedPointSolver, Picard

Projection = Callable[[PyTree], PyTree]
METHODS = ("ap", "dr", "dm", "cyclic")


# ---------------------------------------------------------------------------------------------
# argument checks


def _check_method(owner: str, method: Any, count: int) -> None:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"`{owner}(method=...)`: unknown method {method!r}; choose from {', '.join(map(repr, METHODS))}.")
    if method in ("ap", "dr", "dm") and count != 2:
        raise ValueError(
            f"method={method!r} takes exactly two projections (got {count}); use method='cyclic' for m sets."
        )
    if method == "cyclic" and count < 2:
        raise ValueError(f"method='cyclic' needs at least two projections (got {count}).")


def _check_projections(owner: str, projections: Any) -> tuple:
    if (
        projections is None
        or callable(projections)
        or isinstance(projections, (str, bytes))
        or not isinstance(projections, Sequence)
    ):
        raise TypeError(
            f"`{owner}(projections=...)` must be a list of projections, one function z -> P(z) per set "
            f"(e.g. [lambda z: fpx.feasibility.project_box(z, 0.0, 1.0), ...]), got {projections!r} "
            f"({type(projections).__name__})."
        )
    projections = tuple(projections)
    for i, p in enumerate(projections):
        if not callable(p):
            raise TypeError(
                f"`{owner}(projections=...)`: projections[{i}] must be a function z -> P(z), got {p!r} ({type(p).__name__})."
            )
    return projections


def _check_parameters(owner: str, relaxation: Any, beta: Any) -> None:
    checks.real(owner, "relaxation", relaxation, low=0, high=2, low_open=True, high_open=True,
                hint=" It is Douglas–Rachford's relaxation λ (1 is plain DR).")
    checks.real(owner, "beta", beta, hint=" It is the difference map's parameter β (nonzero; 1 is common).")
    if not isinstance(beta, jax.core.Tracer) and float(beta) == 0:
        raise ValueError(f"`{owner}(beta=...)` must be nonzero (the difference map divides by it), got {beta!r}.")


def _check_outputs(owner: str, projections: tuple, z0: PyTree) -> None:
    """Every projection maps a point shaped like `z0` to one (checked at trace time)."""
    want = jax.eval_shape(lambda: z0)
    for i, p in enumerate(projections):
        try:
            got = eqx.filter_eval_shape(p, z0)
        except Exception as e:
            e.add_note(f"(raised while tracing {owner}'s projections[{i}] on z0: {tree_describe(want)})")
            raise
        if not same_structure(got, want):
            hint = ""
            if isinstance(got, tuple) and not isinstance(want, tuple):
                hint = (
                    " A projection returns one point; a graph projection that returns a tuple, such as "
                    "project_relu_graph(u, y), must be wrapped, e.g. "
                    "`lambda z: jnp.stack(project_relu_graph(z[0], z[1]))`."
                )
            raise ValueError(
                f"`{owner}(projections=...)`: projections[{i}] must return a point with the structure, "
                f"shapes and dtypes of z0, {tree_describe(want)}; it returned {tree_describe(got)}.{hint}"
            )


# ---------------------------------------------------------------------------------------------
# splittings


def _operator(method: str) -> tuple[Callable, Callable]:
    """`(T, point)` of a splitting, as functions of `(z, params)`.

    `params = (projections, relaxation, beta)`: passing the projections as an argument
    (closure-converted, so their closed-over arrays are leaves) instead of closing over them
    is what lets `fixed_point` differentiate the solution with respect to the sets.
    """
    if method == "ap":

        def ap(z, params):
            (pa, pb), _, _ = params
            return pa(pb(z))

        return ap, _same_point
    if method == "cyclic":

        def cyclic(z, params):
            for p in params[0]:
                z = p(z)
            return z

        return cyclic, _same_point
    if method == "dr":

        def dr(z, params):
            (pa, pb), relaxation, _ = params
            a = pa(z)
            reflected = tree_sub(tree_scale(2.0, a), z)
            return tree_add(z, tree_scale(relaxation, tree_sub(pb(reflected), a)))

        return dr, _shadow

    def dm(z, params):
        (pa, pb), _, beta = params
        return tree_add(z, tree_scale(beta, tree_sub(pa(_f_b(z, params)), pb(_f_a(z, params)))))

    return dm, _dm_point


def _same_point(z, params):
    return z


def _shadow(z, params):
    return params[0][0](z)


def _f_a(z, params):
    (pa, _), _, beta = params
    a = pa(z)
    return tree_sub(a, tree_scale(1.0 / beta, tree_sub(a, z)))


def _f_b(z, params):
    (_, pb), _, beta = params
    b = pb(z)
    return tree_add(b, tree_scale(1.0 / beta, tree_sub(b, z)))


def _dm_point(z, params):
    return params[0][0](_f_b(z, params))


def splitting(projections: Sequence[Projection], method: str, *, relaxation: float = 1.0, beta: float = 1.0):
    """The fixed-point operator `T(z, args)` of a splitting and the map from `z` to its solution point.

    - `"ap"`: alternating projections `T = P_A P_B`; the point is `z` itself (in A).
    - `"cyclic"`: `T = P_m ... P_1`; the point is `z` (in the last set).
    - `"dr"`: Douglas–Rachford `T z = z + λ (P_B(2 P_A z - z) - P_A z)`; the point is the
      shadow `P_A z`, not the governing iterate `z`.
    - `"dm"`: Elser's difference map with parameter β:
      `T z = z + β (P_A(f_B z) - P_B(f_A z))`, `f_A z = P_A z - (P_A z - z)/β`,
      `f_B z = P_B z + (P_B z - z)/β`; the point is `P_A(f_B z)`.

    `T` ignores its `args`; pass it to `fpx.fixed_point` with any solver. (To differentiate
    the solution with respect to the sets, use `fpx.feasible_point`.)

    ```python
    import jax.numpy as jnp, fpx
    from fpx.feasibility import project_hyperplane, splitting
    lines = [lambda z: project_hyperplane(z, jnp.array([1.0, 0.0]), 1.0),
             lambda z: project_hyperplane(z, jnp.array([1.0, 1.0]), 3.0)]
    T, point = splitting(lines, "dr")
    sol = fpx.fixed_point(T, jnp.zeros(2), solver=fpx.Anderson())
    assert jnp.allclose(point(sol.value), jnp.array([1.0, 2.0]), atol=1e-4)
    ```
    """
    projections = _check_projections("splitting", projections)
    _check_method("splitting", method, len(projections))
    _check_parameters("splitting", relaxation, beta)
    T, point = _operator(method)
    params = (projections, relaxation, beta)
    return (lambda z, _: T(z, params)), (lambda z: point(z, params))


# ---------------------------------------------------------------------------------------------
# gaps


def _norm(x):
    return jnp.sqrt(sum(jnp.sum(leaf**2) for leaf in jtu.tree_leaves(x)))


def distance(project: Projection, x: PyTree) -> Array:
    """Euclidean distance from `x` to the set that `project` projects onto: `|P(x) - x|`.

    `x` is any pytree of arrays (the norm is over all its entries); `project` maps it to a
    pytree of the same structure. This is the `sol.stats["gap"]` of `fpx.feasible_point`.

    ```python
    import jax.numpy as jnp
    from fpx.feasibility import distance, project_l2_ball
    assert jnp.allclose(distance(project_l2_ball, jnp.array([3.0, 4.0])), 4.0)
    ```
    """
    return _norm(tree_sub(project(x), x))


def gap_tolerance(solver: AbstractFixedPointSolver, x: PyTree) -> Array:
    """The distance within which `x` counts as in a set: `solver.atol + solver.rtol * |x|`.

    `fpx.feasible_point` reports success only when every entry of `sol.stats["gap"]` is
    within this tolerance of its solver (`|x|` is the Euclidean norm of all entries).

    ```python
    import jax.numpy as jnp, fpx
    from fpx.feasibility import gap_tolerance
    tol = gap_tolerance(fpx.Picard(rtol=1e-3, atol=1e-6), jnp.array([3.0, 4.0]))
    assert jnp.allclose(tol, 1e-6 + 1e-3 * 5.0)
    ```
    """
    return solver.atol + solver.rtol * _norm(x)



class _GapTerminated(AbstractFixedPointSolver):
    """Wraps a solver so that it stops only when the point is also close to every set.

    AP and cyclic projections reach their fixed point on disjoint sets too, and near a
    feasible fixed point their residual can be far smaller than the constraint gap. So the
    stopping test is: fixed-point test passed *and* (every gap within tolerance, or — two
    sets — the point and its projection form a verified best-approximation pair).

    The projections are not fields: `init` keeps the arrays of the splitting's `args` (the
    closure-converted projections, `relaxation`, `beta`) in the state and `terminate`
    recombines them with `static`, their non-array part. So the solver closes over nothing
    traced, and differentiating the solve with respect to the sets cannot leak tracers.
    """

    inner: AbstractFixedPointSolver
    method: str = eqx.field(static=True)
    static: Any
    certificate_rtol: Any

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
        return self.inner.init(fn, z0, fz0, args), eqx.filter(args, eqx.is_array)

    def step(self, fn, z, fz, args, state):
        inner_state, dynamic = state
        z, fz, inner_state = self.inner.step(fn, z, fz, args, inner_state)
        return z, fz, (inner_state, dynamic)

    def stats(self, state):
        return self.inner.stats(state[0])

    def drift_scale(self, state, num_steps):
        return self.inner.drift_scale(None if state is None else state[0], num_steps)

    def terminate(self, z, fz, residual_norm, state):
        inner_state, dynamic = state
        converged, result = self.inner.terminate(z, fz, residual_norm, inner_state)
        params = eqx.combine(dynamic, self.static)
        # The gap checks cost several projections: only pay for them once the residual
        # test passes (under vmap the cond becomes a select and both sides run).
        settled = jax.lax.cond(
            converged, lambda z, r: self._settled(params, z, r), lambda z, r: jnp.array(False), z, residual_norm
        )
        return converged & settled, result

    def _settled(self, params, z, residual_norm):
        projections = params[0]
        value = _operator(self.method)[1](z, params)
        tol = gap_tolerance(self.inner, value)
        gaps = jnp.stack([distance(p, value) for p in projections])
        settled = jnp.all(gaps <= tol)
        if len(projections) == 2:
            _, _, verified = _best_approximation_pair(projections, value, tol, self.certificate_rtol)
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

    **Arguments:** `projections`, a list of functions `z -> P(z)` (one per set; each must
    return a point with the structure, shapes and dtypes of `z0`, checked at trace time);
    `z0`, the starting point (a pytree of floating-point arrays); `method`; `solver`, an
    fpx solver instance; `max_steps`; `throw` (raise on failure, else read `sol.result`);
    `relaxation` (DR's λ in (0, 2)); `beta` (the difference map's β, nonzero);
    `detect_infeasible` (as in `fpx.fixed_point`; default: on for DR/DM with a drifting
    solver); `certificate_rtol` in (0, 1).

    **Gradients.** `sol.value` is differentiable (`jax.grad`, `jax.jvp`) with respect to
    the arrays the projections close over (a ball's centre, a hyperplane's offset, ...), by
    the implicit function theorem on the splitting's fixed point, for every method. The
    projections are closure-converted and passed to `fpx.fixed_point` as `args`; the
    backward (adjoint) solve is a plain linear fixed point, solved by `fpx.ImplicitAdjoint`'s
    choice for `solver` (`solver` itself, or Anderson after Halpern / Newton–Krylov), never
    with the gap test. The derivative exists where the fixed point is locally unique and
    the projections are differentiable there (two lines crossing, a line crossing a
    circle); where it is not (a point inside a whole segment or region of solutions, where
    `I - dT/dz` is singular) the adjoint solve fails and the gradient is NaN in the
    undetermined directions. The gradient with respect to `z0` is zero.

    ```python
    import jax, jax.numpy as jnp, fpx
    line = lambda c: (lambda z: z.at[0].set(c))          # the line x1 = c
    sol = fpx.feasible_point([line(0.0), line(1.0)], jnp.array([0.3, -2.0]), throw=False)
    assert sol.result == fpx.RESULTS.infeasible
    assert jnp.allclose(sol.stats["certificate"], jnp.array([1.0, 0.0]))
    # The crossing point of the lines x1 = b and x1 + x2 = 3 moves with b as (1, -1).
    crossing = lambda b: fpx.feasible_point(
        [line(b), lambda z: fpx.feasibility.project_hyperplane(z, jnp.ones(2), 3.0)],
        jnp.zeros(2), solver=fpx.Anderson()).value
    assert jnp.allclose(jax.jacobian(crossing)(1.0), jnp.array([1.0, -1.0]), atol=1e-4)
    ```
    """
    owner = "feasible_point"
    projections = _check_projections(owner, projections)
    _check_method(owner, method, len(projections))
    checks.solver(owner, "solver", solver)
    max_steps = checks.integer(owner, "max_steps", max_steps, minimum=1)
    if not isinstance(throw, (bool, np.bool_)):
        raise TypeError(f"`{owner}(throw=...)` must be True or False, got {throw!r}.")
    _check_parameters(owner, relaxation, beta)
    checks.real(owner, "certificate_rtol", certificate_rtol, low=0, high=1, low_open=True, high_open=True)
    z0 = checks.float_tree(
        f"`{owner}(z0=...)`", z0, empty="pass the starting point, e.g. jnp.zeros(n).", example="z0"
    )
    _check_outputs(owner, projections, z0)
    # Closure-converted, the arrays a projection closes over (traced ones included) become
    # leaves of `args`, which fixed_point differentiates through its implicit adjoint.
    converted = tuple(eqx.filter_closure_convert(p, z0) for p in projections)
    params = (converted, relaxation, beta)
    T, point = _operator(method)
    if detect_infeasible is None:
        detect_infeasible = method in ("dr", "dm") and solver.drift_scale(None, jnp.array(1)) is not None
    wrapped = _GapTerminated(solver, method, eqx.filter(params, eqx.is_array, inverse=True), certificate_rtol)
    # The adjoint problem is a plain linear fixed point: solve it with the inner solver
    # (ImplicitAdjoint's own choice for it), never with the gap-terminated wrapper.
    adjoint = ImplicitAdjoint(solver=ImplicitAdjoint().backward_solver(solver))
    sol = fixed_point(
        T,
        z0,
        params,
        solver=wrapped,
        adjoint=adjoint,
        max_steps=max_steps,
        throw=False,
        detect_infeasible=detect_infeasible,
    )
    value = point(sol.value, params)
    gaps = jnp.stack([distance(p, value) for p in converted])
    tol = gap_tolerance(solver, value)
    feasible = jnp.all(gaps <= tol)

    certificate = jtu.tree_map(jnp.zeros_like, value)
    if len(projections) == 2:
        _, certificate, proven = _best_approximation_pair(converted, value, tol, certificate_rtol)
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
    # (No "successful but gaps open" case: the wrapped solver's stopping test already
    # requires the gaps to close or a verified pair.)
    stats: dict[str, Any] = dict(sol.stats)
    stats.update(gap=gaps, certificate=certificate, iterate=sol.value)
    out = Solution(value=value, result=result, stats=stats)
    if throw:
        out = raise_if_failed(out, solver, max_steps)
    return out
