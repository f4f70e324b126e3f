"""MgNO and its V-cycle block against numpy: values, a Poisson known answer, gradients, symmetries, errors."""

import itertools

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import fpx
from fpx.operators import deq, iterate
from fpx.operators._mgno import MgNO, MgVCycle, _conv, _prolong


def normal(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape)


def np_gelu(x):
    """jax.nn.gelu's default (tanh) approximation."""
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


# --------------------------------------------------------------------------- numpy reference, by the definitions


def np_conv(x, w, boundary, stride=1):
    """`y[i] = sum_k x[stride*i + k - 1] @ w[k]` over the 3**d taps; outside the grid x is 0 or periodic."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    d, n = x.ndim - 1, x.shape[:-1]
    m = tuple(-(-s // stride) for s in n)
    y = np.zeros(m + (w.shape[-1],))
    for k in itertools.product(range(3), repeat=d):
        src = [stride * np.arange(mi) + ki - 1 for mi, ki in zip(m, k)]
        if boundary == "periodic":
            src = [s % ni for s, ni in zip(src, n)]
            y += x[np.ix_(*src)] @ w[k]
        else:
            keep = [(s >= 0) & (s < ni) for s, ni in zip(src, n)]
            out = np.ix_(*[np.flatnonzero(kp) for kp in keep])
            y[out] += x[np.ix_(*[s[kp] for s, kp in zip(src, keep)])] @ w[k]
    return y


def np_prolong(u, w, fine, boundary):
    """Scatter form of the transposed stride-2 convolution: coarse point j adds `u[j] @ w[k]` to fine point `2j + k - 1`."""
    u, w = np.asarray(u, np.float64), np.asarray(w, np.float64)
    d, m = u.ndim - 1, u.shape[:-1]
    y = np.zeros(tuple(fine) + (w.shape[-1],))
    for k in itertools.product(range(3), repeat=d):
        tgt = [2 * np.arange(mi) + ki - 1 for mi, ki in zip(m, k)]
        if boundary == "periodic":
            tgt = [t % n for t, n in zip(tgt, fine)]
            keep = [np.ones(mi, bool) for mi in m]
        else:
            keep = [(t >= 0) & (t < n) for t, n in zip(tgt, fine)]
        contribution = (u @ w[k])[np.ix_(*[np.flatnonzero(kp) for kp in keep])]
        np.add.at(y, np.ix_(*[t[kp] for t, kp in zip(tgt, keep)]), contribution)
    return y


def np_vcycle(p, u, f, boundary):
    """The V-cycle of the MgVCycle docstring, step by step."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
    levels = len(p["A"])
    saved = []
    for level in range(levels):
        A = p["A"][level]
        for S in p["pre"][level]:
            u = u + np_conv(f - np_conv(u, A, boundary), S, boundary)
        saved.append((u, f))
        if level < levels - 1:
            f = np_conv(f - np_conv(u, A, boundary), p["restrict"][level], boundary, stride=2)
            u = np.zeros(f.shape[:-1] + (u.shape[-1],))
    for level in range(levels - 1, -1, -1):
        A = p["A"][level]
        if level < levels - 1:
            fine_u, f = saved[level]
            u = fine_u + np_prolong(u, p["prolong"][level], f.shape[:-1], boundary)
        for S in p["post"][level]:
            u = u + np_conv(f - np_conv(u, A, boundary), S, boundary)
    return u


def np_mgno(p, x, width, boundary):
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
    v = np.asarray(x, np.float64)
    for layer in p["layers"]:
        u0 = np.zeros(v.shape[:-1] + (width,))
        lin = v @ layer["pointwise"]["weight"] + layer["pointwise"]["bias"]
        v = np_gelu(np_vcycle(layer["vcycle"], u0, v, boundary) + lin)
    return v @ p["projection"]["weight"] + p["projection"]["bias"]


