"""Property tests for the projections in fpx.feasibility.

Convex sets: the output is in the set, idempotent, nonexpansive, satisfies the variational
inequality `<z - P z, y - P z> <= 0` for points `y` of the set, and is at least as near as
an independent solution (scipy SLSQP / L-BFGS-B, a least-squares solve, or an exact KKT
certificate for the self-dual cones). The graphs of `max(u, 0)` and `a b` are not convex:
in the set, idempotent, and globally optimal against brute force (dense grid + local
refinement) instead.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fpx.feasibility import (
    project_affine,
    project_bilinear_graph,
    project_box,
    project_halfspace,
    project_hyperplane,
    project_l1_ball,
    project_l2_ball,
    project_linf_ball,
    project_nonnegative,
    project_psd_cone,
    project_relu_graph,
    project_second_order_cone,
    project_simplex,
    project_spectral_norm_ball,
)

shapes = st.tuples(st.integers(1, 5), st.integers(1, 5))
entries = st.floats(-10, 10, allow_nan=False, width=64)
radii = st.floats(0.0, 5.0)


def matrices(shape):
    return arrays(np.float64, shape, elements=entries)


# ---------------------------------------------------------------------------------------------
# spectral-norm ball


@st.composite
def matrix_pair(draw):
    shape = draw(shapes)
    return draw(matrices(shape)), draw(matrices(shape))


def spectral(m):
    return float(np.linalg.norm(np.asarray(m), 2)) if m.size else 0.0


@settings(max_examples=60, deadline=None)
@given(shapes.flatmap(matrices), radii)
def test_in_set_and_idempotent(m, radius):
    p = project_spectral_norm_ball(jnp.asarray(m), radius)
    assert spectral(p) <= radius + 1e-9
    np.testing.assert_allclose(project_spectral_norm_ball(p, radius), p, atol=1e-9)
    if spectral(m) <= radius:
        np.testing.assert_allclose(p, m, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(matrix_pair(), radii)
def test_nonexpansive(pair, radius):
    a, b = pair
    pa = project_spectral_norm_ball(jnp.asarray(a), radius)
    pb = project_spectral_norm_ball(jnp.asarray(b), radius)
    assert float(jnp.linalg.norm(pa - pb)) <= float(np.linalg.norm(a - b)) + 1e-9


@settings(max_examples=60, deadline=None)
@given(matrix_pair(), radii)
def test_variational_inequality_and_optimality(pair, radius):
    # For any Y in the set, <X - P X, Y - P X> <= 0 and |X - P X| <= |X - Y|.
    x, y = pair
    y_in = np.asarray(project_spectral_norm_ball(jnp.asarray(y), radius))
    px = np.asarray(project_spectral_norm_ball(jnp.asarray(x), radius))
    assert np.sum((x - px) * (y_in - px)) <= 1e-7 * (1 + np.abs(x).max() ** 2)
    assert np.linalg.norm(x - px) <= np.linalg.norm(x - y_in) + 1e-9


def test_spectral_subnormal_matrix_is_not_nan():
    # LAPACK's SVD returns NaN singular vectors for a matrix of subnormal entries.
    m = jnp.full((1, 5), 1.11253693e-308)
    assert np.all(np.isfinite(project_spectral_norm_ball(m, 0.0)))
    np.testing.assert_allclose(project_spectral_norm_ball(m, 1.0), m, atol=1e-300)


def test_optimal_against_brute_force_search():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 2)) * 3
    px = np.asarray(project_spectral_norm_ball(jnp.asarray(x), 1.0))
    # Random points of the set, concentrated near the boundary where the optimum lies.
    candidates = rng.normal(size=(2000, 3, 2)) * 3
    candidates = np.stack([np.asarray(project_spectral_norm_ball(jnp.asarray(c), 1.0)) for c in candidates])
    best = np.min(np.linalg.norm((candidates - x).reshape(len(candidates), -1), axis=1))
    assert np.linalg.norm(x - px) <= best + 1e-12


# ---------------------------------------------------------------------------------------------
# convex sets: one generic harness


def _slsqp(z, x0, constraints=(), bounds=None):
    """argmin |x - z|^2 over the constraints, from x0 (an independent reference solution)."""
    z = np.ravel(z)
    res = scipy.optimize.minimize(
        lambda x: np.sum((x - z) ** 2),
        np.ravel(x0),
        jac=lambda x: 2 * (x - z),
        method="SLSQP",
        constraints=list(constraints),
        bounds=bounds,
        options={"ftol": 1e-14, "maxiter": 1000},
    )
    return res.x


def _lbfgsb(z, lower, upper):
    lo = np.broadcast_to(lower, z.shape).ravel()
    hi = np.broadcast_to(upper, z.shape).ravel()
    z = np.ravel(z)
    bounds = [(None if np.isinf(a) else a, None if np.isinf(b) else b) for a, b in zip(lo, hi)]
    x0 = np.clip(np.zeros_like(z), lo, hi)
    res = scipy.optimize.minimize(
        lambda x: np.sum((x - z) ** 2),
        x0,
        jac=lambda x: 2 * (x - z),
        method="L-BFGS-B",
        bounds=bounds,
        options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 1000},
    )
    return res.x


class Case(NamedTuple):
    shapes: Any  # strategy of shapes of z
    params: Callable  # shape -> strategy of a dict of parameters
    project: Callable  # (z, params) -> P z
    violation: Callable  # (x, params) -> how far x is outside the set (<= 0 inside)
    reference: Callable | None  # (z, params) -> an independent nearest point (flattened)


vec_shapes = st.sampled_from([(1,), (2,), (3,), (5,), (2, 3)])


def arr(shape, elements=entries):
    return arrays(np.float64, shape, elements=elements)


def _maybe_center(shape):
    return st.one_of(st.none(), arr(shape))


def _c(p, shape):
    return np.zeros(shape) if p["center"] is None else p["center"]


@st.composite
def _box_params(draw, shape):
    lower = draw(st.one_of(entries.map(np.float64), arr(shape)))
    upper = lower + draw(st.one_of(st.floats(0, 10).map(np.float64), arr(shape, st.floats(0, 10))))
    if draw(st.booleans()):
        lower = np.where(draw(arrays(bool, shape)), -np.inf, lower)
    if draw(st.booleans()):
        upper = np.where(draw(arrays(bool, shape)), np.inf, upper)
    return {"lower": lower, "upper": upper}


@st.composite
def _plane_params(draw, shape):
    a = draw(arr(shape))
    # a = 0 (or subnormal) is rejected; for |a| < 1e-150 (and b = O(1)) the set lies near the
    # end of the float range, where the projection overflows.
    if np.abs(a).max() < 1e-150:
        a = np.ones(shape)
    return {"a": a, "b": draw(entries)}


@st.composite
def _affine_params(draw, shape):
    (n,) = shape
    m = draw(st.integers(1, n))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    A = rng.normal(size=(m, n)) * draw(st.sampled_from([1.0, 1e-3, 1e3]))
    while np.linalg.cond(A) > 1e6:
        A = rng.normal(size=(m, n))
    return {"A": A, "b": draw(arr((m,)))}


def _signed_distance(x, p):
    """(<a, x> - b) / |a|, scaled first so that tiny `a` does not underflow."""
    m = np.abs(p["a"]).max()
    return (np.sum(p["a"] / m * x) - p["b"] / m) / np.linalg.norm(p["a"] / m)


def _plane_reference(z, p, kind):
    # SLSQP on the correction w = (x - z) / c, with (a, b) normalised and c the size of the gap.
    m = np.abs(p["a"]).max()
    a = np.ravel(p["a"]) / m
    gap = p["b"] / m - a @ np.ravel(z)
    c = max(1.0, abs(gap))
    con = {"type": kind, "fun": lambda w: gap / c - a @ w, "jac": lambda w: -a}
    return np.ravel(z) + c * _slsqp(np.zeros(z.size), np.zeros(z.size), [con])


def _l1_reference(z, p):
    z = np.ravel(z - _c(p, z.shape))
    n = z.size
    r = p["radius"]
    res = scipy.optimize.minimize(
        lambda w: np.sum((w[:n] - w[n:] - z) ** 2),
        np.zeros(2 * n),
        jac=lambda w: np.concatenate([2 * (w[:n] - w[n:] - z), -2 * (w[:n] - w[n:] - z)]),
        method="SLSQP",
        bounds=[(0, None)] * (2 * n),
        constraints=[{"type": "ineq", "fun": lambda w: r - w.sum(), "jac": lambda w: -np.ones(2 * n)}],
        options={"ftol": 1e-14, "maxiter": 1000},
    )
    return res.x[:n] - res.x[n:] + np.ravel(_c(p, z.shape))


def _affine_reference(z, p):
    A, b = p["A"], p["b"]
    return z + np.linalg.pinv(A) @ (b - A @ z)  # minimum-norm correction


def _soc_violation(x, p):
    return np.linalg.norm(x[:-1]) - x[-1]


def _soc_reference(z, p):
    # The cone is invariant under scaling, and SLSQP is happier with z of order 1.
    c = max(1.0, np.abs(z).max())
    e = np.eye(z.size)[-1]
    # t - |x| >= 0 (concave, smoothed at x = 0), so SLSQP solves a convex problem.
    def norm(x):
        return np.sqrt(np.sum(x[:-1] ** 2) + 1e-300)

    cons = [{"type": "ineq", "fun": lambda x: x[-1] - norm(x), "jac": lambda x: e - x * (1 - e) / norm(x)}]
    x0 = e * (np.linalg.norm(z / c) + 1)
    return c * _slsqp(z / c, x0, cons)


def _psd_violation(x, p):
    return max(-np.linalg.eigvalsh((x + x.T) / 2).min(), np.abs(x - x.T).max())


CASES = {
    "nonnegative": Case(
        vec_shapes,
        lambda shape: st.just({}),
        lambda z, p: project_nonnegative(z),
        lambda x, p: np.max(-x),
        lambda z, p: _lbfgsb(z, 0.0, np.inf),
    ),
    "box": Case(
        vec_shapes,
        _box_params,
        lambda z, p: project_box(z, p["lower"], p["upper"]),
        lambda x, p: np.max(np.maximum(p["lower"] - x, x - p["upper"])),
        lambda z, p: _lbfgsb(z, p["lower"], p["upper"]),
    ),
    "simplex": Case(
        vec_shapes,
        lambda shape: st.fixed_dictionaries({"scale": radii}),
        lambda z, p: project_simplex(z, p["scale"]),
        lambda x, p: max(-x.min(), abs(x.sum() - p["scale"])),
        lambda z, p: _slsqp(
            z,
            np.full(z.size, p["scale"] / z.size),
            [{"type": "eq", "fun": lambda x: x.sum() - p["scale"], "jac": lambda x: np.ones_like(x)}],
            [(0, None)] * z.size,
        ),
    ),
    "l2_ball": Case(
        vec_shapes,
        lambda shape: st.fixed_dictionaries({"radius": radii, "center": _maybe_center(shape)}),
        lambda z, p: project_l2_ball(z, p["radius"], p["center"]),
        lambda x, p: np.linalg.norm(x - _c(p, x.shape)) - p["radius"],
        lambda z, p: _slsqp(
            z,
            np.ravel(_c(p, z.shape)),
            [{"type": "ineq", "fun": lambda x: p["radius"] ** 2 - np.sum((x - np.ravel(_c(p, z.shape))) ** 2)}],
        ),
    ),
    "l1_ball": Case(
        vec_shapes,
        lambda shape: st.fixed_dictionaries({"radius": radii, "center": _maybe_center(shape)}),
        lambda z, p: project_l1_ball(z, p["radius"], p["center"]),
        lambda x, p: np.abs(x - _c(p, x.shape)).sum() - p["radius"],
        _l1_reference,
    ),
    "linf_ball": Case(
        vec_shapes,
        lambda shape: st.fixed_dictionaries({"radius": radii, "center": _maybe_center(shape)}),
        lambda z, p: project_linf_ball(z, p["radius"], p["center"]),
        lambda x, p: np.abs(x - _c(p, x.shape)).max() - p["radius"],
        lambda z, p: _lbfgsb(z, _c(p, z.shape) - p["radius"], _c(p, z.shape) + p["radius"]),
    ),
    "hyperplane": Case(
        vec_shapes,
        _plane_params,
        lambda z, p: project_hyperplane(z, p["a"], p["b"]),
        lambda x, p: abs(_signed_distance(x, p)),
        lambda z, p: _plane_reference(z, p, "eq"),
    ),
    "halfspace": Case(
        vec_shapes,
        _plane_params,
        lambda z, p: project_halfspace(z, p["a"], p["b"]),
        _signed_distance,
        lambda z, p: _plane_reference(z, p, "ineq"),
    ),
    "affine": Case(
        st.integers(1, 5).map(lambda n: (n,)),
        _affine_params,
        lambda z, p: project_affine(z, p["A"], p["b"]),
        lambda x, p: np.abs(p["A"] @ x - p["b"]).max() / np.abs(p["A"]).max(),
        _affine_reference,
    ),
    "second_order_cone": Case(
        st.integers(1, 5).map(lambda n: (n,)),
        lambda shape: st.just({}),
        lambda z, p: project_second_order_cone(z),
        _soc_violation,
        _soc_reference,
    ),
    "psd_cone": Case(
        st.integers(1, 4).map(lambda n: (n, n)),
        lambda shape: st.just({}),
        lambda z, p: project_psd_cone(z),
        _psd_violation,
        None,  # exact KKT certificate in test_cone_kkt_certificate
    ),
}


@st.composite
def case_data(draw, name, points=2):
    case = CASES[name]
    shape = draw(case.shapes)
    params = draw(case.params(shape))
    zs = [draw(arr(shape)) * draw(st.sampled_from([1.0, 1.0, 1e-3, 1e2])) for _ in range(points)]
    return params, zs


def _scale(params, *zs):
    vals = [np.abs(z).max() for z in zs]
    for v in params.values():
        if v is not None:
            v = np.abs(np.asarray(v, float))
            vals.append(v[np.isfinite(v)].max(initial=0.0))
    return 1.0 + max(vals)


def _project(name, z, params):
    return np.asarray(CASES[name].project(jnp.asarray(z), params))


convex = pytest.mark.parametrize("name", list(CASES))
fast = settings(max_examples=25, deadline=None)


@convex
@fast
@given(data=st.data())
def test_convex_in_set_and_idempotent(name, data):
    params, (z, _) = data.draw(case_data(name))
    p = _project(name, z, params)
    s = _scale(params, z, p)  # rounding is relative to the magnitudes involved
    assert p.shape == z.shape
    assert CASES[name].violation(p, params) <= 1e-12 * s
    np.testing.assert_allclose(_project(name, p, params), p, rtol=0, atol=1e-12 * s)


@convex
@fast
@given(data=st.data())
def test_convex_nonexpansive(name, data):
    params, (z1, z2) = data.draw(case_data(name))
    p1, p2 = _project(name, z1, params), _project(name, z2, params)
    s = _scale(params, z1, z2, p1, p2)
    assert np.linalg.norm(p1 - p2) <= np.linalg.norm(z1 - z2) + 1e-12 * s


@convex
@fast
@given(data=st.data())
def test_convex_variational_inequality(name, data):
    # P z2 and P(P z2 + step) are points of the set; the optimality condition of P z1 holds against both.
    params, (z1, z2) = data.draw(case_data(name))
    p1 = _project(name, z1, params)
    ys = [_project(name, z2, params), _project(name, (z1 + z2) / 2, params)]
    s = _scale(params, z1, z2, p1, *ys)
    z1, p1 = z1 / s, p1 / s  # scaled to order 1 (s**2 may overflow)
    for y in ys:
        y = y / s
        assert np.sum((z1 - p1) * (y - p1)) <= 1e-11
        assert np.linalg.norm(z1 - p1) <= np.linalg.norm(z1 - y) + 1e-12


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.reference is not None])
@fast
@given(data=st.data())
def test_convex_optimal_against_reference_solver(name, data):
    params, (z, _) = data.draw(case_data(name))
    p = _project(name, z, params)
    ref = np.reshape(CASES[name].reference(z, params), z.shape)
    s = _scale(params, z, p, ref)
    v_ref = max(CASES[name].violation(ref, params), 0.0) / s
    assert v_ref <= 1e-6, "the reference solver failed"
    z, p, ref = z / s, p / s, ref / s  # order 1, so that squares cannot overflow
    # ref may be slightly outside the set; its distance to the set is at most 2 sqrt(n) v_ref
    # for these violation measures, so no point of the set is nearer to z than this:
    bound = np.linalg.norm(z - ref) + 2 * np.sqrt(z.size) * v_ref
    assert np.linalg.norm(z - p) <= bound + 1e-10
    np.testing.assert_allclose(p, ref, rtol=0, atol=1e-3)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["second_order_cone", "psd_cone"]).flatmap(lambda n: st.tuples(st.just(n), case_data(n, 1))))
def test_cone_kkt_certificate(args):
    # For a self-dual cone K: x = P_K(z) iff x in K, x - z in K and <x, x - z> = 0 (Moreau).
    name, (params, (z,)) = args
    p = _project(name, z, params)
    s = _scale(params, z, p)
    violation = CASES[name].violation
    sym = (z + z.T) / 2 if name == "psd_cone" else z
    assert violation(p, params) <= 1e-12 * s
    assert violation(p - sym, params) <= 1e-12 * s
    assert abs(np.sum(p * (p - sym))) <= 1e-12 * s**2


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5).flatmap(lambda n: st.tuples(st.integers(1, n), st.just(n))), st.integers(0, 2**32 - 1))
def test_affine_precomputed_qr_and_in_range(mn, seed):
    m, n = mn
    rng = np.random.default_rng(seed)
    A, b, z = rng.normal(size=(m, n)), rng.normal(size=m), rng.normal(size=n)
    p = project_affine(z, A, b)
    np.testing.assert_allclose(project_affine(z, None, b, qr=jnp.linalg.qr(A.T)), p, atol=1e-12)
    # z - P z lies in the row space of A
    lam = np.linalg.lstsq(A.T, z - np.asarray(p), rcond=None)[0]
    np.testing.assert_allclose(A.T @ lam, z - p, atol=1e-9)


def test_known_values():
    np.testing.assert_allclose(project_box(jnp.array([-2.0, 5.0]), -1.0, 1.0), [-1.0, 1.0])
    np.testing.assert_allclose(project_simplex(jnp.array([0.3, 0.3, 0.3])), [1 / 3] * 3)
    np.testing.assert_allclose(project_simplex(jnp.array([1.0, 2.0]), 0.0), [0.0, 0.0])
    np.testing.assert_allclose(project_l2_ball(jnp.zeros(2), 0.0), [0.0, 0.0])
    np.testing.assert_allclose(project_l2_ball(jnp.array([1.0, 2.0]), jnp.inf), [1.0, 2.0])
    np.testing.assert_allclose(project_l1_ball(jnp.array([1.0, 2.0]), 0.0), [0.0, 0.0])
    np.testing.assert_allclose(project_l1_ball(jnp.array([1.0, 2.0]), 1.0), [0.0, 1.0])
    np.testing.assert_allclose(project_linf_ball(jnp.array([1.0, 2.0]), 0.5, jnp.array([1.0, 1.0])), [1.0, 1.5])
    np.testing.assert_allclose(project_halfspace(jnp.array([2.0, 2.0]), jnp.array([0.0, 1.0]), 1.0), [2.0, 1.0])
    np.testing.assert_allclose(project_hyperplane(jnp.array([2.0, 0.0]), jnp.array([0.0, 1.0]), 1.0), [2.0, 1.0])
    np.testing.assert_allclose(project_second_order_cone(jnp.array([-2.0])), [0.0])
    np.testing.assert_allclose(project_second_order_cone(jnp.array([0.0, 0.0, 0.0])), [0.0, 0.0, 0.0])
    np.testing.assert_allclose(project_second_order_cone(jnp.array([2.0, 0.0])), [1.0, 1.0])
    np.testing.assert_allclose(project_psd_cone(jnp.diag(jnp.array([-1.0, 2.0]))), np.diag([0.0, 2.0]))


# ---------------------------------------------------------------------------------------------
# graph of max(u, 0) (not convex)


def _relu_brute(u, y):
    """min over the graph by a dense grid on each ray, refined by a bounded scalar minimisation."""
    r = abs(u) + abs(y) + 1
    s = np.linspace(-r, r, 4001)
    d = (s - u) ** 2 + (np.maximum(s, 0) - y) ** 2
    best = d.min()
    for lo, hi, g in [(0, r, lambda s: (s - u) ** 2 + (s - y) ** 2), (-r, 0, lambda s: (s - u) ** 2 + y**2)]:
        res = scipy.optimize.minimize_scalar(g, bounds=(lo, hi), method="bounded", options={"xatol": 1e-12})
        best = min(best, res.fun, g(lo), g(hi))
    return best


relu_pairs = st.tuples(entries, st.floats(-100, 100, allow_nan=False))


@settings(max_examples=80, deadline=None)
@given(st.lists(relu_pairs, min_size=1, max_size=6))
@example([(1.0, -3.0), (-1.0, -3.0), (3.0, -1.0), (0.0, 0.0), (-2.0, 0.0), (2.0, 2.0)])
@example([(-1.0, 1 + np.sqrt(2)), (1e-300, -5.0), (-1e-300, 5.0)])  # a tie (two nearest points), tiny u
def test_relu_graph_in_set_idempotent_optimal(pairs):
    u, y = (np.array(c) for c in zip(*pairs))
    u, y = np.resize(u, 6), np.resize(y, 6)  # one shape, one compilation
    pu, py = (np.asarray(x) for x in project_relu_graph(jnp.asarray(u), jnp.asarray(y)))
    np.testing.assert_array_equal(py, np.maximum(pu, 0))
    qu, qy = project_relu_graph(jnp.asarray(pu), jnp.asarray(py))
    np.testing.assert_allclose(qu, pu, atol=1e-12)
    np.testing.assert_allclose(qy, py, atol=1e-12)
    for ui, yi, pui, pyi in zip(u, y, pu, py):
        d = (pui - ui) ** 2 + (pyi - yi) ** 2
        assert d <= _relu_brute(ui, yi) + 1e-12 * (1 + ui**2 + yi**2)


def test_relu_graph_negative_targets():
    # The nearest point of a negative target is decided by distance, not by which candidate is 0.
    u, y = project_relu_graph(jnp.array([-1.0, 3.0, 1.0, -0.5]), jnp.array([-3.0, -1.0, -3.0, -0.1]))
    np.testing.assert_allclose(u, [-1.0, 1.0, 0.0, -0.5])
    np.testing.assert_allclose(y, [0.0, 1.0, 0.0, 0.0])


# ---------------------------------------------------------------------------------------------
# graph of a b (not convex)


def _bilinear_brute(a, b, y):
    """Global min of the squared distance to the surface by a dense grid on a 1-D profile.

    For fixed a' = s the best b' is explicit, t(s) = (b + s y) / (1 + s^2), which leaves
    phi(s) = (s - a)^2 + (t - b)^2 + (s t - y)^2 on a bounded interval: the projection is
    no farther than (a, b, a b), so |a' - a| <= |y - a b|. Dense grid, then a bounded scalar
    minimisation around the best grid cells.
    """

    def phi(s):
        t = (b + s * y) / (1 + s * s)
        return (s - a) ** 2 + (t - b) ** 2 + (s * t - y) ** 2

    radius = abs(y - a * b) + 1e-3
    grid = np.linspace(a - radius, a + radius, 20001)
    values = phi(grid)
    best = values.min()
    h = grid[1] - grid[0]
    for k in np.argsort(values)[:5]:
        res = scipy.optimize.minimize_scalar(
            phi, bounds=(grid[k] - h, grid[k] + h), method="bounded", options={"xatol": 1e-14}
        )
        best = min(best, res.fun)
    return best


@st.composite
def bilinear_triples(draw):
    a = draw(entries)
    b = draw(
        st.one_of(
            entries,
            st.just(a),
            st.just(-a),
            st.just(0.0),
            st.floats(-1e-6, 1e-6).map(lambda e: a + e),
            st.floats(-1e-6, 1e-6).map(lambda e: -a + e),
        )
    )
    y = draw(
        st.one_of(
            st.floats(-120, 120, allow_nan=False),
            st.just(a * b),
            st.floats(-1e-3, 1e-3).map(lambda e: a * b + e),
            st.sampled_from([1 - a * a / 4, a * a / 4 - 1]).flatmap(lambda c: st.floats(-1, 1).map(lambda e: c + e)),
        )
    )
    return a, b, y


@settings(max_examples=60, deadline=None)
@given(st.lists(bilinear_triples(), min_size=1, max_size=4))
@example([(0.0, 0.0, 5.0), (0.0, 0.0, -5.0), (0.0, 0.0, 0.5), (0.0, 0.0, 1.0), (0.0, 0.0, -1.0)])
@example([(3.0, -3.0, 10.0), (3.0, 3.0, -10.0), (3.0, -3.0, -10.0), (3.0, 3.0, 10.0)])
@example([(2.0, -2.0, 0.0), (2.0, 2.0, 0.0), (1e-300, -1e-300, 5.0), (1.0, -1.0 + 1e-12, 3.0)])
@example([(10.0, 10.0, -120.0), (10.0, -10.0, 120.0), (-7.0, 4.0, 0.0), (1.0, 2.0, 2.0)])
# On the threshold y = 1 - a^2/4 (a = -b) of the non-unique case. The sqrt(0) there once came out
# as 1 under jit: XLA evaluated the radicand in two fusions with different FMA contraction.
@example([(1.748761429951717, -1.748761429951717, 0.23545836527830655)])
@example([(a, -a, 1 - a * a / 4) for a in (0.5, 1.0, 3.0, 7.1)] + [(a, a, a * a / 4 - 1) for a in (0.5, 1.0, 3.0, 7.1)])
def test_bilinear_graph_in_set_idempotent_optimal(triples):
    for a, b, y in triples:  # one shape, one compilation
        pa, pb, py = (float(x) for x in project_bilinear_graph(a, b, y))
        assert np.isfinite(pa) and np.isfinite(pb)
        assert abs(py - pa * pb) <= 8 * np.finfo(float).eps * abs(py) + np.finfo(float).tiny  # up to rounding
        qa, qb, qy = (float(x) for x in project_bilinear_graph(pa, pb, py))
        scale = 1 + abs(pa) + abs(pb)
        np.testing.assert_allclose([qa, qb, qy], [pa, pb, py], atol=1e-9 * scale**2)
        d = (pa - a) ** 2 + (pb - b) ** 2 + (py - y) ** 2
        assert d <= _bilinear_brute(a, b, y) * (1 + 1e-10) + 1e-12, (a, b, y)


def test_bilinear_graph_closed_forms_on_the_degenerate_axis():
    # a = b = 0: for |y| < 1 the origin, for y >= 1 the points (+-sqrt(y - 1), same, y - 1),
    # for y <= -1 the points (+-sqrt(-1 - y), -+, y + 1).
    y = jnp.array([-5.0, -1.0, -0.5, 0.0, 0.5, 1.0, 5.0])
    a, b, yy = project_bilinear_graph(jnp.zeros(7), jnp.zeros(7), y)
    ra = np.sqrt(np.maximum(np.abs(np.asarray(y)) - 1, 0))
    np.testing.assert_allclose(np.abs(a), ra, atol=1e-7)
    np.testing.assert_allclose(np.abs(b), ra, atol=1e-7)
    np.testing.assert_allclose(yy, np.sign(y) * ra**2, atol=1e-12)
    d = np.asarray((a) ** 2 + (b) ** 2 + (yy - y) ** 2)
    np.testing.assert_allclose(d, np.where(np.abs(y) >= 1, 2 * np.abs(y) - 1, y**2), atol=1e-12)


# ---------------------------------------------------------------------------------------------
# every projection: jit, vmap, dtypes, gradients, errors

rng = np.random.default_rng(1)
_A = rng.normal(size=(2, 4))
_a = rng.normal(size=4)

FUNCTIONS = {
    "nonnegative": (project_nonnegative, (4,)),
    "box": (lambda z: project_box(z, -0.5, jnp.array([1.0, 2.0, 0.0, 0.5])), (4,)),
    "simplex": (lambda z: project_simplex(z, 2.0), (4,)),
    "l2_ball": (lambda z: project_l2_ball(z, 1.5, jnp.ones(4)), (4,)),
    "l1_ball": (lambda z: project_l1_ball(z, 1.5), (4,)),
    "linf_ball": (lambda z: project_linf_ball(z, 0.5), (4,)),
    "hyperplane": (lambda z: project_hyperplane(z, _a, 1.0), (4,)),
    "halfspace": (lambda z: project_halfspace(z, _a, -1.0), (4,)),
    "affine": (lambda z: project_affine(z, _A, jnp.array([1.0, -1.0])), (4,)),
    "second_order_cone": (project_second_order_cone, (4,)),
    "psd_cone": (project_psd_cone, (3, 3)),
    "spectral_norm_ball": (lambda z: project_spectral_norm_ball(z, 1.0), (3, 2)),
    "relu_graph": (lambda z: jnp.stack(project_relu_graph(z[0], z[1])), (2, 5)),
    "bilinear_graph": (lambda z: jnp.stack(project_bilinear_graph(z[0], z[1], z[2])), (3, 4)),
}


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_jit_vmap_float32_and_grad(name):
    f, shape = FUNCTIONS[name]
    zs = jnp.asarray(rng.normal(size=(3, *shape)) * 2)
    eager = jnp.stack([f(z) for z in zs])
    np.testing.assert_allclose(jax.jit(jax.vmap(f))(zs), eager, atol=1e-12)
    out32 = f(zs[0].astype(jnp.float32))
    assert out32.dtype == jnp.float32
    np.testing.assert_allclose(out32, eager[0], atol=1e-4, rtol=1e-4)
    # At 0 (a kink of most of these maps) the derivative is a choice of subgradient: finite.
    grads = jax.jit(jax.vmap(jax.grad(lambda z: jnp.sum(jnp.sin(f(z))))))(zs.at[1].set(0.0))
    assert np.all(np.isfinite(grads))
    # Away from kinks it is the Jacobian of the projection: its closed form where there is a
    # short one, else central differences (the map is smooth there).
    jacobians = jax.jit(jax.vmap(jax.jacobian(f)))(zs)
    for z, jac in zip(np.asarray(zs), np.asarray(jacobians)):
        jac = jac.reshape(z.size, z.size)
        if name in JACOBIANS:
            np.testing.assert_allclose(jac, JACOBIANS[name](z), atol=1e-10, err_msg=name)
        else:
            eps = 1e-6
            steps = eps * np.eye(z.size).reshape(z.size, *z.shape)
            fd = np.stack([(f(z + e) - f(z - e)).reshape(-1) / (2 * eps) for e in steps], axis=1)
            np.testing.assert_allclose(jac, fd, atol=1e-6, err_msg=name)


def _diag(mask):
    return np.diag(np.asarray(mask, float))


def _support_jacobian(signs):
    """`diag(|s|) - s s^T / k` for the sign pattern s of the support (k entries): the
    Jacobian of soft-thresholding at the threshold that fixes the support's sum."""
    support = signs != 0
    return _diag(support) - np.outer(signs, signs) / support.sum()


