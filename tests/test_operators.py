"""fpx.operators: FNO, DeepONet, GNN, iterate/deq combinators, losses."""

import math

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import fpx
import fpx.operators as ops


# Test data and comparisons are computed in numpy: on a small CPU every eager jax op
# compiles a kernel for its shapes (~20 ms each), and they add up across a test file.


def normal(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def band_limited(s, channels=1):
    """Samples at i/s of a fixed trigonometric polynomial (highest frequency 5)."""
    x = np.arange(s) / s
    f = np.sin(2 * np.pi * x) + 0.5 * np.cos(6 * np.pi * x) + 0.3 * np.sin(10 * np.pi * x)
    return jnp.asarray(np.stack([f * (c + 1) for c in range(channels)], axis=-1))


def band_limited_2d(s1, s2):
    x, y = np.meshgrid(np.arange(s1) / s1, np.arange(s2) / s2, indexing="ij")
    return jnp.asarray((np.sin(2 * np.pi * x) * np.cos(4 * np.pi * y) + 0.5 * np.cos(2 * np.pi * (x - 2 * y)))[..., None])


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(leaf)) for leaf in jax.tree_util.tree_leaves(tree)])


def directional_fd_check(f, params, seed, eps=1e-6):
    """Compare <grad f, v> with a central difference along a random direction v (float64)."""
    theta, unravel = ravel_pytree(params)
    v = normal(seed, *theta.shape)
    f_flat = jax.jit(lambda theta: f(unravel(theta)))
    analytic = float(np.dot(np.asarray(jax.jit(jax.grad(f_flat))(theta)), np.asarray(v)))
    numeric = (float(f_flat(theta + eps * v)) - float(f_flat(theta - eps * v))) / (2 * eps)
    assert abs(analytic - numeric) <= 1e-6 * abs(analytic) + 1e-9, (analytic, numeric)


