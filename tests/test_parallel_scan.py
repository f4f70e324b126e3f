"""`fpx.parallel.scan`: exactness against `lax.scan`, the prefix property, divergence, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fpx
from fpx.parallel._scan import affine_scan, damped_newton_step

METHODS = ["jacobi", "gauss_seidel", "hybrid", "deer", "quasi_deer", "elk", "quasi_elk"]


def sequential(f, h0, xs, reverse=False):
    _, ys = jax.lax.scan(lambda h, x: (f(h, x), f(h, x)), h0, xs, reverse=reverse)
    return ys


def tanh_rnn(D, scale, seed=0, dtype=jnp.float64):
    W = scale * jax.random.normal(jax.random.key(seed), (D, D), dtype) / jnp.sqrt(D)
    return W, (lambda h, x: jnp.tanh(W @ h + x))


def gru(D, seed=0, dtype=jnp.float64):
    keys = jax.random.split(jax.random.key(seed), 6)
    Wz, Wr, Wh = (jax.random.normal(k, (D, D), dtype) / jnp.sqrt(D) for k in keys[:3])
    Uz, Ur, Uh = (jax.random.normal(k, (D, D), dtype) / jnp.sqrt(D) for k in keys[3:])

    def cell(h, x):
        z = jax.nn.sigmoid(Wz @ x + Uz @ h)
        r = jax.nn.sigmoid(Wr @ x + Ur @ h)
        candidate = jnp.tanh(Wh @ x + Uh @ (r * h))
        return (1 - z) * h + z * candidate

    return cell


def method_kwargs(method):
    return {"block_size": 8} if method == "hybrid" else {}


def test_linear_recurrence_known_answer():
    # h_t = a h_{t-1} + 1 from h_0 = 0: h_t = (1 - a^t) / (1 - a).
    a, T = 0.9, 64
    exact = (1 - a ** jnp.arange(1, T + 1)) / (1 - a)
    for method in METHODS:
        sol = fpx.parallel.scan(lambda h, x: a * h + x, jnp.zeros(()), jnp.ones(T), method=method, **method_kwargs(method))
        assert sol.converged, method
        np.testing.assert_allclose(sol.value, exact, rtol=1e-12, err_msg=method)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_equals_lax_scan_float64(method):
    _, cell = tanh_rnn(4, 0.8)
    xs = jax.random.normal(jax.random.key(1), (120, 4))
    sol = fpx.parallel.scan(cell, jnp.zeros(4), xs, method=method, **method_kwargs(method))
    assert sol.converged
    assert float(jnp.max(jnp.abs(sol.value - sequential(cell, jnp.zeros(4), xs)))) < 1e-10


def test_deer_on_a_gru_float64_and_float32():
    T, D = 2000, 8
    cell = gru(D)
    xs = jax.random.normal(jax.random.key(2), (T, D))
    sol = fpx.parallel.scan(cell, jnp.zeros(D), xs)
    assert sol.converged and int(sol.stats["num_steps"]) <= 10
    assert float(jnp.max(jnp.abs(sol.value - sequential(cell, jnp.zeros(D), xs)))) <= 1e-10
    cell32 = gru(D, dtype=jnp.float32)
    xs32 = xs.astype(jnp.float32)
    sol32 = fpx.parallel.scan(cell32, jnp.zeros(D, jnp.float32), xs32)
    assert sol32.converged and sol32.value.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(sol32.value - sequential(cell32, jnp.zeros(D, jnp.float32), xs32)))) <= 1e-5


def test_prefix_property_bounds_the_iterations():
    # h_t = h_{t-1} + 1 from a zero guess: Jacobi fixes exactly one more state per
    # iteration, so it needs all T; max_steps beyond T is capped at T.
    T = 40
    step = lambda h, x: h + x
    sol = fpx.parallel.scan(step, jnp.zeros(()), jnp.ones(T), method="jacobi", max_steps=10_000)
    assert sol.converged and int(sol.stats["num_steps"]) == T
    np.testing.assert_array_equal(sol.value, jnp.arange(1.0, T + 1))
    hybrid = fpx.parallel.scan(step, jnp.zeros(()), jnp.ones(T), method="hybrid", block_size=8)
    assert hybrid.converged and int(hybrid.stats["num_steps"]) <= T // 8
    gs = fpx.parallel.scan(step, jnp.zeros(()), jnp.ones(T), method="gauss_seidel")
    assert gs.converged and int(gs.stats["num_steps"]) == 1
    # A budget below T on the shift is honestly not enough.
    short = fpx.parallel.scan(step, jnp.zeros(()), jnp.ones(T), method="jacobi", max_steps=T - 1, throw=False)
    assert short.result == fpx.RESULTS.max_steps_reached


def unstable_problem():
    # A large-weight tanh RNN driven hard: stable along its trajectory, but Newton's
    # first step from the constant guess multiplies Jacobians with spectral radius ~2.
    W, cell = tanh_rnn(8, 2.0, dtype=jnp.float32)
    xs = jax.random.normal(jax.random.key(1), (600, 8), jnp.float32)
    return cell, xs


def test_deer_divergence_is_reported_and_elk_converges():
    cell, xs = unstable_problem()
    h0 = jnp.zeros(8, jnp.float32)
    deer = fpx.parallel.scan(cell, h0, xs, method="deer", throw=False)
    assert deer.result in (fpx.RESULTS.diverged, fpx.RESULTS.nonfinite)
    assert bool(jnp.all(jnp.isfinite(deer.value)))  # the best iterate, never the overflowed one
    with pytest.raises(Exception, match=r"fpx.parallel.scan\(method='deer'\)"):
        jax.block_until_ready(fpx.parallel.scan(cell, h0, xs, method="deer").value)
    elk = fpx.parallel.scan(cell, h0, xs, method="elk")
    assert elk.converged
    assert float(jnp.max(jnp.abs(elk.value - sequential(cell, h0, xs)))) < 1e-4


def test_no_method_claims_success_on_a_diverging_guess_under_vmap():
    cell, xs = unstable_problem()
    stable = 3.0 + xs  # saturated: strongly contracting, Newton converges
    sols = jax.vmap(lambda x: fpx.parallel.scan(cell, jnp.zeros(8, jnp.float32), x, method="deer", throw=False))(
        jnp.stack([stable, xs])
    )
    succeeded = sols.result == fpx.RESULTS.successful
    assert bool(succeeded[0]) and not bool(succeeded[1])
    assert sols.stats["num_steps"].shape == (2,)


def test_damped_step_solves_the_levenberg_marquardt_system():
    T, D, lam = 6, 3, 0.7
    A = jax.random.normal(jax.random.key(0), (T, D, D))
    r = jax.random.normal(jax.random.key(1), (T, D))
    # The normal equations of sum_t |d_t - A_t d_{t-1} - r_t|^2 + lam |d|^2, d_0 = 0.
    M = jnp.eye(T * D)
    for t in range(1, T):
        M = M.at[t * D : (t + 1) * D, (t - 1) * D : t * D].set(-A[t])
    exact = jnp.linalg.solve(M.T @ M + lam * jnp.eye(T * D), M.T @ r.reshape(-1)).reshape(T, D)
    np.testing.assert_allclose(damped_newton_step(A, r, lam), exact, rtol=1e-10, atol=1e-12)
    diag = jnp.einsum("tii->ti", A)
    Md = jnp.eye(T * D)
    for t in range(1, T):
        Md = Md.at[t * D : (t + 1) * D, (t - 1) * D : t * D].set(-jnp.diag(diag[t]))
    exact_d = jnp.linalg.solve(Md.T @ Md + lam * jnp.eye(T * D), Md.T @ r.reshape(-1)).reshape(T, D)
    np.testing.assert_allclose(damped_newton_step(diag, r, lam, diagonal=True), exact_d, rtol=1e-10, atol=1e-12)
    # No damping: the Newton (DEER) step, the linear recurrence itself.
    np.testing.assert_allclose(damped_newton_step(A, r, 1e-14), affine_scan(A, r), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("method,gradient", [("deer", "associative"), ("deer", "sequential"), ("quasi_deer", None), ("jacobi", None)])
def test_gradients_equal_lax_scan_autodiff(method, gradient):
    D, T = 3, 50
    W0 = 0.7 * jax.random.normal(jax.random.key(0), (D, D)) / jnp.sqrt(D)
    xs = jax.random.normal(jax.random.key(1), (T, D))
    h0 = 0.1 * jnp.ones(D)

    def loss(W, xs, h0, parallel):
        cell = lambda h, x: jnp.tanh(W @ h + x)
        ys = fpx.parallel.scan(cell, h0, xs, method=method, gradient=gradient).value if parallel else sequential(cell, h0, xs)
        return jnp.sum(jnp.sin(ys) * jnp.arange(T)[:, None])

    got = jax.grad(loss, argnums=(0, 1, 2))(W0, xs, h0, True)
    want = jax.grad(loss, argnums=(0, 1, 2))(W0, xs, h0, False)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-11)
    tangents = (jnp.ones_like(W0), jnp.ones_like(xs), jnp.ones_like(h0))
    t_got = jax.jvp(lambda *a: loss(*a, True), (W0, xs, h0), tangents)[1]
    t_want = jax.jvp(lambda *a: loss(*a, False), (W0, xs, h0), tangents)[1]
    np.testing.assert_allclose(t_got, t_want, rtol=1e-9)
    # And against central finite differences.
    eps = 1e-6
    fd = (loss(W0 + eps * tangents[0], xs, h0, True) - loss(W0 - eps * tangents[0], xs, h0, True)) / (2 * eps)
    np.testing.assert_allclose(jnp.sum(got[0]), fd, rtol=1e-6)


def test_pytree_state_reverse_and_autonomous():
    def step(h, x):
        a, b = h
        return (0.5 * a + x, jnp.tanh(b + a[0]))

    h0 = (jnp.zeros(2), jnp.zeros(()))
    xs = jax.random.normal(jax.random.key(0), (30, 2))
    for reverse in (False, True):
        sol = fpx.parallel.scan(step, h0, xs, reverse=reverse)
        want = sequential(step, h0, xs, reverse=reverse)
        for got, ref in zip(sol.value, want):
            np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    sol = fpx.parallel.scan(lambda h, _: 0.5 * h + 1.0, jnp.zeros(()), None, length=20, method="quasi_deer")
    np.testing.assert_allclose(sol.value, 2 * (1 - 0.5 ** jnp.arange(1, 21)), rtol=1e-12)


def test_jit_vmap_warm_start_and_stopping_on_the_residual():
    _, cell = tanh_rnn(4, 0.9)
    xs = jax.random.normal(jax.random.key(3), (3, 100, 4))
    run = jax.jit(jax.vmap(lambda x: fpx.parallel.scan(cell, jnp.zeros(4), x, trace_length=12)))
    sols = run(xs)
    assert sols.value.shape == (3, 100, 4) and bool(jnp.all(sols.converged))
    for i in range(3):
        np.testing.assert_allclose(sols.value[i], sequential(cell, jnp.zeros(4), xs[i]), atol=1e-10)
    # The reported residual is max_t |h_t - f(h_{t-1}, x_t)| of the returned trajectory.
    H = sols.value[0]
    prev = jnp.concatenate([jnp.zeros((1, 4)), H[:-1]])
    assert float(sols.stats["residual_norm"][0]) == pytest.approx(float(jnp.max(jnp.abs(H - jax.vmap(cell)(prev, xs[0])))), abs=1e-15)
    warm = fpx.parallel.scan(cell, jnp.zeros(4), xs[0], h_init=sols.value[0])
    assert int(warm.stats["num_steps"]) == 0


def test_bad_input_gets_clear_errors():
    cell = lambda h, x: jnp.tanh(h + x)
    xs = jnp.ones((5, 2))
    with pytest.raises(ValueError, match="method"):
        fpx.parallel.scan(cell, jnp.zeros(2), xs, method="newton")
    with pytest.raises(ValueError, match="same structure|structure, shapes and dtypes of h0"):
        fpx.parallel.scan(lambda h, x: (h, x), jnp.zeros(2), xs)
    with pytest.raises(ValueError, match="structure, shapes and dtypes of h0"):
        fpx.parallel.scan(lambda h, x: jnp.concatenate([h, x]), jnp.zeros(2), xs)
    with pytest.raises(ValueError, match="leading"):
        fpx.parallel.scan(lambda h, x: h + x[0] + x[1][:2], jnp.zeros(2), (xs, jnp.ones((6, 3))))
    with pytest.raises(ValueError, match="length="):
        fpx.parallel.scan(lambda h, x: h, jnp.zeros(2), None)
    with pytest.raises(ValueError, match="block_size"):
        fpx.parallel.scan(cell, jnp.zeros(2), xs, method="hybrid")
    with pytest.raises(TypeError, match="floating-point"):
        fpx.parallel.scan(cell, jnp.zeros(2, jnp.int32), xs)
    with pytest.raises(ValueError, match="h_init"):
        fpx.parallel.scan(cell, jnp.zeros(2), xs, h_init=jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="damping"):
        fpx.parallel.scan(cell, jnp.zeros(2), xs, method="elk", damping=0.0)