def _jac_l2_ball(z, radius=1.5):
    d = z - 1.0
    r = np.linalg.norm(d)
    if r <= radius:
        return np.eye(z.size)
    n = d / r
    return radius / r * (np.eye(z.size) - np.outer(n, n))


def _jac_plane(z, b, halfspace):
    if halfspace and _a @ z <= b:
        return np.eye(z.size)
    return np.eye(z.size) - np.outer(_a, _a) / (_a @ _a)


def _jac_second_order_cone(z):
    x, t = z[:-1], z[-1]
    s = np.linalg.norm(x)
    if s <= t:
        return np.eye(z.size)
    if s <= -t:
        return np.zeros((z.size, z.size))
    n = x / s  # P = (s + t)/2 (n, 1)
    jac = np.zeros((z.size, z.size))
    jac[:-1, :-1] = np.outer(n, n) / 2 + (s + t) / (2 * s) * (np.eye(x.size) - np.outer(n, n))
    jac[:-1, -1] = jac[-1, :-1] = n / 2
    jac[-1, -1] = 0.5
    return jac


def _jac_psd_cone(m):
    # Daleckii–Krein: with (M + M^T)/2 = V diag(w) V^T, dP[H] = V (G o V^T sym(H) V) V^T,
    # G_ij = (w_i^+ - w_j^+) / (w_i - w_j) (the derivative of max(w, 0) when w_i = w_j).
    w, v = np.linalg.eigh((m + m.T) / 2)
    wp = np.maximum(w, 0)
    dw = w[:, None] - w[None, :]
    same = np.abs(dw) < 1e-12
    g = np.where(same, (w[:, None] > 0) * 1.0, (wp[:, None] - wp[None, :]) / np.where(same, 1, dw))
    cols = []
    for e in np.eye(m.size):
        h = e.reshape(m.shape)
        cols.append((v @ (g * (v.T @ ((h + h.T) / 2) @ v)) @ v.T).reshape(-1))
    return np.stack(cols, axis=1)


