"""Implicit differentiation of `fixed_point` (the ImplicitAdjoint used by default)."""

import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import pytest
from jax.test_util import check_grads

import fpx

D = 8


def _problem(dtype=jnp.float64, gamma=0.8):
    k1, k2, k3 = jr.split(jr.PRNGKey(0), 3)
    q, _ = jnp.linalg.qr(jr.normal(k1, (D, D)))
    params = {
        "W": (gamma * q).astype(dtype),
        "U": (0.5 * jr.normal(k2, (D, D)) / jnp.sqrt(D)).astype(dtype),
        "b": (0.1 * jr.normal(k3, (D,))).astype(dtype),
    }
    x = jnp.linspace(-1.0, 1.0, D, dtype=dtype)
    return params, x


def cell(z, params_x):
    params, x = params_x
    return jnp.tanh(params["W"] @ z + params["U"] @ x + params["b"])


def loss_implicit(params, x, solver, adjoint=fpx.ImplicitAdjoint()):
    z0 = jnp.zeros(D, x.dtype)
    z = fpx.fixed_point(cell, z0, (params, x), solver=solver, adjoint=adjoint, max_steps=2000).value
    return jnp.sum(z**2) + jnp.sum(jnp.sin(z))


def loss_unrolled(params, x, steps=400):
    z = jnp.zeros(D, x.dtype)
    for _ in range(steps):
        z = cell(z, (params, x))
    return jnp.sum(z**2) + jnp.sum(jnp.sin(z))


def _rel_err(a, b):
    a, b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    num = np.sqrt(sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(a, b)))
    den = np.sqrt(sum(float(jnp.sum(y**2)) for y in b))
    return num / den


TIGHT = dict(rtol=0.0, atol=1e-13)


@pytest.mark.parametrize(
    "solver",
    [fpx.Picard(**TIGHT), fpx.Anderson(**TIGHT), fpx.Broyden(**TIGHT), fpx.NewtonKrylov(**TIGHT)],
    ids=lambda s: type(s).__name__,
)
def test_implicit_gradient_matches_unrolled_float64(solver):
    params, x = _problem()
    g_imp = jax.grad(loss_implicit, argnums=(0, 1))(params, x, solver)
    g_unr = jax.grad(loss_unrolled, argnums=(0, 1))(params, x)
    assert _rel_err(g_imp, g_unr) <= 1e-6


@pytest.mark.parametrize("solver", [fpx.Picard(rtol=1e-6, atol=0.0), fpx.Anderson(rtol=1e-6, atol=0.0)], ids=lambda s: type(s).__name__)
def test_implicit_gradient_matches_unrolled_float32(solver):
    params, x = _problem(jnp.float32)
    g_imp = jax.grad(loss_implicit, argnums=(0, 1))(params, x, solver)
    g_unr = jax.grad(loss_unrolled, argnums=(0, 1))(params, x, 200)
    assert jax.tree_util.tree_leaves(g_imp)[0].dtype == jnp.float32
    assert _rel_err(g_imp, g_unr) <= 1e-4


