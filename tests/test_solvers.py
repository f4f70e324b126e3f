"""Known-answer tests of the six fixed-point solvers (float64 unless stated otherwise).

Ground-truth problems:

- T1: the linear contraction `T z = A z + b`, `A = [[.5, .25], [.25, .5]]`, `b = (1, 1)`,
  `z* = (4, 4)`. From `z0 = 0` the error `z_k - z*` stays along `(1, 1)`, an eigenvector
  of `A` with eigenvalue 3/4, so every linear one-step method has a closed-form residual.
- T2: the rotation by 90 degrees, `R(x, y) = (-y, x)`, `z* = 0`, from `z0 = (1, 0)`.
- T4: `T z = c P z + e1` with `P` the cyclic shift on R^5 (Anderson = GMRES: exact at n+1).
- T5: `T z = z - arctan(z)` from `z0 = 10` (the classic case where undamped AA(1) fails).
- Nonlinear problems `0.9 tanh(W z) + c` (contractive) and `c - 2 z - 0.3 tanh(W z)`
  (Lipschitz > 2, Picard diverges) against an independent NumPy Newton reference.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

import fpx

SQRT2 = math.sqrt(2.0)
SOLVER_CLASSES = [fpx.Picard, fpx.KM, fpx.Halpern, fpx.Anderson, fpx.Broyden, fpx.NewtonKrylov]


def _trace(sol) -> np.ndarray:
    return np.asarray(sol.stats["residual_trace"])


def _converged(sol) -> bool:
    return bool(sol.result == fpx.RESULTS.successful)


def _close(actual, expected, *, rel=1e-12, abs_=1e-14):
    """Elementwise |actual - expected| <= rel |expected| + abs_ (no NaNs allowed)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert not np.any(np.isnan(actual))
    err = np.abs(actual - expected)
    bad = err > rel * np.abs(expected) + abs_
    assert not np.any(bad), (
        f"mismatch at indices {np.flatnonzero(bad)[:10]}: actual {actual[bad][:5]}, expected {expected[bad][:5]}"
    )


# ----------------------------------------------------------------------------------------
# T1: linear contraction with z* = (4, 4)
# ----------------------------------------------------------------------------------------

A1 = np.array([[0.5, 0.25], [0.25, 0.5]])
B1 = np.ones(2)
Z1 = np.array([4.0, 4.0])
E0_NORM = 4.0 * SQRT2  # |z0 - z*| from z0 = 0
LAM = 0.75  # eigenvalue of A1 along (1, 1), the direction of z_k - z*


def t1(z, _):
    return jnp.asarray(A1) @ z + jnp.asarray(B1)


def _t1_solve(solver, **kwargs):
    kwargs.setdefault("throw", False)
    return fpx.fixed_point(t1, jnp.zeros(2), solver=solver, **kwargs)


def test_t1_picard_residual_trace_is_exact():
    # z_k - z* = -4 * 0.75^k (1, 1), so |z_k - T z_k| = |(I - A)(z_k - z*)| = sqrt(2) 0.75^k.
    length = 120
    sol = _t1_solve(fpx.Picard(rtol=0.0, atol=1e-10), trace_length=length)
    assert _converged(sol)
    # First k with sqrt(2) 0.75^k <= 1e-10 is k = 82 (81.25 rounded up).
    assert int(sol.stats["num_steps"]) == 82
    assert int(sol.stats["num_fn_evals"]) == 83
    tr = _trace(sol)
    k = np.arange(83)
    exact = SQRT2 * LAM**k
    _close(tr[:31], exact[:31], rel=1e-12, abs_=0.0)  # pure relative while the residual is >= 1e-4
    _close(tr[:83], exact, rel=1e-12, abs_=1e-15)
    # NaN padding after the last iterate; the last entry is the reported residual.
    assert np.all(np.isnan(tr[83:]))
    assert tr[82] == float(sol.stats["residual_norm"])
    # z_82 = 4 (1 - 0.75^82) (1, 1).
    _close(sol.value, 4.0 * (1.0 - LAM**82) * np.ones(2), rel=0.0, abs_=1e-14)


def test_t1_km_residual_trace_is_exact():
    # The averaged map (I + T)/2 has eigenvalue (1 + 0.75)/2 = 0.875 along (1, 1).
    sol = _t1_solve(fpx.KM(0.5, rtol=0.0, atol=1e-10), trace_length=200)
    assert _converged(sol)
    assert int(sol.stats["num_steps"]) == 176  # first k with sqrt(2) 0.875^k <= 1e-10
    tr = _trace(sol)
    k = np.arange(177)
    _close(tr[:177], SQRT2 * 0.875**k, rel=1e-12, abs_=1e-15)
    assert np.all(np.isnan(tr[177:]))


def test_t1_plain_halpern_residual_is_exact_and_only_order_one_over_k():
    # Scalar error recursion e_{k+1} = e0/(k+2) + (k+1)/(k+2) * 0.75 e_k gives
    # (k+1) e_k = e0 (1 - 0.75^(k+1)) / 0.25, i.e. |z_k - T z_k| = 4 sqrt(2) (1 - 0.75^(k+1)) / (k+1):
    # plain Halpern is O(1/k) even on a contraction (why T1 below uses contraction=0.75).
    length = 300
    sol = _t1_solve(fpx.Halpern(rtol=0.0, atol=1e-10), trace_length=length, max_steps=length - 1)
    assert sol.result == fpx.RESULTS.max_steps_reached
    tr = _trace(sol)
    k = np.arange(length)
    exact = E0_NORM * (1.0 - LAM ** (k + 1)) / (k + 1)
    _close(tr, exact, rel=1e-12, abs_=1e-15)
    assert np.all(tr <= 2.0 * E0_NORM / (k + 1))  # the nonexpansive worst-case bound


def test_t1_oc_halpern_residual_is_exact():
    # b_k = 1/phi_{k+1}, phi_k = sum_{i<=k} rho^(-2i). With f_k = phi_k e_k the recursion is
    # f_{k+1} = e0 + (lam / rho^2) f_k, so |z_k - T z_k| = (1 - lam) |e0| S_k / phi_k with
    # S_k = sum_{i<=k} (lam/rho^2)^i; for rho = lam = 0.75, S_k = sum_{i<=k} rho^(-i).
    rho = 0.75
    length = 120
    sol = _t1_solve(fpx.Halpern(contraction=rho, rtol=0.0, atol=1e-10), trace_length=length)
    assert _converged(sol)
    n = int(sol.stats["num_steps"])
    k = np.arange(n + 1, dtype=float)
    exact = (1.0 - LAM) * E0_NORM * np.cumsum(rho**-k) / np.cumsum(rho ** (-2.0 * k))
    tr = _trace(sol)
    _close(tr[: n + 1], exact, rel=1e-12, abs_=1e-15)
    # and within the OC-Halpern bound (1 + rho)|z0 - z*| / sum_{i<=k} rho^(-i); the ratio
    # 0.25 S_k^2 / (1.75 phi_k) tends to 1, so allow for rounding of the residual in the tail.
    bound = (1.0 + rho) * E0_NORM / np.cumsum(rho**-k)
    assert np.all(exact <= bound * (1 + 1e-14))
    assert np.all(tr[: n + 1] <= bound * (1 + 1e-12) + 1e-15)