def _jac_relu_graph(z):
    u, y = z
    n = u.size
    jac = np.zeros((2, n, 2, n))
    s = np.maximum((u + y) / 2, 0)
    on_positive_ray = (u - s) ** 2 + (y - s) ** 2 <= (u - np.minimum(u, 0)) ** 2 + y**2
    for i in range(n):
        if on_positive_ray[i] and (u[i] + y[i]) > 0:  # (u', y') = ((u + y)/2, (u + y)/2)
            jac[:, i, :, i] = 0.5
        elif not on_positive_ray[i] and u[i] < 0:  # (u', y') = (u, 0)
            jac[0, i, 0, i] = 1.0
    return jac.reshape(2 * n, 2 * n)


JACOBIANS = {
    "nonnegative": lambda z: _diag(z > 0),
    "box": lambda z: _diag((z > -0.5) & (z < np.array([1.0, 2.0, 0.0, 0.5]))),
    "simplex": lambda z: _support_jacobian((np.asarray(project_simplex(z, 2.0)) > 0) * 1.0),
    "l2_ball": _jac_l2_ball,
    "l1_ball": lambda z: np.eye(z.size)
    if np.abs(z).sum() <= 1.5
    else _support_jacobian(np.sign(z) * (np.asarray(project_l1_ball(z, 1.5)) != 0)),
    "linf_ball": lambda z: _diag(np.abs(z) < 0.5),
    "hyperplane": lambda z: _jac_plane(z, 1.0, halfspace=False),
    "halfspace": lambda z: _jac_plane(z, -1.0, halfspace=True),
    "affine": lambda z: np.eye(z.size) - _A.T @ np.linalg.solve(_A @ _A.T, _A),
    "second_order_cone": _jac_second_order_cone,
    "psd_cone": _jac_psd_cone,
    "relu_graph": _jac_relu_graph,
    # spectral_norm_ball and bilinear_graph: central differences (see above)
}


