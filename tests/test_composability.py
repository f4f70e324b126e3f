"""`fixed_point` under every JAX transformation: forward mode, higher order, has_aux, static args.

Float64 throughout (conftest); derivatives are checked against central finite differences
of the solve itself and against the closed forms of a linear fixed point.
"""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest

import fpx

TIGHT = dict(rtol=0.0, atol=1e-12)
SOLVERS = [
    fpx.Picard(**TIGHT),
    fpx.KM(alpha=0.8, **TIGHT),
    fpx.Halpern(contraction=0.6, **TIGHT),
    fpx.Anderson(**TIGHT),
    fpx.Broyden(**TIGHT),
    fpx.NewtonKrylov(**TIGHT),
]
IDS = lambda s: type(s).__name__  # noqa: E731

A = jnp.array([[0.3, -0.2, 0.1], [0.05, 0.25, -0.1], [0.1, 0.0, 0.35]])


def cell(z, params):
    """A smooth contraction with pytree parameters."""
    return jnp.tanh(params["w"] @ z + params["b"]) * params["scale"]


PARAMS = {"w": A, "b": jnp.array([0.3, -0.5, 0.8]), "scale": jnp.array(0.9)}


def solve(params, solver=fpx.Picard(**TIGHT), **kw):
    return fpx.fixed_point(cell, jnp.zeros(3), params, solver=solver, max_steps=2000, **kw).value


def fd_jvp(f, params, tangent, eps=1e-6):
    plus = jax.tree_util.tree_map(lambda p, t: p + eps * t, params, tangent)
    minus = jax.tree_util.tree_map(lambda p, t: p - eps * t, params, tangent)
    return (f(plus) - f(minus)) / (2 * eps)


TANGENT = {"w": jnp.array([[1.0, 0.5, 0.0], [0.0, -1.0, 0.2], [0.3, 0.0, 1.0]]), "b": jnp.array([1.0, 2.0, -1.0]), "scale": jnp.array(0.5)}


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_jvp_matches_finite_differences_for_every_solver(solver):
    f = lambda p: solve(p, solver)  # noqa: E731
    _, tangent = jax.jit(lambda p, t: jax.jvp(f, (p,), (t,)))(PARAMS, TANGENT)
    np.testing.assert_allclose(tangent, fd_jvp(f, PARAMS, TANGENT), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_vjp_matches_finite_differences_for_every_solver(solver):
    f = lambda p: jnp.sum(jnp.sin(solve(p, solver)))  # noqa: E731
    grad = jax.grad(f)(PARAMS)
    directional = sum(jnp.sum(g * t) for g, t in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(TANGENT)))
    np.testing.assert_allclose(directional, fd_jvp(f, PARAMS, TANGENT), rtol=1e-7)


def test_linear_fixed_point_derivatives_have_their_closed_form():
    # z* = A z* + b  =>  z* = (I - A)^{-1} b, dz*/db = (I - A)^{-1}, exactly.
    inv = np.linalg.inv(np.eye(3) - np.asarray(A))
    f = lambda b: fpx.fixed_point(lambda z, b: A @ z + b, jnp.zeros(3), b, solver=fpx.Picard(**TIGHT), max_steps=500).value  # noqa: E731
    b = jnp.array([1.0, -2.0, 0.5])
    np.testing.assert_allclose(jax.jacfwd(f)(b), inv, rtol=1e-10)
    np.testing.assert_allclose(jax.jacrev(f)(b), inv, rtol=1e-10)
    # The solution is linear in b: its Hessian is exactly zero.
    np.testing.assert_allclose(jax.hessian(lambda b: f(b).sum())(b), np.zeros((3, 3)), atol=1e-12)


