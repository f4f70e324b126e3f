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
    # DR on parallel lines drifts: the displacement test proves them disjoint (not a gap left open).
    with pytest.raises(fpx.FixedPointError, match=r"with Picard found that the operator has no fixed point"):
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
    T, _ = fpx.feasibility.splitting(sets, "dr")
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
    assert sol.result == fpx.RESULTS.infeasible
    # The verified pair: a = (1, 0) in A, b = (2, 0) in B, mutual nearest points at distance 1.
    np.testing.assert_allclose(sol.value, [1.0, 0.0], atol=1e-8)
    np.testing.assert_allclose(sol.stats["certificate"], [1.0, 0.0], atol=1e-8)
    np.testing.assert_allclose(sol.stats["gap"], [0.0, 1.0], atol=1e-8)


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


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(solver="picard"), TypeError, r"`feasible_point\(solver=\.\.\.\)` must be an fpx solver.*got 'picard'.*fpx\.Picard\(\)"),
        (dict(solver=fpx.Anderson), TypeError, r"`feasible_point\(solver=\.\.\.\)` must be a solver instance.*Anderson\(\)"),
        (dict(method="dm", beta=float("nan")), ValueError, r"`feasible_point\(beta=\.\.\.\)` must .*finite.*got nan"),
        (dict(method="dm", beta=0.0), ValueError, r"`feasible_point\(beta=\.\.\.\)` must be nonzero"),
        (dict(relaxation=float("inf")), ValueError, r"`feasible_point\(relaxation=\.\.\.\)` must .*\(0, 2\).*got inf"),
        (dict(max_steps=0), ValueError, r"`feasible_point\(max_steps=\.\.\.\)` must be .*integer.*got 0"),
        (dict(certificate_rtol=0.0), ValueError, r"`feasible_point\(certificate_rtol=\.\.\.\)` must .*\(0, 1\).*got 0.0"),
    ],
)
def test_bad_hyperparameters_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        fpx.feasible_point([line(0.0), line(1.0)], Z0, **kwargs)


def test_bad_projections_name_the_projection_and_the_shapes():
    with pytest.raises(TypeError, match=r"`feasible_point\(projections=\.\.\.\)` must be a list of projections.*got None"):
        fpx.feasible_point(None, Z0)
    with pytest.raises(TypeError, match=r"must be a list of projections"):
        fpx.feasible_point(line(0.0), Z0)  # one function, not a list
    with pytest.raises(TypeError, match=r"projections\[1\] must be a function z -> P\(z\), got 3 \(int\)"):
        fpx.feasible_point([line(0.0), 3], Z0)
    with pytest.raises(ValueError, match=r"projections\[1\] must return .* of z0, f64\[2\]; it returned f64\[1\]"):
        fpx.feasible_point([line(0.0), lambda z: z[:1]], Z0)
    relu = lambda z: fpx.feasibility.project_relu_graph(z, z)  # noqa: E731  (a tuple (u', y'))
    with pytest.raises(ValueError, match=r"projections\[0\] .* returned \(f64\[2\], f64\[2\]\)\. A projection returns one point"):
        fpx.feasible_point([relu, line(0.0)], Z0)
    with pytest.raises(ValueError, match=r"projections\[2\] .* it returned f32\[2\]"):
        fpx.feasible_point([line(0.0), line(1.0), lambda z: z.astype(jnp.float32)], Z0, method="cyclic")
    # A projection that fails to trace keeps its own error, with a note naming it.
    with pytest.raises(TypeError, match=r"dot_general") as info:
        fpx.feasible_point([line(0.0), lambda z: z @ jnp.ones(3)], Z0)
    assert any("projections[1] on z0: f64[2]" in note for note in info.value.__notes__)
    with pytest.raises(TypeError, match=r"`feasible_point\(z0=\.\.\.\)` must contain floating-point arrays.*int"):
        fpx.feasible_point([line(0.0), line(1.0)], jnp.array([1, 2]))


# ---------------------------------------------------------------------------------------------
# gradients with respect to the sets: the implicit function theorem through fpx.fixed_point


def hyperplane(a, b):
    return lambda z: fpx.feasibility.project_hyperplane(z, a, b)


def circle(center, radius):
    """Projection onto the circle |x - center| = radius, the boundary of a ball (not convex).

    A line crosses it at isolated points, where the fixed point of every splitting is locally
    unique; a line through a (solid) ball meets it in a whole segment of solutions instead.
    """

    def project(z):
        d = z - center
        return center + radius * d / jnp.linalg.norm(d)

    return project


def value_and_central_differences(f, theta, eps=1e-6):
    """f(theta), and (f(theta + eps e_j) - f(theta - eps e_j)) / (2 eps) as the columns of a
    Jacobian (one vmapped, jitted evaluation)."""
    n = theta.size
    steps = eps * jnp.eye(n)
    values = jax.jit(jax.vmap(f))(jnp.concatenate([theta[None, :], theta[None, :] + steps, theta[None, :] - steps]))
    return values[0], (values[1 : n + 1] - values[n + 1 :]).T / (2 * eps)


