"""fpx.feasible_point (DESIGN §4, §9 T3): splittings, gaps, verified infeasibility certificates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fpx


# The sets come from the library's projections (fpx.feasibility), tested on their own in
# tests/test_projections.py.
def line(x1):
    return lambda z: fpx.feasibility.project_hyperplane(z, jnp.array([1.0, 0.0]), x1)


def ball(center, radius=1.0):
    return lambda z: fpx.feasibility.project_l2_ball(z, radius, jnp.asarray(center))


def box(lo, hi):
    return lambda z: fpx.feasibility.project_box(z, lo, hi)


def affine(A, b):
    return lambda z: fpx.feasibility.project_affine(z, jnp.asarray(A), jnp.asarray(b))


Z0 = jnp.array([0.3, -2.0])
TIGHT = dict(rtol=0.0, atol=1e-10)


@pytest.mark.parametrize("solver", [fpx.Picard(), fpx.KM(0.5), fpx.Halpern()], ids=lambda s: type(s).__name__)
def test_t3_dr_parallel_lines(solver):
    sol = fpx.feasible_point([line(0.0), line(1.0)], Z0, method="dr", solver=solver, throw=False)
    assert sol.result == fpx.RESULTS.infeasible
    np.testing.assert_allclose(sol.stats["displacement"], [-1.0, 0.0], atol=1e-10)
    np.testing.assert_allclose(sol.stats["certificate"], [1.0, 0.0], atol=1e-10)
    np.testing.assert_allclose(sol.stats["gap"], [0.0, 1.0], atol=1e-10)


def test_t3_ap_parallel_lines_converges_but_is_reported_infeasible():
    sol = fpx.feasible_point([line(0.0), line(1.0)], Z0, method="ap", throw=False)
    # AP reaches its fixed point in one step: the residual alone would say "solved".
    assert int(sol.stats["num_steps"]) <= 2
    assert sol.result == fpx.RESULTS.infeasible
    np.testing.assert_allclose(sol.stats["gap"], [0.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(sol.stats["certificate"], [1.0, 0.0], atol=1e-12)


@pytest.mark.parametrize("method", ["dr", "ap", "dm"])
def test_t3_disjoint_balls_certificate_and_shadow(method):
    sol = fpx.feasible_point([ball([0.0, 0.0]), ball([3.0, 0.0])], Z0, method=method, throw=False, max_steps=3000)
    assert sol.result == fpx.RESULTS.infeasible
    np.testing.assert_allclose(sol.stats["certificate"], [1.0, 0.0], atol=2e-2)
    np.testing.assert_allclose(sol.value, [1.0, 0.0], atol=2e-2)  # the shadow, in A, nearest to B


def test_infeasible_raises_with_throw():
    with pytest.raises(Exception, match=r"no fixed point|not within tolerance"):
        fpx.feasible_point([line(0.0), line(1.0)], Z0)


@pytest.mark.parametrize("method", ["dr", "ap", "dm"])
@pytest.mark.parametrize("solver", [fpx.Picard(**TIGHT), fpx.Anderson(**TIGHT)], ids=lambda s: type(s).__name__)
def test_affine_subspace_and_box_solved_to_1e8(method, solver):
    rng = np.random.default_rng(0)
    A = rng.normal(size=(3, 8))
    x_feasible = rng.uniform(-0.5, 0.5, size=8)
    b = A @ x_feasible
    sets = [affine(A, b), box(-1.0, 1.0)]
    sol = fpx.feasible_point(sets, jnp.asarray(rng.normal(size=8) * 3), method=method, solver=solver, max_steps=5000)
    assert sol.result == fpx.RESULTS.successful
    assert float(jnp.max(sol.stats["gap"])) <= 1e-8
    assert float(jnp.max(jnp.abs(A @ sol.value - b))) <= 1e-8
    assert float(jnp.max(jnp.abs(sol.value))) <= 1 + 1e-8


def test_halpern_dr_obeys_its_rate_bound():
    sets = [ball([0.0, 0.0], 1.0), line(0.5)]
    from fpx.feasibility._feasible_point import splitting

    T, _ = splitting(sets, "dr")
    z0 = jnp.array([3.0, 4.0])
    z_star = fpx.fixed_point(T, z0, solver=fpx.Picard(rtol=0.0, atol=1e-13), max_steps=20_000).value
    sol = fpx.fixed_point(T, z0, solver=fpx.Halpern(rtol=0.0, atol=1e-12), max_steps=300, throw=False, trace_length=300)
    trace = np.asarray(sol.stats["residual_trace"])
    k = np.arange(len(trace))
    bound = 2 * float(jnp.linalg.norm(z0 - z_star)) / (k + 1)
    finite = ~np.isnan(trace)
    assert np.all(trace[finite] <= bound[finite] * (1 + 1e-9) + 1e-12)


def test_cyclic_three_sets_feasible_and_infeasible():
    feasible = [ball([0.0, 0.0], 1.0), line(0.5), box(-0.2, 2.0)]
    sol = fpx.feasible_point(feasible, Z0, method="cyclic", solver=fpx.Picard(**TIGHT), max_steps=5000)
    assert sol.result == fpx.RESULTS.successful and float(jnp.max(sol.stats["gap"])) <= 1e-8
    disjoint = [ball([0.0, 0.0], 1.0), line(0.5), box(0.8, 2.0)]
    sol = fpx.feasible_point(disjoint, Z0, method="cyclic", solver=fpx.Picard(**TIGHT), max_steps=5000, throw=False)
    assert sol.result == fpx.RESULTS.infeasible
    assert float(jnp.max(sol.stats["gap"])) > 0.1


def test_accelerated_solver_on_infeasible_problem_is_never_success():
    # Anderson extrapolates towards the "fixed point at infinity"; the relative stopping test
    # may be met there, but the gap check refuses success and the pair check proves infeasibility.
    sol = fpx.feasible_point([ball([0.0, 0.0]), ball([3.0, 0.0])], Z0, method="dr", solver=fpx.Anderson(), throw=False)
    assert sol.result != fpx.RESULTS.successful
    assert sol.result in (fpx.RESULTS.infeasible, fpx.RESULTS.gap_not_closed)


def test_vmap_over_problems():
    def solve(offset):
        return fpx.feasible_point([line(0.0), line(offset)], Z0, method="dr", throw=False)

    sol = jax.vmap(solve)(jnp.array([0.0, 1.0, -2.0]))
    np.testing.assert_array_equal(sol.result == fpx.RESULTS.successful, [True, False, False])
    np.testing.assert_array_equal(sol.result == fpx.RESULTS.infeasible, [False, True, True])
    np.testing.assert_allclose(sol.stats["certificate"][2], [-2.0, 0.0], atol=1e-10)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"unknown method 'douglas'"):
        fpx.feasible_point([line(0.0), line(1.0)], Z0, method="douglas")
    with pytest.raises(ValueError, match=r"exactly two projections"):
        fpx.feasible_point([line(0.0), line(1.0), line(2.0)], Z0, method="dr")
    with pytest.raises(ValueError, match=r"relaxation"):
        fpx.feasible_point([line(0.0), line(1.0)], Z0, relaxation=2.5)
