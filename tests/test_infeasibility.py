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


FEASIBLE = {
    "T1 contraction": (lambda z, _: jnp.array([[0.5, 0.25], [0.25, 0.5]]) @ z + 1.0, jnp.zeros(2)),
    "intersecting balls DR": (douglas_rachford(ball([0.0, 0.0]), ball([1.5, 0.0])), Z0),
    "line through ball DR": (douglas_rachford(line(0.5), ball([0.0, 0.0])), Z0),
    "rotation": (lambda z, _: jnp.stack([-z[1], z[0]]), jnp.array([1.0, 0.0])),
}


@pytest.mark.parametrize("name", list(FEASIBLE))
@pytest.mark.parametrize("solver", [fpx.KM(0.5), fpx.Halpern()], ids=lambda s: type(s).__name__)
def test_feasible_problems_are_never_flagged(name, solver):
    fn, z0 = FEASIBLE[name]
    sol = fpx.fixed_point(fn, z0, solver=solver, detect_infeasible=True, throw=False, max_steps=20_000)
    assert sol.result != fpx.RESULTS.infeasible
    if type(solver) is fpx.KM:
        assert sol.result == fpx.RESULTS.successful


@pytest.mark.parametrize("rho", [0.99, 0.999, 0.9999])
def test_slow_contraction_from_far_is_not_flagged(rho):
    # For k (1 - rho) << 1 the iterates look like a translation; the test must wait.
    fn = lambda z, _: rho * z + 1.0
    sol = fpx.fixed_point(fn, jnp.zeros(3), detect_infeasible=True, throw=False, max_steps=3000)
    assert sol.result != fpx.RESULTS.infeasible


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
