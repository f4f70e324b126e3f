"""T1 (Transform Once) against an explicit DCT-matrix computation in numpy; resolution invariance, gradients, errors."""

import math

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from fpx.operators._t1 import T1


def normal(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape)


def dct_matrix(n):
    """Orthonormal DCT-II: `C[k, i] = sqrt(2/n) s_k cos(pi k (2i + 1) / (2n))`, `s_0 = 1/sqrt(2)`, else 1."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    c = np.sqrt(2.0 / n) * np.cos(np.pi * k * (2 * i + 1) / (2 * n))
    c[0] /= np.sqrt(2.0)
    return c


def cosine_series(coefficients, shape):
    """`sum_k a_k prod_j cos(pi k_j x_j)` at the cell centres `x_j = (i + 1/2) / s_j`, one channel."""
    x = [(np.arange(s) + 0.5) / s for s in shape]
    out = np.zeros(shape)
    for k, a in np.ndenumerate(coefficients):
        waves = [np.cos(np.pi * kj * xj) for kj, xj in zip(k, x)]
        out += a * (np.multiply.outer(*waves) if len(shape) == 2 else waves[0])
    return out[..., None]


def np_t1(p, x, modes, append_grid):
    """T1.apply for one sample in numpy float64, every transform an explicit matrix product (the T1 docstring's steps)."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
    x = np.asarray(x, np.float64)
    n = x.shape[:-1]
    d = len(n)
    if append_grid:
        centres = np.meshgrid(*[(np.arange(s) + 0.5) / s for s in n], indexing="ij")
        x = np.concatenate([x, np.stack(centres, axis=-1)], axis=-1)
    v = x @ p["lift"]["weight"] + p["lift"]["bias"]  # (*n, width)
    low = [dct_matrix(s)[:m] for s, m in zip(n, modes)]  # (m, s): the kept rows
    z = v
    for axis, c in enumerate(low):  # forward transform, axis by axis
        z = np.moveaxis(np.tensordot(c, z, axes=([1], [axis])), 0, axis)
    z = z / math.sqrt(math.prod(n))  # (*modes, width)
    for layer in p["layers"]:
        h = np.sin(np.einsum("...i,io...->...o", z, layer["channel"]))
        for axis, mix in enumerate(layer["modes"]):  # per channel c: h_c <- mix[:, :, c]^T h_c along `axis`
            h = np.stack(
                [np.moveaxis(np.tensordot(mix[:, :, c].T, h[..., c], axes=([1], [axis])), 0, axis) for c in range(h.shape[-1])],
                axis=-1,
            )
        z = z + h
    first, second = p["projection"]
    y = np.sin(z @ first["weight"]) @ second["weight"]  # (*modes, out)
    for axis, c in enumerate(low):  # inverse: the transpose of the kept rows
        y = np.moveaxis(np.tensordot(c.T, y, axes=([1], [axis])), 0, axis)
    return y * math.sqrt(math.prod(n))


def test_dct_matrix_is_orthonormal_and_jax_dct_agrees():
    for n in (5, 8):
        c = dct_matrix(n)
        np.testing.assert_allclose(c @ c.T, np.eye(n), atol=1e-14)
        # a sampled cosine of frequency 3 has one coefficient, sqrt(n/2)
        expected = np.zeros(n)
        expected[3] = np.sqrt(n / 2)
        np.testing.assert_allclose(c @ cosine_series(np.eye(4)[3], (n,))[:, 0], expected, atol=1e-13)
        x = normal(n, n, 3)
        np.testing.assert_allclose(jax.scipy.fft.dctn(jnp.asarray(x), axes=(0,), norm="ortho"), c @ x, atol=1e-13)


@pytest.mark.parametrize(
    "dim, shape, modes, append_grid",
    [
        (1, (12, 2), (5,), True),
        (1, (7, 2), (7,), False),  # every coefficient kept
        (2, (8, 10, 2), (4, 5), True),
        (2, (6, 9, 2), (6, 2), False),
    ],
)
def test_t1_values_match_explicit_dct_matrices(dim, shape, modes, append_grid):
    t1 = T1(dim=dim, modes=modes, width=5, layers=2, in_channels=2, out_channels=3, append_grid=append_grid, projection_width=7)
    params = t1.init(jr.PRNGKey(0))
    assert params["layers"][0]["channel"].shape == (5, 5) + modes
    assert [m.shape for m in params["layers"][0]["modes"]] == [(m, m, 5) for m in modes]
    assert all(leaf.dtype == jnp.float64 for leaf in jax.tree_util.tree_leaves(params))
    x = normal(1, *shape)
    y = jax.jit(t1.apply)(params, jnp.asarray(x))
    assert y.shape == shape[:-1] + (3,) and y.dtype == jnp.float64
    expected = np_t1(params, x, modes, append_grid)
    np.testing.assert_allclose(y, expected, rtol=1e-11, atol=1e-12)
    assert np.abs(expected).max() > 0.1


def test_t1_is_exactly_resolution_invariant_on_cosine_series():
    # Cell centres of s points are every third cell centre of 3s points, so outputs at s and 3s compare pointwise.
    t1 = T1(dim=1, modes=6, width=4, layers=2, in_channels=1, out_channels=2, append_grid=False, projection_width=8)
    params = t1.init(jr.PRNGKey(0))
    apply = jax.jit(t1.apply)
    a = np.array([0.3, 1.0, -0.5, 0.0, 0.25])  # frequencies 0..4 < modes
    coarse, fine = apply(params, jnp.asarray(cosine_series(a, (16,)))), apply(params, jnp.asarray(cosine_series(a, (48,))))
    np.testing.assert_allclose(coarse, fine[1::3], rtol=1e-12, atol=1e-12)
    assert np.abs(coarse).max() > 0.1
    # the output is band-limited: no DCT coefficient at or beyond `modes`
    spectrum = dct_matrix(48) @ np.asarray(fine)
    assert np.abs(spectrum[6:]).max() < 1e-12 * np.abs(spectrum).max()

    t2 = T1(dim=2, modes=(3, 4), width=3, layers=1, append_grid=False, projection_width=4)
    p2 = t2.init(jr.PRNGKey(1))
    b = np.array([[0.5, 0.0, 1.0], [-1.0, 0.3, 0.0]])  # frequencies (< 2, < 3)
    y_small = jax.jit(t2.apply)(p2, jnp.asarray(cosine_series(b, (6, 8))))
    y_large = jax.jit(t2.apply)(p2, jnp.asarray(cosine_series(b, (18, 24))))
    np.testing.assert_allclose(y_small, y_large[1::3, 1::3], rtol=1e-12, atol=1e-12)


def test_t1_gradients_match_central_differences():
    t1 = T1(dim=2, modes=(3, 2), width=3, layers=2, in_channels=1, out_channels=2, projection_width=4)
    params = t1.init(jr.PRNGKey(0))
    x, w = jnp.asarray(normal(1, 6, 5, 1)), jnp.asarray(normal(2, 6, 5, 2))
    theta, unravel = ravel_pytree({"params": params, "x": x})

    def loss(theta):
        tree = unravel(theta)
        return jnp.sum(t1.apply(tree["params"], tree["x"]) * w)

    f, grad = jax.jit(loss), jax.jit(jax.grad(loss))(theta)
    eps = 1e-6
    for seed in (3, 4, 5):
        v = jnp.asarray(normal(seed, *theta.shape))
        analytic = float(jnp.dot(grad, v))
        numeric = (float(f(theta + eps * v)) - float(f(theta - eps * v))) / (2 * eps)
        assert abs(analytic - numeric) <= 1e-6 * abs(analytic) + 1e-9, (analytic, numeric)


def test_t1_jit_vmap_and_float32():
    t1 = T1(dim=1, modes=4, width=4, layers=1, projection_width=4)
    params = t1.init(jr.PRNGKey(0))
    xs = jnp.asarray(normal(1, 3, 10, 1))
    batched = jax.jit(jax.vmap(t1.apply, in_axes=(None, 0)))(params, xs)
    one = jax.jit(t1.apply)
    np.testing.assert_allclose(batched, np.stack([one(params, x) for x in xs]), rtol=1e-13, atol=1e-13)

    t32 = T1(dim=1, modes=4, width=4, layers=1, projection_width=4, dtype=jnp.float32)
    p32 = t32.init(jr.PRNGKey(0))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(p32))
    x32 = np.asarray(normal(2, 10, 1), np.float32)
    y32 = jax.jit(t32.apply)(p32, jnp.asarray(x32))
    assert y32.dtype == jnp.float32
    np.testing.assert_allclose(y32, np_t1(p32, x32, (4,), True), rtol=1e-5, atol=1e-5)


