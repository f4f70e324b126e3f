"""SQUAREM (Varadhan & Roland 2008): known answers, the EM problem it is built for, truth rules."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fpx

R = fpx.RESULTS

# T1 of tests/test_solvers.py: z* = (4, 4); from 0 the error stays along the eigenvector
# (1, 1) of A, eigenvalue 0.75.
A1 = jnp.array([[0.5, 0.25], [0.25, 0.5]])


def t1(z, _):
    return A1 @ z + 1.0


def test_linear_contraction_is_exact_after_two_cycles():
    # Cycle 1 is clipped to s = step_max = 1 (three Picard steps) and grows step_max to 4;
    # on T z = lam z + b all three schemes give s = 1/(1 - lam) = 4, and the squared
    # extrapolation (1 + s (lam - 1))^2 e = 0 is exact.
    for scheme in (1, 2, 3):
        sol = fpx.fixed_point(t1, jnp.zeros(2), solver=fpx.SQUAREM(scheme=scheme, rtol=0.0, atol=1e-12))
        assert int(sol.stats["num_steps"]) == 2
        assert int(sol.stats["num_fn_evals"]) == 7  # 1 + 3 per cycle
        assert int(sol.stats["num_rejected"]) == 0
        np.testing.assert_allclose(sol.value, [4.0, 4.0], rtol=0, atol=1e-13)


def test_slow_anisotropic_contraction_beats_picard_in_evaluations():
    # Eigenvalues 0.99 and 0.9: two rates, so no single step length is exact.
    a = jnp.diag(jnp.array([0.99, 0.9]))
    fn = lambda z, _: a @ z + jnp.array([0.01, 0.1])  # z* = (1, 1)
    tol = fpx.SQUAREM(rtol=0.0, atol=1e-10)
    sol = fpx.fixed_point(fn, jnp.zeros(2), solver=tol, max_steps=500)
    picard = fpx.fixed_point(fn, jnp.zeros(2), solver=fpx.Picard(rtol=0.0, atol=1e-10), max_steps=5000)
    np.testing.assert_allclose(sol.value, [1.0, 1.0], atol=1e-7)
    # residual |(0.01 * 0.99^k, 0.1 * 0.9^k)|: first k with 0.01 * 0.99^k <= 1e-10 is 1833
    assert int(picard.stats["num_fn_evals"]) == 1834
    assert int(sol.stats["num_fn_evals"]) <= 100


# ----------------------------------------------------------------------------------------
# Poisson mixture EM (Hasselblad 1969 death notices; Varadhan & Roland 2008, §7; the R
# package's `poissmix` example): counts 0..9 with these frequencies, a 2-component Poisson
# mixture with parameters (p, lambda1, lambda2).
# ----------------------------------------------------------------------------------------

FREQ = np.array([162, 267, 271, 185, 111, 61, 27, 8, 3, 1], float)
COUNTS = np.arange(10.0)
P0 = np.array([0.3, 1.0, 2.5])


def poissmix_em(p, _):
    freq, i = jnp.asarray(FREQ, p.dtype), jnp.asarray(COUNTS, p.dtype)
    a = p[0] * jnp.exp(-p[1]) * p[1] ** i
    b = (1 - p[0]) * jnp.exp(-p[2]) * p[2] ** i
    w = a / (a + b)  # E step: posterior weight of component 1
    return jnp.stack(
        [jnp.sum(freq * w) / jnp.sum(freq), jnp.sum(freq * i * w) / jnp.sum(freq * w),
         jnp.sum(freq * i * (1 - w)) / jnp.sum(freq * (1 - w))]
    )


def _loglik(p):
    a = p[0] * np.exp(-p[1]) * p[1] ** COUNTS
    b = (1 - p[0]) * np.exp(-p[2]) * p[2] ** COUNTS
    return float(np.sum(FREQ * np.log(a + b)))


@pytest.fixture(scope="module")
def em_reference():
    # Plain EM (Picard on the EM map) to 1e-13: about 5200 evaluations.
    sol = fpx.fixed_point(poissmix_em, jnp.asarray(P0), solver=fpx.Picard(rtol=0.0, atol=1e-13), max_steps=20_000)
    return np.asarray(sol.value), int(sol.stats["num_fn_evals"])


def test_poisson_mixture_reference_is_the_mle(em_reference):
    mle, evals = em_reference
    np.testing.assert_allclose(mle, [0.3599, 1.256, 2.663], atol=1e-3)
    assert evals > 5000
    # A stationary point of the likelihood: no nearby point is better.
    rng = np.random.default_rng(0)
    assert all(_loglik(mle + 1e-4 * rng.standard_normal(3)) < _loglik(mle) for _ in range(20))


@pytest.mark.parametrize("scheme, max_evals", [(1, 150), (2, 100), (3, 100)])
def test_squarem_reaches_the_mle_in_far_fewer_evaluations(em_reference, scheme, max_evals):
    mle, em_evals = em_reference
    sol = fpx.fixed_point(poissmix_em, jnp.asarray(P0), solver=fpx.SQUAREM(scheme=scheme, rtol=0.0, atol=1e-12))
    np.testing.assert_allclose(sol.value, mle, atol=1e-9)
    evals = int(sol.stats["num_fn_evals"])
    assert evals == 1 + 3 * int(sol.stats["num_steps"])
    # Measured: 136 (SqS1), 85 (SqS2), 82 (SqS3) against about 5200 for EM.
    assert evals <= max_evals and evals * 30 < em_evals


def test_monotone_residual_safeguard_rejects_and_still_converges(em_reference):
    # kr = 0 rejects every extrapolation that raises the residual: on EM that is most of
    # them (SQUAREM's long steps raise it before the next cuts it), so it is slower.
    sol = fpx.fixed_point(
        poissmix_em, jnp.asarray(P0), solver=fpx.SQUAREM(kr=0.0, rtol=0.0, atol=1e-10), max_steps=2000
    )
    np.testing.assert_allclose(sol.value, em_reference[0], atol=1e-6)
    assert int(sol.stats["num_rejected"]) > 10


def test_float32_defaults_on_the_poisson_mixture(em_reference):
    sol = fpx.fixed_point(poissmix_em, jnp.asarray(P0, jnp.float32), solver=fpx.SQUAREM())
    assert sol.value.dtype == jnp.float32 and sol.converged
    assert int(sol.stats["num_fn_evals"]) < 100  # measured: 43
    # EM converges at rate ~0.994 here, so |z - z*| ~ |z - T z| / 0.006: the default stop
    # at |z - T z| <= 1e-6 + 1e-5 |z| (3e-5) leaves an error of about 5e-3, as for any solver.
    error = np.max(np.abs(np.asarray(sol.value) - em_reference[0]))
    assert error <= 300 * float(sol.stats["residual_norm"]) and error < 1e-2
    tight = fpx.fixed_point(poissmix_em, jnp.asarray(P0, jnp.float32), solver=fpx.SQUAREM(rtol=1e-6, atol=0.0))
    np.testing.assert_allclose(tight.value, em_reference[0], atol=1e-3)


# ----------------------------------------------------------------------------------------
# Truth of results, jit and vmap, derivatives
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_expansive_map_is_diverged(dtype):
    sol = fpx.fixed_point(lambda z, _: 1.5 * z + 1.0, jnp.zeros(2, dtype), solver=fpx.SQUAREM(), throw=False)
    assert sol.result == R.diverged and not sol.converged
    assert int(sol.stats["num_steps"]) < 20
    with pytest.raises(Exception, match="diverged"):
        jax.block_until_ready(fpx.fixed_point(lambda z, _: 1.5 * z + 1.0, jnp.zeros(2, dtype), solver=fpx.SQUAREM()).value)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("rtol", [1e-5, 1e-3])
def test_translation_without_fixed_point_is_not_successful(dtype, rtol):
    # v = 0 on a translation: no curvature, so no extrapolation (s = 1) and the iterate
    # drifts by 3 per cycle; it must not leap to where z + 1 rounds to z.
    sol = fpx.fixed_point(lambda z, _: z + 1.0, jnp.zeros(2, dtype), solver=fpx.SQUAREM(rtol=rtol), max_steps=1000, throw=False)
    assert not sol.converged
    assert sol.result == R.diverged


def test_jit_vmap_mixed_members():
    def solve(c):
        fn = lambda z, c: c * jnp.tanh(z) + 1.0  # contractive for |c| < 1
        return fpx.fixed_point(fn, jnp.zeros(3), c, solver=fpx.SQUAREM(rtol=0.0, atol=1e-10), max_steps=200, throw=False)

    sol = jax.jit(jax.vmap(solve))(jnp.array([0.5, 3.0, 0.9, -0.95]))
    results = [int(r) for r in np.asarray(sol.result._value)]
    ok = int(R.successful._value)
    assert results[0] == ok and results[2] == ok and results[3] == ok
    # c = 3: z -> 3 tanh z + 1 has an attracting fixed point near 4: it converges too.
    assert results[1] == ok
    for c, z in zip([0.5, 3.0, 0.9, -0.95], np.asarray(sol.value)):
        np.testing.assert_allclose(z, c * np.tanh(z) + 1.0, atol=1e-9)
    steps = np.asarray(sol.stats["num_steps"])
    assert len(set(steps.tolist())) > 1  # each member stops on its own test
    np.testing.assert_array_equal(np.asarray(sol.stats["num_fn_evals"]), 1 + 3 * steps)


def test_vmap_divergent_member_does_not_spoil_the_batch():
    fn = lambda z, c: c * z + 1.0
    sol = jax.jit(jax.vmap(lambda c: fpx.fixed_point(fn, jnp.zeros(2), c, solver=fpx.SQUAREM(), throw=False)))(
        jnp.array([0.5, 1.5, 0.99])
    )
    assert [bool(x) for x in np.asarray(sol.result == R.successful)] == [True, False, True]
    assert int(sol.result._value[1]) == int(R.diverged._value)
    np.testing.assert_allclose(np.asarray(sol.value)[[0, 2]], [[2.0, 2.0], [100.0, 100.0]], rtol=1e-3)


def test_gradient_via_implicit_adjoint_matches_finite_differences():
    w = jnp.asarray(np.random.default_rng(1).standard_normal((4, 4)) * 0.3)

    def z_star(theta):
        fn = lambda z, th: jnp.tanh(w @ z + th)
        return fpx.fixed_point(fn, jnp.zeros(4), theta, solver=fpx.SQUAREM(rtol=1e-12, atol=1e-12), max_steps=500).value

    loss = lambda th: jnp.sum(z_star(th) ** 2)
    theta = jnp.array([0.3, -0.2, 0.5, 0.1])
    grad = np.asarray(jax.grad(loss)(theta))
    eps = 1e-6
    fd = [(loss(theta + eps * e) - loss(theta - eps * e)) / (2 * eps) for e in np.eye(4)]
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)
    # forward mode agrees with reverse mode
    tangent = jax.jvp(loss, (theta,), (jnp.ones(4),))[1]
    np.testing.assert_allclose(float(tangent), grad.sum(), rtol=1e-8)


def test_arguments_are_validated():
    cases = [
        ({"scheme": 4}, r"scheme=\.\.\.\)` must be 1, 2 or 3"),
        ({"scheme": True}, r"must be 1, 2 or 3"),
        ({"step_min": 0.5}, r"step_min=\.\.\.\)` must be a number >= 1"),
        ({"step_max": math.nan}, r"step_max"),
        ({"step_min": 4.0, "step_max": 2.0}, r"step_max=\.\.\.\)` must be >= step_min=4.0"),
        ({"mstep": 1.0}, r"mstep=\.\.\.\)` must be a number > 1"),
        ({"kr": -1.0}, r"kr=\.\.\.\)` must be a non-negative number"),
        ({"rtol": -1.0}, r"rtol"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises((ValueError, TypeError), match=pattern):
            fpx.SQUAREM(**kwargs)
    fpx.SQUAREM(kr=math.inf, step_max=16.0, mstep=2.0)
    with pytest.raises(ValueError, match="detect_infeasible needs a solver"):
        fpx.fixed_point(t1, jnp.zeros(2), solver=fpx.SQUAREM(), detect_infeasible=True)


def test_pytree_iterates():
    fn = lambda z, _: {"a": 0.5 * z["a"] + 1.0, "b": 0.9 * z["b"] + jnp.sum(z["a"])}  # a* = 2, b* = 40
    sol = fpx.fixed_point(fn, {"a": jnp.zeros(2), "b": jnp.zeros(())}, solver=fpx.SQUAREM(rtol=0.0, atol=1e-10))
    np.testing.assert_allclose(sol.value["a"], [2.0, 2.0], atol=1e-9)
    np.testing.assert_allclose(sol.value["b"], 40.0, atol=1e-8)