def test_check_grads_reverse_mode():
    params, x = _problem()
    solver = fpx.Anderson(**TIGHT)
    check_grads(lambda p, x: loss_implicit(p, x, solver), (params, x), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_lineax_linear_solver_for_the_adjoint():
    params, x = _problem()
    adjoint = fpx.ImplicitAdjoint(linear_solver=lx.GMRES(rtol=1e-12, atol=1e-12))
    g_imp = jax.grad(loss_implicit)(params, x, fpx.Picard(**TIGHT), adjoint)
    g_unr = jax.grad(loss_unrolled)(params, x)
    assert _rel_err(g_imp, g_unr) <= 1e-6


def test_backward_solver_can_differ_from_forward():
    params, x = _problem()
    adjoint = fpx.ImplicitAdjoint(solver=fpx.Anderson(**TIGHT))
    g_imp = jax.grad(loss_implicit)(params, x, fpx.Picard(**TIGHT), adjoint)
    assert _rel_err(g_imp, jax.grad(loss_unrolled)(params, x)) <= 1e-6


def test_gradient_wrt_z0_is_zero():
    params, x = _problem()

    def f(z0):
        return fpx.fixed_point(cell, z0, (params, x), solver=fpx.Anderson(**TIGHT)).value.sum()

    g = jax.grad(f)(jnp.ones(D))
    np.testing.assert_array_equal(g, jnp.zeros(D))


def test_grad_of_vmap_and_vmap_of_grad():
    params, x = _problem()
    xs = jnp.stack([x, 0.5 * x, -x])
    solver = fpx.Anderson(**TIGHT)

    def batch_loss(params):
        return jnp.sum(jax.vmap(lambda x: loss_implicit(params, x, solver))(xs))

    g_batch = jax.jit(jax.grad(batch_loss))(params)
    g_ref = jax.tree_util.tree_map(lambda *g: sum(g), *[jax.grad(loss_unrolled)(params, xi) for xi in xs])
    assert _rel_err(g_batch, g_ref) <= 1e-6
    per_sample = jax.vmap(lambda x: jax.grad(loss_implicit, argnums=1)(params, x, solver))(xs)
    np.testing.assert_allclose(per_sample[1], jax.grad(loss_unrolled, argnums=1)(params, xs[1]), rtol=1e-6, atol=1e-10)


def test_gradient_through_equinox_module_args():
    import equinox as eqx

    class Cell(eqx.Module):
        weight: jax.Array
        bias: jax.Array

        def __call__(self, z, x):
            return jnp.tanh(self.weight @ z + x) + self.bias

    params, x = _problem()
    model = Cell(params["W"], params["b"])

    def loss(model):
        return fpx.fixed_point(lambda z, m: m(z, x), jnp.zeros(D), model, solver=fpx.Anderson(**TIGHT)).value.sum()

    def loss_unr(model):
        z = jnp.zeros(D)
        for _ in range(400):
            z = model(z, x)
        return z.sum()

    g = eqx.filter_grad(loss)(model)
    g_ref = eqx.filter_grad(loss_unr)(model)
    assert _rel_err((g.weight, g.bias), (g_ref.weight, g_ref.bias)) <= 1e-6


def _expansive_at_solution():
    # Newton solves z = 2 z - a exactly (z* = a), but the adjoint iteration u = 2 u + g diverges.
    return lambda z, a: 2.0 * z - a, jnp.zeros(3), jnp.ones(3)


def test_failed_backward_solve_raises_with_throw():
    fn, z0, a = _expansive_at_solution()
    loss = lambda a: fpx.fixed_point(
        fn, z0, a, solver=fpx.NewtonKrylov(), adjoint=fpx.ImplicitAdjoint(solver=fpx.Picard(), max_steps=50)
    ).value.sum()
    with pytest.raises(Exception, match=r"backward \(adjoint\) solve of the implicit gradient failed"):
        jax.block_until_ready(jax.grad(loss)(a))


def test_failed_backward_solve_gives_nan_without_throw():
    fn, z0, a = _expansive_at_solution()
    loss = lambda a: fpx.fixed_point(
        fn, z0, a, solver=fpx.NewtonKrylov(), adjoint=fpx.ImplicitAdjoint(solver=fpx.Picard(), max_steps=50), throw=False
    ).value.sum()
    g = jax.grad(loss)(a)
    assert np.all(np.isnan(np.asarray(g)))
    # The default adjoint for a NewtonKrylov forward (Anderson, i.e. GMRES on this linear
    # problem) does solve it: dz*/da = 1.
    good = lambda a: fpx.fixed_point(fn, z0, a, solver=fpx.NewtonKrylov(rtol=0, atol=1e-10)).value.sum()
    np.testing.assert_allclose(jax.grad(good)(a), jnp.ones(3), rtol=1e-8)


@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e8])
def test_gradient_accuracy_does_not_depend_on_loss_scale(scale):
    # The adjoint solve is relative to |gbar|: a tiny or huge loss scale must not make
    # `atol` stop it early or run it to max_steps.
    params, x = _problem()
    solver = fpx.Picard(rtol=1e-10, atol=1e-10)
    g = jax.grad(lambda p: scale * loss_implicit(p, x, solver))(params)
    g_ref = jax.grad(lambda p: scale * loss_unrolled(p, x))(params)
    assert _rel_err(g, g_ref) <= 1e-8


# ------------------------------------------------------ the other adjoints


def test_unrolled_adjoint_matches_implicit():
    params, x = _problem()
    solver = fpx.Picard(**TIGHT)
    g_unr = jax.grad(loss_implicit)(params, x, solver, fpx.UnrolledAdjoint())
    assert _rel_err(g_unr, jax.grad(loss_unrolled)(params, x)) <= 1e-8


