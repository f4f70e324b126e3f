"""`fpx.argmin` and its hypergradient estimators.

Known answers in float64 on ridge regression (closed-form minimiser and Jacobian), every
estimator against its own definition, per-weight L2 logistic regression on a slice of
sklearn's digits against the exact hypergradient, vmap/jit/Python scalars, inner and
hypergradient failures (reported, never silently wrong) and the trace-time errors.

Each jitted function below is compiled once and checked for several things: compilation,
not arithmetic, is what costs time here.
"""

import itertools
import warnings

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest

import fpx

# ----------------------------------------------------------------- ridge regression

# Data and closed-form references are NumPy: eager JAX operations would each be compiled.
N, D = 12, 4
_rng = np.random.default_rng(0)
X = _rng.standard_normal((N, D))
_w_true = _rng.standard_normal(D)
Y = X @ _w_true + 0.1 * _rng.standard_normal(N)
XV = _rng.standard_normal((N, D))
YV = XV @ _w_true + 0.1 * _rng.standard_normal(N)
LAM = np.array([0.5, 1.0, 2.0, 0.1])  # one L2 strength per weight
W0 = np.zeros(D)
EIGS = np.linalg.eigvalsh(X.T @ X + np.diag(LAM))  # 3.87 ... 28.7
# Picard with step 0.03 contracts by 1 - 0.03 * 3.87 = 0.88 per step. Picard compiles in
# half the time of Anderson (the default, tested on its own below), and compilation, not
# arithmetic, is what these tests spend their time on.
ETA = 0.03
FAST = {"step": ETA, "solver": fpx.Picard(rtol=0.0, atol=1e-14), "max_steps": 1000}
# Anderson's residual is step * |grad|, with the default step 1/28.7: |grad| <= 3e-12.
TIGHT = fpx.Anderson(rtol=0.0, atol=1e-13)
EXACT = fpx.HypergradientExact()


def ridge_loss(w, lam):
    return 0.5 * jnp.sum((X @ w - Y) ** 2) + 0.5 * jnp.sum(lam * w**2)


def val_loss(w):
    return 0.5 * jnp.sum((XV @ w - YV) ** 2)


def hessian(lam):
    return X.T @ X + jnp.diag(lam)


def closed_w(lam):  # traceable, for the references that JAX differentiates
    return jnp.linalg.solve(hessian(lam), X.T @ Y)


def ref_w(lam):
    return np.linalg.solve(X.T @ X + np.diag(lam), X.T @ Y)


def ref_jacobian(lam):
    # d/dlam_i of (A w = X^T y) with dA/dlam_i = e_i e_i^T:  dw/dlam = -A^{-1} diag(w).
    return -np.linalg.solve(X.T @ X + np.diag(lam), np.diag(ref_w(lam)))


def ref_hypergradient(lam):
    w = ref_w(lam)
    return ref_jacobian(lam).T @ (XV.T @ (XV @ w - YV))


def rel(a, b):
    a, b = np.ravel(np.asarray(a)), np.ravel(np.asarray(b))
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def w_star(lam, adjoint=None, **kw):
    return fpx.argmin(ridge_loss, W0, lam, adjoint=adjoint, **{**FAST, **kw}).value


def hypergradient(lam, adjoint=None, **kw):
    return jax.grad(lambda lam: val_loss(w_star(lam, adjoint, **kw)))(lam)


def solved(sol) -> bool:
    return int(sol.result._value) == 0  # RESULTS.successful, without an eager comparison


EXACT_ESTIMATORS = {
    "exact": fpx.HypergradientExact(),
    "cg": fpx.HypergradientLinearSolve(lx.CG(rtol=1e-12, atol=1e-12, max_steps=100)),
    # Picard on u = u - alpha (H u - b), alpha = the argmin step size (Anderson, the default
    # solver, is checked on the digits problem below).
    "fixed_point": fpx.HypergradientFixedPoint(solver=fpx.Picard(rtol=0.0, atol=1e-15), max_steps=1000),
}


