"""fpx.ReversibleAdjoint: exact reverse-mode gradient of the computed coupled iterate."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import fpx

D = 8


def _problem(dtype=jnp.float64, gamma=0.5):
    k1, k2 = jr.split(jr.PRNGKey(0))
    q, _ = jnp.linalg.qr(jr.normal(k1, (D, D)))
    return (gamma * q).astype(dtype), (0.5 * jr.normal(k2, (D,))).astype(dtype)


def cell(z, args):
    W, x = args
    return jnp.tanh(W @ z + x)


def head(z):
    return jnp.sum(z**2) + jnp.sum(jnp.sin(z))


def solve(W, x, beta=0.8, rtol=1e-4, max_steps=200, **kw):
    return fpx.fixed_point(
        cell, jnp.zeros_like(x), (W, x), solver=fpx.Picard(rtol=rtol, atol=0.0),
        adjoint=fpx.ReversibleAdjoint(beta=beta), max_steps=max_steps, **kw,
    )


def coupled_unrolled(W, x, steps, beta=0.8):
    """Plain backprop reference: the same coupled iteration for exactly `steps` steps."""
    def body(_, yz):
        y, z = yz
        y = (1 - beta) * y + beta * cell(z, (W, x))
        return y, (1 - beta) * z + beta * cell(y, (W, x))

    z0 = jnp.zeros_like(x)
    return jax.lax.fori_loop(0, steps, body, (z0, z0))[1]


def rel(a, b):
    a, b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return float(np.sqrt(sum(np.sum((np.asarray(u) - np.asarray(v)) ** 2) for u, v in zip(a, b)) / sum(np.sum(np.asarray(v) ** 2) for v in b)))


@pytest.mark.parametrize("beta", [0.5, 0.8])
def test_gradient_equals_unrolled_coupled_iteration_float64(beta):
    W, x = _problem()
    sol = solve(W, x, beta)
    steps = int(sol.stats["num_steps"])
    assert sol.converged and int(sol.stats["num_fn_evals"]) == 1 + 2 * steps
    np.testing.assert_allclose(sol.value, coupled_unrolled(W, x, steps, beta), rtol=0, atol=1e-14)
    g = jax.grad(lambda W, x: head(solve(W, x, beta).value), argnums=(0, 1))(W, x)
    g_ref = jax.grad(lambda W, x: head(coupled_unrolled(W, x, steps, beta)), argnums=(0, 1))(W, x)
    assert rel(g, g_ref) <= 1e-9


def test_unconverged_solve_differentiates_the_returned_iterate():
    W, x = _problem(gamma=0.9)
    sol = solve(W, x, max_steps=6, throw=False)
    assert sol.result == fpx.RESULTS.max_steps_reached
    g = jax.grad(lambda x: head(solve(W, x, max_steps=6, throw=False).value))(x)
    g_ref = jax.grad(lambda x: head(coupled_unrolled(W, x, 6)))(x)
    assert rel(g, g_ref) <= 1e-11


def test_finite_differences_and_implicit_gradient_on_a_contraction():
    W, x = _problem()
    # A fixed number of steps (rtol = atol = 0), so the loss is smooth for the differences.
    loss = lambda W, x: head(solve(W, x, rtol=0.0, max_steps=10, throw=False).value)  # noqa: E731
    gW, gx = jax.grad(loss, argnums=(0, 1))(W, x)
    for dW, dx in zip(jr.normal(jr.PRNGKey(1), (3, D, D)), jr.normal(jr.PRNGKey(2), (3, D))):
        eps = 1e-5
        fd = (loss(W + eps * dW, x + eps * dx) - loss(W - eps * dW, x - eps * dx)) / (2 * eps)
        np.testing.assert_allclose(jnp.sum(gW * dW) + jnp.sum(gx * dx), fd, rtol=1e-8)
    # Converged: close to the implicit gradient of the ideal fixed point.
    tight = lambda W, x: head(solve(W, x, rtol=1e-7).value)  # noqa: E731
    implicit = lambda W, x: head(fpx.fixed_point(cell, jnp.zeros(D), (W, x), solver=fpx.Picard(rtol=1e-12, atol=0.0)).value)  # noqa: E731
    assert rel(jax.grad(tight, argnums=(0, 1))(W, x), jax.grad(implicit, argnums=(0, 1))(W, x)) <= 1e-5


def test_rounding_error_grows_with_the_number_of_steps():
    # The reversal recovers states of a contracting iteration, so rounding errors are
    # amplified backwards: exact to rounding for short solves, not for long ones (the
    # limitation stated in the docstring; these figures pin it).
    W, x = _problem(gamma=0.9)
    errors = []
    for steps in (5, 10, 20):
        g = jax.grad(lambda x: head(solve(W, x, rtol=0.0, max_steps=steps, throw=False).value))(x)
        errors.append(rel(g, jax.grad(lambda x: head(coupled_unrolled(W, x, steps)))(x)))
    assert errors[0] <= 1e-11 and errors[1] <= 1e-6 and errors[2] <= 1e-1, errors
    assert errors[0] < errors[1] < errors[2], errors


def test_closed_over_parameters():
    W, x = _problem()

    def loss(W):
        return head(fpx.fixed_point(lambda z, x: jnp.tanh(W @ z + x), jnp.zeros(D), x,
                                    solver=fpx.Picard(rtol=1e-4, atol=0.0), adjoint=fpx.ReversibleAdjoint()).value)

    steps = int(solve(W, x).stats["num_steps"])
    g_ref = jax.grad(lambda W: head(coupled_unrolled(W, x, steps)))(W)
    assert rel(jax.grad(loss)(W), g_ref) <= 1e-9


def test_jit_vmap_members_reversed_their_own_number_of_steps():
    W, _ = _problem()
    xs = jnp.stack([jnp.zeros(D), 0.05 * jnp.ones(D), jnp.linspace(-2.0, 2.0, D)])
    steps = np.asarray(jax.vmap(lambda x: solve(W, x).stats["num_steps"])(xs))
    assert len(set(steps.tolist())) > 1, steps
    g = jax.jit(jax.vmap(jax.grad(lambda x: head(solve(W, x).value))))(xs)
    g_ref = jnp.stack([jax.grad(lambda x: head(coupled_unrolled(W, x, int(k))))(x) for x, k in zip(xs, steps)])
    assert rel(g, g_ref) <= 1e-9
    # A shared parameter: the gradient of the batch loss sums the members' exact gradients.
    gW = jax.jit(jax.grad(lambda W: jnp.sum(jax.vmap(lambda x: head(solve(W, x).value))(xs))))(W)
    gW_ref = sum(jax.grad(lambda W: head(coupled_unrolled(W, x, int(k))))(W) for x, k in zip(xs, steps))
    assert rel(gW, gW_ref) <= 1e-9


@pytest.mark.parametrize("fn", [lambda z, a: 1.5 * z + 1.0, lambda z, a: z + 1.0], ids=["expansive", "no-fixed-point"])
def test_divergent_maps_are_not_successful(fn):
    f = lambda a: fpx.fixed_point(fn, jnp.zeros(3), a, adjoint=fpx.ReversibleAdjoint(), max_steps=200, throw=False)  # noqa: E731
    sol = jax.jit(f)(jnp.ones(3))
    assert sol.result == fpx.RESULTS.diverged
    g = jax.grad(lambda a: f(a).value.sum())(jnp.ones(3))
    assert bool(jnp.all(jnp.isfinite(g)))
    with pytest.raises(Exception, match="diverged"):
        fpx.fixed_point(fn, jnp.zeros(3), jnp.ones(3), adjoint=fpx.ReversibleAdjoint(), max_steps=200)


def test_float32_defaults():
    W, x = _problem(jnp.float32)
    loss = lambda x: head(fpx.fixed_point(cell, jnp.zeros(D, jnp.float32), (W, x), adjoint=fpx.ReversibleAdjoint()).value)  # noqa: E731
    g = jax.jit(jax.grad(loss))(x)
    assert g.dtype == jnp.float32
    implicit = jax.grad(lambda x: head(fpx.fixed_point(cell, jnp.zeros(D, jnp.float32), (W, x)).value))(x)
    assert rel(g, implicit) <= 1e-3


@pytest.mark.parametrize("beta", [0.0, 1.0, -0.5, 1.5, float("nan")])
def test_bad_beta_names_the_argument(beta):
    with pytest.raises(ValueError, match="beta"):
        fpx.ReversibleAdjoint(beta=beta)
    with pytest.raises(TypeError, match="beta"):
        fpx.ReversibleAdjoint(beta="0.8")


def test_other_solvers_forward_mode_and_infeasibility_are_refused():
    W, x = _problem()
    with pytest.raises(ValueError, match="ReversibleAdjoint.*Picard.*Anderson"):
        fpx.fixed_point(cell, jnp.zeros(D), (W, x), solver=fpx.Anderson(), adjoint=fpx.ReversibleAdjoint())
    with pytest.raises(ValueError, match="detect_infeasible"):
        fpx.fixed_point(cell, jnp.zeros(D), (W, x), adjoint=fpx.ReversibleAdjoint(), detect_infeasible=True)
    with pytest.raises(TypeError, match="reverse mode only"):
        jax.jvp(lambda x: solve(W, x).value, (x,), (x,))


def test_registry_and_deq_layer_training_step():
    assert fpx.experiment.ADJOINTS["reversible"] is fpx.ReversibleAdjoint
    cell_ = fpx.nn.ContractiveCell(jr.PRNGKey(0), state_size=8, input_size=3, gamma=0.8)
    deq = fpx.nn.DEQ(cell_, solver=fpx.Picard(rtol=1e-6, atol=0.0), adjoint=fpx.ReversibleAdjoint(), max_steps=100)
    xs, ys = jr.normal(jr.PRNGKey(1), (16, 3)), jr.normal(jr.PRNGKey(2), (16, 8))

    def loss(model):
        z, stats = jax.vmap(model)(xs)
        return jnp.mean((z - ys) ** 2), stats

    opt = optax.sgd(0.5)
    state = opt.init(eqx.filter(deq, eqx.is_array))

    @eqx.filter_jit
    def step(model, state):
        (value, stats), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model)
        updates, state = opt.update(grads, state)
        return eqx.apply_updates(model, updates), state, value, stats

    new, state, before, stats = step(deq, state)
    assert bool(stats["converged"].all())
    assert float(loss(new)[0]) < float(before)


def test_an_overflowing_reversal_raises_instead_of_a_silent_nan():
    # float32, 0.99-contractive: the solve converges in 74 steps, but the reversal divides
    # by 1 - beta = 0.2 at every step and the reconstructed states overflow.
    W, x = _problem(jnp.float32, gamma=0.99)
    loss = lambda x, throw: head(solve(W, x, rtol=1e-5, max_steps=2000, throw=throw).value)  # noqa: E731
    assert not jnp.all(jnp.isfinite(jax.grad(loss)(x, False)))
    with pytest.raises(Exception, match=r"ReversibleAdjoint: reversing the forward iteration overflowed"):
        jax.block_until_ready(jax.grad(loss)(x, True))
