"""Infeasibility detection (DESIGN §2, §9 T3): no fixed point is never reported as success."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fpx


def douglas_rachford(project_a, project_b):
    def T(z, _):
        a = project_a(z)
        return z + project_b(2 * a - z) - a

    return T


def line(x1):
    return lambda z: z.at[0].set(x1)


def ball(center, radius=1.0):
    center = jnp.asarray(center)

    def project(z):
        d = z - center
        return center + d / jnp.maximum(1.0, jnp.linalg.norm(d) / radius)

    return project


Z0 = jnp.array([0.3, -2.0])
DRIFTING = [fpx.Picard(), fpx.KM(0.5), fpx.Halpern()]


@pytest.mark.parametrize("solver", DRIFTING, ids=lambda s: type(s).__name__)
def test_dr_parallel_lines_reports_displacement(solver):
    T = douglas_rachford(line(0.0), line(1.0))
    sol = fpx.fixed_point(T, Z0, solver=solver, detect_infeasible=True, throw=False, max_steps=500)
    assert sol.result == fpx.RESULTS.infeasible
    np.testing.assert_allclose(sol.stats["displacement"], [-1.0, 0.0], atol=1e-10)
    assert int(sol.stats["num_steps"]) < 300


@pytest.mark.parametrize("solver", DRIFTING, ids=lambda s: type(s).__name__)
def test_dr_disjoint_balls_certificate_and_shadow(solver):
    A, B = ball([0.0, 0.0]), ball([3.0, 0.0])
    sol = fpx.fixed_point(douglas_rachford(A, B), Z0, solver=solver, detect_infeasible=True, throw=False, max_steps=3000)
    assert sol.result == fpx.RESULTS.infeasible
    v = np.asarray(sol.stats["displacement"])
    # The verdict waits until the estimate is accurate to about 1 % of its norm.
    assert np.linalg.norm(v - np.array([-1.0, 0.0])) <= 0.02
    np.testing.assert_allclose(A(sol.value), [1.0, 0.0], atol=2e-2)


def test_infeasible_with_throw_raises():
    T = douglas_rachford(line(0.0), line(1.0))
    with pytest.raises(fpx.FixedPointError, match=r"found that the operator has no fixed point"):
        fpx.fixed_point(T, Z0, detect_infeasible=True)


def in_both(project_a, project_b):
    """The DR shadow P_A z must lie in B: dist(P_A z, B) <= |z - T z| (as P_B(2 P_A z - z) is in B)."""

    def check(sol):
        a = project_a(sol.value)
        assert float(jnp.linalg.norm(project_b(a) - a)) <= float(sol.stats["residual_norm"]) * (1 + 1e-9) + 1e-15
        assert float(jnp.linalg.norm(project_a(a) - a)) <= 1e-15

    return check


def near(point, atol):
    def check(sol):
        np.testing.assert_allclose(sol.value, point, atol=atol)

    return check


A_BALL, B_BALL, LINE = ball([0.0, 0.0]), ball([1.5, 0.0]), line(0.5)
# (operator, z0, what the fixed point must satisfy); the problems all have fixed points.
FEASIBLE = {
    # z* = (I - M)^-1 1 = (4, 4); |z - z*| <= |z - T z| / (1 - |M|), |M| = 0.75
    "T1 contraction": (lambda z, _: jnp.array([[0.5, 0.25], [0.25, 0.5]]) @ z + 1.0, jnp.zeros(2), lambda tol: near([4.0, 4.0], 4 * tol)),
    "intersecting balls DR": (douglas_rachford(A_BALL, B_BALL), Z0, lambda tol: in_both(A_BALL, B_BALL)),
    "line through ball DR": (douglas_rachford(LINE, A_BALL), Z0, lambda tol: in_both(LINE, A_BALL)),
    # the only fixed point of the rotation is 0
    "rotation": (lambda z, _: jnp.stack([-z[1], z[0]]), jnp.array([1.0, 0.0]), lambda tol: near([0.0, 0.0], 2 * tol)),
}
# KM converges on all of them. Plain Halpern's residual falls like 1/k (DESIGN §2): within
# 20 000 steps it reaches the rotation's fixed point (in a few steps: z_1 = (1, 1)/2 and
# T z_1 is its mirror image) but not the 1e-5 tolerance of the others.
HALPERN_SOLVES = {"rotation"}


@pytest.mark.parametrize("name", list(FEASIBLE))
@pytest.mark.parametrize("solver", [fpx.KM(0.5), fpx.Halpern()], ids=lambda s: type(s).__name__)
def test_feasible_problems_are_never_flagged(name, solver):
    fn, z0, check = FEASIBLE[name]
    sol = fpx.fixed_point(fn, z0, solver=solver, detect_infeasible=True, throw=False, max_steps=20_000)
    residual, steps = float(sol.stats["residual_norm"]), int(sol.stats["num_steps"])
    tol = solver.atol + solver.rtol * float(jnp.linalg.norm(sol.value))
    if type(solver) is fpx.KM or name in HALPERN_SOLVES:
        assert sol.result == fpx.RESULTS.successful
        assert residual <= tol and steps < 1000
        check(tol)(sol)
    else:
        assert sol.result == fpx.RESULTS.max_steps_reached and steps == 20_000
        # Halpern's bound |z_k - T z_k| <= 2 |z0 - z*| / (k + 1), with |z0 - z*| < 6 here.
        assert tol < residual <= 2 * 6.0 / 20_001
        check(2 * residual)(sol)


@pytest.mark.parametrize("rho, max_steps", [(0.99, 3000), (0.999, 3000), (0.9999, 10_000)])
def test_slow_contraction_from_far_is_not_flagged(rho, max_steps):
    # For k (1 - rho) << 1 the iterates look like a translation; the test must wait.
    # Picard from 0 on z -> rho z + 1 has z_k = (1 - rho^k) / (1 - rho), residual rho^k |1|.
    fn = lambda z, _: rho * z + 1.0  # noqa: E731
    sol = fpx.fixed_point(fn, jnp.zeros(3), detect_infeasible=True, throw=False, max_steps=max_steps)
    # The stopping test |z - T z| <= 1e-6 + 1e-5 |z| holds from the first k with
    # sqrt(3) rho^k <= 1e-6 + 1e-5 sqrt(3) (1 - rho^k) / (1 - rho).
    k = np.arange(max_steps + 1)
    z = (1 - rho**k) / (1 - rho)
    passed = np.flatnonzero(np.sqrt(3) * rho**k <= 1e-6 + 1e-5 * np.sqrt(3) * z)
    if passed.size:
        assert sol.result == fpx.RESULTS.successful
        assert int(sol.stats["num_steps"]) == passed[0]
    else:
        assert sol.result == fpx.RESULTS.max_steps_reached
        assert int(sol.stats["num_steps"]) == max_steps
    steps = int(sol.stats["num_steps"])
    np.testing.assert_allclose(sol.value, np.full(3, z[steps]), rtol=1e-12)
    np.testing.assert_allclose(sol.stats["residual_norm"], np.sqrt(3) * rho**steps, rtol=1e-9)


def test_detection_under_vmap_is_per_member():
    def solve(offset):
        T = douglas_rachford(line(0.0), line(offset))
        return fpx.fixed_point(T, Z0, solver=fpx.KM(0.5), detect_infeasible=True, throw=False, max_steps=500)

    sol = jax.vmap(solve)(jnp.array([0.0, 1.0, -2.0]))
    assert bool((sol.result == fpx.RESULTS.successful)[0])
    assert bool((sol.result == fpx.RESULTS.infeasible)[1])
    assert bool((sol.result == fpx.RESULTS.infeasible)[2])
    np.testing.assert_allclose(sol.stats["displacement"][2], [2.0, 0.0], atol=1e-10)


def test_detection_needs_a_drifting_solver():
    T = douglas_rachford(line(0.0), line(1.0))
    for solver in [fpx.Anderson(), fpx.Broyden(), fpx.NewtonKrylov(), fpx.Halpern(contraction=0.5)]:
        with pytest.raises(ValueError, match=r"detect_infeasible needs a solver"):
            fpx.fixed_point(T, Z0, solver=solver, detect_infeasible=True)


def test_displacement_test_options_are_validated():
    with pytest.raises(ValueError, match=r"rtol"):
        fpx.DisplacementTest(rtol=2.0)
    with pytest.raises(ValueError, match=r"min_steps"):
        fpx.DisplacementTest(min_steps=1)
    T = douglas_rachford(line(0.0), line(1.0))
    sol = fpx.fixed_point(T, Z0, detect_infeasible=fpx.DisplacementTest(min_steps=100), throw=False, max_steps=500)
    assert sol.result == fpx.RESULTS.infeasible
    assert int(sol.stats["num_steps"]) >= 100