@pytest.mark.parametrize("name", list(EXACT_ESTIMATORS))
def test_implicit_estimators_match_closed_form_in_both_modes(name):
    est = EXACT_ESTIMATORS[name]

    @jax.jit
    def both(lam):
        # One linearisation gives forward mode (its tangent map) and reverse mode (the
        # transpose of that map, as jax.grad computes it), from one inner solve.
        w, tangent = jax.linearize(lambda lam: w_star(lam, est), lam)
        forward = jax.vmap(tangent)(jnp.eye(D)).T
        (reverse,) = jax.linear_transpose(tangent, lam)(jax.grad(val_loss)(w))
        return forward, reverse

    forward, reverse = both(LAM)
    assert rel(forward, ref_jacobian(LAM)) <= 1e-8
    assert rel(reverse, ref_hypergradient(LAM)) <= 1e-8


def test_defaults_match_finite_differences_float64():
    # Central differences of the outer loss through the inner solve itself, with the
    # defaults: Anderson with step 1/lambda_max (power iteration), CG for the derivative.
    h = 1e-5
    steps = np.concatenate([h * np.eye(D), -h * np.eye(D)])

    @jax.jit
    def run(lam):
        def outer(lam):
            sol = fpx.argmin(ridge_loss, W0, lam, solver=TIGHT)
            return val_loss(sol.value), sol

        values = jax.vmap(lambda lam: outer(lam)[0])(lam[None] + steps)
        g, sol = jax.grad(outer, has_aux=True)(lam)
        # The default of HypergradientFixedPoint: Anderson on u = u - alpha (H u - b).
        g_fixed_point = jax.grad(lambda lam: val_loss(w_star(lam, fpx.HypergradientFixedPoint())))(lam)
        return sol, values, g, g_fixed_point

    sol, values, g, g_fixed_point = run(LAM)
    assert solved(sol) and rel(sol.value, ref_w(LAM)) <= 1e-10
    assert sol.stats["grad_norm"] <= 1e-10 and sol.stats["residual_norm"] <= 1e-13
    # The default step is 1/lambda_max of the Hessian at w0 (here the same everywhere).
    assert abs(float(sol.stats["step_size"]) * EIGS[-1] - 1.0) <= 1e-3
    fd = (values[:D] - values[D:]) / (2 * h)
    assert rel(g, fd) <= 1e-7
    assert rel(fd, ref_hypergradient(LAM)) <= 1e-7
    assert rel(g_fixed_point, ref_hypergradient(LAM)) <= 1e-6


def test_neumann_series_matches_its_definition_and_converges_with_k():
    ks = (1, 4, 16, 64, 256)

    @jax.jit
    def all_k(lam):
        return jnp.stack([hypergradient(lam, fpx.HypergradientNeumann(terms=k)) for k in ks])

    approx = np.asarray(all_k(LAM))
    alpha = ETA  # the default alpha is the argmin step size
    A = X.T @ X + np.diag(LAM)
    w = ref_w(LAM)
    gv = np.asarray(XV.T @ (XV @ w - YV))
    exact = np.asarray(ref_hypergradient(LAM))
    errors = []
    for k, g in zip(ks, approx):
        # Definition: H^{-1} ~ M_k = alpha sum_{j<k} (I - alpha H)^j; the hypergradient is
        # -diag(w) M_k gv (d grad / d lam_i = w_i e_i, and M_k is symmetric).
        M = alpha * sum(np.linalg.matrix_power(np.eye(D) - alpha * A, j) for j in range(k))
        np.testing.assert_allclose(g, -w * (M @ gv), rtol=1e-10, atol=1e-12)
        err = np.linalg.norm(g - exact)
        # error = -diag(w) A^{-1} (I - alpha A)^k gv: at most |w|_inf (1 - alpha l_min)^k / l_min |gv|.
        bound = np.abs(w).max() * (1 - alpha * EIGS[0]) ** k / EIGS[0] * np.linalg.norm(gv)
        assert err <= bound * (1 + 1e-6)
        errors.append(err)
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] / np.linalg.norm(exact) < 1e-8
    # terms=1 is JFB: H^{-1} ~ alpha I.
    np.testing.assert_allclose(approx[0], -alpha * w * gv, rtol=1e-12)