def test_numpy_reference_convolution_is_the_stencil():
    # The reference against hand-computed figures: a 1-D stencil (1, 2, 3) on (1, 0, 0, 2).
    w = np.array([1.0, 2.0, 3.0]).reshape(3, 1, 1)
    x = np.array([1.0, 0.0, 0.0, 2.0])[:, None]
    np.testing.assert_array_equal(np_conv(x, w, "zero")[:, 0], [2.0, 1.0, 6.0, 4.0])
    np.testing.assert_array_equal(np_conv(x, w, "periodic")[:, 0], [4.0, 1.0, 6.0, 7.0])
    np.testing.assert_array_equal(np_conv(x, w, "zero", stride=2)[:, 0], [2.0, 6.0])
    np.testing.assert_array_equal(np_prolong(np.array([[1.0], [10.0]]), w, (4,), "zero")[:, 0], [2.0, 13.0, 20.0, 30.0])
    np.testing.assert_array_equal(np_prolong(np.array([[1.0], [10.0]]), w, (3,), "zero")[:, 0], [2.0, 13.0, 20.0])


@pytest.mark.parametrize("boundary, fine", [("zero", (9, 6)), ("zero", (7, 7)), ("periodic", (8, 6))])
def test_prolongation_is_the_adjoint_of_the_strided_convolution(boundary, fine):
    # <R x, y> = <x, P y> when P carries R's kernel with in/out channels swapped: odd and even sizes.
    w = normal(0, 3, 3, 2, 3)
    x = jnp.asarray(normal(1, *fine, 2))
    rx, vjp = jax.vjp(lambda x: _conv(x, jnp.asarray(w), boundary, stride=2), x)
    y = jnp.asarray(normal(2, *rx.shape))
    py = _prolong(y, jnp.asarray(np.swapaxes(w, -1, -2)), fine, boundary)
    np.testing.assert_allclose(py, vjp(y)[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(py, np_prolong(y, np.swapaxes(w, -1, -2), fine, boundary), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rx, np_conv(x, w, boundary, stride=2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "dim, shape, levels, smoothing, boundary, num_layers",
    [
        (2, (13, 10, 2), 3, [(1, 1), (2, 0), (1, 2)], "zero", 2),  # 13 -> 7 -> 4, 10 -> 5 -> 3
        (2, (16, 8, 2), 3, (1, 1), "periodic", 1),
        (1, (11, 2), 3, [(0, 1), (1, 1), (2, 1)], "zero", 1),  # no pre-smoothing on the finest level
        (1, (12, 2), 2, (2, 1), "periodic", 1),
    ],
)
def test_mgno_values_match_numpy(dim, shape, levels, smoothing, boundary, num_layers):
    width = 3
    net = MgNO(2, 3, width=width, levels=levels, num_layers=num_layers, smoothing=smoothing, dim=dim, boundary=boundary)
    params = net.init(jr.PRNGKey(0))
    assert all(leaf.dtype == jnp.float64 for leaf in jax.tree_util.tree_leaves(params))
    assert params["layers"][0]["vcycle"]["A"][0].shape == (3,) * dim + (width, 2)  # width -> f (input) channels
    assert params["layers"][-1]["vcycle"]["prolong"][0].shape == (3,) * dim + (width, width)
    x = normal(1, *shape)
    y = jax.jit(net.apply)(params, jnp.asarray(x))
    assert y.shape == shape[:-1] + (3,) and y.dtype == jnp.float64
    expected = np_mgno(params, x, width, boundary)
    np.testing.assert_allclose(y, expected, rtol=1e-11, atol=1e-12)
    assert np.abs(expected).max() > 0.1  # a non-trivial output


def test_vcycle_block_from_a_nonzero_iterate_matches_numpy():
    block = MgVCycle(width=2, levels=3, smoothing=[(2, 1), (1, 1), (1, 0)], f_channels=3, dim=2)
    params = block.init(jr.PRNGKey(3))
    u, f = normal(4, 9, 12, 2), normal(5, 9, 12, 3)
    out = jax.jit(block.apply)(params, jnp.asarray(u), jnp.asarray(f))
    np.testing.assert_allclose(out, np_vcycle(params, u, f, "zero"), rtol=1e-11, atol=1e-12)


# --------------------------------------------------------------------------- the V-cycle as a solver: Poisson


def poisson_cycle(levels, smoothing, omega=0.8):
    """MgVCycle parameters of geometric multigrid for the 5-point Laplacian (grid spacing 1 on the finest level).

    A^l = the 5-point stencil / 4**l (rediscretised on spacing 2**l), damped Jacobi S = omega / diag(A^l),
    full-weighting restriction, bilinear prolongation.
    """
    stencil = np.array([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]])
    full_weighting = np.outer([1.0, 2.0, 1.0], [1.0, 2.0, 1.0]) / 16.0
    centre = np.zeros((3, 3))
    centre[1, 1] = 1.0

    def k(a):
        return jnp.asarray(a)[:, :, None, None]

    return {
        "A": [k(stencil / 4**level) for level in range(levels)],
        "pre": [[k(omega * 4**level / 4 * centre)] * pre for level, (pre, _) in enumerate(smoothing)],
        "post": [[k(omega * 4**level / 4 * centre)] * post for level, (_, post) in enumerate(smoothing)],
        "restrict": [k(full_weighting)] * (levels - 1),
        "prolong": [k(4 * full_weighting)] * (levels - 1),
    }


def dirichlet_laplacian(n):
    t = 2 * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1)
    return np.kron(t, np.eye(n)) + np.kron(np.eye(n), t)


def test_vcycle_fixed_point_solves_the_poisson_problem():
    # Known answer: the fixed point of the V-cycle is numpy's direct solve of the same discrete Dirichlet system
    # (an odd size, 15 -> 8 -> 4), and the implicit gradient of <c, u*(f)> is A^{-1} c (A symmetric).
    n = 15
    A, f, c = dirichlet_laplacian(n), jnp.asarray(normal(0, n, n, 1)), normal(1, n, n)
    exact = np.linalg.solve(A, np.ravel(f)).reshape(n, n)
    smoothing = [(1, 1), (1, 1), (2, 2)]
    block = MgVCycle(width=1, levels=3, smoothing=smoothing, dim=2)
    params = poisson_cycle(3, smoothing)

    solve = deq(block, solver=fpx.Picard(rtol=0.0, atol=1e-12), max_steps=100, return_stats=True)

    @jax.jit
    def solve_and_pull_back(f):
        z, pullback, stats = jax.vjp(lambda f: solve.apply(params, f), f, has_aux=True)
        return z, stats, pullback(jnp.asarray(c)[..., None])[0]

    z, stats, grad = solve_and_pull_back(f)
    assert bool(stats["converged"]) and int(stats["num_steps"]) < 45
    assert np.abs(z[..., 0] - exact).max() <= 1e-8 * np.abs(exact).max()
    expected = np.linalg.solve(A, c.ravel()).reshape(n, n)
    assert np.abs(grad[..., 0] - expected).max() <= 1e-8 * np.abs(expected).max()

    # The coarse levels do the work: one level with the same smoothing contracts at ~0.93 per cycle,
    # three levels at ~0.3; `iterate` unrolls the same cycles.
    def errors(block, params, k):
        step, u, err = jax.jit(block.apply), jnp.zeros((n, n, 1)), []
        for _ in range(k):
            u = step(params, u, f)
            err.append(np.linalg.norm(u[..., 0] - exact))
        return u, err

    _, single = errors(MgVCycle(width=1, levels=1, smoothing=(1, 1), dim=2), poisson_cycle(1, [(1, 1)]), 10)
    assert single[-1] / single[-2] > 0.9
    u8, multi = errors(block, params, 8)
    assert multi[-1] / multi[-2] < 0.5 and multi[-1] < 1e-2 * multi[0], multi
    np.testing.assert_allclose(jax.jit(iterate(block, 8, injection=True).apply)(params, f), u8, rtol=1e-12, atol=1e-13)


# --------------------------------------------------------------------------- gradients, composition, symmetries


def directional_fd_check(f, tree, seeds, eps=1e-6):
    """<grad f, v> against a central difference along random directions v (float64), compiled once."""
    theta, unravel = ravel_pytree(tree)
    f_flat = jax.jit(lambda theta: f(unravel(theta)))
    grad = jax.jit(jax.grad(lambda theta: f(unravel(theta))))(theta)
    for seed in seeds:
        v = jnp.asarray(normal(seed, *theta.shape))
        analytic = float(jnp.dot(grad, v))
        numeric = (float(f_flat(theta + eps * v)) - float(f_flat(theta - eps * v))) / (2 * eps)
        assert abs(analytic - numeric) <= 1e-6 * abs(analytic) + 1e-9, (analytic, numeric)


def test_mgno_gradients_match_central_differences():
    net = MgNO(2, 2, width=3, levels=2, num_layers=1, smoothing=(1, 1), dim=2)
    params = net.init(jr.PRNGKey(0))
    x, w = jnp.asarray(normal(1, 9, 8, 2)), jnp.asarray(normal(2, 9, 8, 2))

    def loss(tree):
        return jnp.sum(net.apply(tree["params"], tree["x"]) * w)

    directional_fd_check(loss, {"params": params, "x": x}, seeds=(3, 4, 5))


def test_mgno_jit_vmap_and_other_resolutions():
    net = MgNO(1, 1, width=3, levels=2, num_layers=1, dim=2)
    params = net.init(jr.PRNGKey(0))
    xs = jnp.asarray(normal(1, 3, 16, 12, 1))
    batched = jax.jit(jax.vmap(net.apply, in_axes=(None, 0)))(params, xs)
    one = jax.jit(net.apply)
    np.testing.assert_allclose(batched, np.stack([one(params, x) for x in xs]), rtol=1e-13, atol=1e-13)
    # one set of parameters at every allowed resolution, e.g. the reference's odd Darcy size 85 -> 43 -> 22 -> 11
    deep = MgNO(1, 1, width=3, levels=4, num_layers=1, dim=2)
    assert jax.eval_shape(deep.apply, deep.init(jr.PRNGKey(0)), jnp.zeros((85, 85, 1))).shape == (85, 85, 1)
    assert one(params, xs[0, :9, :5]).shape == (9, 5, 1)


def test_periodic_mgno_commutes_with_coarse_grid_shifts_only():
    # Stride-2 restriction makes shifts by 2**(levels-1) points a symmetry, not shifts by one point.
    net = MgNO(1, 1, width=3, levels=3, num_layers=2, dim=2, boundary="periodic")
    params = net.init(jr.PRNGKey(0))
    apply = jax.jit(net.apply)
    x = jnp.asarray(normal(1, 16, 8, 1))
    y = apply(params, x)
    shifted = apply(params, jnp.roll(x, (4, -4), axis=(0, 1)))
    np.testing.assert_allclose(shifted, jnp.roll(y, (4, -4), axis=(0, 1)), rtol=1e-12, atol=1e-12)
    off_grid = apply(params, jnp.roll(x, 1, axis=0))
    assert np.abs(off_grid - jnp.roll(y, 1, axis=0)).max() > 1e-3


def test_float32_parameters_give_float32_outputs():
    net = MgNO(1, 1, width=3, levels=2, num_layers=1, dim=1, dtype=jnp.float32)
    params = net.init(jr.PRNGKey(0))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params))
    x = np.asarray(normal(1, 10, 1), np.float32)
    y = jax.jit(net.apply)(params, jnp.asarray(x))
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, np_mgno(params, x, 3, "zero"), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- errors


