"""Fixed-point layers: fpx.nn.DEQ (equinox), fpx.nn.nnx.DEQ (flax), cells, regulariser."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from flax import nnx

import fpx
import fpx.nn.nnx

TIGHT = dict(rtol=0.0, atol=1e-12)


def unrolled(cell, x, z0, steps):
    z = z0
    for _ in range(steps):
        z = cell(z, x)
    return z


def rel_err(a, b):
    a, b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return math.sqrt(sum(float(jnp.sum((u - v) ** 2)) for u, v in zip(a, b)) / sum(float(jnp.sum(v**2)) for v in b))


def test_equinox_deq_value_stats_and_gradient():
    cell = fpx.nn.ContractiveCell(jr.PRNGKey(0), state_size=16, input_size=5, gamma=0.8)
    deq = fpx.nn.DEQ(cell, solver=fpx.Anderson(**TIGHT), max_steps=200)
    xs = jr.normal(jr.PRNGKey(1), (6, 5))
    z, stats = jax.jit(jax.vmap(deq))(xs)
    assert z.shape == (6, 16)
    assert stats["num_steps"].shape == (6,) and bool(stats["converged"].all())
    ref = jax.vmap(lambda x: unrolled(cell, x, jnp.zeros(16), 300))(xs)
    np.testing.assert_allclose(z, ref, atol=1e-10)

    def loss(cell):
        return jnp.sum(jax.vmap(fpx.nn.DEQ(cell, solver=fpx.Anderson(**TIGHT), max_steps=200))(xs)[0] ** 2)

    def loss_unrolled(cell):
        return jnp.sum(jax.vmap(lambda x: unrolled(cell, x, jnp.zeros(16), 300))(xs) ** 2)

    g = eqx.filter_grad(loss)(cell)
    g_ref = eqx.filter_grad(loss_unrolled)(cell)
    assert rel_err(eqx.filter(g, eqx.is_array), eqx.filter(g_ref, eqx.is_array)) <= 1e-6


def test_deq_warm_start_needs_fewer_steps():
    cell = fpx.nn.ContractiveCell(jr.PRNGKey(0), state_size=16, input_size=5, gamma=0.9)
    deq = fpx.nn.DEQ(cell, solver=fpx.Picard(rtol=1e-8, atol=0.0), max_steps=500)
    x = jnp.ones(5)
    z, cold = deq(x)
    _, warm = deq(x + 1e-3, z0=z)
    assert int(warm["num_steps"]) <= 0.7 * int(cold["num_steps"])


class EqxCell(eqx.Module):
    lin: eqx.nn.Linear

    def __call__(self, z, x):
        return jnp.tanh(0.5 * self.lin(z) + x)


def test_deq_starts_from_zeros_when_the_state_has_the_shape_of_x():
    # z = 0.5 z + x: the fixed point is 2x; no init_state, no z0.
    z, stats = fpx.nn.DEQ(lambda z, x: 0.5 * z + x, solver=fpx.Picard(**TIGHT), max_steps=100)(jnp.array([1.0, -2.0, 3.0]))
    np.testing.assert_allclose(z, [2.0, -4.0, 6.0], atol=1e-11)
    assert bool(stats["converged"])
    # The cell tanh(0.5 lin(z) + x): the same solve as from z0 = zeros, step for step.
    cell = EqxCell(eqx.nn.Linear(4, 4, key=jr.PRNGKey(0)))
    deq = fpx.nn.DEQ(cell, solver=fpx.Anderson(**TIGHT), max_steps=200)
    xs = jr.normal(jr.PRNGKey(1), (3, 4))
    (z, stats), (z_ref, stats_ref) = jax.jit(
        lambda xs: (jax.vmap(deq)(xs), jax.vmap(lambda x: deq(x, z0=jnp.zeros(4)))(xs))
    )(xs)
    np.testing.assert_array_equal(z, z_ref)
    np.testing.assert_array_equal(stats["num_steps"], stats_ref["num_steps"])
    assert bool(stats["converged"].all())
    np.testing.assert_allclose(z, jax.vmap(cell)(z, xs), atol=1e-11)


def test_deq_without_a_state_of_the_shape_of_x_asks_for_z0():
    # The state has 2 entries, the input 3: zeros_like(x) does not fit, the error says why.
    deq = fpx.nn.DEQ(lambda z, x: 0.5 * z + jnp.ones(2) * x.sum())
    with pytest.raises(ValueError, match=r"pass `z0=`(.|\n)*zero state shaped like the input x: f64\[3\] does not fit: `cell\(zeros_like\(x\), x\)` raised"):
        deq(jnp.ones(3))
    z, stats = deq(jnp.ones(3), z0=jnp.zeros(2))
    np.testing.assert_allclose(z, 6.0, rtol=1e-4)
    # Same shape, other dtype: float32 input, float64 weights.
    cell = EqxCell(eqx.nn.Linear(4, 4, key=jr.PRNGKey(0)))
    with pytest.raises(ValueError, match=r"pass `z0=`(.|\n)*f32\[4\] does not fit: `cell\(zeros_like\(x\), x\)` returns f64\[4\]"):
        fpx.nn.DEQ(cell)(jnp.ones(4, jnp.float32))


def test_deq_input_or_z0_of_the_wrong_size_is_a_clear_error():
    cell = fpx.nn.ContractiveCell(jr.PRNGKey(0), state_size=8, input_size=3)
    deq = fpx.nn.DEQ(cell)
    with pytest.raises(ValueError, match=r"ContractiveCell\(state_size=8, input_size=3\).*an input `x` of shape \(3,\); got `z` of shape \(8,\), `x` of shape \(4,\)"):
        deq(jnp.ones(4))
    with pytest.raises(ValueError, match=r"a state `z` \(the DEQ's `z0`\) of shape \(8,\).*got `z` of shape \(5,\)"):
        deq(jnp.ones(3), z0=jnp.zeros(5))
    with pytest.raises(ValueError, match=r"an input `x` of shape \(3,\); got `z` of shape \(8,\), `x` of shape \(2, 3\)(.|\n)*jax.vmap"):
        deq(jnp.ones((2, 3)))  # a batch without vmap
    sub = fpx.nn.SubDEQCell(jr.PRNGKey(0), state_size=6, input_size=2)
    with pytest.raises(ValueError, match=r"SubDEQCell\(state_size=6, input_size=2\).*`x` of shape \(5,\)"):
        fpx.nn.DEQ(sub)(jnp.ones(5))
    cgs = fpx.nn.CGSCell(jr.PRNGKey(0), feature_size=3, state_size=4)
    with pytest.raises(ValueError, match=r"`features` of shape \(5, 3\).*got .*`features` of shape \(5, 2\)"):
        fpx.nn.DEQ(cgs)((jnp.zeros((5, 5)), jnp.ones((5, 2)), jnp.ones(5)))
    with pytest.raises(TypeError, match=r"\(adjacency, features, mask\).*length 2"):
        fpx.nn.DEQ(cgs)((jnp.zeros((5, 5)), jnp.ones((5, 3))))
    # A cell without shape checks of its own: the DEQ names z0's and x's shapes and the state that fits.
    generic = fpx.nn.DEQ(EqxCell(eqx.nn.Linear(4, 4, key=jr.PRNGKey(0))))
    with pytest.raises(ValueError, match=r"cannot be evaluated on the state `z0`: f64\[3\] and the input x: f64\[4\](.|\n)*dot_general(.|\n)*A state of x's shape, f64\[4\], fits"):
        generic(jnp.ones(4), z0=jnp.zeros(3))
    with pytest.raises(ValueError, match=r"must return the state's structure(.|\n)*`z0`: f32\[4\](.|\n)*returns f64\[4\]"):
        generic(jnp.ones(4), z0=jnp.zeros(4, jnp.float32))


def test_deq_reports_nonconvergence_per_sample():
    deq = fpx.nn.DEQ(lambda z, c: c * z + 1.0, solver=fpx.Picard(), max_steps=50)
    z, stats = jax.vmap(lambda c: deq(c, z0=jnp.zeros(())))(jnp.array([0.5, 1.5]))
    np.testing.assert_array_equal(stats["converged"], [True, False])


class NnxCell(nnx.Module):
    def __init__(self, size, rngs):
        self.lin = nnx.Linear(size, size, rngs=rngs)
        self.inp = nnx.Linear(size, size, rngs=rngs)

    def __call__(self, z, x):
        return jnp.tanh(0.4 * self.lin(z) + self.inp(x))


def test_nnx_deq_matches_unrolled_value_and_gradient():
    model = fpx.nn.nnx.DEQ(NnxCell(6, nnx.Rngs(0)), solver=fpx.Anderson(**TIGHT), max_steps=200)
    x = jnp.linspace(-1.0, 1.0, 6)

    def loss(m):
        return jnp.sum(m(x, z0=jnp.zeros(6))[0] ** 2)

    def loss_unrolled(m):
        return jnp.sum(unrolled(m.cell, x, jnp.zeros(6), 200) ** 2)

    np.testing.assert_allclose(loss(model), loss_unrolled(model), rtol=1e-10)
    g = nnx.grad(loss)(model)
    g_ref = nnx.grad(loss_unrolled)(model)
    assert rel_err(nnx.state(g, nnx.Param), nnx.state(g_ref, nnx.Param)) <= 1e-6


def test_nnx_deq_starts_from_zeros_and_checks_shapes():
    model = fpx.nn.nnx.DEQ(NnxCell(6, nnx.Rngs(0)), solver=fpx.Anderson(**TIGHT), max_steps=200)
    x = jnp.linspace(-1.0, 1.0, 6)
    (z, stats), (z_ref, stats_ref) = nnx.jit(lambda m, x: (m(x), m(x, z0=jnp.zeros(6))))(model, x)
    np.testing.assert_array_equal(z, z_ref)
    assert bool(stats["converged"]) and int(stats["num_steps"]) == int(stats_ref["num_steps"])
    np.testing.assert_allclose(z, model.cell(z, x), atol=1e-11)
    with pytest.raises(ValueError, match=r"fpx.nn.nnx.DEQ needs a starting state: pass `z0=`(.|\n)*f64\[5\] does not fit"):
        model(jnp.ones(5))
    with pytest.raises(ValueError, match=r"fpx.nn.nnx.DEQ: NnxCell\(z, x\) cannot be evaluated on the state `z0`: f64\[4\](.|\n)*A state of x's shape, f64\[6\], fits"):
        model(x, z0=jnp.zeros(4))


def test_nnx_deq_trains_with_optax():
    model = fpx.nn.nnx.DEQ(NnxCell(4, nnx.Rngs(1)), solver=fpx.Anderson(rtol=1e-8, atol=0.0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    x, target = jnp.ones(4), jnp.array([0.5, -0.5, 0.25, 0.0])

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.sum((m(x, z0=jnp.zeros(4))[0] - target) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(60)]
    assert losses[-1] < 0.05 * losses[0]


# ------------------------------------------------------------------- cells


def test_contractive_cell_projection_keeps_contraction_during_training():
    cell = fpx.nn.ContractiveCell(jr.PRNGKey(0), state_size=8, input_size=3, gamma=0.7)
    assert float(jnp.linalg.norm(cell.weight, 2)) <= 0.7 + 1e-9
    model = {"deq_cell": cell, "head": jnp.ones(8)}
    bumped = eqx.tree_at(lambda m: m["deq_cell"].weight, model, 10.0 * cell.weight)
    projected = fpx.nn.project(bumped)
    np.testing.assert_allclose(jnp.linalg.norm(projected["deq_cell"].weight, 2), 0.7, rtol=1e-9)
    np.testing.assert_array_equal(projected["head"], model["head"])
    with pytest.raises(ValueError, match=r"gamma"):
        fpx.nn.ContractiveCell(jr.PRNGKey(0), state_size=8, input_size=3, gamma=1.0)


# The messages come from fpx._validate: they name the argument, say what is allowed and show the value.
@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda k: fpx.nn.ContractiveCell(k, state_size=-1, input_size=3), ValueError, r"`ContractiveCell\(state_size=...\)` must be .*integer.*, got -1"),
        (lambda k: fpx.nn.ContractiveCell(k, state_size=2.5, input_size=3), (TypeError, ValueError), r"`ContractiveCell\(state_size=...\)` must be .*integer.*, got 2.5"),
        (lambda k: fpx.nn.ContractiveCell(k, state_size=4, input_size=0), ValueError, r"`ContractiveCell\(input_size=...\)` must be .*integer.*, got 0"),
        (lambda k: fpx.nn.ContractiveCell(k, 4, 3, gamma="0.5"), TypeError, r"`ContractiveCell\(gamma=...\)` must be a real number.*, got '0.5'"),
        (lambda k: fpx.nn.SubDEQCell(k, state_size=0, input_size=3), ValueError, r"`SubDEQCell\(state_size=...\)` must be .*integer.*, got 0"),
        (lambda k: fpx.nn.SubDEQCell(k, state_size=3, input_size=1.5), (TypeError, ValueError), r"`SubDEQCell\(input_size=...\)` must be .*integer.*, got 1.5"),
        (lambda k: fpx.nn.CGSCell(k, feature_size=3, state_size=4, hidden_size=-2), ValueError, r"`CGSCell\(hidden_size=...\)` must be .*integer.*, got -2"),
        (lambda k: fpx.nn.CGSCell(k, feature_size=3, state_size=4, gamma=1.5), ValueError, r"`CGSCell\(gamma=...\)` must .*\(0, 1\), got 1.5"),
    ],
)
def test_cell_sizes_are_checked(make, error, match):
    with pytest.raises(error, match=match):
        make(jr.PRNGKey(0))


def _subdeq_converged(scale, normalize, seed):
    cell = fpx.nn.SubDEQCell(jr.PRNGKey(seed), state_size=64, input_size=64, weight_scale=scale, normalize=normalize)
    x = jr.normal(jr.PRNGKey(100 + seed), (64,))
    z, stats = fpx.nn.DEQ(cell, solver=fpx.Picard(rtol=1e-8, atol=0.0), max_steps=1000)(x)
    if normalize == "max" and bool(stats["converged"]):
        assert float(jnp.max(z)) == pytest.approx(1.0)
    return bool(stats["converged"])


def test_subdeq_normalisation_makes_large_weights_solvable():
    # Weight scale 10: the max-normalised cell converges for every seed, the raw cell rarely.
    seeds = range(8)
    assert all(_subdeq_converged(10.0, "max", s) for s in seeds)
    assert sum(_subdeq_converged(10.0, None, s) for s in seeds) <= 3


def test_subdeq_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"shift"):
        fpx.nn.SubDEQCell(jr.PRNGKey(0), 4, 4, shift=0.5)
    with pytest.raises(ValueError, match=r"normalize"):
        fpx.nn.SubDEQCell(jr.PRNGKey(0), 4, 4, normalize="l2")


def _random_graph(key, n, real):
    a = (jr.uniform(key, (n, n)) < 0.3).astype(jnp.float64)
    a = jnp.triu(a, 1)
    a = a + a.T
    mask = (jnp.arange(n) < real).astype(jnp.float64)
    return a, mask


@pytest.mark.parametrize("gamma", [0.5, 0.8, 0.95])
def test_cgs_cell_meets_banach_step_bound(gamma):
    cell = fpx.nn.CGSCell(jr.PRNGKey(0), feature_size=3, state_size=4, gamma=gamma)
    adjacency, mask = _random_graph(jr.PRNGKey(1), 12, 9)
    graph = (adjacency, jr.normal(jr.PRNGKey(2), (12, 3)), mask)
    a_hat = fpx.nn.normalized_adjacency(adjacency, mask)
    assert float(jnp.linalg.norm(a_hat, 2)) <= 1 + 1e-12
    tol = 1e-10
    h0 = cell.init_state(graph)
    r0 = float(jnp.linalg.norm(h0 - cell(h0, graph)))
    z, stats = fpx.nn.DEQ(cell, solver=fpx.Picard(rtol=0.0, atol=tol), max_steps=2000)(graph)
    bound = math.ceil(math.log(tol / r0) / math.log(gamma))
    assert bool(stats["converged"]) and int(stats["num_steps"]) <= bound
    # Padded nodes stay exactly zero.
    np.testing.assert_array_equal(z[9:], 0.0)


def test_jacobian_regularizer_is_unbiased():
    w = jr.normal(jr.PRNGKey(0), (5, 5))
    fn = lambda z, w: jnp.tanh(w @ z)
    z = jnp.linspace(-0.3, 0.3, 5)
    exact = float(jnp.sum(jax.jacfwd(fn)(z, w) ** 2)) / 5
    estimate = float(fpx.nn.jacobian_regularizer(fn, z, w, jr.PRNGKey(1), num_samples=20_000))
    assert estimate == pytest.approx(exact, rel=0.03)
    # With a fixed key the estimate is a smooth function of w: its gradient is the central
    # difference, and (unbiased) the many-sample gradient is that of the exact |J|_F^2 / dim.
    few = jax.jit(lambda w: fpx.nn.jacobian_regularizer(fn, z, w, jr.PRNGKey(1), num_samples=4))
    g = jax.grad(few)(w)
    v = jr.normal(jr.PRNGKey(2), w.shape)
    eps = 1e-6
    numeric = (float(few(w + eps * v)) - float(few(w - eps * v))) / (2 * eps)
    assert float(jnp.sum(g * v)) == pytest.approx(numeric, rel=1e-7)
    exact_grad = jax.grad(lambda w: jnp.sum(jax.jacfwd(fn)(z, w) ** 2) / 5)(w)
    many = jax.grad(lambda w: fpx.nn.jacobian_regularizer(fn, z, w, jr.PRNGKey(1), num_samples=20_000))(w)
    assert rel_err(many, exact_grad) < 0.05


def test_jacobian_regularizer_lowers_solver_steps_when_trained():
    cell = fpx.nn.ContractiveCell(jr.PRNGKey(0), state_size=16, input_size=4, gamma=0.99)
    x = jnp.ones(4)
    deq = lambda c: fpx.nn.DEQ(c, solver=fpx.Picard(rtol=1e-6, atol=0.0), max_steps=2000)(x)
    steps_before = int(deq(cell)[1]["num_steps"])
    optimizer = optax.sgd(0.5)
    state = optimizer.init(eqx.filter(cell, eqx.is_array))

    @eqx.filter_jit
    def step(cell, state):
        def reg(cell):
            z, _ = fpx.nn.DEQ(cell, solver=fpx.Picard(rtol=1e-6, atol=0.0), max_steps=2000)(x)
            return fpx.nn.jacobian_regularizer(cell, jax.lax.stop_gradient(z), x, jr.PRNGKey(0), num_samples=8)

        grads = eqx.filter_grad(reg)(cell)
        updates, state = optimizer.update(grads, state)
        return fpx.nn.project(eqx.apply_updates(cell, updates)), state

    for _ in range(20):
        cell, state = step(cell, state)
    assert int(deq(cell)[1]["num_steps"]) < steps_before
