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
    with pytest.raises(fpx.projective.UnsupportedPrimitiveError, match=r"'sin'.*Supported primitives:.*dot_general"):
        G.build_graph(lambda p, x: jnp.sin(x @ p), jnp.ones((3, 2)), jnp.ones(3))
    with pytest.raises(ValueError, match="does not depend on the parameters"):
        G.build_graph(lambda p, x: x * 2, jnp.ones(3), jnp.ones(3))


# ------------------------------------------------------------------ the two sets


def _setup(model, params, x, y, loss="margin"):
    problem = fpx.projective.Trainer(model, loss=loss, anchor=0.0).problem(params, x, y)
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


def _conv_of_a_variable_model(p, x):
    h = jax.lax.conv_general_dilated(x[None, None], jnp.maximum(p, 0.0), (1, 1), "VALID")[0]
    return h.reshape(-1) @ jnp.ones((8, 2))


@pytest.mark.parametrize("kind", ["shared", "dense", "diagonal", "conv", "conv_dense"])
def test_linear_node_projection_matches_dense_least_squares(kind):
    # Projection onto {(u, y): y = L u + c} is u* = (I + L^T L)^{-1} (u0 + L^T (y0 - c)).
    key = jax.random.key(6)
    models = {
        "shared": (lambda p, x: (x @ p) @ jnp.ones((2, 2)), (3, 2), (3,)),  # x @ W, x data
        # a data matrix times a per-sample variable: coupled rows, dense I + L L^T
        "dense": (lambda p, x: jnp.sum(x @ jnp.maximum(p, 0.0), 0) @ jnp.ones((2, 2)), (3, 2), (4, 3)),
        "diagonal": (lambda p, x: (jnp.sum(p * x, axis=0) - 2.0) @ jnp.ones((2, 2)), (4, 2), (4, 2)),
        # a convolution of the data with a parameter kernel: one node for the minibatch, like x @ W
        "conv": (_conv_model, (2, 1, 2, 2), (3, 3)),
        # of the data with a per-sample variable kernel: a dense linear node per sample
        "conv_dense": (_conv_of_a_variable_model, (2, 1, 2, 2), (3, 3)),
    }
    model, pshape, xshape = models[kind]
    params = jax.random.normal(key, pshape)
    x, y = jax.random.normal(jax.random.key(7), (2,) + xshape), jnp.array([0, 1])
    graph, known, z, _, project_g = _setup(model, params, x, y)
    wanted = {"shared": "shared_dot", "dense": "linear", "diagonal": "linear", "conv": "shared_linear", "conv_dense": "linear"}[kind]
    index = next(
        i
        for i, n in enumerate(graph.nodes)
        if n.kind == wanted and (kind != "dense" or n.info[0] == "dense") and (kind != "conv_dense" or "conv" in n.name)
    )
    node = graph.nodes[index]
    zr = _perturb(z, jax.random.key(8))
    (ins, out) = zr[index]
    (new_ins, new_out) = project_g(zr)[index]
    if kind in ("shared", "conv"):  # one copy of W for the whole batch
        one = {"shared": lambda w, s: x[s] @ w, "conv": lambda w, s: jax.lax.conv_general_dilated(x[s][None, None], w, (1, 1), "VALID")}[kind]
        lmat = jnp.concatenate([jax.jacfwd(lambda w, s=s: one(w, s))(ins[0]).reshape(out[0].size, -1) for s in range(2)])
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
    trainer = fpx.projective.Trainer(mlp, loss="margin", margin=0.5, anchor=0.0, steps=3000, solver=fpx.Anderson(rtol=1e-9, atol=1e-10))
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
    trainer = fpx.projective.Trainer(
        model, loss="margin", anchor=0.0, steps=400, solver=fpx.Picard(rtol=1e-10, atol=1e-12), detect_infeasible=True
    )
    w = jnp.zeros((2, 2))
    _, _, info = trainer.update(w, trainer.init(w, x, y), x, y)
    assert bool(info["infeasible"]) and not bool(info["converged"])
    # Off by default (its bookkeeping is a large share of a fixed step budget): the budget runs out.
    default = fpx.projective.Trainer(model, loss="margin", anchor=0.0, steps=400, solver=fpx.Picard(rtol=1e-10, atol=1e-12))
    _, _, info = default.update(w, default.init(w, x, y), x, y)
    assert not bool(info["infeasible"]) and not bool(info["converged"]) and int(info["steps"]) == 400


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
        previous = params
        params, state, info = update(params, state, x[batch], y[batch])
        assert info["steps"] == 20 and not info["converged"]
    after = jnp.mean(jnp.argmax(jax.vmap(mlp, (None, 0))(params, x), 1) == y)
    assert after > max(before, 0.8)
    assert int(state.updates) == 12
    # The figures of the last update are those of its solution: the DR iterate z it returns
    # (the warm start of the next update), its residual |z - T z|, the distance of the
    # shadow P_K z to G, and the loss and accuracy of the new parameters on the minibatch.
    problem = trainer.problem(previous, x[batch], y[batch])
    T, shadow = fpx.feasibility.splitting([problem.project_k, problem.project_g], "dr")
    z = state.iterate
    np.testing.assert_allclose(info["residual"], fpx.two_norm(jax.tree_util.tree_map(jnp.subtract, z, T(z, None))), rtol=1e-9)
    np.testing.assert_allclose(info["gap"], fpx.feasibility.distance(problem.project_g, shadow(z)), rtol=1e-9)
    logits = jax.vmap(mlp, (None, 0))(params, x[batch])
    np.testing.assert_allclose(info["loss"], jnp.mean(jax.nn.logsumexp(logits, 1) - logits[jnp.arange(16), y[batch]]), rtol=1e-12)
    np.testing.assert_allclose(info["accuracy"], jnp.mean(jnp.argmax(logits, 1) == y[batch]), rtol=0)


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


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(solver="picard"), TypeError, r"`Trainer\(solver=\.\.\.\)` must be an fpx solver.*got 'picard'.*fpx\.Picard\(\)"),
        (dict(solver=fpx.Picard), TypeError, r"`Trainer\(solver=\.\.\.\)` must be a solver instance"),
        (dict(anchor=-1.0), ValueError, r"`Trainer\(anchor=\.\.\.\)` must be .*non-negative.*got -1"),
        (dict(anchor=float("inf")), ValueError, r"`Trainer\(anchor=\.\.\.\)` must .*finite.*got inf"),
        (dict(prox_step=-1.0), ValueError, r"`Trainer\(prox_step=\.\.\.\)` must be a number > 0.*got -1"),
        (dict(prox_step=0.0), ValueError, r"`Trainer\(prox_step=\.\.\.\)` must be a number > 0.*got 0"),
        (dict(steps=0), ValueError, r"`Trainer\(steps=\.\.\.\)` must be .*integer.*got 0"),
        (dict(steps=2.5), (TypeError, ValueError), r"`Trainer\(steps=\.\.\.\)` must be .*integer.*got 2.5"),
        (dict(relaxation=2.0), ValueError, r"`Trainer\(relaxation=\.\.\.\)` must .*\(0, 2\).*got 2"),
        (dict(method="dm", beta=float("nan")), ValueError, r"`Trainer\(beta=\.\.\.\)` must .*finite.*got nan"),
        (dict(method="dm", beta=0.0), ValueError, r"`Trainer\(beta=\.\.\.\)` must be nonzero"),
        (dict(margin=float("nan")), ValueError, r"`Trainer\(margin=\.\.\.\)` must .*finite.*got nan"),
        (dict(warm_start="yes"), TypeError, r"`Trainer\(warm_start=\.\.\.\)` must be True or False"),
    ],
)
def test_trainer_hyperparameters_are_checked_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        fpx.projective.Trainer(mlp, **kwargs)