def test_modes_beyond_the_resolution_are_refused():
    t1 = T1(dim=2, modes=(4, 6), width=2, layers=1, projection_width=2)
    params = t1.init(jr.PRNGKey(0))
    with pytest.raises(ValueError, match=r"T1: the input resolution \(8, 5\) is too coarse for `modes`=\(4, 6\).*modes <= s.*axis 1: modes=6 > 5 points"):
        t1.apply(params, jnp.zeros((8, 5, 1)))
    assert jax.eval_shape(t1.apply, params, jnp.zeros((4, 6, 1))).shape == (4, 6, 1)  # modes == s is allowed


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dim": 3}, r"T1: `dim`.*1 or 2, got 3"),
        ({"dim": 2, "modes": (4,)}, r"T1: `modes` must be a positive integer or a tuple of 2"),
        ({"modes": 0}, r"T1: `modes`"),
        ({"width": 0}, r"T1: `width` must be an integer >= 1"),
        ({"layers": 2.0}, r"T1: `layers` must be an integer"),
        ({"projection_width": 0}, r"T1: `projection_width`"),
    ],
)
def test_constructor_errors_name_t1_and_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        T1(**kwargs)


def test_input_and_parameter_errors():
    t1 = T1(dim=1, modes=4, width=3, layers=2, in_channels=2, projection_width=4)
    params = t1.init(jr.PRNGKey(0))
    with pytest.raises(ValueError, match=r"T1 was built for 2 input channel\(s\)"):
        t1.apply(params, jnp.zeros((8, 1)))
    with pytest.raises(ValueError, match=r"T1 \(dim=1\) takes one sample"):
        t1.apply(params, jnp.zeros((8,)))
    other = T1(dim=1, modes=5, width=3, layers=2, in_channels=2, projection_width=4).init(jr.PRNGKey(0))
    with pytest.raises(ValueError, match=r"T1\(dim=1, modes=\(4,\)(.|\n)*params\['layers'\]\[0\]\['channel'\] has shape \(3, 3, 5\) but this operator expects \(3, 3, 4\)"):
        t1.apply(other, jnp.zeros((8, 2)))