def test_resolutions_that_do_not_coarsen_are_refused():
    zero = MgNO(1, 1, width=2, levels=3, num_layers=1)
    params = zero.init(jr.PRNGKey(0))
    with pytest.raises(ValueError, match=r"MgNO\(levels=3, boundary='zero'\).*\(4, 9\).*`levels`=3.*axis 0.*at least 2\*\*\(levels-1\) \+ 1 = 5"):
        zero.apply(params, jnp.zeros((4, 9, 1)))
    assert jax.eval_shape(zero.apply, params, jnp.zeros((5, 9, 1))).shape == (5, 9, 1)  # 5 -> 3 -> 2 is allowed

    periodic = MgNO(1, 1, width=2, levels=4, num_layers=1, boundary="periodic")
    params = periodic.init(jr.PRNGKey(0))
    with pytest.raises(ValueError, match=r"MgNO\(levels=4, boundary='periodic'\).*\(12, 16\).*`levels`=4.*axis 0.*multiple of 2\*\*\(levels-1\) = 8.*16, 24, 32"):
        periodic.apply(params, jnp.zeros((12, 16, 1)))
    with pytest.raises(ValueError, match=r"axis 0, 1"):
        periodic.apply(params, jnp.zeros((8, 8, 1)))  # a multiple of 8, but the coarsest level would have 1 point

    block = MgVCycle(width=1, levels=2, boundary="periodic", dim=1)
    with pytest.raises(ValueError, match=r"MgVCycle\(levels=2, boundary='periodic'\).*\(7,\)"):
        block.apply(block.init(jr.PRNGKey(0)), jnp.zeros((7, 1)), jnp.zeros((7, 1)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"boundary": "reflect"}, r"MgNO: `boundary` must be 'zero'.*'periodic'.*'reflect'"),
        ({"dim": 3}, r"MgNO: `dim`.*1 or 2, got 3"),
        ({"levels": 0}, r"MgNO: `levels` must be an integer >= 1, got 0"),
        ({"width": 0}, r"MgNO: `width` must be an integer >= 1"),
        ({"num_layers": 1.5}, r"MgNO: `num_layers` must be an integer"),
        ({"smoothing": (1, -1)}, r"MgNO: `smoothing` must be a pair \(pre, post\).*`levels`=4"),
        ({"smoothing": [(1, 1)] * 3}, r"MgNO: `smoothing`.*sequence of `levels`=4 such pairs"),
        ({"smoothing": (0, 0)}, r"MgNO: `smoothing`=\(0, 0\) has no smoothing step"),
    ],
)
def test_constructor_errors_name_mgno_and_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MgNO(**kwargs)


