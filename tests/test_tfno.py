"""TFNO (fpx.operators._tfno): factorised spectral weights, against FNO and numpy references."""

import inspect
import math
import re

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import fpx
from fpx.operators import FNO
from fpx.operators._tfno import TFNO, _reconstruct, resolve_rank, tfno_parameter_counts

# Data and references in numpy: every eager jax op compiles a kernel on a small CPU.


def normal(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape)


def pair(z):
    return {"real": jnp.asarray(np.real(z)), "imag": jnp.asarray(np.imag(z))}


def unpair(p):
    return np.asarray(p["real"]) + 1j * np.asarray(p["imag"])


def unitary(rng, n):
    return np.linalg.qr(rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n)))[0]


def randomize(params, seed, scale=0.3):
    """Every leaf replaced by scale * N(0, 1) (the init's tiny or structured values would hide errors).

    `params` may be `jax.eval_shape(op.init, key)`: only the shapes are used (no init compiled)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(scale * rng.standard_normal(np.shape(a))) for a in leaves])


def np_gelu(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def np_tucker(core, factors):
    """Tucker tensor by successive mode products (tensordot), not one einsum."""
    w = core
    for mode, u in enumerate(factors):
        w = np.moveaxis(np.tensordot(u, w, axes=(1, mode)), 0, mode)
    return w


def np_cp(factors):
    """CP tensor as an explicit sum of rank-one outer products."""
    w = 0
    for r in range(factors[0].shape[1]):
        term = factors[0][:, r]
        for u in factors[1:]:
            term = np.multiply.outer(term, u[:, r])
        w = w + term
    return w


def np_fno_1d(p, weights, x, modes):
    """FNO.apply (dim=1, periodic grid, no padding) in numpy with np.fft, given the dense complex weights."""
    s = x.shape[0]
    h = np.concatenate([x, (np.arange(s) / s)[:, None]], axis=-1) @ np.asarray(p["lift"]["weight"]) + np.asarray(p["lift"]["bias"])
    for i, (layer, w) in enumerate(zip(p["layers"], weights)):
        x_hat = np.fft.rfft(h, axis=0)  # (s//2 + 1, width)
        y_hat = np.zeros((s // 2 + 1, w.shape[1]), complex)
        y_hat[:modes] = np.einsum("ki,iok->ko", x_hat[:modes], w)
        pw = layer["pointwise"]
        h = np.fft.irfft(y_hat, n=s, axis=0) + h @ np.asarray(pw["weight"]) + np.asarray(pw["bias"])
        if i < len(weights) - 1:
            h = np_gelu(h)
    p1, p2 = p["projection"]
    return np_gelu(h @ np.asarray(p1["weight"]) + np.asarray(p1["bias"])) @ np.asarray(p2["weight"]) + np.asarray(p2["bias"])


def n_entries(tree):
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def directional_fd_check(f, params, seed, eps=1e-6):
    theta, unravel = ravel_pytree(params)
    v = jnp.asarray(normal(seed, *theta.shape))
    value_and_grad = jax.jit(jax.value_and_grad(lambda t: f(unravel(t))))  # one compilation for both
    analytic = float(jnp.dot(value_and_grad(theta)[1], v))
    numeric = (float(value_and_grad(theta + eps * v)[0]) - float(value_and_grad(theta - eps * v)[0])) / (2 * eps)
    assert abs(analytic - numeric) <= 1e-6 * abs(analytic) + 1e-9, (analytic, numeric)


SMALL = dict(width=4, layers=2, projection_width=5)


# --------------------------------------------------------------------------- exactness against FNO


def test_dense_factorization_is_fno_same_params_same_outputs():
    kw = dict(dim=1, modes=4, **SMALL)
    fno, tfno = FNO(**kw), TFNO(**kw, factorization="dense")
    p_fno, p_tfno = fno.init(jr.PRNGKey(3)), tfno.init(jr.PRNGKey(3))
    assert jax.tree_util.tree_structure(p_fno) == jax.tree_util.tree_structure(p_tfno)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(p_fno), jax.tree_util.tree_leaves(p_tfno)))
    x = jnp.asarray(normal(0, 16, 1))
    np.testing.assert_array_equal(jax.jit(tfno.apply)(p_fno, x), jax.jit(fno.apply)(p_fno, x))


@pytest.mark.parametrize("dim, modes, spatial", [(1, (5,), (16,)), (2, (3, 2), (8, 6))])
def test_exact_tucker_and_cp_decompositions_of_an_fno_weight_reproduce_the_fno(dim, modes, spatial):
    """Full-rank Tucker (random unitary factors, core W ×_k U_kᴴ; and identity factors) and an exact CP."""
    kw = dict(dim=dim, modes=modes, **SMALL)
    fno = FNO(**kw)
    p = fno.init(jr.PRNGKey(0))
    rng = np.random.default_rng(1)
    x = jnp.asarray(normal(2, *spatial, 1))
    expected = jax.jit(fno.apply)(p, x)
    dense = [unpair(layer["spectral"]) for layer in p["layers"]]
    shape = dense[0].shape
    assert shape == (4, 4) + tuple(2 * m for m in modes[:-1]) + (modes[-1],)

    def with_spectral(tfno, spectral):  # the FNO's parameters with these spectral weights (apply checks the shapes)
        q = {**p, "layers": [{**layer, "spectral": s} for layer, s in zip(p["layers"], spectral)]}
        return jax.jit(tfno.apply)(q, x)

    tucker = TFNO(**kw, factorization="tucker", rank=shape)
    unitary_tucker, identity_tucker = [], []
    for w in dense:
        us = [unitary(rng, s) for s in shape]
        core = w
        for mode, u in enumerate(us):  # core = W ×_k U_kᴴ, so that W = core ×_k U_k
            core = np.moveaxis(np.tensordot(u.conj().T, core, axes=(1, mode)), 0, mode)
        np.testing.assert_allclose(np_tucker(core, us), w, atol=1e-15)
        unitary_tucker.append({"core": pair(core), "factors": [pair(u) for u in us]})
        identity_tucker.append({"core": pair(w), "factors": [pair(np.eye(s)) for s in shape]})
    np.testing.assert_allclose(with_spectral(tucker, unitary_tucker), expected, rtol=1e-13, atol=1e-14)
    # Identity factors reconstruct W exactly; the compiled graphs differ, so outputs agree to one ulp, not bitwise.
    np.testing.assert_allclose(with_spectral(tucker, identity_tucker), expected, rtol=4e-16, atol=0)

    # Exact CP with R = prod(shape[1:]) terms: component r = (o, k...) is W[:, o, k...] ⊗ e_o ⊗ e_k ⊗ ...
    n_terms = math.prod(shape[1:])
    cp = TFNO(**kw, factorization="cp", rank=n_terms)
    exact_cp = []
    for w in dense:
        first = w.reshape(shape[0], n_terms)
        rest = [np.zeros((s, n_terms)) for s in shape[1:]]
        for r, index in enumerate(np.ndindex(*shape[1:])):
            for u, i in zip(rest, index):
                u[i, r] = 1.0
        np.testing.assert_allclose(np_cp([first] + rest), w, atol=1e-15)
        exact_cp.append({"factors": [pair(first)] + [pair(u) for u in rest]})
    np.testing.assert_allclose(with_spectral(cp, exact_cp), expected, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("factorization, rank", [("tucker", (3, 2, 4)), ("cp", 3)])
def test_values_against_numpy_reconstruction_and_numpy_fno(factorization, rank):
    tfno = TFNO(dim=1, modes=4, factorization=factorization, rank=rank, **SMALL)
    params = randomize(jax.eval_shape(tfno.init, jr.PRNGKey(0)), 1)
    x = np.asarray(normal(2, 12, 1))
    y = jax.jit(tfno.apply)(params, jnp.asarray(x))
    assert y.shape == (12, 1) and y.dtype == jnp.float64
    weights = []
    for layer in params["layers"]:
        factors = [unpair(f) for f in layer["spectral"]["factors"]]
        if factorization == "tucker":
            assert unpair(layer["spectral"]["core"]).shape == rank
            weights.append(np_tucker(unpair(layer["spectral"]["core"]), factors))
        else:
            assert [f.shape for f in factors] == [(4, 3), (4, 3), (4, 3)]
            weights.append(np_cp(factors))
        np.testing.assert_allclose(unpair(_reconstruct(layer["spectral"], factorization)), weights[-1], rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(y, np_fno_1d(params, weights, x, 4), rtol=1e-11, atol=1e-12)


# --------------------------------------------------------------------------- ranks and parameter counts


def test_rank_conventions_and_parameter_counts_match_init():
    shape = (16, 16, 8)
    P, S = math.prod(shape), sum(shape)
    # CP, float: R = round(P * rank / S); int: R itself.
    assert [resolve_rank(shape, "cp", f) for f in (0.05, 0.2, 1.0)] == [round(P * f / S) for f in (0.05, 0.2, 1.0)] == [3, 10, 51]
    assert resolve_rank(shape, "cp", 7) == 7 and resolve_rank(shape, "cp", 1e-6) == 1
    # Tucker, float: r_k = round(c s_k), c the positive root of P c^3 + (Σ s_k²) c - rank P (numpy's polynomial roots).
    for fraction in (0.05, 0.25, 1.0):
        roots = np.roots([P, 0.0, sum(s * s for s in shape), -fraction * P])
        c = float(np.real(roots[np.argmin(np.abs(np.imag(roots)))]))
        assert resolve_rank(shape, "tucker", fraction) == tuple(max(int(round(c * s)), 1) for s in shape)
    assert resolve_rank(shape, "tucker", 0.25) == (8, 8, 4)
    assert resolve_rank(shape, "tucker", 12) == (12, 12, 8)  # an int: every mode, capped at its size
    assert resolve_rank(shape, "tucker", 100.0) == shape
    assert resolve_rank(shape, "dense", 0.1) is None

    kw = dict(dim=1, modes=8, width=16, layers=2, projection_width=8)
    ranks = {"tucker": [0.05, 0.25, 1.0, 2, (16, 16, 8)], "cp": [0.05, 0.5, 4], "dense": [None]}
    for factorization, rs in ranks.items():
        rows = tfno_parameter_counts(rs, factorization=factorization, **kw)
        for row, r in zip(rows, rs):
            params = jax.eval_shape(TFNO(**kw, factorization=factorization, rank=r).init, jr.PRNGKey(0))
            assert row["total"] == n_entries(params)
            assert row["spectral"] == n_entries([layer["spectral"] for layer in params["layers"]])
            assert row["dense_spectral"] == 2 * 2 * 16 * 16 * 8  # layers * (real, imag) * width² * modes
            assert row["compression"] == row["spectral"] / row["dense_spectral"]
            resolved = row["resolved"]
            if factorization == "tucker":
                assert row["spectral"] == 2 * 2 * (math.prod(resolved) + sum(s * k for s, k in zip(shape, resolved)))
            elif factorization == "cp":
                assert row["spectral"] == 2 * 2 * resolved * S
            else:
                assert resolved is None and row["compression"] == 1.0
            if isinstance(r, float) and factorization != "dense":
                assert abs(row["compression"] - r) < 0.06 * max(r, 0.1) + 0.01, (factorization, r, row["compression"])


@pytest.mark.parametrize("factorization", ["tucker", "cp"])
def test_init_scale_of_the_reconstructed_weight(factorization):
    # Real and imaginary parts of W have RMS 1/width² (neuraloperator's init_std), whatever the rank.
    op = TFNO(dim=1, modes=8, width=16, layers=4, factorization=factorization, rank=0.25)
    params = op.init(jr.PRNGKey(0))
    weights = jax.jit(lambda p: [_reconstruct(layer["spectral"], factorization) for layer in p["layers"]])(params)
    for part in ("real", "imag"):
        w = np.concatenate([np.ravel(layer[part]) for layer in weights])
        assert 0.8 < np.sqrt(np.mean(w**2)) * 16**2 < 1.25


# --------------------------------------------------------------------------- gradients, jit, vmap


@pytest.mark.parametrize("factorization, rank, spatial", [("tucker", 0.5, (10,)), ("cp", 2, (5, 6))])
def test_gradients_through_jit_and_vmap_match_central_finite_differences(factorization, rank, spatial):
    """d/d(params, xs) of Σ_b <apply(params, x_b), r_b> with a vmapped batch, jitted, against a central difference."""
    tfno = TFNO(dim=len(spatial), modes=2, factorization=factorization, rank=rank, **SMALL)
    params = randomize(jax.eval_shape(tfno.init, jr.PRNGKey(0)), 3)
    xs, r = jnp.asarray(normal(1, 2, *spatial, 1)), jnp.asarray(normal(2, 2, *spatial, 1))
    batch = jax.vmap(tfno.apply, in_axes=(None, 0))
    directional_fd_check(lambda a: jnp.sum(batch(a[0], a[1]) * r), (params, xs), 4)  # parameters and inputs at once


def test_vmap_matches_a_loop():
    tfno = TFNO(dim=1, modes=4, factorization="cp", rank=0.5, **SMALL)
    params = randomize(jax.eval_shape(tfno.init, jr.PRNGKey(0)), 1)
    assert params["layers"][0]["spectral"]["factors"][0]["real"].shape == (4, 3)  # R = round(64 * 0.5 / 12)
    xs = jnp.asarray(normal(2, 3, 16, 1))
    batched = jax.jit(jax.vmap(tfno.apply, in_axes=(None, 0)))(params, xs)
    single = jax.jit(tfno.apply)
    np.testing.assert_allclose(batched, np.stack([single(params, x) for x in xs]), rtol=1e-13, atol=1e-14)


# --------------------------------------------------------------------------- errors


def test_errors_name_the_operator_and_the_argument():
    for kwargs, match in [
        (dict(factorization="tt"), r"TFNO: `factorization` must be one of \('tucker', 'cp', 'dense'\), got 'tt'"),
        (dict(rank=0), r"TFNO: an integer `rank` is the rank itself and must be >= 1, got 0"),
        (dict(rank=-0.5), r"TFNO: a float `rank` is the fraction .* must be > 0, got -0.5"),
        (dict(rank=True), r"TFNO: `rank` must be a positive float"),
        (dict(rank="half"), r"TFNO: `rank` must be a float, an int or \(Tucker\) a tuple"),
        (dict(rank=(4, 4)), r"TFNO: a Tucker `rank` tuple needs one int per mode of the weight shape \(4, 4, 4\)"),
        (dict(rank=(4, 5, 4)), r"TFNO: a Tucker `rank` tuple .* each 1 <= r_k <= s_k, got \(4, 5, 4\)"),
        (dict(factorization="cp", rank=(2, 2, 2)), r"TFNO: a per-mode `rank` tuple is for factorization='tucker'"),
        (dict(dim=4), r"TFNO: `dim`"),
        (dict(width=0), r"TFNO: `width` must be an integer >= 1"),
        (dict(grid="uniform"), r"TFNO: `grid`"),
        (dict(modes=(4, 4)), r"TFNO: `modes` must be a positive integer or a tuple of 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            TFNO(**{"dim": 1, "modes": 4, **SMALL, **kwargs})

    three_d = TFNO(dim=3, modes=(2, 2, 2), factorization="tucker", rank=0.5, **SMALL)  # traced only, not compiled
    assert jax.eval_shape(three_d.apply, jax.eval_shape(three_d.init, jr.PRNGKey(0)), jnp.ones((4, 5, 4, 1))).shape == (4, 5, 4, 1)
    tfno = TFNO(dim=1, modes=9, factorization="tucker", rank=0.5, **SMALL)
    params = jax.eval_shape(tfno.init, jr.PRNGKey(0))  # shapes suffice: every check runs at trace time
    jax.eval_shape(tfno.apply, params, jnp.ones((16, 1)))
    with pytest.raises(ValueError, match=r"TFNO: the input resolution \(15,\) is too coarse for modes=\(9,\)(.|\n)*modes=9 but 15 points"):
        jax.eval_shape(tfno.apply, params, jnp.ones((15, 1)))
    with pytest.raises(ValueError, match=r"TFNO \(dim=1\) takes one sample of shape \(s, channels\), got `x` of shape \(16,\)"):
        jax.eval_shape(tfno.apply, params, jnp.ones(16))
    with pytest.raises(ValueError, match=r"TFNO was built for 1 input channel\(s\) but `x` of shape \(16, 2\) has 2"):
        jax.eval_shape(tfno.apply, params, jnp.ones((16, 2)))
    dense = jax.eval_shape(TFNO(dim=1, modes=9, factorization="dense", **SMALL).init, jr.PRNGKey(0))
    with pytest.raises(ValueError, match=r"TFNO\(dim=1(.|\n)*factorization='tucker'(.|\n)*params\['layers'\]\[0\]\['spectral'\]\['core'\]\['imag'\] is missing"):
        jax.eval_shape(tfno.apply, dense, jnp.ones((16, 1)))
    leaf = params["layers"][0]["spectral"]["factors"][1]
    bad = jax.tree_util.tree_map(lambda a: a, params)
    bad["layers"][0]["spectral"]["factors"][1] = {"real": jax.ShapeDtypeStruct(leaf["real"].shape, jnp.complex128), "imag": leaf["imag"]}
    with pytest.raises(TypeError, match=r"params\['layers'\]\[0\]\['spectral'\]\['factors'\]\[1\]\['real'\] has complex dtype"):
        jax.eval_shape(tfno.apply, bad, jnp.ones((16, 1)))


# --------------------------------------------------------------------------- docs


BLOCK = re.compile(r"```python\n(.*?)```", re.S)


@pytest.mark.parametrize("obj", [tfno_parameter_counts, resolve_rank])  # TFNO's runs in test_docs once exported
def test_docstring_examples_run(obj, monkeypatch):
    import fpx.operators._tfno as module

    for name in ("TFNO", "tfno_parameter_counts", "resolve_rank"):
        monkeypatch.setattr(fpx.operators, name, getattr(module, name), raising=False)
    blocks = BLOCK.findall(inspect.getdoc(obj))
    assert blocks
    for code in blocks:
        exec(compile(code, "<docstring>", "exec"), {})