def test_unrolled_estimator_is_the_derivative_of_k_steps_and_converges():
    def unrolled_reference(lam, k):
        w = W0
        for _ in range(k):
            w = w - ETA * jax.grad(ridge_loss)(w, lam)
        return w

    @jax.jit
    def run(lam):
        est5 = fpx.HypergradientUnrolled(steps=5)
        w, tangent = jax.linearize(lambda lam: w_star(lam, est5), lam)
        (g5,) = jax.linear_transpose(tangent, lam)(jax.grad(val_loss)(w))
        j5 = jax.vmap(tangent)(jnp.eye(D)).T
        g300 = hypergradient(lam, fpx.HypergradientUnrolled(steps=300))
        # Own definition: (dw_5/dlam)^T grad V(w*), the value being the solver's w*.
        _, pullback = jax.vjp(lambda lam: unrolled_reference(lam, 5), lam)
        ref5 = pullback(jax.grad(val_loss)(w))[0]
        return w, g5, j5, g300, ref5, jax.jacfwd(lambda lam: unrolled_reference(lam, 5))(lam)

    w, g5, j5, g300, ref5, j5_ref = run(LAM)
    assert rel(w, ref_w(LAM)) <= 1e-10
    assert rel(g5, ref5) <= 1e-12 and rel(j5, j5_ref) <= 1e-12
    exact = ref_hypergradient(LAM)
    assert rel(g5, exact) > 0.1  # five steps from w0 are far from converged
    assert rel(g300, exact) <= 1e-10


def test_second_derivatives():
    # Exact estimators: the Hessian of the outer loss in lambda (forward over reverse).
    exact = jax.jit(jax.hessian(lambda lam: val_loss(w_star(lam, fpx.HypergradientExact()))))(LAM)
    assert rel(exact, jax.jit(jax.hessian(lambda lam: val_loss(closed_w(lam))))(LAM)) <= 1e-7

    # Neumann: the approximation applies at every order (dw*/dlam is -M_k dgrad/dlam
    # wherever it appears, M_k differentiated as the polynomial in H it is). Reference:
    # a closed-form minimiser with exactly that derivative rule.
    k, alpha = 6, 0.02

    @jax.custom_jvp
    def w_neumann(lam):
        return closed_w(lam)

    @w_neumann.defjvp
    def _(primals, tangents):
        (lam,), (lam_dot,) = primals, tangents
        w = w_neumann(lam)
        M = alpha * sum(jnp.linalg.matrix_power(jnp.eye(D) - alpha * hessian(lam), j) for j in range(k))
        return w, -M @ (lam_dot * w)  # d grad / d lam . lam_dot = lam_dot * w

    neumann = fpx.HypergradientNeumann(terms=k, alpha=alpha)
    second = jax.jit(jax.jacrev(lambda lam: hypergradient(lam, neumann)))(LAM)  # reverse over reverse
    reference = jax.jit(jax.jacfwd(jax.grad(lambda lam: val_loss(w_neumann(lam)))))(LAM)
    assert rel(second, reference) <= 1e-10


def test_closed_over_hyperparameters_and_python_scalars():
    def scalar_loss(w, lam):
        return 0.5 * jnp.sum((X @ w - Y) ** 2) + 0.5 * lam * jnp.sum(w**2)

    @jax.jit
    def run(lam):
        # Differentiable in what loss closes over, like in args.
        closure = jax.grad(lambda lam: val_loss(fpx.argmin(lambda w, _: ridge_loss(w, lam), W0, adjoint=EXACT, **FAST).value))(lam)
        # A Python float in args (static, closed over by argmin) and jax.grad with respect
        # to a Python float (traced).
        def scalar(s):
            sol = fpx.argmin(scalar_loss, W0, s, adjoint=EXACT, **FAST)
            return val_loss(sol.value), sol

        static = fpx.argmin(scalar_loss, W0, 0.5, **FAST)
        g, _ = jax.grad(scalar, has_aux=True)(0.5)
        return closure, static, g

    closure, static, g = run(LAM)
    assert rel(closure, ref_hypergradient(LAM)) <= 1e-8
    A = X.T @ X + 0.5 * np.eye(D)
    w = np.linalg.solve(A, X.T @ Y)
    assert solved(static) and rel(static.value, w) <= 1e-10
    g_ref = float(-np.linalg.solve(A, w) @ (XV.T @ (XV @ w - YV)))  # dw/dlam = -A^{-1} w
    assert abs(float(g) - g_ref) <= 1e-8 * abs(g_ref)