# T1 (DESIGN §9) with the matrix and offset as parameters: T(z; M, b) = M z + b,
# M = [[.5, .25], [.25, .5]], b = (1, 1), z* = (4, 4). For L = w . z*, w = (1, 2):
# dL/db = u = (I - M)^{-T} w = (16, 20)/3 and dL/dM = u z*^T = [[64, 64], [80, 80]]/3.
M_T1 = jnp.array([[0.5, 0.25], [0.25, 0.5]])
W_T1 = jnp.array([1.0, 2.0])
GRAD_B_T1 = np.array([16.0, 20.0]) / 3.0
GRAD_M_T1 = np.array([[64.0, 64.0], [80.0, 80.0]]) / 3.0


def _t1_loss(m, b, adjoint):
    sol = fpx.fixed_point(
        lambda z, mb: mb[0] @ z + mb[1], jnp.zeros(2), (m, b), solver=fpx.Picard(rtol=0.0, atol=1e-14),
        adjoint=adjoint, max_steps=500,
    )
    return W_T1 @ sol.value, sol.stats["num_steps"]


def _unrolled_t1_gradient(m, b, steps):
    """Reverse mode through `steps` Picard steps from 0, by hand: z_{i+1} = M z_i + b."""
    m, b, w = np.asarray(m), np.asarray(b), np.asarray(W_T1)
    zs = [np.zeros(2)]
    for _ in range(steps):
        zs.append(m @ zs[-1] + b)
    lam, g_m, g_b = w.copy(), np.zeros((2, 2)), np.zeros(2)
    for i in reversed(range(steps)):
        g_m += np.outer(lam, zs[i])
        g_b += lam
        lam = m.T @ lam
    return g_m, g_b


def test_unrolled_adjoint_checkpoints_give_the_closed_form_gradient():
    grads = {}
    for k in (1, 3, None):
        adjoint = fpx.UnrolledAdjoint(checkpoints=k)
        (g_m, g_b), steps = jax.grad(_t1_loss, argnums=(0, 1), has_aux=True)(M_T1, jnp.ones(2), adjoint)
        steps = int(steps)
        # Picard's residual sqrt(2) 0.75^k first falls below 1e-14 at k = 114.
        assert steps == 114
        # It is the gradient of the 114 iterations the solver took ...
        ref_m, ref_b = _unrolled_t1_gradient(M_T1, jnp.ones(2), steps)
        np.testing.assert_allclose(g_m, ref_m, rtol=1e-13)
        np.testing.assert_allclose(g_b, ref_b, rtol=1e-13)
        # ... which is the implicit gradient up to the truncation after 114 steps (5e-12, relative 2e-13).
        np.testing.assert_allclose(g_m, GRAD_M_T1, rtol=1e-12)
        np.testing.assert_allclose(g_b, GRAD_B_T1, rtol=1e-13)
        grads[k] = (np.asarray(g_m), np.asarray(g_b))
    # Checkpointing changes what is stored and recomputed, not the arithmetic.
    for k in (1, 3):
        np.testing.assert_allclose(grads[k][0], grads[None][0], rtol=1e-15, atol=0)
        np.testing.assert_allclose(grads[k][1], grads[None][1], rtol=1e-15, atol=0)
    (g_m, g_b), _ = jax.grad(_t1_loss, argnums=(0, 1), has_aux=True)(M_T1, jnp.ones(2), fpx.ImplicitAdjoint())
    np.testing.assert_allclose(g_m, GRAD_M_T1, rtol=1e-12)
    np.testing.assert_allclose(g_b, GRAD_B_T1, rtol=1e-12)


def test_unrolled_adjoint_with_two_checkpoints_matches_implicit_on_the_deq_cell():
    params, x = _problem()
    solver = fpx.Picard(**TIGHT)
    g_unr = jax.grad(loss_implicit)(params, x, solver, fpx.UnrolledAdjoint(checkpoints=2))
    g_imp = jax.grad(loss_implicit)(params, x, solver)
    assert _rel_err(g_unr, g_imp) <= 1e-10