@pytest.mark.parametrize(
    ("solver", "expected_steps"),
    [
        (fpx.Picard(rtol=0.0, atol=1e-10), 82),  # first k with sqrt(2) 0.75^k <= 1e-10
        (fpx.KM(0.5, rtol=0.0, atol=1e-10), 176),  # first k with sqrt(2) 0.875^k <= 1e-10
        (fpx.KM(0.9, rtol=0.0, atol=1e-10), None),
        (fpx.Halpern(contraction=0.75, rtol=0.0, atol=1e-10), None),
        # z0 - z* spans a 1-dimensional Krylov space: one Picard step, then one exact secant step.
        (fpx.Anderson(rtol=0.0, atol=1e-10), 2),
        (fpx.Broyden(rtol=0.0, atol=1e-10), 2),
        # A linear problem: one exact Newton step (GMRES needs one matvec, b is an eigenvector).
        (fpx.NewtonKrylov(rtol=0.0, atol=1e-10), 1),
    ],
    ids=["picard", "km0.5", "km0.9", "oc_halpern", "anderson", "broyden", "newton_krylov"],
)
def test_t1_every_solver_converges_tightly(solver, expected_steps):
    sol = _t1_solve(solver, max_steps=1000)
    assert _converged(sol)
    steps = int(sol.stats["num_steps"])
    if expected_steps is None:
        assert 0 < steps <= 100
    else:
        assert steps == expected_steps
    residual = float(sol.stats["residual_norm"])
    assert residual <= 1e-10
    # |z - z*| <= |z - T z| / (1 - 0.75) for a 0.75-contraction.
    assert np.max(np.abs(np.asarray(sol.value) - Z1)) <= 4.0 * residual + 1e-14
    assert sol.value.dtype == jnp.float64
    if isinstance(solver, (fpx.Anderson, fpx.Broyden)):
        assert int(sol.stats["num_rejected"]) == 0
    if isinstance(solver, fpx.NewtonKrylov):
        assert int(sol.stats["num_jvps"]) == 1
        assert int(sol.stats["num_backtracks"]) == 0
        assert int(sol.stats["num_fn_evals"]) == 3  # z0, the linearisation point, the trial point
    else:
        assert int(sol.stats["num_fn_evals"]) == steps + 1


# ----------------------------------------------------------------------------------------
# T1 with a non-default `norm`: the stopping test, the residual trace and the reported
# residual are all in the solver's norm.
# ----------------------------------------------------------------------------------------

# The residual z_k - T z_k = -0.75^k (1, 1) (Picard), -0.875^k (1, 1) (KM(1/2)). Its norm is
# c 0.75^k with c = |(1, 1)| in the chosen norm: sqrt(2) (two), 1 (max), 1 (rms).
NORM_OF_ONES = {"two_norm": SQRT2, "max_norm": 1.0, "rms_norm": 1.0}
NORMS = [fpx.two_norm, fpx.max_norm, fpx.rms_norm]


def _first_step_below(c, lam, tol):
    """First k with c lam^k <= tol."""
    return math.ceil(math.log(tol / c) / math.log(lam))


@pytest.mark.parametrize(
    ("norm", "picard_steps", "km_steps"),
    [(fpx.two_norm, 82, 176), (fpx.max_norm, 81, 173), (fpx.rms_norm, 81, 173)],
    ids=["two", "max", "rms"],
)
def test_t1_atol_test_uses_the_solver_norm(norm, picard_steps, km_steps):
    c = NORM_OF_ONES[norm.__name__]
    for solver, lam, expected in [
        (fpx.Picard(rtol=0.0, atol=1e-10, norm=norm), LAM, picard_steps),
        (fpx.KM(0.5, rtol=0.0, atol=1e-10, norm=norm), 0.875, km_steps),
    ]:
        assert expected == _first_step_below(c, lam, 1e-10)
        sol = _t1_solve(solver, max_steps=500, trace_length=200)
        assert _converged(sol)
        assert int(sol.stats["num_steps"]) == expected
        k = np.arange(expected + 1)
        tr = _trace(sol)
        _close(tr[: expected + 1], c * lam**k, rel=1e-12, abs_=1e-15)
        assert np.all(np.isnan(tr[expected + 1 :]))
        _close(sol.stats["residual_norm"], c * lam**expected, rel=1e-12, abs_=1e-15)
        # one step earlier the test was not met: c lam^(k-1) > 1e-10
        assert c * lam ** (expected - 1) > 1e-10


def test_max_norm_stops_earlier_by_log_sqrt_n_steps_in_dimension_64():
    # T z = 0.75 z + 1 on R^64 from 0: residual 0.75^k (1, ..., 1), of two-norm 8 * 0.75^k and
    # max-norm 0.75^k. The first k below 1e-10: 88 in the two-norm, 81 in the max-norm.
    n = 64
    steps = {}
    for norm in (fpx.two_norm, fpx.max_norm):
        sol = fpx.fixed_point(
            lambda z, _: 0.75 * z + 1.0,
            jnp.zeros(n),
            solver=fpx.Picard(rtol=0.0, atol=1e-10, norm=norm),
            max_steps=500,
            throw=False,
        )
        assert _converged(sol)
        steps[norm.__name__] = int(sol.stats["num_steps"])
    assert steps == {"two_norm": 88, "max_norm": 81}
    assert steps["two_norm"] == _first_step_below(8.0, 0.75, 1e-10)
    assert steps["max_norm"] == _first_step_below(1.0, 0.75, 1e-10)


@pytest.mark.parametrize("norm", NORMS, ids=["two", "max", "rms"])
def test_t1_rtol_test_uses_the_same_norm_for_residual_and_iterate(norm):
    # Pure relative test |z_k - T z_k| <= rtol |z_k|, z_k = 4 (1 - 0.75^k) (1, 1): the factor
    # |(1, 1)| cancels, so every norm stops at the first k with 0.75^k <= 4e-10 (1 - 0.75^k),
    # k = 76. A driver that measured |z| in another norm than the residual would not: with
    # the max-norm residual over the two-norm |z| it would stop at k = 75.
    def first(ratio):
        return next(k for k in range(1, 500) if LAM**k <= ratio * 1e-10 * 4.0 * (1.0 - LAM**k))

    assert first(1.0) == 76 and first(SQRT2) == 75
    sol = _t1_solve(fpx.Picard(rtol=1e-10, atol=0.0, norm=norm), max_steps=500)
    assert _converged(sol)
    assert int(sol.stats["num_steps"]) == 76
    c = NORM_OF_ONES[norm.__name__]
    _close(sol.stats["residual_norm"], c * LAM**76, rel=1e-12, abs_=1e-15)


# ----------------------------------------------------------------------------------------
# T2: rotation by 90 degrees (nonexpansive, z* = 0)
# ----------------------------------------------------------------------------------------


