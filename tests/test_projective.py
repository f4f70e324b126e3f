"""fpx.projective: traced constraint graphs, exact primitive projections, the Trainer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from hypothesis import given, settings, strategies as st

import fpx
from fpx.projective import _graph as G
from fpx.projective import (
    project_margin,
    project_max_graph,
    project_reduce_max_graph,
    prox_cross_entropy,
)

finite = st.floats(-5, 5, allow_nan=False, width=64)


def _brute_force(objective, dim, starts, rng):
    best = np.inf
    for _ in range(starts):
        x0 = rng.normal(scale=3, size=dim)
        res = scipy.optimize.minimize(objective, x0, method="Nelder-Mead", options=dict(xatol=1e-10, fatol=1e-12, maxiter=4000))
        best = min(best, res.fun)
    return best


# ------------------------------------------------------------------ primitive projections


@settings(max_examples=25, deadline=None)
@given(finite, finite, finite)
def test_max_graph_is_nearest_point(u, v, y):
    pu, pv, py = (float(t) for t in project_max_graph(jnp.array(u), jnp.array(v), jnp.array(y)))
    assert py == max(pu, pv)
    dist = (pu - u) ** 2 + (pv - v) ** 2 + (py - y) ** 2
    # The graph is parametrised by (u', v'); a dense grid plus local refinement is the brute force.
    objective = lambda p: (p[0] - u) ** 2 + (p[1] - v) ** 2 + (max(p[0], p[1]) - y) ** 2  # noqa: E731
    grid = np.linspace(-8, 8, 161)
    uu, vv = np.meshgrid(grid, grid)
    values = (uu - u) ** 2 + (vv - v) ** 2 + (np.maximum(uu, vv) - y) ** 2
    i = np.unravel_index(np.argmin(values), values.shape)
    refined = scipy.optimize.minimize(objective, [uu[i], vv[i]], method="Nelder-Mead", options=dict(xatol=1e-12, fatol=1e-14))
    assert dist <= min(values[i], refined.fun) + 1e-9


def test_max_graph_negative_target_and_min():
    # Target below both inputs: the nearest point lowers the larger input, not "y = 0".
    u, v, y = project_max_graph(jnp.array(1.0), jnp.array(-1.0), jnp.array(-2.0))
    dist = (u - 1) ** 2 + (v + 1) ** 2 + (y + 2) ** 2
    # piece y = u >= v: s = (1 - 2)/2 = -0.5 >= -1, cost 2 * 1.5^2 = 4.5; piece y = v >= u: s = (-1 -2)/2 = -1.5,
    # needs v >= u -> edge (2 s + 1)/3 = -2/3, cost (1 + 2/3)^2 + (-1 + 2/3)^2 + (-2 + 2/3)^2 = 4.666
    assert jnp.allclose(dist, 4.5) and jnp.allclose(jnp.stack([u, v, y]), jnp.array([-0.5, -1.0, -0.5]))


@pytest.mark.parametrize("seed", range(6))
def test_reduce_max_graph_is_nearest_point(seed):
    rng = np.random.default_rng(seed)
    u, y = rng.normal(scale=2, size=3), rng.normal(scale=3)
    pu, py = project_reduce_max_graph(jnp.asarray(u), jnp.asarray(y))
    assert float(py) == float(jnp.max(pu))
    dist = float(jnp.sum((pu - u) ** 2) + (py - y) ** 2)
    best = _brute_force(lambda p: np.sum((p - u) ** 2) + (np.max(p) - y) ** 2, 3, 12, rng)
    assert dist <= best + 1e-8
    assert dist >= best - 1e-6  # and it is not "better" than possible: it is on the graph


@pytest.mark.parametrize("seed", range(6))
def test_margin_projection_solves_the_qp(seed):
    rng = np.random.default_rng(seed)
    o, label, margin = rng.normal(scale=2, size=5), int(rng.integers(5)), 1.0
    p = np.asarray(project_margin(jnp.asarray(o), label, margin))
    others = np.delete(np.arange(5), label)
    assert np.all(p[label] - p[others] >= margin - 1e-12)
    cons = [{"type": "ineq", "fun": lambda q, j=j: q[label] - q[j] - margin} for j in others]
    ref = scipy.optimize.minimize(lambda q: np.sum((q - o) ** 2), o, constraints=cons, method="SLSQP", options=dict(ftol=1e-14))
    np.testing.assert_allclose(p, ref.x, atol=1e-6)
    # Points already inside stay put (idempotent).
    np.testing.assert_allclose(project_margin(jnp.asarray(p), label, margin), p, atol=1e-12)


@pytest.mark.parametrize("step", [0.1, 1.0, 5.0, 50.0])
def test_cross_entropy_prox_optimality(step):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(scale=5, size=(32, 10)))
    labels = jnp.asarray(rng.integers(10, size=32))
    v = prox_cross_entropy(logits, labels, step)
    residual = v - logits + step * (jax.nn.softmax(v) - jax.nn.one_hot(labels, 10))
    assert float(jnp.max(jnp.abs(residual))) <= 1e-8
    # PJAX's fixed-point map v <- o + step (onehot - softmax v) does not converge for step >= 2.
    if step >= 5:
        w = logits
        for _ in range(200):
            w = logits + step * (jax.nn.one_hot(labels, 10) - jax.nn.softmax(w))
        assert float(jnp.max(jnp.abs(w - v))) > 1e-3


def test_projection_errors():
    with pytest.raises(ValueError, match="label must be an integer array of shape"):
        project_margin(jnp.zeros((4, 3)), jnp.zeros(4))
    with pytest.raises(ValueError, match="y must have shape"):
        project_reduce_max_graph(jnp.zeros((4, 3)), jnp.zeros(3))


# ------------------------------------------------------------------ tracing


def mlp(p, x):
    return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"]


def _params(key, sizes=(6, 5, 3), scale=0.5):
    k1, k2 = jax.random.split(key)
    return {
        "w1": scale * jax.random.normal(k1, sizes[:2]),
        "b1": jnp.zeros(sizes[1]),
        "w2": scale * jax.random.normal(k2, sizes[1:]),
    }


def test_graph_of_an_mlp_is_what_the_design_says():
    graph = G.build_graph(mlp, _params(jax.random.key(0)), jnp.ones(6))
    kinds = sorted(f"{n.kind}:{n.name}" for n in graph.nodes)
    # x @ W1 with data x is one shared linear node; h @ W2 becomes products + a sum.
    assert kinds == ["bilinear:dot_general", "linear:add", "linear:dot_general sum", "max:max", "shared_dot:dot_general"]
    assert "5 nodes" in graph.describe()


@jax.jit
def _jitted_layer(h, w):
    return jnp.maximum(h @ w, 0.0)


@jax.custom_vjp
def _vjp_relu(u):
    return jnp.maximum(u, 0.0)


_vjp_relu.defvjp(lambda u: (_vjp_relu(u), u), lambda u, g: (g * (u > 0),))


def _wrapped_model(p, x):
    h = _jitted_layer(x, p["a"])  # pjit wrapper (jax.nn.relu's custom_jvp: see mlp)
    g = _vjp_relu(x @ p["b"])  # custom_vjp wrapper, same shapes as the first branch
    skip = h + g  # a skip/merge: not bipartite
    return jnp.concatenate([skip, h[:1]]) @ p["c"] - jnp.max(skip) * 0.5


def test_wrappers_inline_and_same_shape_inputs_stay_distinct():
    key = jax.random.key(1)
    p = {"a": jax.random.normal(key, (4, 3)), "b": jax.random.normal(key, (4, 3)) + 1, "c": jnp.ones((4, 2))}
    graph = G.build_graph(_wrapped_model, p, jnp.ones(4))
    params = [b for b in graph.base if b.param is not None]
    assert len(params) == 3  # a and b have the same shape and value pattern: still two variables
    names = {n.name for n in graph.nodes}
    assert {"max", "concatenate", "reduce_max", "mul", "sub"} <= names
    # The forward pass through the graph reproduces the model.
    x = jnp.arange(4.0) / 4 - 0.3
    known = graph.known_values([x])
    values = graph.forward(jax.tree_util.tree_leaves(p), known)
    np.testing.assert_allclose(values[graph.output], _wrapped_model(p, x), rtol=1e-12)


def test_unsupported_primitive_names_it_and_the_supported_list():
    with pytest.raises(fpx.projective.UnsupportedPrimitiveError, match=r"'tanh'.*Supported primitives:.*dot_general"):
        G.build_graph(lambda p, x: jnp.tanh(x @ p), jnp.ones((3, 2)), jnp.ones(3))
    with pytest.raises(ValueError, match="does not depend on the parameters"):
        G.build_graph(lambda p, x: x * 2, jnp.ones(3), jnp.ones(3))


# ------------------------------------------------------------------ the two sets


def _setup(model, params, x, y, loss="margin"):
    problem = fpx.projective.Trainer(model, loss=loss).problem(params, x, y)
    return problem.graph, problem.known, problem.z0, jax.jit(problem.project_k), jax.jit(problem.project_g)


def _perturb(z, key, scale=1.0):
    leaves, treedef = jax.tree_util.tree_flatten(z)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [l + scale * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


def _inner(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_consensus_projection_is_the_euclidean_projection():
    key = jax.random.key(2)
    params = _params(key)
    x, y = jax.random.normal(key, (5, 6)), jnp.array([0, 1, 2, 0, 1])
    _, _, z, project_k, _ = _setup(_wrapped_model_for_k, {"a": params["w1"], "c": params["w2"]}, x, y)
    w = _perturb(z, jax.random.key(3))
    pw = project_k(w)
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(*map(jax.tree_util.tree_leaves, (project_k(pw), pw)))) < 1e-12
    # Variational inequality of a projection onto a convex set: <w - Pw, q - Pw> <= 0 for q in K.
    for i in range(5):
        q = project_k(_perturb(z, jax.random.key(10 + i), 3.0))
        diff = jax.tree_util.tree_map(lambda a, b: a - b, w, pw)
        step = jax.tree_util.tree_map(lambda a, b: a - b, q, pw)
        assert float(_inner(diff, step)) <= 1e-9


def _wrapped_model_for_k(p, x):
    h = jnp.maximum(x @ p["a"], 0.0)
    return (h + h[::-1]) @ p["c"]  # the reversed copy: an alias used twice by one node


def test_graph_projection_lands_on_every_node_graph():
    key = jax.random.key(4)
    p = {"a": jax.random.normal(key, (4, 3)), "b": jax.random.normal(key, (4, 3)) + 1, "c": jnp.ones((4, 2))}
    x, y = jax.random.normal(key, (3, 4)), jnp.array([0, 1, 1])
    graph, known, z, _, project_g = _setup(_wrapped_model, p, x, y)
    pz = project_g(_perturb(z, jax.random.key(5), 2.0))
    for node, (ins, out), k in zip(graph.nodes, pz, range(len(pz))):
        for s in range(3):
            it = iter(i[s] for i in ins)
            known_s = [kv[s] for kv in known]
            operands = [known_s[r.index] if isinstance(r, G.Known) else next(it) for r in node.inputs]
            if node.shared:
                operands = [known_s[r.index] if isinstance(r, G.Known) else ins[0] for r in node.inputs]
            np.testing.assert_allclose(node.fn(*operands), out[s], atol=1e-9, err_msg=f"{node.kind}:{node.name}")
    # And it is a projection: idempotent.
    again = project_g(pz)
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(pz)):
        np.testing.assert_allclose(a, b, atol=1e-9)


def _conv_model(p, x):
    h = jax.lax.conv_general_dilated(x[None, None], p, (1, 1), "VALID")[0]
    return jax.nn.relu(h).reshape(-1) @ jnp.ones((8, 2))


@pytest.mark.parametrize("kind", ["shared", "dense", "diagonal", "conv"])
def test_linear_node_projection_matches_dense_least_squares(kind):
    # Projection onto {(u, y): y = L u + c} is u* = (I + L^T L)^{-1} (u0 + L^T (y0 - c)).
    key = jax.random.key(6)
    models = {
        "shared": (lambda p, x: (x @ p) @ jnp.ones((2, 2)), (3, 2), (3,)),  # x @ W, x data
        # a data matrix times a per-sample variable: coupled rows, dense I + L L^T
        "dense": (lambda p, x: jnp.sum(x @ jnp.maximum(p, 0.0), 0) @ jnp.ones((2, 2)), (3, 2), (4, 3)),
        "diagonal": (lambda p, x: (jnp.sum(p * x, axis=0) - 2.0) @ jnp.ones((2, 2)), (4, 2), (4, 2)),
        # a convolution of the data with a parameter kernel: an exact (dense) linear node
        "conv": (_conv_model, (2, 1, 2, 2), (3, 3)),
    }
    model, pshape, xshape = models[kind]
    params = jax.random.normal(key, pshape)
    x, y = jax.random.normal(jax.random.key(7), (2,) + xshape), jnp.array([0, 1])
    graph, known, z, _, project_g = _setup(model, params, x, y)
    wanted = {"shared": "shared_dot", "dense": "linear", "diagonal": "linear", "conv": "linear"}[kind]
    index = next(
        i
        for i, n in enumerate(graph.nodes)
        if n.kind == wanted and (kind != "dense" or n.info[0] == "dense") and (kind != "conv" or "conv" in n.name)
    )
    node = graph.nodes[index]
    zr = _perturb(z, jax.random.key(8))
    (ins, out) = zr[index]
    (new_ins, new_out) = project_g(zr)[index]
    if kind == "shared":  # one copy of W for the whole batch
        lmat = jnp.concatenate([jax.jacfwd(lambda w, s=s: x[s] @ w)(ins[0]).reshape(2, -1) for s in range(2)])
        u0, y0 = ins[0].reshape(-1), out.reshape(-1)
        u = jnp.linalg.solve(jnp.eye(u0.size) + lmat.T @ lmat, u0 + lmat.T @ y0)
        np.testing.assert_allclose(new_ins[0].reshape(-1), u, atol=1e-10)
        np.testing.assert_allclose(new_out.reshape(-1), lmat @ u, atol=1e-10)
        return
    for s in range(2):
        f = lambda u, s=s: node.fn(*[known[r.index][s] if isinstance(r, G.Known) else u for r in node.inputs])  # noqa: E731
        c = f(jnp.zeros_like(ins[0][s]))
        lmat = jax.jacfwd(f)(ins[0][s]).reshape(c.size, -1)
        u0, y0 = ins[0][s].reshape(-1), out[s].reshape(-1)
        u = jnp.linalg.solve(jnp.eye(u0.size) + lmat.T @ lmat, u0 + lmat.T @ (y0 - c.reshape(-1)))
        np.testing.assert_allclose(new_ins[0][s].reshape(-1), u, atol=1e-10)
        np.testing.assert_allclose(new_out[s].reshape(-1), lmat @ u + c.reshape(-1), atol=1e-10)


# ------------------------------------------------------------------ training


def test_trainer_reaches_a_feasible_point_and_reports_it():
    key = jax.random.key(8)
    params = _params(key, (4, 6, 3))
    x = jax.random.normal(jax.random.key(9), (6, 4))
    y = jnp.array([0, 1, 2, 0, 1, 2])
    trainer = fpx.projective.Trainer(mlp, loss="margin", margin=0.5, steps=3000, solver=fpx.Anderson(rtol=1e-9, atol=1e-10))
    state = trainer.init(params, x, y)
    new, state, info = jax.jit(trainer.update)(params, state, x, y)
    assert bool(info["converged"]) and not bool(info["infeasible"])
    logits = jax.vmap(mlp, (None, 0))(new, x)
    true = jnp.take_along_axis(logits, y[:, None], 1)
    others = jnp.where(jax.nn.one_hot(y, 3) > 0, -jnp.inf, logits)
    assert float(jnp.min(true[:, 0] - jnp.max(others, 1))) >= 0.5 - 1e-5
    assert float(info["gap"]) < 1e-6 and info["accuracy"] == 1.0


def test_infeasible_minibatch_is_flagged():
    # A linear model (a convex problem) asked to put one input in two classes.
    model = lambda w, x: x @ w  # noqa: E731
    x = jnp.array([[1.0, 2.0], [1.0, 2.0]])
    y = jnp.array([0, 1])
    trainer = fpx.projective.Trainer(model, loss="margin", steps=400, solver=fpx.Picard(rtol=1e-10, atol=1e-12))
    w = jnp.zeros((2, 2))
    _, _, info = trainer.update(w, trainer.init(w, x, y), x, y)
    assert bool(info["infeasible"]) and not bool(info["converged"])


def test_trainer_learns_with_warm_start_across_minibatches():
    key = jax.random.key(10)
    x = jax.random.normal(key, (64, 4))
    y = (x[:, 0] + x[:, 1] > 0).astype(jnp.int32) + (x[:, 2] > 1).astype(jnp.int32)
    params = _params(jax.random.key(11), (4, 8, 3))
    trainer = fpx.projective.Trainer(mlp, loss="cross_entropy", steps=20)
    state = trainer.init(params, x[:16], y[:16])
    update = jax.jit(trainer.update)
    before = jnp.mean(jnp.argmax(jax.vmap(mlp, (None, 0))(params, x), 1) == y)
    for i in range(12):
        batch = slice(16 * (i % 4), 16 * (i % 4 + 1))
        params, state, info = update(params, state, x[batch], y[batch])
        assert info["steps"] == 20 and jnp.isfinite(info["residual"]) and not info["converged"]
    after = jnp.mean(jnp.argmax(jax.vmap(mlp, (None, 0))(params, x), 1) == y)
    assert after > max(before, 0.8)
    assert int(state.updates) == 12


def test_trainer_argument_errors():
    params = _params(jax.random.key(0))
    x = jnp.ones((4, 6))
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        fpx.projective.Trainer(mlp, loss="hinge")
    with pytest.raises(ValueError, match="unknown method"):
        fpx.projective.Trainer(mlp, method="admm")
    trainer = fpx.projective.Trainer(mlp)
    with pytest.raises(ValueError, match=r"y must be integer labels of shape \(4,\)"):
        trainer.init(params, x, jnp.zeros(4))
    with pytest.raises(ValueError, match="same leading batch axis"):
        trainer.init(params, {"a": x, "b": jnp.ones((3, 6))}, jnp.zeros(4, int))