def test_bilinear_graph_derivative_matches_finite_differences():
    z = jnp.array([0.7, -1.3, 2.1])

    def f(z):
        return jnp.stack(project_bilinear_graph(z[0], z[1], z[2]))

    jac = jax.jacfwd(f)(z)
    eps = 1e-6
    fd = jnp.stack([(f(z + eps * e) - f(z - eps * e)) / (2 * eps) for e in jnp.eye(3)], axis=1)
    np.testing.assert_allclose(jac, fd, atol=1e-6)


def test_errors():
    with pytest.raises(ValueError, match=r"radius"):
        project_spectral_norm_ball(jnp.eye(2), -1.0)
    with pytest.raises(ValueError, match=r"expects a matrix"):
        project_spectral_norm_ball(jnp.ones(3), 1.0)
    z = jnp.ones(3)
    cases = [
        (lambda: project_box(z, 1.0, 0.0), r"empty"),
        (lambda: project_box(z, jnp.zeros(2), 1.0), r"`lower` of shape \(2,\) does not broadcast"),
        (lambda: project_box(z, 0.0, jnp.ones((2, 3))), r"`upper` of shape"),
        (lambda: project_simplex(z, -1.0), r"`scale` must be non-negative"),
        (lambda: project_simplex(jnp.ones(0)), r"at least one entry"),
        (lambda: project_l2_ball(z, -1.0), r"`radius` must be non-negative"),
        (lambda: project_l2_ball(z, jnp.nan), r"`radius` must be non-negative"),
        (lambda: project_l2_ball(z, jnp.ones(3)), r"`radius` must be a scalar"),
        (lambda: project_l1_ball(z, -0.1), r"`radius` must be non-negative"),
        (lambda: project_linf_ball(z, 1.0, jnp.zeros(2)), r"`center` must have the shape"),
        (lambda: project_hyperplane(z, jnp.zeros(3), 1.0), r"`a` must be nonzero"),
        (lambda: project_halfspace(z, jnp.ones(2), 1.0), r"`a` must have the shape"),
        (lambda: project_halfspace(z, jnp.ones(3), jnp.ones(1)), r"`b` must be a scalar"),
        (lambda: project_affine(z, jnp.ones((2, 2)), jnp.ones(2)), r"3 columns"),
        (lambda: project_affine(z, jnp.ones((4, 3)), jnp.ones(4)), r"more rows than columns"),
        (lambda: project_affine(z, jnp.ones((2, 3)), jnp.ones(2)), r"full row rank"),
        (lambda: project_affine(z, jnp.eye(3)[:2], jnp.ones(3)), r"`b` must have shape \(2,\)"),
        (lambda: project_affine(z, None, jnp.ones(2)), r"pass the matrix"),
        (lambda: project_affine(jnp.ones((3, 1)), jnp.eye(3), jnp.ones(3)), r"must be a vector"),
        (lambda: project_affine(z, None, jnp.ones(2), qr=(jnp.ones((3, 2)), jnp.ones((3, 3)))), r"thin QR"),
        (lambda: project_second_order_cone(jnp.ones((2, 2))), r"non-empty vector"),
        (lambda: project_second_order_cone(jnp.ones(0)), r"non-empty vector"),
        (lambda: project_psd_cone(jnp.ones((2, 3))), r"square matrix"),
        (lambda: project_relu_graph(jnp.ones(2), jnp.ones(3)), r"same shape"),
        (lambda: project_bilinear_graph(jnp.ones(2), jnp.ones(2), jnp.ones(3)), r"same shape"),
        (lambda: project_nonnegative(jnp.ones(2, complex)), r"must be real"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


def test_traced_arguments_are_not_validated_but_work():
    # Inside jit the values are unknown, so only shapes are checked; valid values give the projection.
    z = jnp.array([3.0, 4.0])
    np.testing.assert_allclose(jax.jit(project_l2_ball)(z, 1.0), [0.6, 0.8])
    np.testing.assert_allclose(jax.jit(project_box)(z, 0.0, 3.5), [3.0, 3.5])
    np.testing.assert_allclose(jax.jit(project_simplex)(z, 0.0), [0.0, 0.0])
    A = jnp.array([[1.0, 1.0]])
    np.testing.assert_allclose(jax.jit(project_affine)(z, A, jnp.array([1.0])), [0.0, 1.0], atol=1e-12)