def rot90(z, _):
    return jnp.stack([-z[1], z[0]])


Z0_ROT = jnp.array([1.0, 0.0])


def test_t2_picard_cycles_with_constant_residual():
    sol = fpx.fixed_point(rot90, Z0_ROT, solver=fpx.Picard(), max_steps=40, throw=False, trace_length=41)
    assert sol.result == fpx.RESULTS.max_steps_reached
    assert int(sol.stats["num_steps"]) == 40
    _close(_trace(sol), np.full(41, SQRT2), rel=1e-15, abs_=0.0)
    assert float(sol.stats["residual_norm"]) == pytest.approx(SQRT2, rel=1e-15)


def test_t2_picard_raises_with_throw():
    with pytest.raises(fpx.FixedPointError, match="did not converge within max_steps=10"):
        sol = fpx.fixed_point(rot90, Z0_ROT, solver=fpx.Picard(), max_steps=10)
        sol.value.block_until_ready()


def test_t2_km_half_residual_is_exact():
    # (I + R)/2 is normal with eigenvalues (1 +- i)/2 of modulus 2^(-1/2).
    sol = fpx.fixed_point(
        rot90, Z0_ROT, solver=fpx.KM(0.5, rtol=0.0, atol=1e-12), max_steps=200, throw=False, trace_length=120
    )
    assert _converged(sol)
    steps = int(sol.stats["num_steps"])
    assert steps == 81  # first k with sqrt(2) 2^(-k/2) <= 1e-12
    k = np.arange(steps + 1)
    _close(_trace(sol)[: steps + 1], SQRT2 * 2.0 ** (-k / 2), rel=1e-13, abs_=0.0)
    assert np.max(np.abs(np.asarray(sol.value))) <= 1e-12


def test_t2_halpern_attains_its_worst_case_bound():
    length = 60
    sol = fpx.fixed_point(
        rot90, Z0_ROT, solver=fpx.Halpern(rtol=0.0, atol=0.0), max_steps=length - 1, throw=False, trace_length=length
    )
    tr = _trace(sol)
    k = np.arange(length)
    bound = 2.0 * 1.0 / (k + 1)  # 2 |z0 - z*| / (k + 1)
    assert np.all(tr <= bound * (1 + 1e-14))
    # Equality at k = 1 (mod 4): residual 1, 1/3, 1/5, ...
    ones = k[k % 4 == 1]
    _close(tr[ones], bound[ones], rel=1e-13, abs_=0.0)
    # z_k = 0 at k = 3 (mod 4) in exact arithmetic (rounding level here).
    assert np.all(tr[k % 4 == 3] <= 1e-15)
    # the first entries in closed form: z_1 = (1/2, 1/2), z_2 = (0, 1/3)
    _close(tr[:3], [SQRT2, 1.0, SQRT2 / 3.0], rel=1e-15, abs_=0.0)


def test_t2_halpern_stops_at_step_3():
    sol = fpx.fixed_point(rot90, Z0_ROT, solver=fpx.Halpern(), throw=True)
    assert int(sol.stats["num_steps"]) == 3
    assert np.max(np.abs(np.asarray(sol.value))) <= 1e-15
    assert float(sol.stats["residual_norm"]) <= 1e-15


def test_halpern_bound_on_a_generic_rotation():
    theta = 1.0
    rot = jnp.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    z0 = jnp.array([3.0, -1.0])
    length = 300
    sol = fpx.fixed_point(
        lambda z, _: rot @ z,
        z0,
        solver=fpx.Halpern(rtol=0.0, atol=0.0),
        max_steps=length - 1,
        throw=False,
        trace_length=length,
    )
    tr = _trace(sol)
    k = np.arange(length)
    assert np.all(tr <= 2.0 * math.sqrt(10.0) / (k + 1) * (1 + 1e-12))


# ----------------------------------------------------------------------------------------
# Optimal-contractive Halpern, Halpern(contraction=rho)
# ----------------------------------------------------------------------------------------


