"""GalerkinTransformer (fpx.operators._galerkin): Galerkin and Fourier attention against numpy references."""

import math

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from fpx.operators._galerkin import GalerkinTransformer, _attention

# Data and references in numpy: every eager jax op compiles a kernel on a small CPU.


def normal(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape)


def randomize(params, seed, scale=0.4):
    """Every leaf replaced by scale * N(0, 1): the init's W_Q ≈ 0.01 I would make the attention invisible.

    `params` may be `jax.eval_shape(op.init, key)`: only the shapes are used (no init compiled)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(scale * rng.standard_normal(np.shape(a))) for a in leaves])


def n_entries(tree):
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


# --------------------------------------------------------------------------- numpy reference


def np_silu(x):
    return x / (1.0 + np.exp(-x))


def np_relu(x):
    return np.maximum(x, 0.0)


def np_layer_norm(x, scale, shift, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * scale + shift


def np_dense(p, x):
    return x @ np.asarray(p["weight"]) + np.asarray(p["bias"])


def np_spectral_conv(v, real, imag, modes):
    """Channel-last spectral convolution with np.fft, the reference's corner layout (1-D and 2-D)."""
    w = np.asarray(real) + 1j * np.asarray(imag)
    if v.ndim == 2:
        (s,) = v.shape[:1]
        x_hat = np.fft.rfft(v, axis=0)
        y_hat = np.zeros((s // 2 + 1, w.shape[1]), complex)
        y_hat[: modes[0]] = np.einsum("ki,iok->ko", x_hat[: modes[0]], w)
        return np.fft.irfft(y_hat, n=s, axis=0)
    s1, s2 = v.shape[:2]
    m1, m2 = modes
    x_hat = np.fft.rfft2(v, axes=(0, 1))
    y_hat = np.zeros((s1, s2 // 2 + 1, w.shape[1]), complex)
    y_hat[:m1, :m2] = np.einsum("xyi,ioxy->xyo", x_hat[:m1, :m2], w[:, :, :m1])
    y_hat[s1 - m1 :, :m2] = np.einsum("xyi,ioxy->xyo", x_hat[s1 - m1 :, :m2], w[:, :, m1:])
    return np.fft.irfft2(y_hat, s=(s1, s2), axes=(0, 1))


def np_transformer(p, x, *, heads, attention, modes, attention_norm=True, layer_norm=False, activation=np_relu):
    """GalerkinTransformer.apply in numpy: per-head attention through the explicit n×n matrix (Q Kᵀ)/n, both kinds."""
    p = jax.tree_util.tree_map(np.asarray, p)
    x = np.asarray(x, np.float64)
    spatial = x.shape[:-1]
    n, dim = math.prod(spatial), len(spatial)
    pos = np.stack(np.meshgrid(*[np.arange(s) / s for s in spatial], indexing="ij"), axis=-1).reshape(n, dim)
    h = np_dense(p["lift"], np.concatenate([x.reshape(n, -1), pos], axis=-1))
    width = h.shape[1]
    e = width // heads
    for layer in p["encoder"]:
        att = layer["attention"]
        qkv = {name: np_dense(att[name], h) for name in ("query", "key", "value")}
        outputs = []
        for head in range(heads):
            cols = slice(head * e, (head + 1) * e)
            q, k, v = (qkv[name][:, cols] for name in ("query", "key", "value"))
            if attention_norm:
                normed = ("key", "value") if attention == "galerkin" else ("query", "key")
                q, k, v = (
                    np_layer_norm(y, att[f"{name}_norm"]["scale"][head], att[f"{name}_norm"]["shift"][head]) if name in normed else y
                    for name, y in zip(("query", "key", "value"), (q, k, v))
                )
            q, k, v = (np.concatenate([pos, y], axis=1) for y in (q, k, v))
            kernel = q @ k.T / n  # the n×n matrix, also for Galerkin: the other association of the same form
            outputs.append(kernel @ v)
        h = h + np_dense(att["output"], np.concatenate(outputs, axis=1))
        if layer_norm:
            h = np_layer_norm(h, layer["norm_1"]["scale"], layer["norm_1"]["shift"])
        (f1, f2) = layer["feedforward"]
        h = h + np_dense(f2, activation(np_dense(f1, h)))
        if layer_norm:
            h = np_layer_norm(h, layer["norm_2"]["scale"], layer["norm_2"]["shift"])
    v = h.reshape(spatial + (width,))
    for layer in p["decoder"]:
        v = np_silu(np_spectral_conv(v, layer["spectral"]["real"], layer["spectral"]["imag"], modes) + np_dense(layer["pointwise"], v))
    (p1, p2) = p["projection"]
    return np_dense(p2, np_silu(np_dense(p1, v)))


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    "dim, shape, modes, heads, attention, layer_norm",
    [
        (1, (12, 2), (4,), 2, "galerkin", False),
        (1, (12, 2), (4,), 2, "fourier", False),
        (1, (11, 2), (5,), 1, "fourier", True),  # odd s, post-residual layer norms, no attention norms
        (2, (6, 5, 2), (2, 3), 2, "galerkin", False),
    ],
)
def test_values_against_numpy_explicit_attention_matrices(dim, shape, modes, heads, attention, layer_norm):
    op = GalerkinTransformer(
        dim=dim, modes=modes, width=8, heads=heads, layers=2, in_channels=2, out_channels=3, attention=attention,
        layer_norm=layer_norm, feedforward_width=6, decoder_width=5, projection_width=7,
    )
    params = jax.eval_shape(op.init, jr.PRNGKey(0))
    names = set(params["encoder"][0]["attention"])
    assert ("norm_1" in params["encoder"][0]) == layer_norm
    if layer_norm:
        assert names == {"query", "key", "value", "output"}
    else:
        assert names - {"query", "key", "value", "output"} == ({"key_norm", "value_norm"} if attention == "galerkin" else {"query_norm", "key_norm"})
    assert params["encoder"][0]["attention"]["output"]["weight"].shape == (8 + heads * dim, 8)
    assert params["decoder"][0]["spectral"]["real"].shape == (8, 5) + tuple(2 * m for m in modes[:-1]) + (modes[-1],)
    params = randomize(params, 1)
    x = normal(2, *shape)
    y = jax.jit(op.apply)(params, jnp.asarray(x))
    assert y.shape == shape[:-1] + (3,) and y.dtype == jnp.float64
    expected = np_transformer(params, x, heads=heads, attention=attention, modes=modes, attention_norm=not layer_norm, layer_norm=layer_norm)
    np.testing.assert_allclose(y, expected, rtol=1e-11, atol=1e-12)


def test_init_is_the_references():
    op = GalerkinTransformer(dim=1, modes=4, width=8, heads=2, layers=1, xavier_gain=0.5, diagonal_weight=0.25)
    p = op.init(jr.PRNGKey(0))
    att = p["encoder"][0]["attention"]
    bound = 0.5 * math.sqrt(6 / 16)
    for name in ("query", "key", "value"):
        off_diagonal = np.asarray(att[name]["weight"]) - 0.25 * np.eye(8)
        assert np.abs(off_diagonal).max() <= bound and np.abs(off_diagonal).max() > 0.5 * bound
        assert not np.any(np.asarray(att[name]["bias"]))
    for name in ("key_norm", "value_norm"):
        np.testing.assert_array_equal(att[name]["scale"], np.ones((2, 4)))
        np.testing.assert_array_equal(att[name]["shift"], np.zeros((2, 4)))


# --------------------------------------------------------------------------- Galerkin vs Fourier


def test_galerkin_and_fourier_are_one_bilinear_form_associated_differently():
    q, k, v = (jnp.asarray(normal(i, 2, 50, 3)) for i in range(3))
    attend = jax.jit(_attention, static_argnums=3)
    galerkin, fourier = attend(q, k, v, "galerkin"), attend(q, k, v, "fourier")
    explicit = np.einsum("hnd,hmd,hme->hne", q, k, v) / 50
    np.testing.assert_allclose(galerkin, explicit, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(fourier, explicit, rtol=1e-12, atol=1e-13)

    # Without the attention norms the two operators are the same map of the same parameters (with them,
    # the numpy comparison above tells them apart: layer norm on K, V against Q, K).
    kw = dict(dim=1, modes=4, width=8, heads=2, layers=2, decoder_layers=1, attention_norm=False)
    g, f = GalerkinTransformer(**kw, attention="galerkin"), GalerkinTransformer(**kw, attention="fourier")
    params = randomize(jax.eval_shape(g.init, jr.PRNGKey(0)), 1)
    x = jnp.asarray(normal(2, 16, 1))
    y_g, y_f = jax.jit(lambda p, x: (g.apply(p, x), f.apply(p, x)))(params, x)
    np.testing.assert_allclose(y_g, y_f, rtol=1e-12, atol=1e-13)
    assert float(jnp.abs(y_g).max()) > 0.1


def _intermediate_shapes(jaxpr):
    """Shapes of every variable of a jaxpr, sub-jaxprs (pjit, custom_jvp, scan...) included."""
    shapes = []
    for eqn in jaxpr.eqns:
        shapes += [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    shapes += _intermediate_shapes(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    shapes += _intermediate_shapes(sub)
    return shapes


@pytest.mark.parametrize("spatial", [(64,), (8, 8)])
def test_galerkin_never_forms_an_n_by_n_matrix(spatial):
    n, dim = math.prod(spatial), len(spatial)
    kw = dict(dim=dim, modes=2, width=8, heads=2, layers=2, feedforward_width=16)
    x = jnp.ones(spatial + (1,))

    def biggest(attention):
        op = GalerkinTransformer(**kw, attention=attention)
        params = jax.eval_shape(op.init, jr.PRNGKey(0))
        forward = jax.make_jaxpr(op.apply)(params, x).jaxpr
        backward = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(op.apply(p, x) ** 2)))(params).jaxpr
        shapes = _intermediate_shapes(forward) + _intermediate_shapes(backward)
        return max(math.prod(s) for s in shapes), [s for s in shapes if sum(a == n for a in s) >= 2]

    largest, square = biggest("galerkin")
    assert not square and largest < n * n // 2, (largest, square)  # largest: (n, feedforward_width) = 1024
    largest, square = biggest("fourier")
    assert (2, n, n) in square and largest >= 2 * n * n  # the (heads, n, n) kernel: this check can fail


# --------------------------------------------------------------------------- gradients, jit, vmap


def directional_fd_check(f, arg, seed, eps=1e-6):
    theta, unravel = ravel_pytree(arg)
    v = jnp.asarray(normal(seed, *theta.shape))
    value_and_grad = jax.jit(jax.value_and_grad(lambda t: f(unravel(t))))  # one compilation for both
    analytic = float(jnp.dot(value_and_grad(theta)[1], v))
    numeric = (float(value_and_grad(theta + eps * v)[0]) - float(value_and_grad(theta - eps * v)[0])) / (2 * eps)
    assert abs(analytic - numeric) <= 1e-6 * abs(analytic) + 1e-9, (analytic, numeric)


@pytest.mark.parametrize("attention, spatial", [("galerkin", (5, 4)), ("fourier", (9,))])
def test_gradients_through_jit_and_vmap_match_central_finite_differences(attention, spatial):
    """d/d(params, xs) of Σ_b <apply(params, x_b), r_b> with a vmapped batch, jitted, against a central difference."""
    # tanh in the feed-forward sublayers: relu's kink would spoil a finite difference.
    op = GalerkinTransformer(
        dim=len(spatial), modes=2, width=4, heads=2, layers=1, decoder_layers=1, attention=attention,
        activation=jnp.tanh, feedforward_width=6,
    )
    params = randomize(jax.eval_shape(op.init, jr.PRNGKey(0)), 1)
    xs, r = jnp.asarray(normal(2, 2, *spatial, 1)), jnp.asarray(normal(3, 2, *spatial, 1))
    batch = jax.vmap(op.apply, in_axes=(None, 0))
    directional_fd_check(lambda a: jnp.sum(batch(a[0], a[1]) * r), (params, xs), 4)  # parameters and inputs at once


def test_vmap_matches_a_loop():
    op = GalerkinTransformer(dim=1, modes=3, width=4, heads=2, layers=1, decoder_layers=1, feedforward_width=4)
    params = randomize(jax.eval_shape(op.init, jr.PRNGKey(0)), 1)
    xs = jnp.asarray(normal(2, 3, 16, 1))
    batched = jax.jit(jax.vmap(op.apply, in_axes=(None, 0)))(params, xs)
    single = jax.jit(op.apply)
    np.testing.assert_allclose(batched, np.stack([single(params, x) for x in xs]), rtol=1e-13, atol=1e-14)


# --------------------------------------------------------------------------- resolution


@pytest.mark.parametrize("attention", ["galerkin", "fourier"])
def test_attention_quadrature_converges_with_resolution(attention):
    """The same parameters on a smooth input at s = 16, 32, 64, compared on the s = 16 points.

    `1/n Σ_j` is the rectangle rule on [0, 1); the coordinate channel `i/s` is not periodic,
    so the error is first order: the differences between successive resolutions halve.
    """
    op = GalerkinTransformer(dim=1, modes=6, width=8, heads=2, layers=1, decoder_layers=1, attention=attention)
    params = randomize(jax.eval_shape(op.init, jr.PRNGKey(0)), 1, scale=0.3)
    apply = jax.jit(op.apply)

    def u(s):
        x = np.arange(s) / s
        return jnp.asarray(np.exp(np.sin(2 * np.pi * x)) + 0.5 * np.cos(4 * np.pi * x))[:, None]

    y16, y32, y64 = (np.asarray(apply(params, u(s)))[:: s // 16] for s in (16, 32, 64))
    d1, d2 = float(np.abs(y16 - y32).max()), float(np.abs(y32 - y64).max())
    assert 0 < d1 < 0.1 * float(np.abs(y64).max())
    # First order: each doubling of the resolution halves the difference (measured 1.80-2.01).
    assert d1 / d2 > 1.6, (d1, d2)
    assert d1 / d2 < 2.6, (d1, d2)


# --------------------------------------------------------------------------- errors


def test_errors_name_the_operator_and_the_argument():
    for kwargs, match in [
        (dict(dim=3), r"GalerkinTransformer: `dim` is the number of spatial dimensions and must be 1 or 2, got 3"),
        (dict(heads=3), r"GalerkinTransformer: `heads`=3 must divide `width`=8"),
        (dict(attention="softmax"), r"GalerkinTransformer: `attention` must be 'galerkin' or 'fourier', got 'softmax'"),
        (dict(width=0), r"GalerkinTransformer: `width` must be an integer >= 1"),
        (dict(decoder_layers=0), r"GalerkinTransformer: `decoder_layers` must be an integer >= 1"),
        (dict(modes=(4, 4)), r"GalerkinTransformer: `modes` must be a positive integer or a tuple of 1"),
        (dict(grid="uniform"), r"GalerkinTransformer: `grid` must be 'periodic' or 'closed'"),
        (dict(eps=0.0), r"GalerkinTransformer: `eps`"),
    ]:
        with pytest.raises(ValueError, match=match):
            GalerkinTransformer(**{"dim": 1, "modes": 4, "width": 8, **kwargs})

    op = GalerkinTransformer(dim=1, modes=9, width=8, heads=2)
    params = jax.eval_shape(op.init, jr.PRNGKey(0))  # shapes suffice: every check runs at trace time
    jax.eval_shape(op.apply, params, jnp.ones((16, 1)))
    with pytest.raises(ValueError, match=r"GalerkinTransformer: the input resolution \(15,\) is too coarse for modes=\(9,\)(.|\n)*modes=9 but 15 points"):
        jax.eval_shape(op.apply, params, jnp.ones((15, 1)))
    with pytest.raises(ValueError, match=r"GalerkinTransformer \(dim=1\) takes one sample of shape \(s, channels\), got `x` of shape \(16,\)"):
        jax.eval_shape(op.apply, params, jnp.ones(16))
    with pytest.raises(ValueError, match=r"GalerkinTransformer was built for 1 input channel\(s\) but `x` of shape \(16, 2\) has 2"):
        jax.eval_shape(op.apply, params, jnp.ones((16, 2)))
    op2 = GalerkinTransformer(dim=2, modes=(4, 3), width=8)
    with pytest.raises(ValueError, match=r"GalerkinTransformer: the input resolution \(7, 8\)(.|\n)*axis 0: modes=4 keeps 8"):
        jax.eval_shape(op2.apply, jax.eval_shape(op2.init, jr.PRNGKey(0)), jnp.ones((7, 8, 1)))
    fourier = GalerkinTransformer(dim=1, modes=9, width=8, heads=2, attention="fourier")
    with pytest.raises(ValueError, match=r"GalerkinTransformer\(dim=1(.|\n)*attention='fourier'(.|\n)*params\['encoder'\]\[0\]\['attention'\]\['query_norm'\]\['scale'\] is missing"):
        jax.eval_shape(fourier.apply, params, jnp.ones((16, 1)))
    four_heads = GalerkinTransformer(dim=1, modes=9, width=8, heads=4)
    with pytest.raises(ValueError, match=r"params\['encoder'\]\[0\]\['attention'\]\['key_norm'\]\['scale'\] has shape \(2, 4\) but this operator expects \(4, 2\)"):
        jax.eval_shape(four_heads.apply, params, jnp.ones((16, 1)))
