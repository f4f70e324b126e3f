"""CGS graph value iteration (configs/cgs/value_iteration.py): the Picard step bound
⌈log(tol)/log γ⌉ on every forward and adjoint solve, the model pieces (degree
normalisation, implicit gradient, MDP generator, scores) and the README table."""

import importlib.util
import json
import math
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import fpx
from fpx.cli import main
from fpx.experiment import ConfigError, build_task, expand_sweep, member_config, resolve_config
from fpx.experiment.tasks import cgs_value_iteration as cgs

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "cgs" / "value_iteration.py") + ":quick"
BOUND = 20  # ⌈log(1e-6) / log 0.5⌉


def _table():
    spec = importlib.util.spec_from_file_location("cgs_table", ROOT / "experiments/cgs/table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_keeps_the_step_bound_on_every_forward_and_adjoint_solve_and_tabulates(tmp_path, monkeypatch):
    # One test runs the preset and reads it with experiments/cgs/table.py (under pytest-xdist a
    # shared fixture could run it once per worker).
    monkeypatch.setenv("FPX_DATA_DIR", str(tmp_path / "data"))
    run = tmp_path / "run"
    assert main(["run", QUICK, "--workdir", str(run)]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    assert [m["hparams"]["variant"] for m in summary["members"]] == ["dense"]
    assert all(m["status"] == "ok" for m in summary["members"])
    sets = ["test", "ns50"]
    assert [r["step"] for r in records] == [10, 20]
    for r in records:
        assert r["eval/step_bound"] == BOUND
        # Every training step's solves (running maxima and the count over the bound).
        assert 10 <= r["eval/train_forward_steps_max"] <= BOUND
        assert 10 <= r["eval/train_backward_steps_max"] <= BOUND  # the adjoint really ran (probe per graph)
        assert r["eval/train_over_bound"] == 0
        for s in sets:
            assert 10 <= r[f"eval/{s}_forward_steps_max"] <= BOUND, (s, r)
            assert 10 <= r[f"eval/{s}_backward_steps_max"] <= BOUND, (s, r)
            assert r[f"eval/{s}_over_bound"] == 0
            assert r[f"eval/{s}_backward_steps"] <= r[f"eval/{s}_backward_steps_max"]
    last = records[-1]
    for s in sets:
        # A short run: values within 15 % (the targets are about 8; a constant 0 would be 100 %),
        # policies no worse than 0.25 below the reward-greedy baseline.
        assert 0 < last[f"eval/{s}_mape"] < 15, (s, last[f"eval/{s}_mape"])
        assert last[f"eval/{s}_policy_accuracy"] > last[f"eval/{s}_greedy_policy_accuracy"] - 0.25
        assert 0 < last[f"eval/{s}_mean_oracle_mape"] < 5
    # On dense MDPs the reward-greedy policy is already almost optimal (see the README).
    assert last["eval/test_greedy_policy_accuracy"] > 0.9

    # experiments/cgs/table.py reads the run directory.
    table = _table()
    result = table.collect(run)
    rows = result["rows"]
    assert [(r["graph"], r["set"]) for r in rows] == [("dense", s) for s in ("[20, 50)", "50", "train")]
    for r in rows:
        assert r["bound"] == BOUND and r["over_bound"] == 0
        assert r["forward_steps_max"] <= BOUND and r["backward_steps_max"] <= BOUND
        assert 0 < r["mape"] < 100 and 0 <= r["policy_accuracy"] <= 1
    assert rows[0]["mape"] == pytest.approx(last["eval/test_mape"]) and rows[1]["forward_steps_max"] == max(
        r["eval/ns50_forward_steps_max"] for r in records)
    assert result["setup"]["steps"] == 20 and result["setup"]["seeds"] == 1
    text = table.markdown(result)
    assert "| dense | [20, 50) |" in text and "| dense | training batches |" in text


def test_readme_table_is_what_results_json_regenerates():
    table = _table()
    results = json.loads(table.RESULTS.read_text())
    assert table.readme_section() == table.markdown(results)


# ------------------------------------------------------------------ model pieces


def test_step_bound():
    assert cgs.step_bound(1e-6, 0.5) == BOUND == math.ceil(math.log(1e-6) / math.log(0.5))
    assert cgs.step_bound(0.25, 0.5) == 2  # an exact power: 0.5**2 == 0.25
    with pytest.raises(ValueError, match="gamma"):
        cgs.step_bound(1e-6, 1.0)


def test_degree_normalisation_has_spectral_norm_at_most_one():
    k1, k2, k3 = jr.split(jr.PRNGKey(0), 3)
    w = jr.uniform(k1, (20, 3, 12, 12), jnp.float64) * (jr.uniform(k2, (20, 3, 12, 12)) < 0.3)  # zero rows/columns too
    norms = jax.jit(lambda w: jnp.linalg.norm(cgs.degree_normalised(w), ord=2, axis=(-2, -1)))
    assert bool(jnp.all(jnp.isfinite(cgs.degree_normalised(w))))
    assert float(jnp.max(norms(w))) <= 1 + 1e-12
    positive = jr.uniform(k3, (20, 3, 12, 12), jnp.float64) + 0.1  # positive: the bound is attained
    assert jnp.allclose(norms(positive), 1.0, atol=1e-12)


def _mdp_batch(graph, n=4, states=(20, 50), seed=3):
    mdps = cgs._mdps(graph, n, seed, states, (5, 10), 0.9) if graph == "sparse" else fpx.data.value_iteration_mdps(
        n, seed=seed, states=states, cache=False)
    return cgs._Split.of(mdps, jnp.float64), mdps


def _model(heads=4, dtype=jnp.float64, key=0):
    return cgs._CGS(jr.PRNGKey(key), hidden=8, heads=heads, layers=2, decoder_hidden=8, gamma=0.5, dtype=dtype)


@pytest.mark.parametrize("graph,states", [("dense", (20, 50)), ("sparse", (100, 101))])
def test_transition_is_a_contraction_and_picard_meets_the_bound_from_either_start(graph, states):
    split, _ = _mdp_batch(graph, n=4 if states[0] < 100 else 2, states=states)
    model = _model()
    a_hat, b = jax.jit(jax.vmap(model.system))(split.transitions, split.rewards, split.state_mask, split.action_mask)
    _, sv, vt = jax.jit(jnp.linalg.svd)(a_hat)
    assert float(jnp.max(sv)) <= 1 + 1e-12
    # The worst right-hand side for each graph: the top right singular vector of Â_h in every head.
    worst = jnp.swapaxes(vt[:, :, 0, :], 1, 2)  # (n, S, heads)
    exact_solve = jax.jit(lambda a, r: jnp.swapaxes(jnp.linalg.solve(
        jnp.eye(a.shape[-1])[None, None] - 0.5 * a, jnp.swapaxes(r, 1, 2)[..., None])[..., 0], 1, 2))
    solver = fpx.Picard(rtol=0.0, atol=1e-6)
    cell = cgs._Transition(0.5)
    solve = jax.jit(jax.vmap(lambda a, r, z0: fpx.fixed_point(cell, z0, (a, r), solver=solver, max_steps=60, throw=False)))

    def pulled_back(a, r, g, probe):  # <z*, g>: its gradient runs the adjoint solve u = γÂᵀu + g/|g|
        return jnp.vdot(fpx.fixed_point(cell, r, (a, r), solver=solver, max_steps=60, throw=False, backward_probe=probe).value, g)

    adjoint_report = jax.jit(jax.vmap(jax.grad(pulled_back, argnums=3)))
    for rhs in (b, worst):
        rhs = rhs / jnp.linalg.norm(rhs, axis=(1, 2), keepdims=True)
        for z0, limit in ((rhs, BOUND - 1), (jnp.zeros_like(rhs), BOUND)):
            sol = solve(a_hat, rhs, z0)
            assert bool(jnp.all(sol.result == fpx.RESULTS.successful))
            assert int(jnp.max(sol.stats["num_steps"])) <= limit
            assert jnp.allclose(sol.value, exact_solve(a_hat, rhs), atol=4e-6)
        # Adjoint solves for the same worst directions (Âᵀ has the same singular values) and for b.
        report = adjoint_report(a_hat, rhs, rhs, jnp.zeros((rhs.shape[0], 3)))
        assert bool(jnp.all(report[:, 2] == 0)) and 10 <= int(jnp.max(report[:, 0])) <= BOUND - 1


def test_implicit_gradient_matches_the_direct_linear_solve():
    # The known answer: H* = (I - γÂ)^{-1} b by a dense solve, differentiated by JAX's own rules.
    split, _ = _mdp_batch("sparse", n=2)
    model = _model()
    solver, adjoint = fpx.Picard(rtol=0.0, atol=1e-12), fpx.ImplicitAdjoint()
    P, r, sm, am = split.transitions[0], split.rewards[0], split.state_mask[0], split.action_mask[0]
    target = split.values[0] / 10

    def loss_cgs(m, probe):
        out, _ = m(P, r, sm, am, solver=solver, adjoint=adjoint, max_steps=200, probe=probe)
        return jnp.sum((out - target) ** 2)

    def loss_direct(m):
        a_hat, b = m.system(P, r, sm, am)
        eye = jnp.eye(a_hat.shape[-1])[None]
        h = jnp.linalg.solve(eye - 0.5 * a_hat, jnp.swapaxes(b, 0, 1)[..., None])[..., 0].T
        return jnp.sum((m.decoder(h)[:, 0] * sm - target) ** 2)

    dyn, static = eqx.partition(model, eqx.is_inexact_array)
    grad_cgs = jax.jit(jax.grad(lambda d, p: loss_cgs(eqx.combine(d, static), p), argnums=(0, 1)))
    (g_cgs, report) = grad_cgs(dyn, fpx.backward_probe(jnp.float64))
    g_direct = jax.jit(jax.grad(lambda d: loss_direct(eqx.combine(d, static))))(dyn)
    for a, b in zip(jax.tree_util.tree_leaves(g_cgs), jax.tree_util.tree_leaves(g_direct)):
        assert jnp.allclose(a, b, rtol=1e-8, atol=1e-10)
    assert 0 < report[0] <= cgs.step_bound(1e-12, 0.5) and report[2] == 0


def test_sparse_mdps_are_the_reference_graphs_with_exact_values():
    _, mdps = _mdp_batch("sparse", n=6)
    P, sm, am = mdps.transitions, mdps.state_mask, mdps.action_mask
    real = sm[:, :, None] & am[:, None, :]
    assert np.array_equal(P.sum(-1), real.astype(float))  # one successor per real (s, a)
    assert np.all((P == 0) | (P == 1))
    assert np.all(np.einsum("bsas->bsa", P) == 0)  # never to itself
    v, q = fpx.data.bellman(P, mdps.rewards, am, sm, mdps.values, mdps.gamma)
    assert np.abs(v - mdps.values).max() < 1e-9
    assert np.array_equal(np.where(sm, q.argmax(2), 0), mdps.policy)
    assert set(mdps.num_states) <= set(range(20, 50)) and set(mdps.num_actions) <= set(range(5, 10))
    again = cgs._sparse_mdps(6, 3, (20, 50), (5, 10), 0.9)
    assert np.array_equal(again.transitions, P)  # deterministic in its seed
    with pytest.raises(ConfigError, match="fewer actions than states"):
        cgs._sparse_mdps(1, 0, (5, 8), (5, 10), 0.9)


@pytest.mark.parametrize("graph", ["dense", "sparse"])
def test_scores_known_answers(graph, monkeypatch, tmp_path):
    monkeypatch.setenv("FPX_DATA_DIR", str(tmp_path))
    task = build_task(member_config(resolve_config(QUICK), {"data.graph": graph, "seed": 0}))
    split = task.tests["test"]
    mape, accuracy = task._scores(split.values, split)
    assert float(mape) == 0 and float(accuracy) == 1
    mape, accuracy = task._scores(jnp.zeros_like(split.values), split)
    assert float(mape) == pytest.approx(100) and float(accuracy) == pytest.approx(task.greedy["test"], abs=1e-6)
    # The reward-greedy baseline: nearly optimal on dense MDPs, far from it on the reference graphs.
    assert (task.greedy["test"] > 0.9) if graph == "dense" else (0.5 < task.greedy["test"] < 0.8)
    # The padded evaluation group (training sizes with nS = 50) has the same rows, padded with masked states.
    assert task.groups == [["test", "ns50"]]
    joint = task.group_splits[0]
    assert joint.values.shape == (16, 50) and float(jnp.sum(joint.state_mask)) == float(
        jnp.sum(split.state_mask) + jnp.sum(task.tests["ns50"].state_mask))


@pytest.mark.parametrize(
    "override,match",
    [
        ({"max_steps": "20"}, "max_steps"),
        ({"data.states_min": "50"}, "states_min"),
        ({"data.batch_size": "64"}, "batch_size"),
    ],
)
def test_bad_settings_name_the_key(override, match, monkeypatch, tmp_path):
    monkeypatch.setenv("FPX_DATA_DIR", str(tmp_path))
    config = resolve_config(QUICK, override)
    with pytest.raises(ConfigError, match=match):
        build_task(member_config(config, expand_sweep(config)[0]))


def test_solver_must_be_picard():
    with pytest.raises(ConfigError, match="solver.name"):
        resolve_config(QUICK, {"solver.name": "anderson"})


@pytest.mark.parametrize("obj", [cgs.step_bound, cgs.degree_normalised])
def test_docstring_examples_run(obj):
    import inspect
    import re

    blocks = re.findall(r"```python\n(.*?)```", inspect.getdoc(obj), flags=re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, f"<{obj.__name__} docstring>", "exec"), {})