def _orthogonal(n, seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def _oc_problem(name, rho):
    """(M, c, z0) with T z = M z + c a rho-contraction."""
    rng = np.random.default_rng(7)
    if name == "rho_rot90":
        return rho * np.array([[0.0, -1.0], [1.0, 0.0]]), np.zeros(2), np.array([1.0, 0.0])
    if name == "rho_orthogonal_shift":
        return rho * _orthogonal(6, 3), rng.standard_normal(6), rng.standard_normal(6)
    if name == "minus_rho_identity":  # the worst case: the bound is attained at every even k
        return -rho * np.eye(3), np.ones(3), np.zeros(3)
    raise AssertionError(name)


@pytest.mark.parametrize("rho", [0.5, 0.9])
@pytest.mark.parametrize("name", ["rho_rot90", "rho_orthogonal_shift", "minus_rho_identity"])
def test_oc_halpern_residual_bound(name, rho):
    m, c, z0 = _oc_problem(name, rho)
    n = m.shape[0]
    z_star = np.linalg.solve(np.eye(n) - m, c)
    mj, cj = jnp.asarray(m), jnp.asarray(c)
    length = 400
    sol = fpx.fixed_point(
        lambda z, _: mj @ z + cj,
        jnp.asarray(z0),
        solver=fpx.Halpern(contraction=rho, rtol=0.0, atol=1e-11),
        max_steps=length - 1,
        throw=False,
        trace_length=length,
    )
    assert _converged(sol)
    steps = int(sol.stats["num_steps"])
    tr = _trace(sol)[: steps + 1]
    k = np.arange(steps + 1, dtype=float)
    e0 = np.linalg.norm(z0 - z_star)
    bound = (1.0 + rho) * e0 / np.cumsum(rho**-k)
    # Slack: rounding of the residual itself (~ a few eps |z|), relevant once the bound is ~1e-13.
    assert np.all(tr <= bound * (1 + 1e-12) + 1e-14), np.max(tr / bound)
    _close(sol.value, z_star, rel=0.0, abs_=1e-10 / (1 - rho))
    if name == "minus_rho_identity":
        # Eigenvalue -rho: |z_k - T z_k| = (1 + rho)|e0| |sum_{i<=k} (-1/rho)^i| / sum_{i<=k} rho^(-2i),
        # which equals the bound exactly for even k.
        exact = (1.0 + rho) * e0 * np.abs(np.cumsum((-1.0 / rho) ** k)) / np.cumsum(rho ** (-2.0 * k))
        _close(tr, exact, rel=1e-12, abs_=1e-14)
        even = k[: min(steps + 1, 21)][::2].astype(int)
        _close(tr[even], bound[even], rel=1e-12, abs_=1e-15)


def test_oc_halpern_anchor_weights():
    rho = 0.8
    solver = fpx.Halpern(contraction=rho)
    for k in range(8):
        expected = 1.0 / sum(rho ** (-2 * i) for i in range(k + 2))
        assert float(solver.anchor_weight(jnp.array(k))) == pytest.approx(expected, rel=1e-13)
    # finite and tending to 0 (Picard) for large k
    large = float(solver.anchor_weight(jnp.array(5000)))
    assert math.isfinite(large) and 0.0 <= large < 1e-300
    # rho -> 1 recovers 1/(k+2)
    near_one = fpx.Halpern(contraction=1.0 - 1e-7)
    for k in range(8):
        assert float(near_one.anchor_weight(jnp.array(k))) == pytest.approx(1.0 / (k + 2), rel=1e-5)


@pytest.mark.parametrize("problem", ["rot90", "t1"])
def test_halpern_contraction_one_is_plain_halpern(problem):
    fn, z0 = (rot90, Z0_ROT) if problem == "rot90" else (t1, jnp.zeros(2))
    traces = []
    for solver in (fpx.Halpern(rtol=0.0, atol=0.0), fpx.Halpern(contraction=1.0, rtol=0.0, atol=0.0)):
        sol = fpx.fixed_point(fn, z0, solver=solver, max_steps=40, throw=False, trace_length=41)
        traces.append((_trace(sol), np.asarray(sol.value)))
    np.testing.assert_array_equal(traces[0][0], traces[1][0])
    np.testing.assert_array_equal(traces[0][1], traces[1][1])
    k = np.arange(41)
    # and rho = 1 in the OC bound is the plain bound 2 |z0 - z*| / (k + 1)
    e0 = 1.0 if problem == "rot90" else E0_NORM
    assert np.all(traces[1][0] <= 2.0 * e0 / (k + 1) * (1 + 1e-14))


# ----------------------------------------------------------------------------------------
# T4: Anderson on T z = c P z + e1 (P the cyclic shift, n = 5)
# ----------------------------------------------------------------------------------------

N4 = 5
P4 = np.roll(np.eye(N4), 1, axis=0)  # P e_i = e_{i+1}, P e_n = e_1
E1 = np.eye(N4)[0]


def _t4(c):
    m, e = jnp.asarray(c * P4), jnp.asarray(E1)
    return (lambda z, _: m @ z + e), np.linalg.solve(np.eye(N4) - c * P4, E1)


@pytest.mark.parametrize("memory", [N4, N4 + 3])
@pytest.mark.parametrize("c", [0.5, 1.5])
def test_t4_anderson_is_exact_at_step_n_plus_one(c, memory):
    fn, z_star = _t4(c)
    sol = fpx.fixed_point(
        fn,
        jnp.zeros(N4),
        solver=fpx.Anderson(memory=memory, beta=1.0, rtol=0.0, atol=1e-12),
        max_steps=30,
        throw=False,
        trace_length=12,
    )
    tr = _trace(sol)
    assert _converged(sol)
    assert int(sol.stats["num_steps"]) == N4 + 1
    assert tr[N4 + 1] <= 1e-12
    assert np.min(tr[: N4 + 1]) > 1e-2  # not before: the Krylov space of P e1 has dimension n
    _close(sol.value, z_star, rel=0.0, abs_=1e-12)
    assert int(sol.stats["num_rejected"]) == 0
    _close(tr[:2], [1.0, c], rel=1e-15, abs_=0.0)  # |e1|, then |c e2| after the Picard step


def test_t4_picard_fails_where_anderson_succeeds():
    fn, _ = _t4(1.5)
    sol = fpx.fixed_point(fn, jnp.zeros(N4), solver=fpx.Picard(), max_steps=60, throw=False, trace_length=61)
    assert not _converged(sol)
    # Picard residual is exactly 1.5^k (z_k = sum_{j<k} 1.5^j e_{j+1}, residual -1.5^k e_{k+1}),
    # so it passes a millionfold growth (the divergence test) at k = 35.
    assert sol.result == fpx.RESULTS.diverged
    assert int(sol.stats["num_steps"]) == 35
    k = np.arange(36)
    tr = _trace(sol)
    _close(tr[:36], 1.5**k, rel=1e-13, abs_=0.0)
    assert np.all(np.isnan(tr[36:]))
    # the best iterate seen is z0, with residual 1
    assert float(sol.stats["residual_norm"]) == 1.0
    np.testing.assert_array_equal(np.asarray(sol.value), np.zeros(N4))


@pytest.mark.parametrize("c", [0.5, 1.5])
def test_t4_broyden_without_safeguard_is_exact_at_step_n_plus_one(c):
    # Good Broyden with H0 = I steps along e1, c e2, c^2 e3, ...: residual c^k for k <= n,
    # then the update has seen every direction and the step is exact (within Gay's 2n bound).
    fn, z_star = _t4(c)
    sol = fpx.fixed_point(
        fn,
        jnp.zeros(N4),
        solver=fpx.Broyden(memory=2 * N4, safeguard=None, rtol=0.0, atol=1e-12),
        max_steps=30,
        throw=False,
        trace_length=12,
    )
    assert _converged(sol)
    assert int(sol.stats["num_steps"]) == N4 + 1
    tr = _trace(sol)
    _close(tr[: N4 + 1], c ** np.arange(N4 + 1), rel=1e-13, abs_=0.0)
    assert tr[N4 + 1] <= 1e-12
    _close(sol.value, z_star, rel=0.0, abs_=1e-12)


# ----------------------------------------------------------------------------------------
# T5: T z = z - arctan(z) from z0 = 10
# ----------------------------------------------------------------------------------------


def t5(z, _):
    return z - jnp.arctan(z)


def _aa1_second_iterate():
    """AA(1), beta = 1, by hand: z1 = z0 + g0, z2 = z1 + g1 - gamma (dz + dg), gamma = g1 / (g1 - g0)."""
    z0 = 10.0
    g0 = -math.atan(z0)
    z1 = z0 + g0
    g1 = -math.atan(z1)
    gamma = g1 / (g1 - g0)
    z2 = z1 + g1 - gamma * ((z1 - z0) + (g1 - g0))
    return z1, z2


def test_t5_unsafeguarded_aa1_jumps_and_fails():
    z1, z2 = _aa1_second_iterate()
    assert z2 == pytest.approx(-116.954, abs=1e-3)
    sol = fpx.fixed_point(
        t5,
        jnp.array(10.0),
        solver=fpx.Anderson(memory=1, safeguard=None, rtol=0.0, atol=1e-10),
        max_steps=30,
        throw=False,
        trace_length=31,
    )
    tr = _trace(sol)
    _close(tr[:3], [math.atan(10.0), math.atan(z1), abs(math.atan(z2))], rel=1e-12, abs_=0.0)
    # |z_k| runs off but the first step did improve on the starting residual
    # (arctan(z1) < arctan(10)), so this is an honest max_steps_reached, not "diverged".
    assert sol.result == fpx.RESULTS.max_steps_reached
    assert int(sol.stats["num_steps"]) == 30
    assert int(sol.stats["num_rejected"]) == 0
    # |z_k| -> infinity: the residual |arctan(z_k)| tends to pi/2
    assert np.all(tr[-5:] > 1.57)
    # the best iterate is z1 (residual atan(z1) < atan(10)), far from 0
    assert float(sol.stats["residual_norm"]) == pytest.approx(math.atan(z1), rel=1e-12)


def test_t5_safeguarded_aa1_converges():
    z1, z2 = _aa1_second_iterate()
    sol = fpx.fixed_point(
        t5,
        jnp.array(10.0),
        solver=fpx.Anderson(memory=1, rtol=0.0, atol=1e-10),
        max_steps=100,
        throw=False,
        trace_length=101,
    )
    assert _converged(sol)
    assert abs(float(sol.value)) <= 1e-10
    assert int(sol.stats["num_rejected"]) >= 1
    tr = _trace(sol)
    # The jump to z2 is proposed and evaluated, then rejected: z3 is the relaxed step from z1.
    z3 = z1 - math.atan(z1)
    _close(tr[:4], [math.atan(10.0), math.atan(z1), abs(math.atan(z2)), math.atan(z3)], rel=1e-12, abs_=0.0)


# ----------------------------------------------------------------------------------------
# Nonlinear problems: Broyden, NewtonKrylov (and the others) against a NumPy Newton reference
# ----------------------------------------------------------------------------------------

N_NL = 20
W_NL = _orthogonal(N_NL, 0)
C_NL = np.random.default_rng(1).standard_normal(N_NL)


def _newton_reference(t_np, jac_np, n):
    z = np.zeros(n)
    for _ in range(60):
        z = z - np.linalg.solve(np.eye(n) - jac_np(z), z - t_np(z))
    assert np.linalg.norm(z - t_np(z)) <= 1e-13
    return z


def contractive(z, _):
    return 0.9 * jnp.tanh(jnp.asarray(W_NL) @ z) + jnp.asarray(C_NL)


def expansive(z, _):  # Lipschitz constant >= 2: Picard diverges from anywhere but z*
    return jnp.asarray(C_NL) - 2.0 * z - 0.3 * jnp.tanh(jnp.asarray(W_NL) @ z)


def _t_contractive_np(z):
    return 0.9 * np.tanh(W_NL @ z) + C_NL


REF_CONTRACTIVE = _newton_reference(
    _t_contractive_np,
    lambda z: 0.9 * (1.0 - np.tanh(W_NL @ z) ** 2)[:, None] * W_NL,
    N_NL,
)
REF_EXPANSIVE = _newton_reference(
    lambda z: C_NL - 2.0 * z - 0.3 * np.tanh(W_NL @ z),
    lambda z: -2.0 * np.eye(N_NL) - 0.3 * (1.0 - np.tanh(W_NL @ z) ** 2)[:, None] * W_NL,
    N_NL,
)


def _numpy_anderson_residuals(t_np, z0, memory, num):
    """Textbook type-II Anderson (beta = 1, least squares by lstsq) residual norms."""
    z = np.array(z0, dtype=float)
    zs, gs, out = [], [], []
    for _ in range(num):
        g = t_np(z) - z
        out.append(np.linalg.norm(g))
        zs.append(z.copy())
        gs.append(g)
        if len(zs) == 1:
            z = z + g
            continue
        d_z = np.diff(np.array(zs[-memory - 1 :]), axis=0).T
        d_g = np.diff(np.array(gs[-memory - 1 :]), axis=0).T
        gamma = np.linalg.lstsq(d_g, g, rcond=None)[0]
        z = z + g - (d_z + d_g) @ gamma
    return np.array(out)


@pytest.mark.parametrize(
    ("solver", "max_expected_steps"),
    [
        (fpx.Picard(rtol=0.0, atol=1e-10), 80),
        (fpx.Anderson(rtol=0.0, atol=1e-10), 60),
        (fpx.Broyden(rtol=0.0, atol=1e-10), 70),
    ],
    ids=["picard", "anderson", "broyden"],
)
def test_contractive_tanh_matches_reference(solver, max_expected_steps):
    sol = fpx.fixed_point(contractive, jnp.zeros(N_NL), solver=solver, max_steps=300, throw=False, trace_length=100)
    assert _converged(sol)
    steps = int(sol.stats["num_steps"])
    assert steps <= max_expected_steps
    residual = float(sol.stats["residual_norm"])
    assert residual <= 1e-10
    # 0.9-Lipschitz: |z - z*| <= |z - T z| / 0.1
    assert np.linalg.norm(np.asarray(sol.value) - REF_CONTRACTIVE) <= 10.0 * residual + 1e-13
    if isinstance(solver, fpx.Anderson):
        # The iterates are those of textbook AA(5) (the ridge is at rounding level).
        reference = _numpy_anderson_residuals(_t_contractive_np, np.zeros(N_NL), 5, steps + 1)
        tr = _trace(sol)[: steps + 1]
        _close(tr[:31], reference[:31], rel=1e-8, abs_=0.0)
        _close(tr, reference, rel=1e-4, abs_=0.0)


def test_newton_krylov_converges_quadratically_on_contractive_tanh():
    sol = fpx.fixed_point(
        contractive,
        jnp.zeros(N_NL),
        solver=fpx.NewtonKrylov(rtol=0.0, atol=1e-10),
        max_steps=50,
        throw=False,
        trace_length=51,
    )
    assert _converged(sol)
    residual = float(sol.stats["residual_norm"])
    assert residual <= 1e-10
    assert np.linalg.norm(np.asarray(sol.value) - REF_CONTRACTIVE) <= 10.0 * residual + 1e-13
    steps = int(sol.stats["num_steps"])
    assert steps <= 8  # Picard needs 76 here
    tr = _trace(sol)[: steps + 1]
    ratios = tr[1:] / tr[:-1]
    assert np.all(ratios < 1.0)
    # Linear convergence would keep the ratio near the spectral radius of T'(z*); Newton's
    # ratios collapse, and the residual is (at least) squared on several consecutive steps.
    assert np.min(ratios) < 1e-4
    squared = (tr[:-1] < 1.0) & (tr[1:] <= tr[:-1] ** 2)
    assert int(np.sum(squared)) >= 3, tr
    jvps = int(sol.stats["num_jvps"])
    assert jvps >= steps > 0
    assert int(sol.stats["num_fn_evals"]) == 1 + 2 * steps + int(sol.stats["num_backtracks"])


def test_expansive_problem_picard_fails():
    sol = fpx.fixed_point(expansive, jnp.zeros(N_NL), solver=fpx.Picard(), max_steps=50, throw=False, trace_length=51)
    assert not _converged(sol)
    assert sol.result == fpx.RESULTS.diverged
    tr = _trace(sol)
    k = int(sol.stats["num_steps"])
    # The residual blows up geometrically; the solve stops at the first millionfold growth.
    assert tr[k] > 1e6 * tr[0] and np.all(tr[1:k] <= 1e6 * tr[0]) and k < 50


@pytest.mark.parametrize(
    ("solver", "max_expected_steps"),
    [
        (fpx.NewtonKrylov(rtol=0.0, atol=1e-10), 8),
        (fpx.Anderson(rtol=0.0, atol=1e-10), 40),
        (fpx.Broyden(memory=2 * N_NL, rtol=0.0, atol=1e-10), 40),
    ],
    ids=["newton_krylov", "anderson", "broyden"],
)
def test_expansive_problem_accelerated_solvers_converge(solver, max_expected_steps):
    sol = fpx.fixed_point(expansive, jnp.zeros(N_NL), solver=solver, max_steps=200, throw=False)
    assert _converged(sol)
    assert int(sol.stats["num_steps"]) <= max_expected_steps
    assert float(sol.stats["residual_norm"]) <= 1e-10
    # |z - z*| <= |(I - T')^{-1}| |z - T z| (mean value), and I - T' = 3 I + 0.3 D W with
    # 0 <= D <= I, W orthogonal, has smallest singular value >= 2.7.
    assert np.linalg.norm(np.asarray(sol.value) - REF_EXPANSIVE) <= 1e-10 / 2.7 * 1.01
    if isinstance(solver, fpx.NewtonKrylov):
        assert int(sol.stats["num_jvps"]) > 0


# ----------------------------------------------------------------------------------------
# Restarted GMRES (the linear solver inside NewtonKrylov) with restarts actually taken
# ----------------------------------------------------------------------------------------


def _numpy_gmres(a, b, tol, restart, max_restarts):
    """Textbook restarted GMRES(m) from x = 0: Arnoldi (Gram-Schmidt twice) and a least-squares
    solve by `lstsq` after every inner step; stops inside a cycle as soon as the least-squares
    residual is <= tol. Returns x, the residual estimate, the matvec count and the estimate
    after every inner step."""
    n = b.size
    x, r, count, history = np.zeros(n), b.copy(), 0, []
    res = np.linalg.norm(b)
    for _ in range(max_restarts):
        if res <= tol:
            break
        beta = np.linalg.norm(r)
        v = np.zeros((n, restart + 1))
        h = np.zeros((restart + 1, restart))
        v[:, 0] = r / beta
        for j in range(restart):
            w = a @ v[:, j]
            count += 1
            for _pass in range(2):
                coeffs = v[:, : j + 1].T @ w
                h[: j + 1, j] += coeffs
                w = w - v[:, : j + 1] @ coeffs
            h[j + 1, j] = np.linalg.norm(w)
            v[:, j + 1] = w / h[j + 1, j]
            rhs = np.zeros(j + 2)
            rhs[0] = beta
            y = np.linalg.lstsq(h[: j + 2, : j + 1], rhs, rcond=None)[0]
            res = np.linalg.norm(rhs - h[: j + 2, : j + 1] @ y)
            history.append(res)
            if res <= tol:
                break
        x = x + v[:, : j + 1] @ y
        r = b - a @ x
    return x, res, count, np.array(history)


N_GM = 50
_RNG_GM = np.random.default_rng(0)
# Nonsymmetric, well conditioned: I + 0.3 G / sqrt(n), singular values in [0.63, 1.43].
A_GM = np.eye(N_GM) + 0.3 * _RNG_GM.standard_normal((N_GM, N_GM)) / np.sqrt(N_GM)
B_GM = _RNG_GM.standard_normal(N_GM)
SHIFT_GM = np.roll(np.eye(N_GM), 1, axis=0)  # P e_i = e_{i+1}, P e_n = e_1


def _fpx_gmres(a, b, tol, restart, max_restarts):
    from fpx.solvers._gmres import gmres

    aj = jnp.asarray(a)
    out = gmres(lambda v: aj @ v, jnp.asarray(b), tol, restart=restart, max_restarts=max_restarts)
    return np.asarray(out.x), float(out.residual_norm), int(out.num_matvecs)


def test_gmres_with_restarts_reaches_the_tolerance():
    sigma = np.linalg.svd(A_GM, compute_uv=False)
    assert sigma[0] / sigma[-1] < 2.5 and not np.allclose(A_GM, A_GM.T)
    tol = 1e-10 * np.linalg.norm(B_GM)
    x, res, count = _fpx_gmres(A_GM, B_GM, tol, restart=5, max_restarts=50)
    x_ref, res_ref, count_ref, history = _numpy_gmres(A_GM, B_GM, tol, 5, 50)
    # Three full cycles of 5 and 4 steps of the fourth: restarts happened.
    assert count == count_ref == 19 > 5
    assert history[-2] > 1.05 * tol  # (the count is not decided by rounding)
    assert res <= tol
    true_res = np.linalg.norm(B_GM - A_GM @ x)
    _close(res, true_res, rel=1e-5, abs_=0.0)  # the restart residual carried over, not recomputed
    _close(res, res_ref, rel=1e-6, abs_=0.0)
    # |x - x*| = |A^{-1} (A x - b)| <= |A^{-1}| |b - A x|
    x_star = np.linalg.solve(A_GM, B_GM)
    assert np.linalg.norm(x - x_star) <= true_res / sigma[-1] * (1 + 1e-6)
    _close(x, x_ref, rel=0.0, abs_=1e-13)


@pytest.mark.parametrize("cycles", [1, 2, 3])
def test_gmres_cycle_by_cycle_matches_numpy(cycles):
    # With tol = 0 every cycle runs its 5 steps; after each restart the residual is the one the
    # textbook algorithm reaches, so the restart (r = V (beta e1 - H y), no extra matvec) is right.
    x, res, count = _fpx_gmres(A_GM, B_GM, 0.0, restart=5, max_restarts=cycles)
    x_ref, res_ref, count_ref, _ = _numpy_gmres(A_GM, B_GM, 0.0, 5, cycles)
    assert count == count_ref == 5 * cycles
    _close(res, res_ref, rel=1e-8, abs_=0.0)
    _close(res, np.linalg.norm(B_GM - A_GM @ x), rel=1e-6, abs_=0.0)
    _close(x, x_ref, rel=0.0, abs_=1e-13)


def test_gmres_out_of_budget_reports_the_residual_it_reached():
    # Two cycles of 5 cannot reach 1e-10 |b| (19 matvecs are needed, above): the reported
    # residual is the true one, far above tol.
    tol = 1e-10 * np.linalg.norm(B_GM)
    x, res, count = _fpx_gmres(A_GM, B_GM, tol, restart=5, max_restarts=2)
    _, res_ref, _, _ = _numpy_gmres(A_GM, B_GM, tol, 5, 2)
    assert count == 10
    assert res > 1e4 * tol
    _close(res, np.linalg.norm(B_GM - A_GM @ x), rel=1e-8, abs_=0.0)
    _close(res, res_ref, rel=1e-8, abs_=0.0)


def test_gmres_stagnates_exactly_on_the_cyclic_shift():
    # A = P, b = e1: A K_m(A, e1) = span(e2, ..., e_{m+1}) is orthogonal to e1 for m < n, so
    # every GMRES(m) cycle returns x = 0 with residual exactly |e1| = 1: the budget is spent
    # and the failure is reported as it is.
    e1 = np.eye(N_GM)[0]
    x, res, count = _fpx_gmres(SHIFT_GM, e1, 1e-8, restart=5, max_restarts=3)
    assert count == 15
    assert res == 1.0
    np.testing.assert_array_equal(x, np.zeros(N_GM))


@pytest.mark.parametrize(("c", "m"), [(0.5, 1), (0.5, 2), (0.5, 5), (0.9, 5)])
def test_gmres_one_cycle_on_identity_minus_shift_is_exact(c, m):
    # (I - c P) x = e1 over x in K_m = span(e1..e_m): the least-squares residual is
    # min |y| subject to a.y = c^m, a = (c^m, -c^(m-1), ..., -c, 1), i.e.
    # rho_m = (sum_{j<=m} c^(-2j))^(-1/2).
    e1 = np.eye(N_GM)[0]
    x, res, count = _fpx_gmres(np.eye(N_GM) - c * SHIFT_GM, e1, 0.0, restart=m, max_restarts=1)
    rho = 1.0 / math.sqrt(sum(c ** (-2 * j) for j in range(m + 1)))
    assert count == m
    _close(res, rho, rel=1e-13, abs_=0.0)
    assert np.all(x[m:] == 0.0)  # x lies in the Krylov space


# ----------------------------------------------------------------------------------------
# NewtonKrylov with a small GMRES restart
# ----------------------------------------------------------------------------------------

C_SHIFT = 0.5
M_SHIFT = C_SHIFT * SHIFT_GM  # T z = c P z + e1 on R^50: I - T' = I - c P
Z_SHIFT = np.linalg.solve(np.eye(N_GM) - M_SHIFT, np.eye(N_GM)[0])


def _shift_map(z, _):
    return jnp.asarray(M_SHIFT) @ z + jnp.asarray(np.eye(N_GM)[0])


def test_newton_krylov_restarts_inside_one_newton_step():
    # Linear T, z0 = 0: F(z0) = -e1 and the first Newton system is (I - cP) d = e1, solved by
    # GMRES(5) to eta_max |F| = 1e-11. That takes 37 matvecs (7 full cycles, then 2 steps),
    # exactly as in the textbook GMRES(5); the step is then exact to 1e-11: one Newton step.
    solver = fpx.NewtonKrylov(rtol=0.0, atol=1e-10, eta_max=1e-11, restart=5, max_restarts=50)
    sol = fpx.fixed_point(_shift_map, jnp.zeros(N_GM), solver=solver, max_steps=20, throw=False, trace_length=3)
    _, res_ref, count_ref, history = _numpy_gmres(np.eye(N_GM) - M_SHIFT, np.eye(N_GM)[0], 1e-11, 5, 50)
    assert count_ref == 37 and history[-2] > 1.2e-11
    assert _converged(sol)
    assert int(sol.stats["num_steps"]) == 1
    assert int(sol.stats["num_jvps"]) == 37 > solver.restart
    assert int(sol.stats["num_fn_evals"]) == 3
    assert int(sol.stats["num_backtracks"]) == 0
    # On a linear map |F(z1)| is the GMRES residual.
    _close(_trace(sol)[1], res_ref, rel=1e-4, abs_=0.0)
    # |z - z*| <= |(I - cP)^{-1}| |F| <= |F| / (1 - c)
    assert np.max(np.abs(np.asarray(sol.value) - Z_SHIFT)) <= float(sol.stats["residual_norm"]) / (1 - C_SHIFT)


def test_newton_krylov_one_gmres_cycle_per_step_is_restarted_gmres():
    # With max_restarts=1 and a tight forcing term every Newton step is one GMRES(5) cycle from
    # the current residual: on a linear map the Newton iterates are the restarted GMRES(5)
    # iterates, and the first residual is rho_5 = (sum_{j<=5} 4^j)^(-1/2) = 1/sqrt(1365).
    solver = fpx.NewtonKrylov(rtol=0.0, atol=1e-10, eta_max=1e-11, restart=5, max_restarts=1)
    sol = fpx.fixed_point(_shift_map, jnp.zeros(N_GM), solver=solver, max_steps=20, throw=False, trace_length=21)
    assert _converged(sol)
    steps = int(sol.stats["num_steps"])
    assert steps == 7
    assert int(sol.stats["num_jvps"]) == 5 * steps
    assert int(sol.stats["num_backtracks"]) == 0
    tr = _trace(sol)
    _close(tr[1], 1.0 / math.sqrt(1365.0), rel=1e-13, abs_=0.0)
    cycles = []
    for k in range(1, steps + 1):
        _, res_k, _, _ = _numpy_gmres(np.eye(N_GM) - M_SHIFT, np.eye(N_GM)[0], 0.0, 5, k)
        cycles.append(res_k)
    _close(tr[1 : steps + 1], np.array(cycles), rel=1e-5, abs_=1e-15)
    assert np.max(np.abs(np.asarray(sol.value) - Z_SHIFT)) <= float(sol.stats["residual_norm"]) / (1 - C_SHIFT)


def test_newton_krylov_with_restart_2_on_contractive_tanh():
    # 20 unknowns, GMRES(2): the inner solves must restart to meet the forcing term, and the
    # solve still ends at the NumPy Newton reference.
    solver = fpx.NewtonKrylov(rtol=0.0, atol=1e-10, restart=2, max_restarts=50)
    sol = fpx.fixed_point(contractive, jnp.zeros(N_NL), solver=solver, max_steps=50, throw=False)
    assert _converged(sol)
    steps, jvps = int(sol.stats["num_steps"]), int(sol.stats["num_jvps"])
    assert steps <= 10
    assert jvps > solver.restart * steps  # some inner solve used more than one cycle
    assert jvps <= solver.restart * solver.max_restarts * steps
    residual = float(sol.stats["residual_norm"])
    assert residual <= 1e-10
    assert np.linalg.norm(np.asarray(sol.value) - REF_CONTRACTIVE) <= 10.0 * residual + 1e-13
    # A budget of one cycle of 2 per step: every step spends at most 2 matvecs, and the
    # iteration still converges (now linearly, in more steps).
    tight = fpx.NewtonKrylov(rtol=0.0, atol=1e-10, restart=2, max_restarts=1)
    sol1 = fpx.fixed_point(contractive, jnp.zeros(N_NL), solver=tight, max_steps=200, throw=False)
    assert _converged(sol1)
    assert int(sol1.stats["num_jvps"]) <= 2 * int(sol1.stats["num_steps"])
    assert int(sol1.stats["num_steps"]) > steps
    assert np.linalg.norm(np.asarray(sol1.value) - REF_CONTRACTIVE) <= 10.0 * float(sol1.stats["residual_norm"]) + 1e-13


# ----------------------------------------------------------------------------------------
# Constructors and argument validation
# ----------------------------------------------------------------------------------------


def test_constructor_defaults():
    for cls in SOLVER_CLASSES:
        solver = cls()
        assert solver.rtol == 1e-5
        assert solver.atol == 1e-6
        assert solver.norm is fpx.two_norm
    assert fpx.KM().alpha == 0.5
    assert fpx.Halpern().contraction is None
    anderson = fpx.Anderson()
    assert (anderson.memory, anderson.beta, anderson.regularization, anderson.safeguard) == (5, 1.0, None, 1.0)
    broyden = fpx.Broyden()
    assert (broyden.memory, broyden.beta, broyden.safeguard) == (10, 1.0, 2.0)
    assert fpx.NewtonKrylov().eta_max == 0.9


def test_first_positional_argument():
    assert fpx.KM(0.5).alpha == 0.5
    assert fpx.KM(1.0).alpha == 1.0
    assert fpx.Halpern(0.3).contraction == 0.3
    assert fpx.Anderson(3).memory == 3
    assert fpx.Broyden(7).memory == 7


@pytest.mark.parametrize("cls", SOLVER_CLASSES, ids=lambda c: c.__name__)
def test_default_solvers_work(cls):
    if cls is fpx.Halpern:
        # Plain Halpern is O(1/k) on a contraction (see T1); its home is the nonexpansive T2.
        sol = fpx.fixed_point(rot90, Z0_ROT, solver=cls())
        assert int(sol.stats["num_steps"]) == 3
        return
    sol = fpx.fixed_point(contractive, jnp.zeros(N_NL), solver=cls())  # throw=True: raises on failure
    assert _converged(sol)
    residual = float(sol.stats["residual_norm"])
    assert residual <= 1e-6 + 1e-5 * np.linalg.norm(np.asarray(sol.value))
    assert np.linalg.norm(np.asarray(sol.value) - REF_CONTRACTIVE) <= 10.0 * residual + 1e-12


@pytest.mark.parametrize("alpha", [0, 0.0, -1, 1.5, float("nan")])
def test_km_rejects_alpha_outside_unit_interval(alpha):
    with pytest.raises(ValueError, match=r"KM\(alpha=\.\.\.\)` must lie in \(0, 1\]"):
        fpx.KM(alpha)


@pytest.mark.parametrize("field", ["rtol", "atol"])
@pytest.mark.parametrize("value", [-1e-3, -1, float("nan")])
@pytest.mark.parametrize("cls", SOLVER_CLASSES, ids=lambda c: c.__name__)
def test_negative_tolerances_are_rejected(cls, field, value):
    with pytest.raises(ValueError, match=rf"`{field}` must be a non-negative number"):
        cls(**{field: value})


@pytest.mark.parametrize("cls", SOLVER_CLASSES, ids=lambda c: c.__name__)
def test_zero_tolerances_are_allowed(cls):
    solver = cls(rtol=0.0, atol=0.0)
    assert (solver.rtol, solver.atol) == (0.0, 0.0)


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda: fpx.Anderson(memory=0), r"Anderson\(memory=\.\.\.\)` must be a positive integer"),
        (lambda: fpx.Anderson(memory=-2), r"Anderson\(memory=\.\.\.\)` must be a positive integer"),
        (lambda: fpx.Anderson(memory=2.5), r"Anderson\(memory=\.\.\.\)` must be a positive integer"),
        (lambda: fpx.Broyden(memory=0), r"Broyden\(memory=\.\.\.\)` must be a positive integer"),
        (lambda: fpx.Anderson(safeguard=0.5), r"Anderson\(safeguard=\.\.\.\)`.*>= 1 or None"),
        (lambda: fpx.Anderson(safeguard=0.0), r"Anderson\(safeguard=\.\.\.\)`.*>= 1 or None"),
        (lambda: fpx.Broyden(safeguard=0.99), r"Broyden\(safeguard=\.\.\.\)`.*>= 1 or None"),
        (lambda: fpx.Anderson(beta=0.0), r"Anderson\(beta=\.\.\.\)` must lie in \(0, 1\]"),
        (lambda: fpx.Broyden(beta=1.5), r"Broyden\(beta=\.\.\.\)` must lie in \(0, 1\]"),
        (lambda: fpx.Halpern(contraction=1.5), r"Halpern\(contraction=\.\.\.\)`.*must lie in \[0, 1\]"),
        (lambda: fpx.Halpern(contraction=-0.1), r"Halpern\(contraction=\.\.\.\)`.*must lie in \[0, 1\]"),
        (lambda: fpx.NewtonKrylov(eta_max=1.0), r"NewtonKrylov\(eta_max=\.\.\.\)` must lie in \(0, 1\)"),
        (lambda: fpx.NewtonKrylov(eta_max=1.5), r"NewtonKrylov\(eta_max=\.\.\.\)` must lie in \(0, 1\)"),
        (lambda: fpx.NewtonKrylov(eta_max=0.0), r"NewtonKrylov\(eta_max=\.\.\.\)` must lie in \(0, 1\)"),
        (lambda: fpx.NewtonKrylov(restart=0), r"NewtonKrylov\(restart=\.\.\.\)` must be a positive integer"),
    ],
)
def test_bad_solver_arguments(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


def test_boundary_arguments_are_accepted():
    fpx.KM(1.0)
    fpx.Halpern(contraction=0.0)
    fpx.Halpern(contraction=1.0)
    fpx.Anderson(memory=1, safeguard=1.0)
    fpx.Anderson(safeguard=None)
    fpx.Broyden(memory=1, safeguard=None)
    fpx.NewtonKrylov(eta_max=0.5)


# ----------------------------------------------------------------------------------------
# float32: a DEQ-like cell tanh(W z + x), |W|_2 = 0.9
# ----------------------------------------------------------------------------------------

N32 = 16
_W32 = np.random.default_rng(11).standard_normal((N32, N32))
W32 = 0.9 * _W32 / np.linalg.norm(_W32, 2)
X32 = np.random.default_rng(12).standard_normal(N32)
REF32 = _newton_reference(
    lambda z: np.tanh(W32 @ z + X32),
    lambda z: (1.0 - np.tanh(W32 @ z + X32) ** 2)[:, None] * W32,
    N32,
)


def deq_cell(z, x):
    return jnp.tanh(jnp.asarray(W32, jnp.float32) @ z + x)


@pytest.mark.parametrize(
    "solver",
    [
        fpx.Picard(rtol=1e-4),
        fpx.KM(0.5, rtol=1e-4),
        fpx.Halpern(rtol=1e-4),
        fpx.Halpern(contraction=0.9, rtol=1e-4),
        fpx.Anderson(rtol=1e-4),
        fpx.Broyden(rtol=1e-4),
        fpx.NewtonKrylov(rtol=1e-4),
    ],
    ids=["picard", "km", "halpern", "oc_halpern", "anderson", "broyden", "newton_krylov"],
)
def test_float32_deq_cell(solver):
    x = jnp.asarray(X32, jnp.float32)
    sol = fpx.fixed_point(
        deq_cell,
        jnp.zeros(N32, jnp.float32),
        x,
        solver=solver,
        max_steps=20_000 if isinstance(solver, fpx.Halpern) and solver.contraction is None else 256,
        throw=False,
    )
    assert _converged(sol)
    assert sol.value.dtype == jnp.float32
    assert sol.stats["residual_norm"].dtype == jnp.float32
    residual = float(sol.stats["residual_norm"])
    value = np.asarray(sol.value, np.float64)
    assert residual <= 1e-6 + 1e-4 * np.linalg.norm(value) * (1 + 1e-5)
    # 0.9-contraction: |z - z*| <= |z - T z| / 0.1, plus float32 rounding of T
    assert np.linalg.norm(value - REF32) <= 10.0 * residual + 1e-5