def test_jacfwd_equals_jacrev():
    fwd = jax.jacfwd(solve)(PARAMS)
    rev = jax.jacrev(solve)(PARAMS)
    for a, b in zip(jax.tree_util.tree_leaves(fwd), jax.tree_util.tree_leaves(rev)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_hessian_and_forward_over_reverse_match_finite_differences():
    def loss(b):
        return jnp.sum(solve({**PARAMS, "b": b}) ** 3)

    b = PARAMS["b"]
    hessian = jax.hessian(loss)(b)
    grad = jax.grad(loss)
    eps = 1e-5
    fd = np.stack([(grad(b + eps * e) - grad(b - eps * e)) / (2 * eps) for e in np.eye(3)])
    np.testing.assert_allclose(hessian, fd, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(hessian, hessian.T, rtol=1e-9)
    v = jnp.array([0.3, -1.0, 2.0])
    _, hvp = jax.jvp(grad, (b,), (v,))  # forward-over-reverse
    np.testing.assert_allclose(hvp, hessian @ v, rtol=1e-9)
    hvp_rev = jax.grad(lambda b: jnp.dot(grad(b), v))(b)  # reverse-over-reverse
    np.testing.assert_allclose(hvp_rev, hessian @ v, rtol=1e-9)


def test_hessian_through_a_closed_over_parameter():
    # fn closes over `w` (a traced value): closure conversion must carry its tangents too.
    def loss(scale):
        return fpx.fixed_point(lambda z, _: jnp.tanh(scale * (A @ z) + 1.0), jnp.zeros(3), solver=fpx.Picard(**TIGHT)).value.sum()

    scale = jnp.array(0.7)
    second = jax.grad(jax.grad(loss))(scale)
    eps = 1e-4
    fd = (jax.grad(loss)(scale + eps) - jax.grad(loss)(scale - eps)) / (2 * eps)
    np.testing.assert_allclose(second, fd, rtol=1e-6)
    np.testing.assert_allclose(jax.jacfwd(jax.jacfwd(loss))(scale), second, rtol=1e-9)


def test_forward_mode_under_vmap_and_jit_with_mixed_members():
    def member(c):
        return fpx.fixed_point(lambda z, c: c * jnp.cos(z), jnp.zeros(()), c, solver=fpx.Picard(**TIGHT), max_steps=2000).value

    cs = jnp.array([0.2, 0.5, 0.9])
    _, tangents = jax.jit(jax.vmap(lambda c: jax.jvp(member, (c,), (jnp.ones(()),))))(cs)
    z = jax.vmap(member)(cs)
    # Implicit derivative of z = c cos z: dz/dc = cos z / (1 + c sin z).
    np.testing.assert_allclose(tangents, np.cos(z) / (1 + cs * np.sin(z)), rtol=1e-9)
    np.testing.assert_allclose(jax.grad(lambda c: jax.vmap(member)(c).sum())(cs), tangents, rtol=1e-9)


def test_halpern_forward_solve_gets_an_anderson_adjoint():
    halpern = fpx.Halpern(contraction=0.6, rtol=0.0, atol=1e-10)
    assert isinstance(fpx.ImplicitAdjoint().backward_solver(halpern), fpx.Anderson)
    probe_grad = jax.grad(
        lambda b, probe: jnp.sum(fpx.fixed_point(cell, jnp.zeros(3), {**PARAMS, "b": b}, solver=halpern, max_steps=5000, backward_probe=probe).value),
        argnums=(0, 1),
    )
    grad, (steps, residual, failed) = probe_grad(PARAMS["b"], fpx.backward_probe())
    reference = jax.grad(lambda b: jnp.sum(solve({**PARAMS, "b": b})))(PARAMS["b"])
    np.testing.assert_allclose(grad, reference, rtol=1e-8)
    # Anderson solves the 3-dimensional linear adjoint in at most a handful of steps,
    # where Halpern's O(1/k) rate would need thousands for atol 1e-10.
    assert failed == 0 and 0 < steps <= 10


def test_backward_probe_sums_the_adjoint_report_over_vmapped_members():
    def loss(bs, probe):
        solve_one = lambda b: fpx.fixed_point(cell, jnp.zeros(3), {**PARAMS, "b": b}, solver=fpx.Picard(**TIGHT), backward_probe=probe, max_steps=2000).value  # noqa: E731
        return jnp.sum(jax.vmap(solve_one)(bs))

    bs = jnp.stack([PARAMS["b"], -PARAMS["b"]])
    _, report = jax.grad(loss, argnums=(0, 1))(bs, fpx.backward_probe())
    singles = [jax.grad(loss, argnums=1)(b[None], fpx.backward_probe()) for b in bs]
    np.testing.assert_allclose(report, singles[0] + singles[1], rtol=1e-12)
    assert report[2] == 0 and report[0] > 0


def test_has_aux_returns_the_aux_of_the_returned_iterate():
    def fn(z, params):
        out = cell(z, params)
        return out, {"residual": z - out, "tag": jnp.sum(out)}

    sol = fpx.fixed_point(fn, jnp.zeros(3), PARAMS, solver=fpx.Anderson(**TIGHT), has_aux=True)
    np.testing.assert_allclose(sol.aux["tag"], jnp.sum(cell(sol.value, PARAMS)), rtol=1e-14)
    assert float(jnp.max(jnp.abs(sol.aux["residual"]))) < 1e-11
    # Differentiable, and the aux output needs no gradient.
    grad = jax.grad(lambda p: fpx.fixed_point(fn, jnp.zeros(3), p, solver=fpx.Picard(**TIGHT), has_aux=True).value.sum())(PARAMS)
    reference = jax.grad(lambda p: solve(p).sum())(PARAMS)
    np.testing.assert_allclose(grad["b"], reference["b"], rtol=1e-10)
    # Under vmap each member has its own aux.
    sols = jax.vmap(lambda b: fpx.fixed_point(fn, jnp.zeros(3), {**PARAMS, "b": b}, has_aux=True))(jnp.stack([PARAMS["b"], -PARAMS["b"]]))
    assert sols.aux["tag"].shape == (2,)
    np.testing.assert_allclose(sols.aux["tag"][0], -sols.aux["tag"][1], rtol=1e-4)


def test_has_aux_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"has_aux=True, fn\(z, args\) must return a pair"):
        fpx.fixed_point(lambda z, _: 0.5 * z, jnp.zeros(2), has_aux=True)
    with pytest.raises(ValueError, match="pass has_aux=True"):
        fpx.fixed_point(lambda z, _: (0.5 * z, 1), jnp.zeros(2))


def test_python_scalars_ints_none_and_static_objects_in_args():
    class Config:
        power = 2

    def fn(z, args):
        assert args["name"] == "cos" and args["nothing"] is None and args["cfg"] is Config
        return args["c"] * jnp.cos(z) ** args["n"] / args["n"]

    def loss(c):
        args = {"c": c, "n": 1, "name": "cos", "nothing": None, "cfg": Config}
        return fpx.fixed_point(fn, jnp.ones(3), args, solver=fpx.Picard(**TIGHT), max_steps=2000).value.sum()

    z = fpx.fixed_point(lambda z, _: jnp.cos(z), jnp.ones(3), solver=fpx.Picard(**TIGHT), max_steps=2000).value
    expected = 3 * np.cos(z[0]) / (1 + np.sin(z[0]))
    for c in (1.0, jnp.array(1.0)):
        np.testing.assert_allclose(jax.grad(loss)(c), expected, rtol=1e-9)
        np.testing.assert_allclose(jax.jit(jax.grad(loss))(c), expected, rtol=1e-9)
        np.testing.assert_allclose(jax.jvp(loss, (c,), (1.0,))[1], expected, rtol=1e-9)
    np.testing.assert_allclose(jax.vmap(jax.grad(loss))(jnp.array([1.0, 1.0])), [expected, expected], rtol=1e-9)
    # The example, verbatim: a Python float as args under grad.
    g = jax.grad(lambda c: fpx.fixed_point(lambda z, c: jnp.cos(c * z), jnp.ones(3), c).value.sum())(1.0)
    np.testing.assert_allclose(g, 3 * -np.sin(z[0]) * z[0] / (1 + np.sin(z[0])), rtol=1e-4)


def test_lineax_linear_solver_in_both_modes_and_its_failure_reason():
    adjoint = fpx.ImplicitAdjoint(linear_solver=lx.GMRES(rtol=1e-12, atol=1e-12))
    f = lambda p: fpx.fixed_point(cell, jnp.zeros(3), p, solver=fpx.Picard(**TIGHT), adjoint=adjoint).value  # noqa: E731
    _, tangent = jax.jvp(f, (PARAMS,), (TANGENT,))
    np.testing.assert_allclose(tangent, fd_jvp(solve, PARAMS, TANGENT), rtol=1e-7, atol=1e-9)
    grad = jax.grad(lambda p: f(p).sum())(PARAMS)
    np.testing.assert_allclose(grad["b"], jax.grad(lambda p: solve(p).sum())(PARAMS)["b"], rtol=1e-9)
    # I - J singular (J = identity): lineax's own reason is reported.
    stuck = fpx.ImplicitAdjoint(linear_solver=lx.GMRES(rtol=1e-8, atol=1e-8, max_steps=3))
    g = lambda a: fpx.fixed_point(lambda z, a: z - (z - a) ** 3, jnp.zeros(2) + 0.5, a, solver=fpx.Picard(rtol=0, atol=1e-14), adjoint=stuck, max_steps=10).value.sum()  # noqa: E731
    with pytest.raises(Exception, match="lineax reports"):
        jax.block_until_ready(jax.grad(g)(jnp.array([0.5, 0.5])))


def test_failed_tangent_solve_raises_or_gives_nan():
    # T(z, a) = z - z**3 + a has the fixed point a**(1/3): at a = 0, dT/dz = 1, so I - J is
    # singular and the derivative infinite; the tangent solve u = u + ȧ cannot converge.
    fn = lambda z, a: z - z**3 + a  # noqa: E731
    f = lambda a, throw: fpx.fixed_point(fn, jnp.zeros(2), a, throw=throw, adjoint=fpx.ImplicitAdjoint(max_steps=20)).value  # noqa: E731
    with pytest.raises(Exception, match="tangent \\(forward-mode\\) solve"):
        jax.block_until_ready(jax.jvp(lambda a: f(a, True), (jnp.zeros(2),), (jnp.ones(2),))[1])
    _, tangent = jax.jvp(lambda a: f(a, False), (jnp.zeros(2),), (jnp.ones(2),))
    assert bool(jnp.all(jnp.isnan(tangent)))
    grad = jax.grad(lambda a: f(a, False).sum())(jnp.zeros(2))
    assert bool(jnp.all(jnp.isnan(grad)))


def test_approximate_adjoints_work_in_forward_mode():
    for adjoint in (fpx.JFBAdjoint(), fpx.PhantomAdjoint(steps=3, damping=1.0)):
        f = lambda p: fpx.fixed_point(cell, jnp.zeros(3), p, solver=fpx.Picard(**TIGHT), adjoint=adjoint).value  # noqa: E731
        _, tangent = jax.jvp(f, (PARAMS,), (TANGENT,))
        vjp = jax.grad(lambda p: jnp.dot(f(p), jnp.ones(3)))(PARAMS)
        directional = sum(jnp.sum(g * t) for g, t in zip(jax.tree_util.tree_leaves(vjp), jax.tree_util.tree_leaves(TANGENT)))
        np.testing.assert_allclose(jnp.sum(tangent), directional, rtol=1e-10)


def test_unrolled_adjoint_says_it_is_reverse_mode_only():
    f = lambda p: fpx.fixed_point(cell, jnp.zeros(3), p, adjoint=fpx.UnrolledAdjoint()).value  # noqa: E731
    with pytest.raises(TypeError, match="UnrolledAdjoint.*reverse mode only.*ImplicitAdjoint"):
        jax.jvp(f, (PARAMS,), (TANGENT,))


def test_fixed_point_signature_shows_its_real_defaults():
    import inspect

    params = inspect.signature(fpx.fixed_point).parameters
    assert isinstance(params["adjoint"].default, fpx.ImplicitAdjoint)
    assert isinstance(params["solver"].default, fpx.Picard)
    assert params["has_aux"].default is False


@pytest.mark.parametrize(
    ("call", "error", "pattern"),
    [
        (lambda: fpx.fixed_point(lambda z, _: 0.5, jnp.zeros(2)), TypeError, r"must return JAX arrays.*0.5 \(float\)"),
        (lambda: fpx.fixed_point(lambda z, _: z, "abc"), TypeError, r"`z0` must be a pytree of floating-point arrays.*'abc'"),
        (lambda: fpx.fixed_point(lambda z, _: z, jnp.zeros(2), max_steps=2**31), ValueError, r"`max_steps` must be a positive integer \(at most 2147483647\)"),
        (lambda: fpx.fixed_point(lambda z, _: z, jnp.zeros(2), max_steps=2**32 + 10), ValueError, r"`max_steps`"),
        (lambda: fpx.fixed_point("not a function", jnp.zeros(2)), TypeError, r"`fn` must be a function"),
        (lambda: fpx.fixed_point(lambda z, _: z, jnp.zeros(2), throw="yes"), TypeError, r"`throw` must be True or False"),
        (lambda: fpx.Picard(rtol="1e-3"), TypeError, r"`rtol` must be a non-negative number, got '1e-3' \(str\)"),
        (lambda: fpx.KM(alpha="0.5"), TypeError, r"`KM\(alpha=...\)` must be a real number in \(0, 1\]"),
        (lambda: fpx.Picard(norm=5), TypeError, r"`Picard\(norm=...\)` must be a function"),
        (lambda: fpx.Anderson(regularization=-1), ValueError, r"`Anderson\(regularization=...\)` must be a non-negative number"),
        (lambda: fpx.ImplicitAdjoint(max_steps=0), ValueError, r"`ImplicitAdjoint\(max_steps=...\)` must be a positive integer"),
        (lambda: fpx.ImplicitAdjoint(solver="anderson"), TypeError, r"`ImplicitAdjoint\(solver=...\)` must be an fpx solver.*fpx.Anderson\(\)"),
        (lambda: fpx.ImplicitAdjoint(linear_solver="gmres"), TypeError, r"`ImplicitAdjoint\(linear_solver=...\)` must be a lineax solver"),
        (lambda: fpx.UnrolledAdjoint(checkpoints=0), ValueError, r"`UnrolledAdjoint\(checkpoints=...\)` must be a positive integer"),
        (lambda: fpx.PhantomAdjoint(damping=float("nan")), ValueError, r"`PhantomAdjoint\(damping=...\)` must lie in \(0, 1\]"),
    ],
)
def test_bad_input_gets_a_clear_error(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_non_default_norm_is_used_by_the_safeguard_and_newton_krylov():
    calls = []

    def counting_norm(x):
        calls.append(jax.tree_util.tree_structure(x))
        return fpx.max_norm(x)

    for solver in (fpx.Anderson(norm=counting_norm), fpx.NewtonKrylov(norm=counting_norm)):
        calls.clear()
        fpx.fixed_point(cell, jnp.zeros(3), PARAMS, solver=solver)
        # The driver calls it on z0's structure; the solver's own residual norms add more calls.
        assert len(calls) > 4, type(solver).__name__
    sol = fpx.fixed_point(cell, jnp.zeros(3), PARAMS, solver=fpx.NewtonKrylov(norm=fpx.max_norm, rtol=0, atol=1e-9))
    assert float(sol.stats["residual_norm"]) == pytest.approx(float(fpx.max_norm(sol.value - cell(sol.value, PARAMS))), abs=1e-15)


def test_deq_layers_pass_the_cells_aux_through():
    from flax import nnx

    w = 0.5 * jnp.eye(3)

    def cell(z, x):
        out = jnp.tanh(w @ z + x)
        return out, {"pre": w @ out + x}

    z, stats = fpx.nn.DEQ(cell, has_aux=True)(jnp.ones(3))
    # The aux of the returned iterate: computed from cell(z*), which is z* to the tolerance.
    np.testing.assert_allclose(stats["aux"]["pre"], w @ jnp.tanh(w @ z + 1.0) + 1.0, rtol=1e-12)

    class Cell(nnx.Module):
        def __call__(self, z, x):
            return cell(z, x)

    z2, stats2 = fpx.nn.nnx.DEQ(Cell(), has_aux=True)(jnp.ones(3))
    np.testing.assert_allclose(z2, z, rtol=1e-5)
    np.testing.assert_allclose(stats2["aux"]["pre"], w @ jnp.tanh(w @ z2 + 1.0) + 1.0, rtol=1e-12)