def rel_err(a, b):
    a, b = flat(a), flat(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --------------------------------------------------------------------------- FNO


def np_gelu(x):
    """jax.nn.gelu's default (tanh) approximation."""
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def naive_spectral_conv(v, real, imag, modes):
    """The spectral convolution of one channel-first sample by explicit DFT sums (no FFT).

    `y(x) = (1/N) sum_k c_k Re(Y_k exp(2 pi i k.x / n))` over the retained frequencies `k`
    (`-m..m-1` along every axis but the last, `0..m_d-1` along the last), `c_k = 1` if
    the last component is 0 or the Nyquist frequency and 2 otherwise (its conjugate mode
    counted too), `Y_k = sum_i W_ik X_ik`, `X_k = sum_x v(x) exp(-2 pi i k.x / n)`.
    """
    v = np.asarray(v, np.float64)
    n, d = v.shape[1:], len(modes)
    freqs = [np.concatenate([np.arange(m), np.arange(-m, 0)]) for m in modes[:-1]] + [np.arange(modes[-1])]
    waves = [np.exp(-2j * np.pi * np.outer(k, np.arange(size)) / size) for k, size in zip(freqs, n)]  # (k, x)
    letters = "abc"[:d]
    upper = "ABC"[:d]
    x_hat = np.einsum(f"i{letters}," + ",".join(f"{u}{a}" for u, a in zip(upper, letters)) + f"->i{upper}", v, *waves)
    y_hat = np.einsum(f"i{upper},io{upper}->o{upper}", x_hat, np.asarray(real, np.float64) + 1j * np.asarray(imag, np.float64))
    last = freqs[-1]
    weight = np.where((last == 0) | (2 * last == n[-1]), 1.0, 2.0)
    y_hat = y_hat * weight.reshape((1,) * d + (-1,))
    y = np.einsum(f"o{upper}," + ",".join(f"{u}{a}" for u, a in zip(upper, letters)) + f"->o{letters}", y_hat, *[w.conj() for w in waves])
    return y.real / math.prod(n)


def naive_fno(p, x, modes, padding, grid):
    """FNO.apply for one sample, in numpy float64 with `naive_spectral_conv` (the layers of the FNO docstring)."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
    x = np.asarray(x, np.float64)
    n = x.shape[:-1]
    coords = [np.linspace(0.0, 1.0, k) if grid == "closed" else np.arange(k) / k for k in n]
    x = np.concatenate([x, np.stack(np.meshgrid(*coords, indexing="ij"), axis=-1)], axis=-1)
    v = np.moveaxis(x @ p["lift"]["weight"] + p["lift"]["bias"], -1, 0)
    v = np.pad(v, [(0, 0)] + [(0, padding)] * len(n))
    for i, layer in enumerate(p["layers"]):
        spectral, pointwise = layer["spectral"], layer["pointwise"]
        local = np.einsum("io,i...->o...", pointwise["weight"], v) + pointwise["bias"].reshape((-1,) + (1,) * len(n))
        v = naive_spectral_conv(v, spectral["real"], spectral["imag"], modes) + local
        if i < len(p["layers"]) - 1:
            v = np_gelu(v)
    v = np.moveaxis(v[(slice(None),) + tuple(slice(0, k) for k in n)], 0, -1)
    (p1, p2) = p["projection"]
    return np_gelu(v @ p1["weight"] + p1["bias"]) @ p2["weight"] + p2["bias"]


@pytest.mark.parametrize("s", [16, 17])
@pytest.mark.parametrize("padding", [0, 3])
def test_fno_1d_values_odd_even_padding(s, padding):
    # modes=5 keeps frequencies 0..4; with s + padding = 16 + 3 nothing hits a Nyquist bin, at 16 none is kept either.
    fno = ops.FNO(dim=1, modes=5, width=8, layers=2, in_channels=2, out_channels=3, padding=padding, projection_width=16)
    params = fno.init(jr.PRNGKey(0))
    x = normal(1, s, 2)
    y = jax.jit(fno.apply)(params, x)
    assert y.shape == (s, 3) and y.dtype == jnp.float64
    leaves = jax.tree_util.tree_leaves(params)
    assert all(leaf.dtype == jnp.float64 for leaf in leaves)
    grid = "closed" if padding else "periodic"
    np.testing.assert_allclose(y, naive_fno(params, x, (5,), padding, grid), rtol=1e-12, atol=1e-12)


def test_naive_spectral_conv_is_the_convolution_theorem():
    # The reference itself, against a closed form: keeping every frequency of an odd s, a
    # single channel with weight w_k = exp(-2 pi i k t / s) shifts the signal by t points.
    s, t = 9, 2
    w = np.exp(-2j * np.pi * np.arange(5) * t / s).reshape(1, 1, 5)
    v = np.random.default_rng(0).standard_normal((1, s))
    np.testing.assert_allclose(naive_spectral_conv(v, w.real, w.imag, (5,)), np.roll(v, t, axis=1), atol=1e-12)


@pytest.mark.parametrize("dim, shape, modes", [(1, (16, 2), (9,)), (2, (8, 10, 2), (4, 6)), (3, (4, 3, 6, 2), (2, 1, 4))])
def test_spectral_conv_matches_naive_dft_including_nyquist_bins(dim, shape, modes):
    # Every case keeps a Nyquist frequency: the last axis at s//2 (even s), and 2m = s along axis 0.
    conv = ops.SpectralConv(dim=dim, modes=modes, in_channels=2, out_channels=3)
    params = conv.init(jr.PRNGKey(dim))
    x = normal(dim, *shape)
    y = jax.jit(conv.apply)(params, x)
    expected = np.moveaxis(naive_spectral_conv(np.moveaxis(np.asarray(x), -1, 0), params["real"], params["imag"], modes), 0, -1)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("shape, padding", [((12, 12, 1), 0), ((11, 10, 2), 2)])
def test_fno_2d_values(shape, padding):
    fno = ops.FNO(dim=2, modes=(3, 4), width=6, layers=2, in_channels=shape[-1], out_channels=2, padding=padding, projection_width=8)
    params = fno.init(jr.PRNGKey(0))
    assert params["layers"][0]["spectral"]["real"].shape == (6, 6, 6, 4)  # (in, out, 2*m1, m2)
    x = normal(1, *shape)
    y = jax.jit(fno.apply)(params, x)
    assert y.shape == shape[:-1] + (2,)
    grid = "closed" if padding else "periodic"
    np.testing.assert_allclose(y, naive_fno(params, x, (3, 4), padding, grid), rtol=1e-12, atol=1e-12)


def test_fno_3d_values_float64_and_float32():
    # 3-D: three FFT axes, each layout of the kept block (negative frequencies along axes 0, 1).
    fno = ops.FNO(dim=3, modes=(2, 2, 2), width=4, layers=2, projection_width=4, padding=1)
    params = fno.init(jr.PRNGKey(0))
    assert params["layers"][0]["spectral"]["real"].shape == (4, 4, 4, 4, 2)
    x = normal(1, 6, 5, 4, 1)
    y = jax.jit(fno.apply)(params, x)
    assert y.shape == (6, 5, 4, 1)
    np.testing.assert_allclose(y, naive_fno(params, x, (2, 2, 2), 1, "closed"), rtol=1e-12, atol=1e-12)

    fno32 = ops.FNO(dim=3, modes=2, width=4, layers=1, projection_width=4, dtype=jnp.float32)
    p32 = fno32.init(jr.PRNGKey(0))
    x32 = np.asarray(normal(2, 6, 5, 4, 1), np.float32)
    y32 = jax.jit(fno32.apply)(p32, jnp.asarray(x32))
    assert y32.shape == (6, 5, 4, 1) and y32.dtype == jnp.float32
    np.testing.assert_allclose(y32, naive_fno(p32, x32, (2, 2, 2), 0, "periodic"), rtol=1e-5, atol=1e-5)


def reference_fno(p, x, modes, dim, padding):
    """A batch-first port of the reference PyTorch FNO (complex weights, corner blocks, F.pad)."""
    b, *n, _ = x.shape
    coords = [jnp.linspace(0, 1, k) if padding else jnp.arange(k) / k for k in n]
    grid = jnp.stack(jnp.meshgrid(*coords, indexing="ij"), axis=-1)
    x = jnp.concatenate([x, jnp.broadcast_to(grid[None], (b,) + grid.shape)], axis=-1)
    h = jnp.einsum("b...i,io->b...o", x, p["lift"]["weight"]) + p["lift"]["bias"].reshape((1,) * (dim + 1) + (-1,))
    h = jnp.moveaxis(h, -1, 1)  # (b, width, *n)
    if padding:
        h = jnp.pad(h, [(0, 0), (0, 0)] + [(0, padding)] * dim)
        unpadded, n = n, [k + padding for k in n]
    for i, layer in enumerate(p["layers"]):
        w = layer["spectral"]["real"] + 1j * layer["spectral"]["imag"]
        width = h.shape[1]
        if dim == 1:
            x_ft = jnp.fft.rfft(h, axis=-1)
            out_ft = jnp.zeros((b, width, n[0] // 2 + 1), x_ft.dtype)
            out_ft = out_ft.at[:, :, :modes].set(jnp.einsum("bix,iox->box", x_ft[:, :, :modes], w))
            x1 = jnp.fft.irfft(out_ft, n=n[0], axis=-1)
        else:
            m1, m2 = modes
            w1, w2 = w[:, :, :m1], w[:, :, m1:]
            x_ft = jnp.fft.rfft2(h, axes=(-2, -1))
            out_ft = jnp.zeros((b, width, n[0], n[1] // 2 + 1), x_ft.dtype)
            out_ft = out_ft.at[:, :, :m1, :m2].set(jnp.einsum("bixy,ioxy->boxy", x_ft[:, :, :m1, :m2], w1))
            out_ft = out_ft.at[:, :, -m1:, :m2].set(jnp.einsum("bixy,ioxy->boxy", x_ft[:, :, -m1:, :m2], w2))
            x1 = jnp.fft.irfft2(out_ft, s=n, axes=(-2, -1))
        pw = layer["pointwise"]
        x2 = jnp.einsum("bi...,io->bo...", h, pw["weight"]) + pw["bias"].reshape((1, -1) + (1,) * dim)
        h = x1 + x2
        if i < len(p["layers"]) - 1:
            h = jax.nn.gelu(h)
    if padding:
        h = h[(slice(None), slice(None)) + tuple(slice(0, k) for k in unpadded)]
    h = jnp.moveaxis(h, 1, -1)
    (p1, p2) = p["projection"]
    h = jax.nn.gelu(h @ p1["weight"] + p1["bias"].reshape((1,) * (dim + 1) + (-1,)))
    return h @ p2["weight"] + p2["bias"].reshape((1,) * (dim + 1) + (-1,))


@pytest.mark.parametrize("dim, shape, modes, padding", [(1, (20, 1), 6, 0), (1, (19, 1), 6, 3), (2, (10, 9, 1), (3, 4), 2)])
def test_fno_matches_a_port_of_the_reference_code(dim, shape, modes, padding):
    # With padding the grid is linspace(0, 1, s) (grid="auto"), as in the reference.
    fno = ops.FNO(dim=dim, modes=modes, width=5, layers=3, projection_width=7, padding=padding)
    params = fno.init(jr.PRNGKey(2))
    xs = normal(3, 2, *shape)
    ours = jax.jit(jax.vmap(fno.apply, in_axes=(None, 0)))(params, xs)
    reference = jax.jit(reference_fno, static_argnums=(2, 3, 4))(params, xs, modes, dim, padding)
    np.testing.assert_allclose(ours, reference, atol=1e-12)


def test_spectral_conv_is_exactly_resolution_invariant_on_band_limited_inputs():
    conv = ops.SpectralConv(dim=1, modes=8, in_channels=2, out_channels=3)
    params = conv.init(jr.PRNGKey(0))
    apply = jax.jit(conv.apply)
    for s in (16, 17):
        np.testing.assert_allclose(apply(params, band_limited(s, 2)), apply(params, band_limited(4 * s, 2))[::4], atol=1e-12)
    conv2 = ops.SpectralConv(dim=2, modes=(3, 4), in_channels=1, out_channels=2)
    p2 = conv2.init(jr.PRNGKey(1))
    apply2 = jax.jit(conv2.apply)
    coarse, fine = apply2(p2, band_limited_2d(8, 9)), apply2(p2, band_limited_2d(32, 36))
    np.testing.assert_allclose(coarse, fine[::4, ::4], atol=1e-12)


def test_fno_resolution_invariance():
    u = band_limited(64)
    u_fine = band_limited(256)
    # Without the grid channel only the pointwise nonlinearities create energy above
    # `modes`, and the spectral weights barely see it: invariant to ~1e-16 here.
    fno = ops.FNO(dim=1, modes=8, width=16, layers=4, append_grid=False)
    p, apply = fno.init(jr.PRNGKey(0)), jax.jit(fno.apply)
    assert float(ops.relative_l2(apply(p, u), apply(p, u_fine)[::4])) < 1e-8
    # The periodic coordinate i/s is a sawtooth, not band-limited: close, not exact.
    fno = ops.FNO(dim=1, modes=8, width=16, layers=4)
    p, apply = fno.init(jr.PRNGKey(0)), jax.jit(fno.apply)
    assert float(ops.relative_l2(apply(p, u), apply(p, u_fine)[::4])) < 1e-3


def test_fno_gradient_matches_finite_differences():
    fno = ops.FNO(dim=1, modes=3, width=4, layers=2, padding=2, projection_width=5)
    params = fno.init(jr.PRNGKey(0))
    x, r = normal(1, 9, 1), normal(2, 9, 1)
    directional_fd_check(lambda p: jnp.sum(fno.apply(p, x) * r), params, 3)
    fno2 = ops.FNO(dim=2, modes=2, width=3, layers=2, projection_width=4)
    p2 = fno2.init(jr.PRNGKey(0))
    x2, r2 = normal(1, 5, 6, 1), normal(2, 5, 6, 1)
    directional_fd_check(lambda p: jnp.sum(fno2.apply(p, x2) * r2), p2, 3)


def test_fno_vmap_matches_a_loop():
    fno = ops.FNO(dim=1, modes=4, width=6, layers=2, projection_width=8)
    params = fno.init(jr.PRNGKey(0))
    xs = normal(1, 3, 16, 1)
    batched = jax.jit(jax.vmap(fno.apply, in_axes=(None, 0)))(params, xs)
    np.testing.assert_allclose(batched, jnp.stack([jax.jit(fno.apply)(params, x) for x in xs]), atol=1e-12)


def test_fno_errors_are_clear():
    for dim in (0, 4, 1.0, True):
        with pytest.raises(ValueError, match="`dim`"):
            ops.FNO(dim=dim)
    with pytest.raises(ValueError, match="modes"):
        ops.FNO(dim=2, modes=(4, 4, 4))
    with pytest.raises(ValueError, match="grid"):
        ops.FNO(grid="uniform")
    fno = ops.FNO(dim=1, modes=9, width=4, layers=1, projection_width=4)
    params = fno.init(jr.PRNGKey(0))
    jax.eval_shape(fno.apply, params, jnp.ones((16, 1)))  # 16 points: 9 real-FFT frequencies, just enough
    with pytest.raises(ValueError, match=r"modes=9 but 15 points have only 8 .*s//2 \+ 1"):
        jax.eval_shape(fno.apply, params, jnp.ones((15, 1)))
    with pytest.raises(ValueError, match="1 input channel.*has 2"):
        jax.eval_shape(fno.apply, params, jnp.ones((16, 2)))
    with pytest.raises(ValueError, match=r"trailing channel axis"):
        jax.eval_shape(fno.apply, params, jnp.ones(16))
    fno2 = ops.FNO(dim=2, modes=(4, 3), width=4, layers=1, projection_width=4)
    p2 = fno2.init(jr.PRNGKey(0))
    with pytest.raises(ValueError, match=r"axis 0: modes=4 keeps 8"):
        jax.eval_shape(fno2.apply, p2, jnp.ones((7, 8, 1)))
    padded = ops.FNO(dim=1, modes=9, width=4, layers=1, padding=2, projection_width=4)
    jax.eval_shape(padded.apply, padded.init(jr.PRNGKey(0)), jnp.ones((14, 1)))  # 14 + 2 padded points suffice


def test_params_of_another_configuration_name_the_leaf():
    small = dict(width=4, projection_width=4)
    p8 = ops.FNO(dim=1, modes=8, layers=2, **small).init(jr.PRNGKey(0))
    x = jnp.ones((16, 1))
    with pytest.raises(ValueError, match=r"modes=\(6,\)(.|\n)*params\['layers'\]\[0\]\['spectral'\]\['imag'\] has shape \(4, 4, 8\) but this operator expects \(4, 4, 6\)"):
        jax.eval_shape(ops.FNO(dim=1, modes=6, layers=2, **small).apply, p8, x)
    two_channels = ops.FNO(dim=1, modes=8, layers=2, in_channels=2, **small)
    with pytest.raises(ValueError, match=r"params\['lift'\]\['weight'\] has shape \(2, 4\) but this operator expects \(3, 4\)"):
        jax.eval_shape(two_channels.apply, p8, jnp.ones((16, 2)))
    with pytest.raises(ValueError, match=r"params\['layers'\]\[1\]\['pointwise'\]\['bias'\] \(shape \(4,\)\) is not a parameter"):
        jax.eval_shape(ops.FNO(dim=1, modes=8, layers=1, **small).apply, p8, x)
    with pytest.raises(ValueError, match=r"params\['layers'\]\[2\]\['spectral'\]\['real'\] is missing \(expected shape \(4, 4, 8\)\)"):
        jax.eval_shape(ops.FNO(dim=1, modes=8, layers=3, **small).apply, p8, x)
    # Lists and tuples are interchangeable, the operator's own params pass.
    as_tuple = {**p8, "layers": tuple(p8["layers"])}
    assert jax.eval_shape(ops.FNO(dim=1, modes=8, layers=2, **small).apply, as_tuple, x).shape == (16, 1)
    conv = ops.SpectralConv(dim=2, modes=3, in_channels=1, out_channels=2)
    other = ops.SpectralConv(dim=2, modes=(3, 4), in_channels=1, out_channels=2).init(jr.PRNGKey(0))
    with pytest.raises(ValueError, match=r"params\['real'\] has shape \(1, 2, 6, 4\) but this operator expects \(1, 2, 6, 3\)"):
        jax.eval_shape(conv.apply, other, jnp.ones((8, 8, 1)))
    block = ops.FNOBlock(dim=1, modes=4, width=6)
    wide = ops.FNOBlock(dim=1, modes=4, width=8).init(jr.PRNGKey(0))
    with pytest.raises(ValueError, match=r"width=6(.|\n)*params\['pointwise'\]\['weight'\] has shape \(8, 8\) but this operator expects \(6, 6\)"):
        jax.eval_shape(block.apply, wide, jnp.ones((16, 6)), jnp.ones((16, 6)))


def test_complex_parameters_are_refused():
    fno = ops.FNO(dim=1, modes=3, width=4, layers=1, projection_width=4)
    params = fno.init(jr.PRNGKey(0))
    spectral = params["layers"][0]["spectral"]
    params["layers"][0]["spectral"] = {"real": spectral["real"] + 1j * spectral["imag"], "imag": spectral["imag"]}
    with pytest.raises(TypeError, match=r"params\['layers'\]\[0\]\['spectral'\]\['real'\] has complex dtype.*conjugate"):
        jax.eval_shape(fno.apply, params, jnp.ones((8, 1)))


def test_why_real_pairs_optax_on_a_complex_leaf_moves_the_imaginary_part_uphill():
    """The reason for real/imag pairs: fit w*x = t with w = a + ib, by Adam on a complex leaf vs on the pair."""
    target = jnp.array(1.0 + 2.0j)

    def loss_complex(w):
        return jnp.abs(w - target) ** 2

    def loss_pair(p):
        return loss_complex(jax.lax.complex(p["real"], p["imag"]))

    def train(loss, params):
        opt = optax.adam(0.1)
        state = opt.init(params)
        for _ in range(30):
            updates, state = opt.update(jax.grad(loss)(params), state)
            params = optax.apply_updates(params, updates)
        return float(loss(params))

    start = loss_complex(jnp.array(0j))
    assert train(loss_pair, {"real": jnp.array(0.0), "imag": jnp.array(0.0)}) < 0.1 * start
    assert train(loss_complex, jnp.array(0j)) > start  # the imaginary part went the wrong way


# --------------------------------------------------------------------------- DeepONet


def test_deeponet_layouts_agree_and_gradients():
    net = ops.DeepONet(sensors=7, branch=(9, 9), trunk=(8,), latent=5, coord_dim=2, activation=jnp.tanh)
    params = net.init(jr.PRNGKey(0))
    params["bias"] = jnp.array(0.3)
    us = normal(1, 3, 7)
    ys = jnp.asarray(np.random.default_rng(2).uniform(size=(4, 2)))
    grid = jax.jit(jax.vmap(lambda u: net.apply(params, (u, ys))))(us)  # Cartesian product: (3 functions, 4 points)
    assert grid.shape == (3, 4) and jax.eval_shape(net.apply, params, (us[0], ys[0])).shape == ()
    # Unaligned: one point per function, as (u_i, y_i) pairs.
    pairs_u = jnp.repeat(us, 4, axis=0)
    pairs_y = jnp.tile(ys, (3, 1))
    unaligned = jax.jit(jax.vmap(lambda u, y: net.apply(params, (u, y))))(pairs_u, pairs_y)
    np.testing.assert_allclose(unaligned.reshape(3, 4), grid, atol=1e-12)
    directional_fd_check(lambda p: jnp.sum(jnp.sin(net.apply(p, (us[0], ys)))), params, 3)


def test_deeponet_errors():
    net = ops.DeepONet(sensors=5)
    params = net.init(jr.PRNGKey(0))
    with pytest.raises(ValueError, match=r"5 sensors.*\(4,\)"):
        jax.eval_shape(net.apply, params, (jnp.ones(4), jnp.ones(1)))
    with pytest.raises(ValueError, match=r"y\[:, None\]"):
        jax.eval_shape(net.apply, params, (jnp.ones(5), jnp.ones(3)))
    with pytest.raises(TypeError, match=r"\(u, y\)"):
        net.apply(params, jnp.ones(5))
    with pytest.raises(ValueError, match="branch"):
        ops.DeepONet(sensors=5, branch=(0,))


# --------------------------------------------------------------------------- GNN


def ring(n):
    senders = jnp.concatenate([jnp.arange(n), (jnp.arange(n) + 1) % n])
    receivers = jnp.concatenate([(jnp.arange(n) + 1) % n, jnp.arange(n)])
    return senders, receivers


@pytest.mark.parametrize("aggregation", ["sum", "mean"])
def test_gnn_padding_leaves_real_nodes_unchanged(aggregation):
    gnn = ops.GNN(hidden=8, layers=2, in_features=3, out_features=2, aggregation=aggregation)
    params = gnn.init(jr.PRNGKey(0))
    n, n_pad, e_pad = 5, 3, 6
    nodes = normal(1, n, 3)
    senders, receivers = ring(n)
    senders, receivers = jnp.concatenate([senders, jnp.array([0])]), jnp.concatenate([receivers, jnp.array([2])])
    out = jax.jit(gnn.apply)(params, ops.Graph(nodes, senders, receivers))
    assert out.shape == (n, 2)

    # Padded nodes hold garbage (NaN too); padded edges point anywhere, into real nodes included;
    # an unmasked edge from a padded node into a real one is dropped as well.
    garbage = normal(2, n_pad, 3).at[0, 0].set(jnp.nan)
    pad_s = jnp.asarray(np.random.default_rng(3).integers(0, n + n_pad, e_pad))
    pad_r = jnp.asarray(np.random.default_rng(4).integers(0, n + n_pad, e_pad)).at[0].set(1)
    graph = ops.Graph(
        jnp.concatenate([nodes, garbage]),
        jnp.concatenate([senders, pad_s, jnp.array([n])]),
        jnp.concatenate([receivers, pad_r, jnp.array([1])]),
        edge_mask=jnp.concatenate([jnp.ones(senders.shape, bool), jnp.zeros((e_pad,), bool), jnp.ones((1,), bool)]),
        node_mask=jnp.arange(n + n_pad) < n,
    )
    padded = jax.jit(gnn.apply)(params, graph)
    np.testing.assert_allclose(padded[:n], out, atol=1e-12)
    assert bool((padded[n:] == 0).all())

    def loss(p, g):
        return jnp.sum(gnn.apply(p, g) ** 2)

    g_plain = jax.jit(jax.grad(loss))(params, ops.Graph(nodes, senders, receivers))
    g_padded = jax.jit(jax.grad(loss))(params, graph)
    assert rel_err(g_padded, g_plain) < 1e-12  # finite: no 0 * NaN from the padding


def test_gnn_gradient_vmap_and_errors():
    gnn = ops.GNN(hidden=4, layers=2, in_features=2, out_features=1, activation=jnp.tanh)
    params = gnn.init(jr.PRNGKey(0))
    senders, receivers = ring(4)
    nodes = normal(1, 2, 4, 2)
    directional_fd_check(lambda p: jnp.sum(jnp.sin(gnn.apply(p, (nodes[0], senders, receivers)))), params, 2)
    batched = jax.jit(jax.vmap(lambda x: gnn.apply(params, (x, senders, receivers))))(nodes)
    np.testing.assert_allclose(batched[1], jax.jit(gnn.apply)(params, (nodes[1], senders, receivers)), atol=1e-12)
    with pytest.raises(ValueError, match=r"in_features=2.*\(N, 2\)"):
        jax.eval_shape(gnn.apply, params, (jnp.ones((4, 3)), senders, receivers))
    with pytest.raises(ValueError, match="equal length"):
        jax.eval_shape(gnn.apply, params, (nodes[0], senders, receivers[:-1]))
    with pytest.raises(TypeError, match="Graph"):
        gnn.apply(params, nodes[0])


def test_graph_operator_is_the_cgs_normalisation():
    n = 6
    senders, receivers = ring(4)  # nodes 4 and 5 are padding
    node_mask = jnp.arange(n) < 4
    graph_operator = jax.jit(ops.graph_operator, static_argnums=2, static_argnames="symmetrize")
    a_hat = graph_operator(senders, receivers, n, node_mask=node_mask)
    dense = np.zeros((n, n))
    dense[np.asarray(receivers), np.asarray(senders)] = 1.0
    np.testing.assert_allclose(a_hat, fpx.nn.normalized_adjacency(jnp.asarray(dense), node_mask.astype(float)), atol=1e-15)
    # One direction listed + symmetrize == both directions listed.
    one_way = graph_operator(jnp.arange(4), (jnp.arange(4) + 1) % 4, n, node_mask=node_mask, symmetrize=True)
    np.testing.assert_allclose(one_way, a_hat, atol=1e-15)
    assert np.linalg.norm(np.asarray(a_hat), 2) <= 1 + 1e-12 and bool((a_hat[4:] == 0).all())
    # The CGS cell's step is γ Â h + b with this Â.
    cell = fpx.nn.CGSCell(jr.PRNGKey(0), feature_size=2, state_size=3, gamma=0.7)
    features, h = normal(1, n, 2), normal(2, n, 3)
    graph = (jnp.asarray(dense), features, node_mask.astype(float))
    step = jax.jit(lambda h: cell(h, graph) - 0.7 * a_hat @ h)
    np.testing.assert_allclose(step(h), step(jnp.zeros((n, 3))), atol=1e-12)  # = b(G), independent of h


# --------------------------------------------------------------------------- combinators


def test_iterate_one_step_is_the_operator_and_relaxation_is_as_documented():
    fno = ops.FNO(dim=1, modes=3, width=4, layers=1, in_channels=2, out_channels=2, projection_width=4)
    params = fno.init(jr.PRNGKey(0))
    x = normal(1, 8, 2)
    apply = jax.jit(fno.apply)
    np.testing.assert_allclose(jax.jit(ops.iterate(fno, 1).apply)(params, x), apply(params, x), rtol=1e-14, atol=1e-15)
    np.testing.assert_array_equal(ops.iterate(fno, 0).apply(params, x), x)
    expected = x
    for _ in range(3):
        expected = 0.25 * expected + 0.75 * apply(params, expected)
    np.testing.assert_allclose(jax.jit(ops.iterate(fno, 3, relax=0.25).apply)(params, x), expected, atol=1e-12)
    remat = jax.jit(jax.grad(lambda p: ops.iterate(fno, 3, relax=0.25, remat=True).apply(p, x).sum()))(params)
    plain = jax.jit(jax.grad(lambda p: ops.iterate(fno, 3, relax=0.25).apply(p, x).sum()))(params)
    assert rel_err(remat, plain) < 1e-12
    assert ops.iterate(fno, 3).init is fno.init


def test_iterate_errors():
    fno = ops.FNO(dim=1, modes=4, width=4, layers=1, in_channels=1, out_channels=2, projection_width=4)
    params = fno.init(jr.PRNGKey(0))
    with pytest.raises(ValueError, match=r"state's\s+shape(.|\n)*f64\[16, 1\](.|\n)*f64\[16, 2\](.|\n)*in_channels == out_channels"):
        jax.eval_shape(ops.iterate(fno, 2).apply, params, jnp.ones((16, 1)))
    with pytest.raises(ValueError, match="relax"):
        ops.iterate(fno, 2, relax=1.0)
    with pytest.raises(ValueError, match="`k`"):
        ops.iterate(fno, -1)
    block = ops.FNOBlock(dim=1, modes=4, width=4)
    with pytest.raises(TypeError) as info:
        jax.eval_shape(ops.iterate(block, 2).apply, block.init(jr.PRNGKey(0)), jnp.ones((16, 4)))
    assert "injection=True" in "".join(getattr(info.value, "__notes__", []))


def test_deq_gradient_matches_long_unrolled_iterate():
    block = ops.FNOBlock(dim=1, modes=4, width=6, init_scale=0.3)
    params = block.init(jr.PRNGKey(0))
    x = 0.5 * normal(1, 16, 6)
    target = normal(2, 16, 6)
    solved = ops.deq(block, solver=fpx.Picard(rtol=0.0, atol=1e-13), max_steps=200, throw=True)
    unrolled = ops.iterate(block, 120, injection=True)

    def loss(model):
        return lambda p, x: jnp.sum((model.apply(p, x) - target) ** 2)

    z_star = jax.jit(solved.apply)(params, x)
    np.testing.assert_allclose(z_star, jax.jit(unrolled.apply)(params, x), atol=1e-12)
    np.testing.assert_allclose(jax.jit(block.apply)(params, z_star, x), z_star, atol=1e-12)
    g, gx = jax.jit(jax.grad(loss(solved), argnums=(0, 1)))(params, x)
    g_ref, gx_ref = jax.jit(jax.grad(loss(unrolled), argnums=(0, 1)))(params, x)
    assert rel_err(g, g_ref) <= 1e-6 and rel_err(gx, gx_ref) <= 1e-6


def test_deq_stats_warm_start_vmap_and_errors():
    block = ops.FNOBlock(dim=1, modes=3, width=4, init_scale=0.3)
    model = ops.deq(block, solver=fpx.Picard(rtol=1e-10, atol=0.0), max_steps=300, return_stats=True)
    params = block.init(jr.PRNGKey(0))
    xs = normal(1, 3, 8, 4)
    z, stats = jax.jit(jax.vmap(model.apply, in_axes=(None, 0)))(params, xs)
    assert z.shape == (3, 8, 4) and bool(stats["converged"].all()) and stats["num_steps"].shape == (3,)
    _, warm = jax.jit(model.apply)(params, xs[0] + 1e-4, z0=z[0])
    assert int(warm["num_steps"]) < int(stats["num_steps"][0])
    fno = ops.FNO(dim=1, modes=3, width=4, layers=1, projection_width=4)
    with pytest.raises(TypeError) as info:
        jax.eval_shape(ops.deq(fno).apply, fno.init(jr.PRNGKey(0)), jnp.ones((8, 1)))
    assert "op.apply(params, z, x)" in "".join(getattr(info.value, "__notes__", []))
    with pytest.raises(ValueError, match="injected input `x` must have the state's shape"):
        jax.eval_shape(ops.deq(block, init_state=lambda x: jnp.zeros((8, 4))).apply, params, jnp.ones((8, 2)))
    with pytest.raises(TypeError, match="solver"):
        ops.deq(block, solver="anderson")


def test_chain_encoder_block_decoder():
    width = 4
    lift = ops.Operator(lambda key: 0.5 * normal(0, 1, width), lambda w, x: x @ w)
    project = ops.Operator(lambda key: normal(1, width, 1), lambda w, z: z @ w)
    block = ops.iterate(ops.FNOBlock(dim=1, modes=3, width=width, init_scale=0.3), 4, injection=True)
    model = ops.chain(lift, block, project)
    params = model.init(jr.PRNGKey(0))
    assert len(params) == 3
    u = band_limited(16)
    y, expected = jax.jit(
        lambda p: (model.apply(p, u), project.apply(p[2], block.apply(p[1], lift.apply(p[0], u))))
    )(params)
    np.testing.assert_allclose(y, expected, atol=1e-12)
    with pytest.raises(ValueError, match="tuple of 3"):
        jax.eval_shape(model.apply, params[:2], u)


# --------------------------------------------------------------------------- losses


def test_losses():
    target = normal(0, 4, 10, 2)
    pred = target + 0.1 * normal(1, 4, 10, 2)
    per_sample = jax.jit(jax.vmap(ops.relative_l2))(pred, target)
    manual = [np.linalg.norm(np.asarray(p - t)) / np.linalg.norm(np.asarray(t)) for p, t in zip(pred, target)]
    np.testing.assert_allclose(per_sample, manual, rtol=1e-12)
    np.testing.assert_allclose(jax.jit(ops.mean_relative_l2)(pred, target), np.mean(manual), rtol=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        ops.relative_l2(pred, target[0])

    s = 48
    x = np.arange(s) / s
    t = jnp.asarray(np.stack([np.sin(2 * np.pi * x), np.cos(4 * np.pi * x)], axis=-1))
    e = jnp.asarray(0.01 * np.stack([np.sin(6 * np.pi * x), np.zeros(s)], axis=-1))
    exact = 0.01 * math.sqrt((1 + 36 * math.pi**2) / (2 + 4 * math.pi**2 + 16 * math.pi**2))
    h1 = jax.jit(ops.h1_relative, static_argnames="derivative")
    np.testing.assert_allclose(h1(t + e, t, 1 / s), exact, rtol=1e-12)
    np.testing.assert_allclose(h1(t + e, t, 1 / s, derivative="fd"), exact, rtol=0.05)
    assert float(h1(jnp.zeros(s), t[:, 0], 1 / s)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="derivative"):
        ops.h1_relative(t, t, 1 / s, derivative="weak")
