"""fpx.data._elliptic: the matrix-free Darcy operator, CG / multigrid-CG, recycling, and `darcy(solver=...)`.

Shapes and settings are shared between tests where possible: every distinct (shape, method,
max_steps) compiles afresh, and the multigrid solve takes a few seconds to compile.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fpx
import fpx.data
from fpx.data import _darcy, _elliptic
from fpx.data._grf import grf2_cosine


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FPX_DATA_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fields(n, s, seed=0):
    """The FNO Darcy coefficients (3 / 12), float64."""
    return np.where(grf2_cosine(np.random.default_rng(seed), n, s, 2.0, 3.0) >= 0, 12.0, 3.0)


def rel(u, ref):
    u, ref = np.asarray(u), np.asarray(ref)
    axes = tuple(range(u.ndim - 2, u.ndim))
    return np.linalg.norm(u - ref, axis=axes) / np.linalg.norm(ref, axis=axes)


def direct(a):
    return np.stack([_darcy.solve_darcy(x) for x in a])


def code(sol):
    return np.asarray(sol.result._value)


SUCCESS = int(fpx.RESULTS.successful._value)
MAX_STEPS = int(fpx.RESULTS.max_steps_reached._value)
NONFINITE = int(fpx.RESULTS.nonfinite._value)
BREAKDOWN = int(fpx.RESULTS.breakdown._value)


# ---------------------------------------------------------------------------------------------
# operator, transfer operators, Galerkin stencils


@pytest.mark.parametrize("s", [3, 8, 20])
def test_operator_is_darcy_matrix(s):
    rng = np.random.default_rng(s)
    a = rng.uniform(0.5, 20.0, (s, s))
    u = rng.standard_normal((s - 2, s - 2))
    op = _elliptic.darcy_operator(a)
    matrix = _darcy.darcy_matrix(a)
    expected = (matrix @ u.ravel()).reshape(u.shape)
    got = np.asarray(jax.jit(lambda op, u: op.mv(u))(op, jnp.asarray(u)))
    assert np.abs(got - expected).max() <= 1e-14 * np.abs(expected).max()
    np.testing.assert_allclose(np.asarray(op.diagonal()).ravel(), matrix.diagonal(), rtol=1e-15)
    dense = matrix.toarray()
    off = np.abs(dense).sum(axis=1) - np.abs(dense.diagonal())
    np.testing.assert_allclose(np.asarray(op.offdiagonal_abs_sum()).ravel(), off, rtol=1e-14, atol=1e-12)


def matrix_of(fn, n_in, shape_in):
    """The matrix of a linear map of arrays of shape `shape_in` (jitted over the basis vectors)."""
    basis = jnp.eye(n_in).reshape((n_in,) + shape_in)
    return np.asarray(jax.jit(jax.vmap(fn))(basis)).reshape(n_in, -1).T


@pytest.mark.parametrize("m", [5, 8])  # odd and even grids coarsen
def test_galerkin_stencil_is_ptap(m):
    a = np.random.default_rng(m).uniform(1.0, 12.0, (m + 2, m + 2))
    op = _elliptic.darcy_operator(a)
    mc = _elliptic.coarse_size(m)
    P = matrix_of(lambda c: _elliptic.prolong(c, m), mc * mc, (mc, mc))
    R = matrix_of(_elliptic.restrict, m * m, (m, m))
    np.testing.assert_array_equal(P.T, R)
    # linear interpolation: reproduces constants away from the boundary nodes' neighbours
    assert set(np.unique(P)) <= {0.0, 0.25, 0.5, 1.0}
    A = _darcy.darcy_matrix(a).toarray()
    coarse = np.asarray(jax.jit(lambda op: _elliptic._dense(_elliptic.galerkin(op, m), mc))(op))
    np.testing.assert_allclose(coarse, P.T @ A @ P, rtol=0, atol=1e-13 * np.abs(A).max())


def test_multigrid_is_a_symmetric_positive_definite_preconditioner():
    a = fields(1, 17)[0]
    op = _elliptic.darcy_operator(jnp.asarray(a))
    assert _elliptic.multigrid_sizes(15) == (15, 7)
    B = matrix_of(lambda r: _elliptic.multigrid(op)(r), 15 * 15, (15, 15))
    np.testing.assert_allclose(B, B.T, atol=1e-12 * np.abs(B).max())
    assert np.linalg.eigvalsh(0.5 * (B + B.T)).min() > 0
    # a good preconditioner: the spectrum of B A is clustered
    A = _darcy.darcy_matrix(a).toarray()
    ev = np.sort(np.linalg.eigvals(B @ A).real)
    assert ev[0] > 0.3 and ev[-1] < 1.01


# ---------------------------------------------------------------------------------------------
# CG and multigrid CG against the direct solve


def test_cg_and_mg_cg_match_the_direct_solve():
    a = fields(3, 33)
    ref = direct(a)
    for method in ("cg", "mg-cg"):
        sol = _elliptic.solve_darcy_iterative(a, method=method, rtol=1e-8)
        assert (code(sol) == SUCCESS).all() and sol.converged.all()
        assert (np.asarray(sol.residual_norm) <= 1e-8).all()
        assert sol.value.shape == a.shape and sol.value.dtype == jnp.float64
        assert (rel(sol.value, ref) <= 1e-8).all()
        # the reported residual is the true one
        for k in range(3):
            r = 1.0 - _darcy.darcy_matrix(a[k]) @ np.asarray(sol.value[k, 1:-1, 1:-1]).ravel()
            # (to rounding: two evaluations of a 1e-9 residual of a unit right-hand side differ by ~1e-15)
            np.testing.assert_allclose(np.linalg.norm(r) / 31, float(sol.residual_norm[k]), rtol=1e-6, atol=1e-13)
    # one sample after another (the CPU default) or all under vmap: the same solves
    one_by_one = _elliptic.solve_darcy_iterative(a, method="cg", rtol=1e-8, batch=1)
    batched = _elliptic.solve_darcy_iterative(a, method="cg", rtol=1e-8, batch=3)
    np.testing.assert_array_equal(np.asarray(one_by_one.num_steps), np.asarray(batched.num_steps))
    np.testing.assert_allclose(np.asarray(one_by_one.value), np.asarray(batched.value), rtol=1e-12, atol=1e-16)
    # inactive (padding) entries are skipped
    part = _elliptic.solve_darcy_iterative(a, method="cg", rtol=1e-8, batch=1, active=[True, False, True])
    assert int(part.num_steps[1]) == 0 and not np.asarray(part.value[1]).any()
    np.testing.assert_array_equal(np.asarray(part.value[2]), np.asarray(one_by_one.value[2]))


def test_mg_cg_iterations_do_not_grow_with_resolution():
    steps = {}
    for s in (33, 65):
        sol = _elliptic.solve_darcy_iterative(fields(3, s, seed=1), method="mg-cg", rtol=1e-8)
        assert sol.converged.all()
        steps[s] = int(sol.num_steps.max())
    # measured 8 and 9 (and 10 at s = 211, 421); Jacobi CG: 131 and 274, ~4.2 s
    assert steps[33] <= 12 and steps[65] <= 12


@functools.partial(jax.jit, static_argnums=1)
def core_solve(a, kind):
    """The core solver on one `(17, 17)` coefficient (shared by the tests below: one compilation per kind)."""
    op = _elliptic.darcy_operator(a)
    pre = _elliptic.make_preconditioner(op, kind)
    return _elliptic.pcg(op.mv, jnp.ones((15, 15), a.dtype), precond=pre, rtol=1e-10, max_steps=100)


def test_vmap_and_jit_of_the_core_solver():
    a = jnp.asarray(fields(3, 17))
    batched = jax.jit(jax.vmap(lambda a: core_solve(a, "mg")))(a)
    assert batched.value.shape == (3, 15, 15) and batched.converged.all()
    for k in range(3):
        one = core_solve(a[k], "mg")
        assert int(one.num_steps) == int(batched.num_steps[k])
        np.testing.assert_allclose(np.asarray(one.value), np.asarray(batched.value[k]), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(np.asarray(batched.value), direct(np.asarray(a))[:, 1:-1, 1:-1], rtol=1e-8)


# ---------------------------------------------------------------------------------------------
# failures: never `successful` when not converged


def test_unreachable_tolerance_and_step_budget_are_not_success():
    a = fields(3, 33)
    # 3e-15 passes the float64 check (10 eps) but the true residual stagnates near 1e-14
    sol = _elliptic.solve_darcy_iterative(a, method="mg-cg", rtol=3e-15)
    assert (code(sol) == MAX_STEPS).all() and not sol.converged.any()
    assert (np.asarray(sol.residual_norm) > 3e-15).all()
    sol = _elliptic.solve_darcy_iterative(a, method="cg", rtol=1e-8, max_steps=5)
    assert (code(sol) == MAX_STEPS).all() and (np.asarray(sol.num_steps) == 5).all()
    assert (np.asarray(sol.residual_norm) > 1e-8).all()


def test_non_spd_and_nonfinite_operators_are_not_success():
    # the core solver, bypassing the positivity check of the high-level functions
    solve = lambda a, kind: core_solve(jnp.asarray(a), kind)
    negative = -np.ones((17, 17))
    for kind in (None, "jacobi", "mg"):
        sol = solve(negative, kind)
        assert int(sol.result._value) in (BREAKDOWN, NONFINITE) and not bool(sol.converged), kind
    assert int(solve(negative, None).result._value) == BREAKDOWN  # p^T A p < 0 at once
    indefinite = fields(1, 17)[0] - 7.5  # values -4.5 and 4.5
    sol = solve(indefinite, None)
    assert int(sol.result._value) == BREAKDOWN and float(sol.residual_norm) > 1e-8
    # Jacobi: some diagonal entries are 0 here (edges of -4.5 and 4.5 average to 0)
    sol = solve(indefinite, "jacobi")
    assert int(sol.result._value) in (BREAKDOWN, NONFINITE) and not bool(sol.converged)
    nan = np.ones((17, 17))
    nan[5, 5] = np.nan
    sol = solve(nan, "jacobi")
    assert int(sol.result._value) in (NONFINITE, BREAKDOWN) and not bool(sol.converged)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(a=-np.ones((9, 9))), "`a` must be > 0 everywhere.*positive definite"),
        (dict(a=np.zeros((9, 9))), "`a` must be > 0"),
        (dict(a=np.full((9, 9), np.nan)), "`a` must be finite"),
        (dict(a=np.ones((9, 8))), "`a` must have shape"),
        (dict(rtol=1e-16), "`rtol`=1e-16 is below the resolution of float64"),
        (dict(a=np.ones((9, 9), np.float32), rtol=1e-7), "`rtol`=1e-07 is below the resolution of float32"),
        (dict(rtol=0.0), "`rtol` must be a number in"),
        (dict(method="gmres"), "`method` must be one of"),
        (dict(levels=5), "`levels`=5 is too deep for s=9"),
        (dict(a=np.ones((99, 99)), levels=2), r"`levels`=2 is too shallow for s=99.*levels >= 3"),
        (dict(levels=0), "`levels` must be a positive integer"),
    ],
)
def test_solver_argument_errors(kwargs, match):
    kwargs = {"a": np.ones((9, 9)), **kwargs}
    with pytest.raises(ValueError, match=match):
        _elliptic.solve_darcy_iterative(**kwargs)


# ---------------------------------------------------------------------------------------------
# sequences: warm starts, recycling, SKR order


def test_skr_order_is_a_greedy_nearest_neighbour_tour():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 4, 4))
    order = _elliptic.skr_order(x, features=None)
    assert order[0] == 0 and sorted(order) == list(range(30))
    flat = x.reshape(30, -1)
    for i in range(29):
        left = [j for j in range(30) if j not in order[: i + 1]]
        d = np.linalg.norm(flat[left] - flat[order[i]], axis=1)
        assert order[i + 1] == left[int(np.argmin(d))]
    # sorted neighbours are closer than the original order's
    a = fields(40, 33)
    o = _elliptic.skr_order(a)
    step = lambda seq: np.linalg.norm(np.diff(seq.reshape(len(seq), -1), axis=0), axis=1).mean()
    assert step(a[o]) < 0.8 * step(a)


def test_recycled_and_warm_started_sequences_match_independent_solves():
    a = fields(24, 33, seed=2)
    ref = direct(a)
    runs = {}
    for method in ("independent", "warm-start", "recycled"):
        sol = _elliptic.solve_sequence(a, method=method, order="skr", rtol=1e-8)
        assert sol.converged.all() and (np.asarray(sol.residual_norm) <= 1e-8).all()
        assert (rel(sol.value, ref) <= 1e-8).all()  # returned in the original order
        runs[method] = int(sol.num_steps.sum())
    # Def-CG with the recycled Ritz space: measured 3176 -> 1704 iterations (1.9x)
    assert runs["recycled"] < 0.7 * runs["independent"]


def test_sequence_with_multigrid_and_explicit_order():
    a = fields(4, 17)
    order = np.array([2, 0, 3, 1])
    sol = _elliptic.solve_sequence(a, method="recycled", preconditioner="mg", order=order, rtol=1e-9, k=4, ell=8)
    assert sol.converged.all() and (rel(sol.value, direct(a)) <= 1e-8).all()
    with pytest.raises(ValueError, match="`order` must be a permutation"):
        _elliptic.solve_sequence(a, order=[0, 0, 1, 2])
    with pytest.raises(ValueError, match="`method` must be one of"):
        _elliptic.solve_sequence(a, method="gcro-dr")
    with pytest.raises(ValueError, match="`k` must be a positive integer"):
        _elliptic.solve_sequence(a, k=0)


# ---------------------------------------------------------------------------------------------
# fpx.data.darcy(solver=...)


def test_darcy_iterative_solvers_reproduce_the_direct_data(data_dir):
    # n = 3, s = 33: the shapes of the solves above (compiled once per shape)
    a, u = fpx.data.darcy(3, s=33)
    for solver in ("cg", "mg-cg", "recycled"):
        a2, u2 = fpx.data.darcy(3, s=33, solver=solver)
        np.testing.assert_array_equal(a, a2)
        assert u2.dtype == np.float32 and (u2[:, 0] == 0).all() and (u2[:, :, -1] == 0).all()
        np.testing.assert_allclose(u2, u, rtol=3e-7, atol=0)  # float32 rounding of the same solution
    # one cache file per solver; the direct solve keeps its old key
    assert len(list(data_dir.glob("darcy-*.npz"))) == 4
    from fpx.data._cache import cache_path

    assert cache_path("darcy", dict(n=3, s=33, seed=0, alpha=2.0, tau=3.0)).exists()


def test_darcy_solutions_within_1e8_of_direct_in_float64():
    a = fields(3, 33, seed=4).astype(np.float32)
    ref = direct(a.astype(np.float64))
    for solver in ("cg", "mg-cg", "recycled"):
        u = _elliptic.darcy_solutions(a, solver, 1e-8)
        assert u.dtype == np.float64 and (rel(u, ref) <= 1e-8).all(), solver


def test_darcy_unconverged_sample_is_an_error_and_not_cached(data_dir, monkeypatch):
    monkeypatch.setattr(_elliptic, "default_max_steps", lambda method, s: 3)
    with pytest.raises(RuntimeError, match=r"did not converge on sample 0 \(of 2\): relative residual .* after 3 iterations"):
        fpx.data.darcy(2, s=17, solver="cg")
    assert not list(data_dir.glob("darcy-*.npz"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(solver="lu"), "`solver` must be one of 'direct', 'cg', 'mg-cg', 'recycled'"),
        (dict(rtol=1e-8), "solver='direct' takes none"),
        (dict(solver="cg", rtol=1e-17), "`rtol`=1e-17 is below the resolution of float64"),
        (dict(solver="mg-cg", rtol=2.0), "`rtol` must be a number in"),
    ],
)
def test_darcy_solver_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fpx.data.darcy(1, s=9, cache=False, **kwargs)