LINEAR = lambda w, x: x @ w  # noqa: E731


def test_labels_out_of_range_are_errors_eagerly_and_under_jit():
    w, x = jnp.zeros((2, 2)), jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    trainer = fpx.projective.Trainer(LINEAR, steps=5)
    for bad, where in [(jnp.array([0, 5, 1]), r"got y\[1\] = 5\."), (jnp.array([0, 1, -1]), r"got y\[2\] = -1\.")]:
        message = r"Trainer: every label in y must be a class index in \[0, 2\) \(the model returns 2 class scores\); "
        with pytest.raises(ValueError, match=message + where):
            trainer.init(w, x, bad)
        with pytest.raises(ValueError, match=message + where):
            trainer.problem(w, x, bad)
        state = trainer.init(w, x, jnp.array([0, 1, 1]))
        with pytest.raises(Exception, match=message + "a label is outside that range"):
            jax.block_until_ready(jax.jit(trainer.update)(w, state, x, bad))
    # In range, under jit: no error.
    jax.block_until_ready(jax.jit(trainer.update)(w, state, x, jnp.array([0, 1, 1])))


def _separable(key, n=12):
    """Two classes in the plane on either side of the line x1 = 0, at least 0.2 from it."""
    u = jax.random.uniform(key, (n, 2), minval=-1.0, maxval=1.0)
    side = jnp.where(jnp.arange(n) % 2 == 0, 1.0, -1.0)
    x = jnp.stack([side * (0.2 + jnp.abs(u[:, 0])), u[:, 1]], axis=1)
    return x, (side > 0).astype(jnp.int32)