def test_unrolled_adjoint_differentiates_what_the_solver_did():
    # Stopped after 3 Picard steps, the unrolled gradient is that of 3 unrolled steps
    # (and not the implicit gradient of the true fixed point).
    params, x = _problem()
    adj = fpx.UnrolledAdjoint()
    g = jax.grad(lambda p: fpx.fixed_point(cell, jnp.zeros(D), (p, x), adjoint=adj, max_steps=3, throw=False).value.sum())(params)

    def three(p):
        z = jnp.zeros(D)
        for _ in range(3):
            z = cell(z, (p, x))
        return z.sum()

    assert _rel_err(g, jax.grad(three)(params)) <= 1e-12


def test_jfb_is_one_step_gradient_and_value_is_exact():
    params, x = _problem()
    solver = fpx.Picard(**TIGHT)
    sol_value = fpx.fixed_point(cell, jnp.zeros(D), (params, x), solver=solver, adjoint=fpx.JFBAdjoint()).value
    z_star = fpx.fixed_point(cell, jnp.zeros(D), (params, x), solver=solver).value
    np.testing.assert_array_equal(sol_value, z_star)
    g = jax.grad(lambda p: fpx.fixed_point(cell, jnp.zeros(D), (p, x), solver=solver, adjoint=fpx.JFBAdjoint()).value.sum())(params)
    g_one_step = jax.grad(lambda p: cell(z_star, (p, x)).sum())(params)
    assert _rel_err(g, g_one_step) <= 1e-12


def test_phantom_error_shrinks_with_steps():
    # Measured, not assumed equal: the phantom gradient is a truncated damped Neumann
    # series; its error against the implicit gradient falls as steps grow.
    params, x = _problem()
    solver = fpx.Picard(**TIGHT)
    g_ref = jax.grad(loss_unrolled)(params, x)
    errors = [
        _rel_err(jax.grad(loss_implicit)(params, x, solver, fpx.PhantomAdjoint(steps=k, damping=0.9)), g_ref)
        for k in (1, 5, 20, 60)
    ]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-4 < errors[0]
    err_jfb = _rel_err(jax.grad(loss_implicit)(params, x, solver, fpx.JFBAdjoint()), g_ref)
    assert 0.05 < err_jfb < 1.0


def test_adjoint_argument_validation():
    with pytest.raises(ValueError, match=r"PhantomAdjoint\(steps=...\)"):
        fpx.PhantomAdjoint(steps=0)
    with pytest.raises(ValueError, match=r"PhantomAdjoint\(damping=...\)"):
        fpx.PhantomAdjoint(damping=1.5)


def test_backward_probe_reports_the_adjoint_solve():
    params, x = _problem()
    solver = fpx.Picard(rtol=1e-10, atol=0.0)

    def loss(params, probe):
        sol = fpx.fixed_point(cell, jnp.zeros(D), (params, x), solver=solver, backward_probe=probe)
        return jnp.sum(sol.value**2)

    _, (steps, residual, failed) = jax.grad(loss, argnums=(0, 1))(params, fpx.backward_probe())
    # The adjoint iteration contracts like the forward one: comparable step counts.
    forward_steps = int(fpx.fixed_point(cell, jnp.zeros(D), (params, x), solver=solver).stats["num_steps"])
    assert 0.5 * forward_steps <= float(steps) <= 1.5 * forward_steps
    assert 0 < float(residual) <= 1e-10 * 10 and float(failed) == 0.0

    # Shared across vmapped members, the probe sums their statistics.
    def batch_loss(params, probe):
        xs = jnp.stack([x, 2 * x])
        return jnp.sum(jax.vmap(lambda x: jnp.sum(fpx.fixed_point(cell, jnp.zeros(D), (params, x), solver=solver, backward_probe=probe).value))(xs))

    _, (steps2, _, _) = jax.grad(batch_loss, argnums=(0, 1))(params, fpx.backward_probe())
    assert float(steps2) >= 2 * 0.5 * forward_steps


def test_backward_probe_flags_a_failed_adjoint():
    loss = lambda a, probe: fpx.fixed_point(
        lambda z, a: 2.0 * z - a, jnp.zeros(3), a, solver=fpx.NewtonKrylov(),
        adjoint=fpx.ImplicitAdjoint(solver=fpx.Picard(), max_steps=20), throw=False, backward_probe=probe,
    ).value.sum()
    _, (steps, _, failed) = jax.grad(loss, argnums=(0, 1))(jnp.ones(3), fpx.backward_probe())
    assert float(failed) == 1.0 and float(steps) == 20.0
