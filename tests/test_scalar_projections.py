"""fpx.projective: exact projections onto graphs of scalar maps, quantisers and pooling in models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.special
from hypothesis import given, settings, strategies as st

import fpx
from fpx.projective import (
    SCALAR_FUNCTIONS,
    project_quantizer_graph,
    project_scalar_graph,
    project_step_graph,
    quantize,
)
from fpx.projective import _graph as G
from fpx.projective._scalar import scalar_function, step_function

N = 48  # one shape for every call, so each (function, dtype) compiles once

_NUMPY = {
    "tanh": np.tanh,
    "logistic": scipy.special.expit,
    "softplus": lambda t: np.logaddexp(0, t),
    "exp": np.exp,
    "expm1": np.expm1,
    "log": np.log,
    "log1p": np.log1p,
    "leaky_relu": lambda t: np.where(t >= 0, t, 0.01 * t),
    "hard_tanh": lambda t: np.clip(t, -1, 1),
}
# Points on the concave side of the S-curves, inside the convex curves, near the kinks, far away.
_ADVERSARIAL = [
    (2, -3), (5, -0.5), (1.5, -3), (-2, 3), (0.7, -1.2), (3, -2), (-3, 2), (0, 5), (-1, 10), (0.3, 0.3),
    (1, 0.9), (-1, -0.9), (0, 0), (0.5, -40), (-0.5, 40), (4, 0.1), (-4, 0.9), (2, 6), (1e3, -1e3), (-1e3, 1e3),
]


def _points(seed, scale=3.0):
    rng = np.random.default_rng(seed)
    extra = N - len(_ADVERSARIAL)
    a = np.concatenate([[p[0] for p in _ADVERSARIAL], rng.normal(scale=scale, size=extra)])
    b = np.concatenate([[p[1] for p in _ADVERSARIAL], rng.normal(scale=scale, size=extra)])
    return a, b


def _brute_force(function, a, b):
    """min over the graph of the squared distance: a dense grid, then a bounded local refinement."""
    phi = _NUMPY[function]
    if function in ("log", "log1p"):
        shift = 0.0 if function == "log" else -1.0
        ts = shift + np.exp(np.linspace(-40, 8, 100001))
    else:
        ts = np.concatenate([np.linspace(-60, 60, 120001), np.linspace(a - 3, a + 3, 6001)])
    with np.errstate(all="ignore"):
        values = (ts - a) ** 2 + (phi(ts) - b) ** 2
        i = int(np.nanargmin(values))
        lo, hi = ts[max(i - 1, 0)], ts[min(i + 1, ts.size - 1)]
        res = scipy.optimize.minimize_scalar(
            lambda t: (t - a) ** 2 + (phi(t) - b) ** 2, bounds=(lo, hi), method="bounded", options=dict(xatol=1e-13)
        )
    return min(values[i], res.fun)


# ------------------------------------------------------------------ monotone curves


@pytest.mark.parametrize("function", SCALAR_FUNCTIONS)
def test_scalar_graph_is_the_global_nearest_point(function):
    a, b = _points(0)
    x, y = project_scalar_graph(jnp.asarray(a), jnp.asarray(b), function)
    assert np.all(np.asarray(scalar_function(function)(x)) == np.asarray(y))  # on the graph, exactly
    dist = (np.asarray(x) - a) ** 2 + (np.asarray(y) - b) ** 2
    for i in range(N):
        if abs(a[i]) > 100 and function in ("exp", "expm1", "log", "log1p"):
            continue  # outside the brute force's grid
        best = _brute_force(function, a[i], b[i])
        assert dist[i] <= best * (1 + 1e-9) + 1e-12, (function, a[i], b[i], dist[i], best)


def test_scalar_graph_known_values():
    # The point (0, 2) above tanh: two candidate branches are not equidistant; the nearest
    # lies at t > 0 with t = sech^2(t) (2 - tanh t).
    x, y = project_scalar_graph(jnp.array([0.0] * N), jnp.array([2.0] * N), "tanh")
    t = float(x[0])
    assert abs(t - (2 - np.tanh(t)) / np.cosh(t) ** 2) < 1e-12
    # leaky_relu is a union of two rays: (-1, 1) goes to the ray y = s x (cost 1.8 < 2 at the origin)
    x, y = project_scalar_graph(jnp.array([-1.0, 3.0]), jnp.array([1.0, 1.0]), "leaky_relu", negative_slope=0.5)
    np.testing.assert_allclose(np.asarray(x), [-0.4, 2.0], atol=1e-12)  # t = (a + s b) / (1 + s^2)
    np.testing.assert_allclose(np.asarray(y), [-0.2, 2.0], atol=1e-12)
    # The graph of log is the graph of exp with the coordinates swapped.
    a, b = _points(1)
    x1, y1 = project_scalar_graph(jnp.asarray(a), jnp.asarray(b), "log")
    x2, y2 = project_scalar_graph(jnp.asarray(b), jnp.asarray(a), "exp")
    np.testing.assert_allclose(np.asarray(x1), np.asarray(y2), rtol=1e-12, atol=1e-300)  # x >= tiny for log


finite = st.floats(-8, 8, allow_nan=False, width=64)


@settings(max_examples=12, deadline=None)
@given(st.sampled_from(SCALAR_FUNCTIONS), st.lists(finite, min_size=N, max_size=N), st.lists(finite, min_size=N, max_size=N))
def test_scalar_graph_properties(function, a, b):
    a, b = np.asarray(a), np.asarray(b)
    phi = scalar_function(function)
    if function in ("log", "log1p"):
        a = np.exp(a / 2) - (function == "log1p")  # points of the domain
    # Idempotent: a point of the graph is its own projection.
    on = np.asarray(phi(jnp.asarray(a)))
    x, y = project_scalar_graph(jnp.asarray(a), jnp.asarray(on), function)
    np.testing.assert_allclose(np.asarray(x), a, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np.asarray(y), on, rtol=1e-9, atol=1e-9)
    # Nearest: no sampled graph point is nearer than the projection.
    x, y = project_scalar_graph(jnp.asarray(a), jnp.asarray(b), function)
    assert np.all(np.asarray(phi(x)) == np.asarray(y))
    dist = (np.asarray(x) - a) ** 2 + (np.asarray(y) - b) ** 2
    samples = np.linspace(-10, 10, 2001) if function not in ("log", "log1p") else np.exp(np.linspace(-10, 3, 2001)) - (function == "log1p")
    sy = np.asarray(phi(jnp.asarray(samples)))
    sampled = np.min((samples[None, :] - a[:, None]) ** 2 + (sy[None, :] - b[:, None]) ** 2, axis=1)
    assert np.all(dist <= sampled + 1e-9)


@pytest.mark.parametrize("function", SCALAR_FUNCTIONS)
def test_scalar_graph_float32_huge_values_jit_and_vmap(function):
    rng = np.random.default_rng(2)
    big = np.concatenate([[1e6, -1e6, 1e6, -1e6, 0, 0, 1e6, -1e6], rng.normal(scale=1e5, size=N - 8)])
    other = np.concatenate([[1e6, 1e6, -1e6, -1e6, 1e6, -1e6, 0, 0], rng.normal(scale=1e5, size=N - 8)])
    for dtype in (jnp.float32, jnp.float64):
        x, y = jax.jit(project_scalar_graph, static_argnames="function")(
            jnp.asarray(big, dtype), jnp.asarray(other, dtype), function=function
        )
        assert x.dtype == dtype and y.dtype == dtype
        assert bool(jnp.all(jnp.isfinite(x)) & jnp.all(jnp.isfinite(y))), (function, dtype)
        assert bool(jnp.all(scalar_function(function)(x) == y))
    # vmap over a batch axis agrees with the flat call (float32, moderate values)
    a, b = (jnp.asarray(v.reshape(6, 8), jnp.float32) for v in _points(3))
    xv, yv = jax.vmap(lambda a, b: project_scalar_graph(a, b, function))(a, b)
    xf, yf = project_scalar_graph(a.reshape(-1), b.reshape(-1), function)
    np.testing.assert_allclose(np.asarray(xv).reshape(-1), np.asarray(xf), rtol=1e-5, atol=1e-5)
    # float32 is accurate to float32 rounding: compare with the float64 answer
    x64, y64 = project_scalar_graph(a.reshape(-1).astype(jnp.float64), b.reshape(-1).astype(jnp.float64), function)
    d32 = (xf - a.reshape(-1)) ** 2 + (yf - b.reshape(-1)) ** 2
    d64 = (x64 - a.reshape(-1)) ** 2 + (y64 - b.reshape(-1)) ** 2
    # (beyond |y| ~ 15 the graph points of log/log1p are not representable in float32: x -> 0 or -1)
    keep = np.abs(np.asarray(b.reshape(-1))) < 15
    np.testing.assert_allclose(np.asarray(d32)[keep], np.asarray(d64)[keep], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ step maps

_LEVELS = {"binary": ([-1.0, 1.0], [0.0]), "ternary": ([-1.0, 0.0, 1.0], [-0.3, 0.3])}


def _step_brute_force(q_name, a, b):
    """Infimum of the squared distance to the union of the closed segments (levels -30..30)."""
    if q_name in _LEVELS:
        levels, thresholds = _LEVELS[q_name]
        edges = [-np.inf] + thresholds + [np.inf]
        segments = [(edges[j], edges[j + 1], levels[j]) for j in range(len(levels))]
    elif q_name in ("sign", "heaviside"):
        low, mid = (-1, 0) if q_name == "sign" else (0, 0.5)
        segments = [(-np.inf, 0, low), (0, 0, mid), (0, np.inf, 1)]
    else:
        shift = {"floor": (0, 1), "ceil": (-1, 0), "round": (-0.5, 0.5), "round_away": (-0.5, 0.5)}[q_name]
        segments = [(k + shift[0], k + shift[1], k) for k in range(-30, 31)]
    return min((np.clip(a, lo, hi) - a) ** 2 + (level - b) ** 2 for lo, hi, level in segments)


def _step(q_name, x, y):
    if q_name in _LEVELS:
        levels, thresholds = _LEVELS[q_name]
        return project_quantizer_graph(x, y, levels, thresholds), lambda v: quantize(v, levels, thresholds)
    return project_step_graph(x, y, q_name), step_function(q_name)


_STEPS = ["sign", "round", "round_away", "floor", "ceil", "heaviside", "binary", "ternary"]


@pytest.mark.parametrize("q_name", _STEPS)
def test_step_graph_is_the_nearest_point_and_exactly_on_the_graph(q_name):
    rng = np.random.default_rng(4)
    jumps = np.array([0.0, 0.5, -0.5, 1.5, 2.5, -2.5, 1.0, -1.0, 0.3, -0.3, 2.0])
    near = np.concatenate([jumps, jumps + 1e-9, jumps - 1e-9])
    a = np.concatenate([near, rng.normal(scale=3, size=N - near.size)])
    b = np.concatenate([rng.normal(size=near.size), rng.normal(scale=3, size=N - near.size)])
    for dtype in (jnp.float64, jnp.float32):
        (x, y), q = _step(q_name, jnp.asarray(a, dtype), jnp.asarray(b, dtype))
        assert x.dtype == dtype
        assert np.all(np.asarray(q(x)) == np.asarray(y)), q_name  # exactly on the graph, jump values included
    (x, y), _ = _step(q_name, jnp.asarray(a), jnp.asarray(b))
    dist = (np.asarray(x) - a) ** 2 + (np.asarray(y) - b) ** 2
    for i in range(N):
        best = _step_brute_force(q_name, a[i], b[i])
        assert dist[i] <= best + 1e-12, (q_name, a[i], b[i], dist[i], best)


def test_step_graph_jump_values():
    # sign(0) = 0: the point (0, 0.1) stays at (0, 0); (1e-3, 0.9) goes to the upper ray.
    x, y = project_step_graph(jnp.array([0.0, 1e-3, -1e-3]), jnp.array([0.1, 0.9, 0.4]), "sign")
    np.testing.assert_array_equal(np.asarray(y), [0.0, 1.0, 0.0])
    # round half to even: 2.5 rounds to 2, so (2.5, 3) must move off 2.5 (to just above it)
    x, y = project_step_graph(jnp.array([2.5, 2.5]), jnp.array([3.0, 2.0]), "round")
    assert float(y[0]) == 3.0 and float(x[0]) > 2.5 and float(x[0]) - 2.5 < 1e-12
    assert float(x[1]) == 2.5 and float(y[1]) == 2.0
    # huge values: no NaN, still on the graph
    big = jnp.array([1e6, -1e6, 1e20, -1e20], jnp.float32)
    for name in ("sign", "round", "floor", "ceil"):
        x, y = project_step_graph(big, big[::-1], name)
        assert bool(jnp.all(jnp.isfinite(x)) & jnp.all(step_function(name)(x) == y))


@settings(max_examples=15, deadline=None)
@given(st.sampled_from(_STEPS), st.lists(finite, min_size=N, max_size=N), st.lists(finite, min_size=N, max_size=N))
def test_step_graph_properties(q_name, a, b):
    a, b = np.asarray(a), np.asarray(b)
    (x, y), q = _step(q_name, jnp.asarray(a), jnp.asarray(b))
    assert np.all(np.asarray(q(x)) == np.asarray(y))
    # idempotent on the graph
    (x2, y2), _ = _step(q_name, x, y)
    np.testing.assert_array_equal(np.asarray(x2), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(y2), np.asarray(y))
    # no sampled graph point is nearer
    samples = jnp.linspace(-10, 10, 4001)
    sy = np.asarray(q(samples))
    dist = (np.asarray(x) - a) ** 2 + (np.asarray(y) - b) ** 2
    sampled = np.min((np.asarray(samples)[None, :] - a[:, None]) ** 2 + (sy[None, :] - b[:, None]) ** 2, axis=1)
    assert np.all(dist <= sampled + 1e-12)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"project_scalar_graph: unknown function='sin'; choose from tanh"):
        project_scalar_graph(jnp.zeros(2), jnp.zeros(2), "sin")
    with pytest.raises(ValueError, match=r"project_step_graph: unknown function='relu'"):
        project_step_graph(jnp.zeros(2), jnp.zeros(2), "relu")
    with pytest.raises(ValueError, match="same shape"):
        project_scalar_graph(jnp.zeros(2), jnp.zeros(3))
    with pytest.raises(ValueError, match=r"len\(levels\) == len\(thresholds\) \+ 1"):
        project_quantizer_graph(jnp.zeros(2), jnp.zeros(2), [0.0, 1.0], [0.0, 1.0])
    with pytest.raises(ValueError, match="strictly increasing"):
        project_quantizer_graph(jnp.zeros(2), jnp.zeros(2), [0.0, 1.0, 2.0], [1.0, 0.0])
    with pytest.raises(ValueError, match=r"quantize: levels and thresholds must be 1-d"):
        fpx.projective.quantize(jnp.zeros(2), [0.0, 1.0], [0.0, 1.0])


# ------------------------------------------------------------------ models


def _activations(p, x):
    h = x @ p["w1"]
    h = jnp.concatenate([jnp.tanh(h[:2]), jax.nn.sigmoid(h[2:4]), jax.nn.softplus(h[4:6]), jax.nn.leaky_relu(h[6:], 0.1)])
    return jnp.clip(h, -0.9, 5.0) @ p["w2"]


def _binary(p, x):
    w = p["w1"] + jax.lax.stop_gradient(jnp.sign(p["w1"]) - p["w1"])  # straight-through binary weights
    return jax.nn.relu(x @ w) @ p["w2"]


def _ternary(p, x):
    q = lambda w: fpx.projective.quantize(w, [-1.0, 0.0, 1.0], [-0.5, 0.5])  # noqa: E731
    w = p["w1"] + jax.lax.stop_gradient(q(p["w1"]) - p["w1"])  # straight-through ternary weights
    return jax.nn.relu(x @ w) @ p["w2"]


def _pooling(p, x):  # x: (6, 6) image
    h = jax.lax.conv_general_dilated(x[None, None], p["k"], (1, 1), "VALID")[0]  # (2, 4, 4)
    pooled = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2), (1, 2, 2), "VALID")  # (2, 2, 2)
    overlap = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2), (1, 1, 1), "SAME")  # (2, 4, 4)
    average = jax.lax.reduce_window(h, 0.0, jax.lax.add, (1, 2, 2), (1, 2, 2), "VALID") / 4  # (2, 2, 2)
    features = jnp.concatenate([pooled.reshape(-1), jnp.mean(overlap, (1, 2)), average.reshape(-1)])
    return features @ p["w"]


def _forward_matches(model, params, x):
    graph = G.build_graph(model, params, x)
    values = graph.forward(jax.tree_util.tree_leaves(params), graph.known_values([x]))
    np.testing.assert_allclose(values[graph.output], model(params, x), rtol=1e-12, atol=1e-12)
    return graph


def test_graphs_of_activation_quantised_and_pooling_models():
    k = jax.random.split(jax.random.key(0), 4)
    act = {"w1": jax.random.normal(k[0], (3, 8)), "w2": jax.random.normal(k[1], (8, 2))}
    graph = _forward_matches(_activations, act, jnp.array([0.3, -1.0, 2.0]))
    kinds = {f"{n.kind}:{n.name}" for n in graph.nodes}
    assert {"scalar:tanh", "scalar:logistic", "scalar:softplus", "scalar:leaky_relu", "max:max", "max:min"} <= kinds
    assert [n.info for n in graph.nodes if n.name == "leaky_relu"] == [("leaky_relu", 0.1)]
    binary = {"w1": jax.random.normal(k[2], (3, 4)), "w2": jax.random.normal(k[3], (4, 2))}
    graph = _forward_matches(_binary, binary, jnp.array([0.3, -1.0, 2.0]))
    steps = [n for n in graph.nodes if n.kind == "step"]
    assert len(steps) == 1 and steps[0].info[0] == "sign"
    assert not any(n.name in ("sub", "stop_gradient") for n in graph.nodes)  # the estimator's parts are gone
    graph = _forward_matches(_ternary, binary, jnp.array([0.3, -1.0, 2.0]))
    assert [n.info for n in graph.nodes if n.kind == "quantizer"] == [((-1.0, 0.0, 1.0), (-0.5, 0.5))]
    pool = {"k": jax.random.normal(k[0], (2, 1, 3, 3)), "w": jax.random.normal(k[1], (18, 2))}
    graph = _forward_matches(_pooling, pool, jax.random.normal(k[2], (6, 6)))
    names = sorted(f"{n.kind}:{n.name}" for n in graph.nodes)
    assert names.count("reduce_max:reduce_window_max") == 2 and "linear:reduce_window_sum" in names
    # flax-style padding for sums and a non -inf initial value for max
    model = lambda p, x: jax.lax.reduce_window(x @ p, 0.0, jax.lax.add, (2,), (1,), "SAME") + jax.lax.reduce_window(  # noqa: E731
        x @ p, 0.0, jax.lax.max, (3,), (2,), ((1, 1),)
    )[:1]
    _forward_matches(model, jnp.ones((3, 4)) * 0.5 - jnp.eye(3, 4), jnp.array([1.0, -2.0, 0.5]))
    # jnp.heaviside and jax.nn.hard_tanh are recognised by name and value
    graph = _forward_matches(lambda p, x: jnp.heaviside(x @ p, 0.5) + jax.nn.hard_tanh(x @ p), jnp.eye(3), jnp.array([0.0, -2.0, 0.5]))
    assert {n.info[0] for n in graph.nodes if n.kind in ("scalar", "step")} == {"heaviside", "hard_tanh"}


def test_softmax_and_quotients_are_refused_with_the_reason():
    with pytest.raises(fpx.projective.UnsupportedPrimitiveError, match=r"'div' in the equation .*divisor depends on the parameters.*softmax.*Supported primitives:.*tanh"):
        G.build_graph(lambda p, x: jax.nn.softmax(x @ p), jnp.ones((3, 2)), jnp.ones(3))
    with pytest.raises(fpx.projective.UnsupportedPrimitiveError, match=r"'div'.*divisor depends on the parameters"):
        G.build_graph(lambda p, x: x / (x @ p), jnp.ones(3), jnp.ones(3))
    with pytest.raises(fpx.projective.UnsupportedPrimitiveError, match=r"'sin' in the equation"):
        G.build_graph(lambda p, x: jnp.sin(x @ p), jnp.ones((3, 2)), jnp.ones(3))
    with pytest.raises(fpx.projective.UnsupportedPrimitiveError, match=r"comparisons of parameter-dependent values"):
        G.build_graph(lambda p, x: jnp.where(x @ p > 0, x @ p, 0.0), jnp.ones((3, 2)), jnp.ones(3))


def _train(model, params, x, y, updates=4, steps=10):
    trainer = fpx.projective.Trainer(model, loss="margin", steps=steps)
    state = trainer.init(params, x, y)
    update = jax.jit(trainer.update)
    logits = jax.vmap(model, (None, 0))(params, x)
    first = (float(jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], 1)[:, 0])),
             float(jnp.mean(jnp.argmax(logits, -1) == y)))
    history = []
    for _ in range(updates):
        params, state, info = update(params, state, x, y)
        history.append((float(info["loss"]), float(info["accuracy"])))
    for leaf in jax.tree_util.tree_leaves(params):
        assert bool(jnp.all(jnp.isfinite(leaf)))
    last = history[-1]
    assert last[0] < first[0] or last[1] > first[1], (first, history)
    return params


def test_trainer_runs_on_activation_binary_and_pooling_models():
    k = jax.random.split(jax.random.key(1), 6)
    x = jax.random.normal(k[0], (8, 3))
    y = (x[:, 0] + x[:, 1] > 0).astype(jnp.int32)
    act = {"w1": jax.random.normal(k[1], (3, 8)) / 2, "w2": jax.random.normal(k[2], (8, 2)) / 2}
    _train(_activations, act, x, y)
    binary = {"w1": jax.random.normal(k[3], (3, 4)), "w2": jax.random.normal(k[4], (4, 2)) / 2}
    new = _train(_binary, binary, x, y)
    assert set(np.unique(np.sign(np.asarray(new["w1"])))) <= {-1.0, 1.0}  # the forward uses sign(W1)
    _train(_ternary, binary, x, y)
    # the same straight-through model trains by gradients too
    grads = jax.grad(lambda p: jnp.sum(jax.vmap(_ternary, (None, 0))(p, x)))(binary)
    assert float(jnp.abs(grads["w1"]).sum()) > 0
    images = jax.random.normal(k[5], (6, 6, 6))
    labels = (images[:, 2, 2] > 0).astype(jnp.int32)
    pool = {"k": jax.random.normal(k[0], (2, 1, 3, 3)) / 3, "w": jax.random.normal(k[1], (18, 2)) / 3}
    _train(_pooling, pool, images, labels)