@pytest.mark.parametrize("method", ["dr", "ap", "dm"])
def test_every_method_fits_a_separable_minibatch(method):
    # A linear model x @ w on linearly separable data: G and K are convex and intersect, so
    # every splitting converges to a w that puts every sample at margin >= 1 on its side.
    x, y = _separable(jax.random.key(20))
    w = jnp.zeros((2, 2))
    trainer = fpx.projective.Trainer(
        LINEAR, loss="margin", method=method, anchor=0.0, steps=5000, solver=fpx.Picard(rtol=0.0, atol=1e-10)
    )
    new, state, info = jax.jit(trainer.update)(w, trainer.init(w, x, y), x, y)
    assert not bool(info["infeasible"]) and int(info["steps"]) < 5000 and float(info["residual"]) <= 1e-10
    # AP's residual |z - P_K P_G z| undershoots its gap to G (here about 5x), so its gap
    # exceeds atol while DR's and the difference map's shadows land in G to rounding.
    assert float(info["gap"]) <= (1e-8 if method == "ap" else 1e-13)
    assert bool(info["converged"]) == (method != "ap")
    assert float(info["accuracy"]) == 1.0
    logits = x @ new
    margins = logits[jnp.arange(y.size), y] - logits[jnp.arange(y.size), 1 - y]
    assert float(jnp.min(margins)) >= 1.0 - 1e-8


def _param_copy_mask(graph, z):
    """True at every copy of a parameter in a splitting iterate, False elsewhere."""
    out = []
    for node, (ins, o) in zip(graph.nodes, z):
        kinds = [graph.base[node.inputs[i].var].param is not None for i in node.unknown]
        out.append((tuple(jnp.full(c.shape, k) for k, c in zip(kinds, ins)), jnp.full(o.shape, False)))
    return tuple(out)