def test_input_and_parameter_errors():
    net = MgNO(2, 1, width=3, levels=2, num_layers=2)
    params = net.init(jr.PRNGKey(0))
    with pytest.raises(ValueError, match=r"MgNO was built for 2 input channel\(s\)"):
        net.apply(params, jnp.zeros((8, 8, 1)))
    with pytest.raises(ValueError, match=r"MgNO \(dim=2\) takes one sample"):
        net.apply(params, jnp.zeros((2, 8, 8, 2)))
    other = MgNO(2, 1, width=3, levels=3, num_layers=2).init(jr.PRNGKey(0))
    with pytest.raises(ValueError, match=r"MgNO\(.*levels=2(.|\n)*params\['layers'\]\[0\]\['vcycle'\]\['A'\]\[2\] \(shape \(3, 3, 3, 2\)\) is not a parameter"):
        net.apply(other, jnp.zeros((8, 8, 2)))
    block = MgVCycle(width=2, levels=2, dim=2)
    with pytest.raises(ValueError, match=r"MgVCycle: `u` \(8, 8, 2\) and `f` \(8, 6, 2\) must share the spatial shape"):
        block.apply(block.init(jr.PRNGKey(0)), jnp.zeros((8, 8, 2)), jnp.zeros((8, 6, 2)))