def test_vmap_over_hyperparameters_equals_a_python_loop():
    lams = np.stack([LAM, 2.0 * LAM, 0.25 * LAM])

    def one(lam, probe):
        return jax.grad(lambda lam, probe: val_loss(fpx.argmin(ridge_loss, W0, lam, backward_probe=probe, **FAST).value), argnums=(0, 1))(lam, probe)

    single = jax.jit(one)
    g_batch, reports = jax.jit(jax.vmap(lambda lam: one(lam, fpx.backward_probe())))(lams)
    for lam, g, report in zip(lams, g_batch, reports):
        g_one, report_one = single(lam, fpx.backward_probe())
        np.testing.assert_allclose(g, g_one, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(g, ref_hypergradient(lam), rtol=1e-7)
        # The probe reports the (default) CG solve: steps taken, a small residual, not failed.
        assert report_one[0] >= 1 and report_one[1] <= 1e-5 and report_one[2] == 0
        np.testing.assert_allclose(report, report_one, rtol=1e-6, atol=1e-12)


def test_optax_step_maps_give_the_same_minimiser_and_hypergradient():
    optax = pytest.importorskip("optax")
    picard = {"solver": fpx.Picard(rtol=0.0, atol=1e-13), "max_steps": 2000}

    @jax.jit
    def run(lam):
        plain = w_star(lam, step=ETA, **picard)
        sgd = w_star(lam, step=optax.sgd(ETA), **picard)
        momentum = optax.sgd(0.02, momentum=0.5)
        def outer(lam):
            sol = fpx.argmin(ridge_loss, W0, lam, step=momentum, adjoint=EXACT, **picard)
            return val_loss(sol.value), sol

        g, sol = jax.grad(outer, has_aux=True)(lam)
        return plain, sgd, sol, g

    plain, sgd, sol, g = run(LAM)
    np.testing.assert_allclose(sgd, plain, rtol=1e-12)
    assert solved(sol) and rel(sol.value, ref_w(LAM)) <= 1e-9
    assert "step_size" not in sol.stats
    assert rel(g, ref_hypergradient(LAM)) <= 1e-8  # implicit: independent of the optimiser


def test_has_aux_pytree_weights_and_float32():
    def loss(w, lam):
        return ridge_loss(w, lam), {"fit": 0.5 * jnp.sum((X @ w - Y) ** 2)}

    @jax.jit
    def run(lam):
        def fit(lam):
            sol = fpx.argmin(loss, W0, lam, has_aux=True, adjoint=EXACT, **FAST)
            return sol.aux["fit"], sol

        g, sol = jax.grad(fit, has_aux=True)(lam)
        f32 = {"step": ETA, "solver": fpx.Picard(rtol=1e-6, atol=0.0), "adjoint": EXACT}
        g32 = jax.grad(lambda lam: val_loss(fpx.argmin(ridge_loss, W0.astype(jnp.float32), lam, **f32).value))(lam.astype(jnp.float32))
        # Weights as a pytree with float64 and float32 leaves, the default CG estimator.
        w0 = {"head": jnp.zeros(2), "tail": jnp.zeros(D - 2, jnp.float32)}
        split = {"step": ETA, "solver": fpx.Picard(rtol=1e-6, atol=0.0), "max_steps": 1000}

        def tree_w(lam):
            return fpx.argmin(lambda w, lam: ridge_loss(jnp.concatenate([w["head"], w["tail"]]), lam), w0, lam, **split).value

        flat, tangent = jax.linearize(lambda lam: jnp.concatenate(list(tree_w(lam).values())), lam)
        dtypes = {k: v.dtype for k, v in jax.eval_shape(tree_w, lam).items()}
        assert dtypes == {"head": jnp.float64, "tail": jnp.float32}
        return sol, g, g32, flat, jax.vmap(tangent)(jnp.eye(D)).T

    sol, g, g32, w_tree, jac_tree = run(LAM)
    assert rel(w_tree, ref_w(LAM)) <= 1e-4 and rel(jac_tree, ref_jacobian(LAM)) <= 1e-4
    w = ref_w(LAM)
    np.testing.assert_allclose(sol.aux["fit"], 0.5 * np.sum((X @ w - Y) ** 2), rtol=1e-10)
    assert rel(g, ref_jacobian(LAM).T @ (X.T @ (X @ w - Y))) <= 1e-8
    # float32 in, float32 out, to float32 accuracy.
    assert g32.dtype == jnp.float32 and rel(g32, ref_hypergradient(LAM)) <= 1e-3


# -------------------------------------------------- per-weight L2 logistic regression


def test_digits_per_weight_l2_cg_agrees_with_exact():
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = images[:160] / 16.0
    onehot = np.eye(10)[labels[:160]]
    xt, yt, xv, yv = x[:80], onehot[:80], x[80:], onehot[80:]

    def inner(W, loglam):  # multinomial logistic regression, 640 weights, one L2 strength each
        return -jnp.mean(jnp.sum(yt * jax.nn.log_softmax(xt @ W), -1)) + 0.5 * jnp.sum(jnp.exp(loglam) * W**2)

    def outer(W):
        return -jnp.mean(jnp.sum(yv * jax.nn.log_softmax(xv @ W), -1))

    loglam = np.log(0.03) + 0.5 * np.random.default_rng(1).standard_normal((64, 10))
    inner_solve = {"step": 1.0, "solver": fpx.Picard(rtol=1e-9, atol=0.0), "max_steps": 20000}
    estimators = [fpx.HypergradientExact(), fpx.HypergradientLinearSolve()]
    estimators += [fpx.HypergradientNeumann(k) for k in (10, 100)]

    @jax.jit
    def run(loglam):
        def hypergradient(loglam, est):
            sol = fpx.argmin(inner, np.zeros((64, 10)), loglam, adjoint=est, **inner_solve)
            return outer(sol.value), sol

        return [jax.grad(hypergradient, has_aux=True)(loglam, est) for est in estimators]

    results = run(loglam)
    assert all(solved(sol) for _, sol in results)
    exact, cg, *neumann = [np.ravel(np.asarray(g)) for g, _ in results]

    def cosine(a):
        return float(a @ exact / np.linalg.norm(a) / np.linalg.norm(exact))

    assert cosine(cg) >= 0.99
    assert np.linalg.norm(cg - exact) <= 1e-4 * np.linalg.norm(exact)
    cosines = [cosine(g) for g in neumann]
    assert cosines[0] < cosines[1] < 1.0, cosines


# --------------------------------------------------------------- failures reported

A2 = np.array([[3.0, 1.0], [1.0, 2.0]])


def quadratic(w, b):
    return 0.5 * w @ A2 @ w - b @ w


def test_divergent_step_size_is_reported_and_poisons_the_hypergradient():
    # lambda_max(A2) = 3.6: a gradient step converges for step < 0.55 only.
    def outer(b, step):
        sol = fpx.argmin(quadratic, jnp.zeros(2), b, step=step, solver=fpx.Picard(rtol=0.0, atol=1e-12), max_steps=500, throw=False)
        return sol.value.sum(), sol

    @jax.jit
    def run(b):
        g, sol = jax.grad(outer, has_aux=True)(b, 1.0)
        tangent = jax.jvp(lambda b: outer(b, 1.0)[1].value, (b,), (jnp.ones(2),))[1]
        # Under vmap over (traced) step sizes, each member reports its own result.
        g_steps, sols = jax.vmap(lambda step: jax.grad(outer, has_aux=True)(b, step))(jnp.array([0.2, 1.0]))
        return sol, g, tangent, g_steps, sols

    sol, g, tangent, g_steps, sols = run(np.ones(2))
    diverged = int(fpx.RESULTS.diverged._value)
    assert int(sol.result._value) == diverged
    assert np.all(np.isnan(g)) and np.all(np.isnan(tangent))
    # Step 0.2 converges (to the exact dV/db = A^{-1} 1), step 1.0 diverges: NaN for that member only.
    assert [int(r) for r in sols.result._value] == [0, diverged]
    np.testing.assert_allclose(g_steps[0], np.linalg.solve(A2, np.ones(2)), rtol=1e-8)
    assert np.all(np.isnan(g_steps[1]))
    # throw=True raises FixedPointError (under jit inside JAX's runtime error).
    with pytest.raises(Exception, match=r"(?s)FixedPointError: fpx.argmin: the inner solve .* step size is too large"):
        jax.block_until_ready(jax.jit(lambda b: fpx.argmin(quadratic, jnp.zeros(2), b, step=1.0, solver=fpx.Picard()).value)(np.ones(2)))


def test_loss_without_minimiser_is_not_successful():
    @jax.jit
    def run(b):
        def f(b):
            sol = fpx.argmin(lambda w, b: b @ w, jnp.zeros(2), b, step=1.0, solver=fpx.Picard(), max_steps=64, throw=False)
            return sol.value.sum(), sol

        return jax.grad(f, has_aux=True)(b)

    g, sol = run(np.ones(2))
    assert int(sol.result._value) == int(fpx.RESULTS.diverged._value) and np.all(np.isnan(g))


# A saddle point: H = diag(1, -1) is nonsingular (dw*/da = H^{-1}) but indefinite. The
# forward solve starts at w* itself; for V = sum(w) the CG right-hand side (1, 1) has
# p^T H p = 0, so CG breaks down.
SADDLE_D = np.array([1.0, -1.0])
SADDLE_A = np.array([1.0, 2.0])


def saddle(w, a):
    return 0.5 * jnp.sum(SADDLE_D * w**2) - a @ w


def saddle_grad(est, throw):
    def f(a, probe):
        return fpx.argmin(saddle, SADDLE_A / SADDLE_D, a, adjoint=est, throw=throw, backward_probe=probe).value.sum()

    return jax.grad(f, argnums=(0, 1))(SADDLE_A, fpx.backward_probe())


def test_failed_hypergradient_solve_is_reported():
    gmres = fpx.HypergradientLinearSolve(lx.GMRES(rtol=1e-10, atol=1e-10))
    (g, report), (g_gmres, report_gmres) = jax.jit(
        lambda: (saddle_grad(fpx.HypergradientLinearSolve(), False), saddle_grad(gmres, True))
    )()
    assert np.all(np.isnan(g)) and report[2] == 1 and fpx.backward_result(report) == fpx.RESULTS.backward_failed
    # An estimator for indefinite Hessians solves it: dV/da = H^{-1} 1 = (1, -1).
    np.testing.assert_allclose(g_gmres, [1.0, -1.0], rtol=1e-10)
    assert report_gmres[2] == 0 and report_gmres[1] <= 1e-10
    with pytest.raises(Exception, match=r"hypergradient solve H u = b \(HypergradientLinearSolve with lineax.CG"):
        jax.block_until_ready(jax.jit(lambda: saddle_grad(fpx.HypergradientLinearSolve(), True))())


def test_singular_hessian_truncated_cg_and_divergent_neumann_are_reported():
    # H = diag(1, 0): w[1] is free, the adjoint system H u = (1, 1) has no solution (CG
    # failing is checked on the saddle point above).
    def flat(w, a):
        return 0.5 * (w[0] - a[0]) ** 2 + 0.0 * w[1] * a[1]

    # Neumann with alpha above 2/lambda_max(A2) = 0.55: the series diverges.
    neumann = fpx.HypergradientNeumann(terms=20, alpha=1.0)

    @jax.jit
    def run(b):
        singular = jax.grad(lambda a: fpx.argmin(flat, jnp.zeros(2), a, adjoint=EXACT, throw=False).value.sum())(b)
        # An outer loss that does not depend on w* needs no solve: zero, not a failure.
        unrelated = jax.grad(lambda a: 0.0 * fpx.argmin(flat, jnp.zeros(2), a, adjoint=EXACT).value.sum())(b)
        # A CG budget with no tolerance: lineax calls any two steps a success; the
        # recomputed residual does not.
        budget = fpx.HypergradientLinearSolve(lx.CG(rtol=0.0, atol=0.0, max_steps=2))
        truncated = jax.grad(lambda lam: val_loss(w_star(lam, budget, throw=False)))(LAM)
        def f(b, probe):
            return fpx.argmin(quadratic, jnp.zeros(2), b, adjoint=neumann, throw=False, backward_probe=probe).value.sum()

        return singular, unrelated, truncated, jax.grad(f, argnums=(0, 1))(b, fpx.backward_probe())

    singular, unrelated, truncated, (g, report) = run(np.ones(2))
    assert np.all(np.isnan(singular)) and np.all(np.isnan(truncated))
    np.testing.assert_array_equal(unrelated, np.zeros(2))
    assert np.all(np.isnan(g)) and report[2] == 1 and report[1] > 1


# --------------------------------------------------------------------------- errors


def test_loss_errors():
    w = jnp.zeros(2)
    with pytest.raises(ValueError, match=r"loss\(w, args\) must return a scalar, got shape \(2,\)"):
        fpx.argmin(lambda w, _: w**2, w)
    with pytest.raises(ValueError, match="pass has_aux=True"):
        fpx.argmin(lambda w, _: (jnp.sum(w**2), w), w)
    with pytest.raises(ValueError, match=r"With has_aux=True, loss\(w, args\) must return a pair"):
        fpx.argmin(lambda w, _: jnp.sum(w**2), w, has_aux=True)
    with pytest.raises(TypeError, match="must return a real scalar, got dtype complex128"):
        fpx.argmin(lambda w, _: jnp.sum(w**2) * (1 + 1j), w)
    with pytest.raises(TypeError, match="must return a floating-point scalar, got dtype int"):
        fpx.argmin(lambda w, _: jnp.sum(w**2).astype(jnp.int32), w)
    with pytest.raises(TypeError, match="must return a JAX scalar computed from w"):
        fpx.argmin(lambda w, _: 1.0, w)
    with pytest.raises(TypeError, match=r"`loss` must be a function loss\(w, args\)"):
        fpx.argmin("sum", w)


def test_w0_errors():
    def loss(w, _):
        return jnp.sum(w**2)

    with pytest.raises(TypeError, match=r"`w0` must contain real floating-point arrays only, but the leaf at w0 has dtype int"):
        fpx.argmin(loss, jnp.zeros(2, jnp.int32))
    with pytest.raises(TypeError, match=r"the leaf at \['a'\] has dtype complex"):
        fpx.argmin(lambda w, _: jnp.sum(jnp.abs(w["a"]) ** 2), {"a": jnp.zeros(2, jnp.complex64)})
    with pytest.raises(ValueError, match="`w0` has no array leaves"):
        fpx.argmin(loss, {})


@pytest.mark.parametrize(
    "step, error, match",
    [
        (0.0, ValueError, r"`step` must be a number > 0, got 0.0"),
        (-0.1, ValueError, r"`step` must be a number > 0"),
        (float("nan"), ValueError, r"`step` must be a number > 0 and be finite"),
        (float("inf"), ValueError, r"`step` must be a number > 0 and be finite"),
        ("0.1", TypeError, r"`step` must be a number > 0, got '0.1'"),
        (True, TypeError, r"`step` must be a number > 0, got True"),
        (fpx.Picard(), TypeError, r"got the fpx solver Picard; pass it as `solver=fpx.Picard\(...\)`"),
    ],
)
def test_bad_step_size(step, error, match):
    with pytest.raises(error, match=match):
        fpx.argmin(quadratic, jnp.zeros(2), jnp.ones(2), step=step)


def test_step_error_explains_the_step():
    with pytest.raises(ValueError, match=r"step size η of the gradient step"):
        fpx.argmin(quadratic, jnp.zeros(2), jnp.ones(2), step=-1.0)


def test_optax_transform_with_a_step_count_is_an_error():
    optax = pytest.importorskip("optax")
    with pytest.raises(ValueError, match=r"non-floating leaf at \[0\].count \(int32\).*has no fixed point"):
        fpx.argmin(quadratic, jnp.zeros(2), jnp.ones(2), step=optax.adam(0.1))


@pytest.mark.parametrize(
    "adjoint, match",
    [
        ("cg", r"Unknown hypergradient estimator `adjoint='cg'`: use fpx.HypergradientLinearSolve\(\)"),
        (fpx.ImplicitAdjoint(), r"got fpx.ImplicitAdjoint, an adjoint of fpx.fixed_point .* Use fpx.HypergradientLinearSolve\(\)"),
        (fpx.JFBAdjoint(), r"Use fpx.HypergradientNeumann\(terms=1\)"),
        (fpx.UnrolledAdjoint(), r"Use fpx.HypergradientUnrolled\(steps=k\)"),
        (fpx.HypergradientExact, r"got the class HypergradientExact; write HypergradientExact\(\)"),
        (fpx.Anderson(), r"wrap it: fpx.HypergradientFixedPoint\(solver=fpx.Anderson\(...\)\)"),
        (lx.CG(rtol=1e-6, atol=1e-6), r"wrap it: fpx.HypergradientLinearSolve\(lineax.CG\(...\)\)"),
    ],
    ids=["string", "implicit", "jfb", "unrolled", "class", "fpx-solver", "lineax-solver"],
)
def test_unknown_estimator(adjoint, match):
    with pytest.raises(TypeError, match=match):
        fpx.argmin(quadratic, jnp.zeros(2), jnp.ones(2), adjoint=adjoint)


def test_estimator_argument_errors():
    with pytest.raises(ValueError, match=r"`HypergradientNeumann\(terms=...\)` must be a positive integer"):
        fpx.HypergradientNeumann(terms=0)
    with pytest.raises(ValueError, match=r"`HypergradientNeumann\(alpha=...\)` must be a number > 0"):
        fpx.HypergradientNeumann(alpha=-1.0)
    with pytest.raises(ValueError, match=r"`HypergradientUnrolled\(steps=...\)` must be a positive integer"):
        fpx.HypergradientUnrolled(steps=0)
    with pytest.raises(TypeError, match=r"`HypergradientFixedPoint\(solver=...\)` must be an fpx solver"):
        fpx.HypergradientFixedPoint(solver="anderson")
    with pytest.raises(ValueError, match=r"`HypergradientFixedPoint\(alpha=...\)` must be a number > 0"):
        fpx.HypergradientFixedPoint(alpha=0.0)
    with pytest.raises(TypeError, match=r"`HypergradientLinearSolve\(linear_solver=...\)` must be a lineax solver"):
        fpx.HypergradientLinearSolve("cg")
    with pytest.raises(ValueError, match=r"`HypergradientExact\(rtol=...\)` must be a number > 0"):
        fpx.HypergradientExact(rtol=0.0)


def test_other_argument_errors():
    with pytest.raises(ValueError, match=r"`max_steps` must be a positive integer"):
        fpx.argmin(quadratic, jnp.zeros(2), jnp.ones(2), max_steps=0)
    with pytest.raises(TypeError, match=r"`throw` must be True or False"):
        fpx.argmin(quadratic, jnp.zeros(2), jnp.ones(2), throw="yes")
    with pytest.raises(TypeError, match=r"`solver` must be an fpx solver"):
        fpx.argmin(quadratic, jnp.zeros(2), jnp.ones(2), solver=lx.CG(rtol=1e-6, atol=1e-6))


def test_hyperparameter_that_does_not_reach_the_inner_problem_warns():
    # args[1] only shifts the loss; args[2] is unused; args[0] reaches the gradient.
    def loss(w, a):
        return quadratic(w, a[0]) + a[1] ** 2 + 0.0 * jnp.sum(jax.lax.stop_gradient(a[2]))

    args = (jnp.ones(2), jnp.array(3.0), jnp.ones(3))
    # The check is made at trace time: no need to run the solve.
    with pytest.warns(UserWarning, match=r"args\[1\], args\[2\] does not reach the gradient of the inner loss") as record:
        jax.eval_shape(lambda args: fpx.argmin(loss, jnp.zeros(2), args).value, args)
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.eval_shape(lambda b: fpx.argmin(quadratic, jnp.zeros(2), b).value, jnp.ones(2))  # reaches it