@pytest.mark.parametrize("method", ["ap", "dr", "dm", "cyclic"])
def test_gradient_of_crossing_lines_wrt_offsets_and_normal(method):
    # x* solves <a1, x> = b1, <a2, x> = b2, i.e. M x* = b: dx*/db = M^-1 and, as row 2 of M
    # is a2, dx*/da2 = -M^-1 e2 x*^T.
    a1 = jnp.array([1.0, 0.0])

    def crossing(theta):
        b, a2 = theta[:2], theta[2:]
        sets = [hyperplane(a1, b[0]), hyperplane(a2, b[1])]
        return fpx.feasible_point(sets, Z0, method=method, solver=fpx.Picard(**TIGHT), max_steps=5000).value

    theta = jnp.array([1.0, 3.0, 1.0, 2.0])
    M = np.array([[1.0, 0.0], [1.0, 2.0]])
    x = np.linalg.solve(M, [1.0, 3.0])
    M_inv = np.linalg.inv(M)
    want = np.concatenate([M_inv, -np.outer(M_inv[:, 1], x)], axis=1)
    value, fd = value_and_central_differences(crossing, theta)
    np.testing.assert_allclose(value, [1.0, 1.0], atol=1e-10)
    np.testing.assert_allclose(fd, want, atol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.jacrev(crossing))(theta), want, atol=1e-9)
    if method == "dr":  # forward mode agrees
        v = jnp.array([0.3, -1.0, 0.5, 2.0])
        _, tangent = jax.jit(lambda t: jax.jvp(crossing, (t,), (v,)))(theta)
        np.testing.assert_allclose(tangent, want @ np.asarray(v), atol=1e-9)


@pytest.mark.parametrize(
    "method, solver",
    [("ap", fpx.Picard(**TIGHT)), ("dr", fpx.Anderson(**TIGHT)), ("dm", fpx.Picard(**TIGHT))],
    ids=["ap-Picard", "dr-Anderson", "dm-Picard"],
)
def test_gradient_wrt_the_centre_and_radius_of_a_circle_crossing_a_line(method, solver):
    # The circle |x - c| = r meets the line x2 = b at x* = (c1 + s, b), s = sqrt(r^2 - h^2),
    # h = b - c2: dx1/dc1 = 1, dx1/dc2 = h/s, dx1/dr = r/s, dx1/db = -h/s, dx2/db = 1.
    def crossing(theta):
        c, r, b = theta[:2], theta[2], theta[3]
        sets = [circle(c, r), hyperplane(jnp.array([0.0, 1.0]), b)]
        return fpx.feasible_point(sets, jnp.array([1.5, 0.0]), method=method, solver=solver, max_steps=5000).value

    theta = jnp.array([0.5, -0.2, 1.3, 0.4])
    h, r = 0.6, 1.3
    s = np.sqrt(r**2 - h**2)
    want = np.array([[1.0, h / s, r / s, -h / s], [0.0, 0.0, 0.0, 1.0]])
    value, fd = value_and_central_differences(crossing, theta)
    np.testing.assert_allclose(value, [0.5 + s, 0.4], atol=1e-10)
    np.testing.assert_allclose(fd, want, atol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.jacrev(crossing))(theta), want, atol=1e-9)


def test_gradient_wrt_an_inactive_ball_is_zero():
    # The lines cross at (1, 1), strictly inside the ball: moving the ball does not move the
    # point (exactly zero), moving the lines does (M^-1 as above).
    def crossing(theta):
        b, center, radius = theta[:2], theta[2:4], theta[4]
        sets = [hyperplane(jnp.array([1.0, 0.0]), b[0]), hyperplane(jnp.array([1.0, 2.0]), b[1]), ball(center, radius)]
        return fpx.feasible_point(sets, Z0, method="cyclic", solver=fpx.Picard(**TIGHT), max_steps=5000).value

    theta = jnp.array([1.0, 3.0, 0.5, 0.5, 2.0])
    jac = jax.jit(jax.jacrev(crossing))(theta)
    np.testing.assert_allclose(jac[:, :2], np.linalg.inv([[1.0, 0.0], [1.0, 2.0]]), atol=1e-9)
    np.testing.assert_array_equal(jac[:, 2:], np.zeros((2, 3)))


def test_gradient_where_the_solutions_form_a_segment_is_nan():
    # The line x1 = 0.5 meets the ball in a segment, and z0's projection onto the line is
    # already inside the ball: every point of the segment is a fixed point, I - dT/dz is
    # singular along the line, and the implicit gradient is undetermined there: NaN (from the
    # failed adjoint solve), never a tracer leak or a silent guess. Across the line it is 0.
    def point(center, method):
        sets = [line(0.5), ball(center)]
        return fpx.feasible_point(sets, jnp.array([0.3, -0.2]), method=method).value

    for method in ("ap", "dr"):
        np.testing.assert_allclose(point(jnp.zeros(2), method), [0.5, -0.2], atol=1e-12)
        jac = np.asarray(jax.jacrev(point)(jnp.zeros(2), method))
        np.testing.assert_array_equal(jac[0], [0.0, 0.0])
        assert np.all(np.isnan(jac[1]))
