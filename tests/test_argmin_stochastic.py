"""`fpx.argmin_stochastic`: a minibatch optax loop differentiated as a minimiser at its final iterate.

Known answers in float64 on ridge regression (the closed-form minimiser, and `fpx.argmin`'s
exact hypergradient): with enough steps the hypergradient agrees with the exact one, within
the first-order bound set by the reported gradient norm; the data (features of a
classification problem with integer labels) is differentiable; `HypergradientUnrolled` is
the derivative of the loop's last steps; jit/vmap; warm starts; failures reported, never
silently wrong; trace-time errors.

Each jitted function is compiled once and checked for several things: compilation, not
arithmetic, is what costs time here.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fpx

# ----------------------------------------------------------------- ridge regression

N, D, BATCH = 96, 4, 16
_rng = np.random.default_rng(0)
X = _rng.standard_normal((N, D))
_w_true = _rng.standard_normal(D)
Y = X @ _w_true + 0.3 * _rng.standard_normal(N)
XV = _rng.standard_normal((N, D))
YV = XV @ _w_true + 0.3 * _rng.standard_normal(N)
LAM = np.array([0.05, 0.1, 0.2, 0.01])  # one L2 strength per weight
MU = float(np.linalg.eigvalsh(X.T @ X / N + np.diag(LAM))[0])  # 0.81: strong convexity
KEY = jax.random.key(0)
# A halving learning rate every 200 steps: 2000 steps bring |grad L| to about 6e-5.
DECAY = optax.sgd(optax.exponential_decay(0.3, 200, 0.5))
STEPS = 2000


def ridge(w, batch, lam):
    xb, yb = batch
    return 0.5 * jnp.mean((xb @ w - yb) ** 2) + 0.5 * jnp.sum(lam * w**2)


def val_loss(w):
    return 0.5 * jnp.mean((XV @ w - YV) ** 2)


def ref_w(lam):
    return np.linalg.solve(X.T @ X / N + np.diag(lam), X.T @ Y / N)


def ref_hypergradient(lam):
    # dw*/dlam_i = -H^{-1} e_i w*_i, so dV/dlam = -w* * H^{-1} grad V(w*).
    w = ref_w(lam)
    return -w * np.linalg.solve(X.T @ X / N + np.diag(lam), XV.T @ (XV @ w - YV) / N)


def rel(a, b):
    a, b = np.ravel(np.asarray(a)), np.ravel(np.asarray(b))
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def fit(lam, key=KEY, adjoint=None, **kw):
    kw = {"optimizer": DECAY, "num_steps": STEPS, "batch_size": BATCH, "gtol": 1e-4, **kw}
    return fpx.argmin_stochastic(ridge, jnp.zeros(D), (X, Y), lam, key=key, adjoint=adjoint, **kw)


def outer(lam, adjoint=None, **kw):
    sol = fit(lam, adjoint=adjoint, **kw)
    return val_loss(sol.value), sol


def argmin_exact(loss, w0, args):
    # Picard with a fixed step compiles in half the time of the default Anderson.
    return fpx.argmin(loss, w0, args, adjoint=fpx.HypergradientExact(), step=0.5, solver=fpx.Picard(rtol=0.0, atol=1e-14),
                      max_steps=5000).value


@jax.jit
def ridge_run(lam):
    grad = jax.grad(outer, has_aux=True)
    (g_cg, sol), (g_exact, _) = grad(lam), grad(lam, fpx.HypergradientExact())
    exact = jax.grad(lambda lam: val_loss(argmin_exact(lambda w, lam: ridge(w, (X, Y), lam), jnp.zeros(D), lam)))(lam)
    return g_cg, g_exact, exact, sol


def test_hypergradient_at_the_final_iterate_agrees_with_argmin_exact():
    g_cg, g_exact, exact, sol = ridge_run(LAM)
    np.testing.assert_allclose(exact, ref_hypergradient(LAM), rtol=1e-9)  # argmin's exact one
    grad_norm = float(sol.stats["grad_norm"])
    assert int(sol.result._value) == 0 and grad_norm <= 1e-4 and sol.stats["loss_trace"].shape == (STEPS,)
    assert float(sol.stats["grad_norm_0"]) > 1e3 * grad_norm
    # |w_T - w*| <= |grad L(w_T)| / mu: the reported gradient norm bounds the distance.
    distance = float(np.linalg.norm(np.asarray(sol.value) - ref_w(LAM)))
    assert distance <= grad_norm / MU * (1 + 1e-6)
    # The stated tolerance: relative error <= 1e-3 once |grad L(w_T)| <= 1e-4 (measured 5e-4).
    assert rel(g_cg, exact) <= 1e-3 and rel(g_exact, exact) <= 1e-3
    assert rel(g_cg, g_exact) <= 1e-5  # CG (the default) and the dense solve agree at w_T
    # First-order bound: for ridge the hypergradient -w * H^{-1} grad V(w) is Lipschitz in w
    # with a constant C <= |H^{-1} grad V| + |w| |H^{-1}| |grad^2 V| (about 2 here).
    hinv = np.linalg.inv(X.T @ X / N + np.diag(LAM))
    w = ref_w(LAM)
    c = np.linalg.norm(hinv @ (XV.T @ (XV @ w - YV) / N)) + np.linalg.norm(w) * np.linalg.norm(hinv, 2) * np.linalg.norm(
        XV.T @ XV / N, 2
    )
    assert np.linalg.norm(np.asarray(g_cg) - np.asarray(exact)) <= 1.1 * c * distance


# --------------------------------------------- classification: differentiable data, integer labels

NC = 60
XC = _rng.standard_normal((NC, 3))
YC = (XC[:, 0] + 0.5 * XC[:, 1] > 0).astype(np.int32) + (XC[:, 2] > 1).astype(np.int32)  # classes 0, 1, 2
XCV = _rng.standard_normal((40, 3))
YCV = (XCV[:, 0] + 0.5 * XCV[:, 1] > 0).astype(np.int32)


def cross_entropy(W, x, y):
    logits = x @ W
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0])


def logistic(W, batch, lam):
    xb, yb = batch
    return cross_entropy(W, xb, yb) + 0.5 * lam * jnp.sum(W**2)


@jax.jit
def classification_run(x):
    def stochastic(x):
        sol = fpx.argmin_stochastic(
            logistic, jnp.zeros((3, 3)), (x, YC), 0.1, optimizer=optax.adam(optax.exponential_decay(0.1, 300, 0.5)),
            key=KEY, num_steps=3000, batch_size=12, gtol=1e-4, adjoint=fpx.HypergradientExact(),
        )
        return cross_entropy(sol.value, XCV, YCV), sol

    def exact(x):
        return cross_entropy(argmin_exact(lambda W, x: logistic(W, (x, YC), 0.1), jnp.zeros((3, 3)), x), XCV, YCV)

    g, sol = jax.grad(stochastic, has_aux=True)(x)
    return g, jax.grad(exact)(x), sol


def test_data_is_differentiable_with_integer_labels():
    # The hypergradient with respect to the training features (what dataset distillation learns).
    g, exact, sol = classification_run(XC)
    assert int(sol.result._value) == 0 and float(sol.stats["grad_norm"]) <= 1e-4
    assert rel(g, exact) <= 1e-3


# ------------------------------------------------------------ unrolled, stationarity loss


def gd_reference(lam, k, total, lr):
    # Full-batch gradient descent: with batch_size = N every minibatch is the whole data set
    # (reordered), so the loop is plain gradient descent.
    step = lambda w: w - lr * jax.grad(lambda w: ridge(w, (X, Y), lam))(w)
    w = jax.lax.stop_gradient(jax.lax.fori_loop(0, total - k, lambda _, w: step(w), jnp.zeros(D)))
    return jax.lax.fori_loop(0, k, lambda _, w: step(w), w)


@jax.jit
def unrolled_run(lam):
    kw = {"optimizer": optax.sgd(0.5), "num_steps": 60, "batch_size": N, "gtol": jnp.inf}
    jac = {k: jax.jacrev(lambda lam: fit(lam, adjoint=fpx.HypergradientUnrolled(steps=k), **kw).value)(lam) for k in (10, 500)}
    ref = {k: jax.jacrev(lambda lam: gd_reference(lam, k, 60, 0.5))(lam) for k in (10, 60)}
    # A given stationarity loss (here the full-batch loss written out): the hypergradient
    # in args, and data no longer differentiated. 60 full-batch steps reach w* to 1e-13.
    stat = lambda w, lam: ridge(w, (X, Y), lam)
    g_stat, g_data = jax.grad(
        lambda lam, x: val_loss(fpx.argmin_stochastic(ridge, jnp.zeros(D), (x, Y), lam, key=KEY, stationarity_loss=stat,
                                                      adjoint=fpx.HypergradientExact(), **kw).value),
        argnums=(0, 1),
    )(lam, jnp.asarray(X))
    return jac, ref, g_stat, g_data


def test_unrolled_is_the_derivative_of_the_last_steps_and_stationarity_loss():
    jac, ref, g_stat, g_data = unrolled_run(LAM)
    np.testing.assert_allclose(jac[10], ref[10], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(jac[500], ref[60], rtol=1e-10, atol=1e-14)  # steps > num_steps: the whole loop
    assert rel(jac[10], ref[60]) > 1e-3  # truncation matters
    np.testing.assert_allclose(g_stat, ref_hypergradient(LAM), rtol=1e-9)
    assert np.all(np.asarray(g_data) == 0)


# ----------------------------------------------------------------------- warm start


WARM_OPT = optax.sgd(0.03, momentum=0.5)


def warm(lam, w0, state, key, steps=30):
    def f(lam):
        # The dense estimator compiles faster than CG (checked above) on these 4 weights.
        sol = fpx.argmin_stochastic(ridge, w0, (X, Y), lam, optimizer=WARM_OPT, key=key, num_steps=steps, batch_size=BATCH,
                                    gtol=1e-2, opt_state=state, throw=False, adjoint=fpx.HypergradientExact())
        return val_loss(sol.value), sol

    return jax.grad(f, has_aux=True)(lam)


warm_run = jax.jit(warm, static_argnames="steps")


def test_warm_start_reduces_the_steps_needed_and_vmap():
    state0 = WARM_OPT.init(jnp.zeros(D))
    # Warm start from the previous outer step: the minimiser for nearby hyperparameters.
    w_prev = jnp.asarray(ref_w(1.1 * LAM))
    g_warm, warm_sol = warm_run(LAM, w_prev, state0, KEY)
    g_cold, cold = warm_run(LAM, jnp.zeros(D), state0, KEY)
    g_cold_long, cold_long = warm_run(LAM, jnp.zeros(D), state0, KEY, steps=120)
    # 30 steps pass the test from the warm start (|grad L| 5e-3); from zero they do not
    # (0.15: the hypergradient is NaN, never silently wrong), and 120 steps do (3e-3).
    assert int(warm_sol.result._value) == 0 and float(warm_sol.stats["grad_norm"]) <= 1e-2
    assert int(cold.result._value) == int(fpx.RESULTS.max_steps_reached._value) and np.all(np.isnan(g_cold))
    assert float(cold.stats["grad_norm"]) > 10 * float(warm_sol.stats["grad_norm"])
    assert int(cold_long.result._value) == 0
    for g in (g_warm, g_cold_long):
        assert rel(g, ref_hypergradient(LAM)) <= 5e-2
    # The final optimiser state (the momentum) carries on to the next call.
    _, again = warm_run(LAM, warm_sol.value, warm_sol.stats["opt_state"], KEY)
    assert int(again.result._value) == 0
    # vmap over hyperparameters and keys equals a Python loop of single runs.
    lams = np.stack([LAM, 1.2 * LAM])
    keys = jax.random.split(KEY, 2)
    g_v, sols = jax.jit(jax.vmap(lambda lam, k: warm(lam, w_prev, state0, k)))(lams, keys)
    for i in range(2):
        g_i, sol_i = warm_run(lams[i], w_prev, state0, keys[i])
        np.testing.assert_allclose(g_v[i], g_i, rtol=1e-10, atol=1e-14)
        assert int(sols.result._value[i]) == int(sol_i.result._value)


# ----------------------------------------------------------------------- failures


def test_divergent_and_unfinished_loops_are_reported():
    g, sol = jax.jit(jax.grad(
        lambda lam: outer(lam, fpx.HypergradientExact(), optimizer=optax.sgd(50.0), num_steps=200, throw=False), has_aux=True
    ))(LAM)
    assert int(sol.result._value) == int(fpx.RESULTS.nonfinite._value) and np.all(np.isnan(g))
    with pytest.raises(Exception, match=r"(?s)FixedPointError: fpx.argmin_stochastic: after 20 optimiser steps the final "
                       r"iterate is not stationary enough: \|grad L_S\(w_T\)\| = .* > gtol = 1.000e-04"):
        jax.block_until_ready(jax.jit(lambda lam: fit(lam, optimizer=optax.sgd(0.3), num_steps=20).value)(LAM))


# ------------------------------------------------------------------- trace-time errors


def _trace(**kw):
    base = {"loss": ridge, "w0": jnp.zeros(D), "data": (X, Y), "args": LAM, "optimizer": optax.sgd(0.1),
            "key": KEY, "num_steps": 5, "batch_size": BATCH}
    base.update(kw)
    return jax.eval_shape(lambda: fpx.argmin_stochastic(**base).value)


@pytest.mark.parametrize(
    "kw,error,match",
    [
        ({"loss": lambda w, b, lam: (b[0] @ w - b[1]) ** 2}, ValueError, r"loss\(w, batch, args\) must return a scalar, got shape \(16,\)"),
        ({"loss": lambda w, b, lam: (ridge(w, b, lam), 0.0)}, ValueError, r"pass has_aux=True"),
        ({"stationarity_loss": lambda w, lam: w}, ValueError, r"stationarity_loss\(w, args\) must return a scalar"),
        ({"optimizer": optax.adam}, TypeError, r"got the function 'adam'.*optax.adam\(1e-3\)"),
        ({"optimizer": 0.1}, TypeError, r"optimizer=optax.sgd\(0.1\)"),
        ({"optimizer": fpx.Anderson()}, TypeError, r"got the fpx solver Anderson.*fpx.argmin"),
        ({"optimizer": None}, TypeError, r"needs `optimizer`"),
        ({"optimizer": "sgd"}, TypeError, r"must be an optax GradientTransformation"),
        ({"batch_size": N + 1}, ValueError, r"`batch_size` = 97 is larger than the 96 examples in `data`"),
        ({"batch_size": 0}, ValueError, r"batch_size"),
        ({"num_steps": 0}, ValueError, r"num_steps"),
        ({"data": (X, Y[:10])}, ValueError, r"share their leading \(example\) axis, got data\[0\]: 96, data\[1\]: 10"),
        ({"data": (X, 1.0)}, TypeError, r"every leaf of `data` must be an array"),
        ({"data": ()}, ValueError, r"`data` has no arrays"),
        ({"key": 0}, TypeError, r"`key` must be one JAX PRNG key, e.g. jax.random.key\(0\)"),
        ({"key": jax.random.split(KEY, 3)}, TypeError, r"of shape \(3,\)"),
        ({"gtol": -1.0}, ValueError, r"gtol"),
        ({"opt_state": (jnp.zeros(3),)}, ValueError, r"`opt_state` must be a state of `optimizer`"),
        ({"adjoint": fpx.ImplicitAdjoint()}, TypeError, r"hypergradient estimator"),
        ({"w0": jnp.zeros(D, jnp.int32)}, TypeError, r"w0"),
    ],
)
def test_bad_inputs_are_clear_errors(kw, error, match):
    with pytest.raises(error, match=match):
        _trace(**kw)


def test_hyperparameter_that_does_not_reach_the_loss_warns():
    with pytest.warns(UserWarning, match=r"args\[1\] does not reach the gradient of the stationarity loss"):
        _trace(loss=lambda w, b, a: ridge(w, b, a[0]) + a[1], args=(LAM, 1.0 * jnp.ones(())))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _trace()  # the data and LAM reach it: no warning