def test_anchor_weights_the_current_parameters_in_the_consensus():
    key = jax.random.key(21)
    params = _params(key, (4, 6, 3))
    x, y = jax.random.normal(jax.random.key(22), (5, 4)), jnp.array([0, 1, 2, 0, 1])
    anchor = 3.0
    plain = fpx.projective.Trainer(mlp, anchor=0.0).problem(params, x, y)
    anchored = fpx.projective.Trainer(mlp, anchor=anchor).problem(params, x, y)
    z = _perturb(plain.z0, jax.random.key(23))
    # P_K with an anchor: a parameter's consensus is (sum of its c copies + anchor c theta) /
    # ((1 + anchor) c) = (plain consensus + anchor theta) / (1 + anchor); theta's copies are
    # those of z0 (the forward pass). Every other variable's consensus is unchanged.
    mask = _param_copy_mask(plain.graph, z)
    want = jax.tree_util.tree_map(
        lambda m, p, t: jnp.where(m, (p + anchor * t) / (1 + anchor), p), mask, plain.project_k(z), plain.z0
    )
    for a, b in zip(jax.tree_util.tree_leaves(anchored.project_k(z)), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    # An update returns the parameters of its solution point (the DR shadow P_K z, in K), with
    # the anchor applied once, in P_K. A huge anchor pins them to their current values.
    x, y = _separable(jax.random.key(20))
    w = jnp.array([[0.3, -0.2], [0.1, 0.4]])
    moved = {}
    for a in (anchor, 1e9):
        trainer = fpx.projective.Trainer(LINEAR, anchor=a, steps=200, solver=fpx.Picard(rtol=0.0, atol=1e-12))
        new, state, info = jax.jit(trainer.update)(w, trainer.init(w, x, y), x, y)
        problem = trainer.problem(w, x, y)
        shadow = problem.project_k(state.iterate)
        for node, (ins, _) in zip(problem.graph.nodes, shadow):
            for i, copy in zip(node.unknown, ins):
                ref = node.inputs[i]
                if problem.graph.base[ref.var].param is not None:  # one copy per sample, or one per batch
                    np.testing.assert_allclose(copy, jnp.broadcast_to(ref(new), copy.shape), rtol=1e-12, atol=1e-12)
        moved[a] = float(jnp.max(jnp.abs(new - w)))
    assert moved[anchor] > 0.1 and moved[1e9] < 1e-5  # O(steps / anchor)


def test_warm_start_carries_the_parameter_copies_of_the_previous_iterate():
    key = jax.random.key(24)
    params = _params(key, (4, 6, 3))
    x, y = jax.random.normal(jax.random.key(25), (6, 4)), jnp.array([0, 1, 2, 0, 1, 2])
    x2, y2 = jax.random.normal(jax.random.key(26), (6, 4)), jnp.array([2, 1, 0, 2, 1, 0])
    config = dict(loss="margin", steps=15)
    warm, cold = fpx.projective.Trainer(mlp, **config), fpx.projective.Trainer(mlp, warm_start=False, **config)
    fresh = warm.init(params, x, y)
    # A state from another minibatch's update: its parameter copies are not params' copies.
    _, other, _ = jax.jit(warm.update)(params, fresh, x2, y2)
    run = {name: jax.jit(t.update) for name, t in (("warm", warm), ("cold", cold))}
    leaves = lambda out: jax.tree_util.tree_leaves((out[0], out[1].iterate, out[2]))  # noqa: E731  (not the counter)
    def gap(a, b):
        return max(float(np.max(np.abs(np.asarray(p, float) - np.asarray(q, float)))) for p, q in zip(leaves(a), leaves(b)))

    # Without warm start the state does not matter at all (the same program: bitwise equal).
    assert gap(run["cold"](params, fresh, x, y), run["cold"](params, other, x, y)) == 0
    # With it, a fresh state (the forward pass of params) is the same start as no warm start
    # (another compiled program: equal to rounding), and another state's parameter copies
    # change the start, hence the result.
    assert gap(run["warm"](params, fresh, x, y), run["cold"](params, fresh, x, y)) <= 1e-12
    assert gap(run["warm"](params, other, x, y), run["cold"](params, other, x, y)) > 1e-3


def test_entrywise_nodes_projected_together_equal_one_by_one(monkeypatch):
    # Nodes of one entrywise kind (here two bilinear products and two tanh nodes) are projected
    # by one kernel call; the result must be the node-by-node projection's (to rounding: an
    # entry may take one more Newton step when its loop runs on with slower entries).
    import fpx.projective._trainer as T

    def model(p, x):
        h = jnp.tanh(x @ p["u"])
        h = jnp.tanh(h @ p["w"])
        return h @ p["v"]

    k = jax.random.split(jax.random.key(3), 4)
    params = {"u": jax.random.normal(k[0], (3, 4)), "w": jax.random.normal(k[1], (4, 4)), "v": jax.random.normal(k[2], (4, 2))}
    x, y = jax.random.normal(k[3], (5, 3)), jnp.array([0, 1, 0, 1, 1])
    trainer = fpx.projective.Trainer(model, loss="cross_entropy")
    graph = G.build_graph(model, params, x[0])
    assert sorted(len(g) for g in T._entrywise_groups(graph)) == [2, 2]
    fused = trainer.problem(params, x, y)
    monkeypatch.setattr(T, "_entrywise_groups", lambda graph: [])
    single = trainer.problem(params, x, y)
    z = _perturb(fused.z0, jax.random.key(4))
    for a, b in zip(jax.tree_util.tree_leaves(fused.project_g(z)), jax.tree_util.tree_leaves(single.project_g(z))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-14, atol=1e-14)
