"""Hypergradient descent on a global L2 strength as a runner task (configs/hypergradients/global_l2.py)
against the vmapped grid (global_l2_grid.py): the quick presets run, the descent lowers the
validation loss, the vmapped grid equals a Python loop of single runs, and the README table."""

import importlib.util
import inspect
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpx.cli import main
from fpx.experiment import ConfigError, build_task, expand_sweep, member_config, resolve_config
from fpx.experiment.tasks import hypergradient_descent as hd

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "hypergradients" / "global_l2.py") + ":quick"
GRID_QUICK = str(ROOT / "configs" / "hypergradients" / "global_l2_grid.py") + ":quick"
TWO_VALUES = [-6.0, 0.0]


def _table():
    spec = importlib.util.spec_from_file_location("hypergradients_table", ROOT / "experiments/hypergradients/table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_quick_runs_descent_lowers_validation_loss_grid_equals_a_loop_and_tabulates(tmp_path):
    # One test runs both presets (under pytest-xdist a shared fixture would run once per worker).
    run, grid_run = tmp_path / "descent", tmp_path / "grid"
    assert main(["run", QUICK, "--workdir", str(run)]) == 0
    sweep = "[" + ", ".join(map(str, TWO_VALUES)) + "]"
    assert main(["run", GRID_QUICK, "--workdir", str(grid_run), f"--config.sweep.log_lambda={sweep}"]) == 0

    # The descent lowers the validation loss.
    records = _records(run)
    summary = json.loads((run / "summary.json").read_text())
    assert [m["status"] for m in summary["members"]] == ["ok"]
    assert [r["step"] for r in records] == [2, 4]
    first, last = records
    # train/* averages the chunk's two outer steps; the first chunk starts at log λ = 0.
    assert first["train/log_lambda"] < 0 and last["eval/log_lambda"] < first["eval/log_lambda"] < 0
    assert first["train/hypergradient"] > 0  # λ = 1 over-regularises: the hypergradient says lower it
    assert last["eval/val_loss"] < first["eval/val_loss"] < first["train/val_loss"]
    assert last["eval/test_loss"] < first["train/val_loss"]
    for r in records:
        assert r["train/hypergradient_failed"] == 0 and r["train/inner_failed"] == 0
        assert r["eval/converged_fraction"] == 1
        assert 0 < r["train/hypergradient_residual"] < 1e-6  # CG to rtol = atol = 1e-8 (unit right-hand side)
        assert r["train/hypergradient_steps"] > 0 and r["train/inner_steps"] > 0

    # The vmapped grid (one compiled program for both values) equals a Python loop of single runs.
    config = resolve_config(GRID_QUICK, {"sweep.log_lambda": sweep})
    members = expand_sweep(config)
    grid_records = _records(grid_run)
    swept = {r["member"]: r for r in grid_records}
    assert sorted(swept) == [0, 1]
    task = build_task(member_config(config, members[0]))

    @jax.jit
    def single(hp):  # one member, unvmapped; the grid is one step per member
        state = task.init(hp, jax.random.PRNGKey(hp["seed"]))
        state, train = task.train_step(state, hp, jax.random.PRNGKey(0))
        return train, task.evaluate(state, hp)

    for m, assignment in enumerate(members):
        cfg = member_config(config, assignment)
        hp = {p: jnp.asarray(v) for p, v in (("seed", cfg.seed), ("hyper.log_lambda", cfg.hyper.log_lambda),
                                              ("optim.lr", cfg.optim.lr))}
        train, evaluation = single(hp)
        assert swept[m]["hparams"]["hyper.log_lambda"] == TWO_VALUES[m]
        assert float(evaluation["log_lambda"]) == TWO_VALUES[m]
        assert swept[m]["train/inner_steps"] == float(train["inner_steps"])  # the same solve, step for step
        # Equal to rounding: batched and single matrix products round differently, and the
        # ill-conditioned inner solve (condition ~1e4, tolerance 1e-9) amplifies that to ~1e-10.
        for key in ("val_loss", "test_loss", "train_loss", "test_accuracy"):
            np.testing.assert_allclose(swept[m][f"eval/{key}"], float(evaluation[key]), rtol=1e-8, atol=1e-12)
    assert swept[1]["eval/val_loss"] > swept[0]["eval/val_loss"]  # a strong L2 under-fits

    # experiments/hypergradients/table.py reads both run directories.
    table = _table()
    result = table.collect(run, grid=grid_run)
    descent, grid = result["rows"]
    assert descent["inner_solves"] == 4 and grid["inner_solves"] == 2
    assert descent["log_lambda"] == last["eval/log_lambda"] and descent["val_loss"] == last["eval/val_loss"]
    assert descent["inner_steps"] == pytest.approx(2 * sum(r["train/inner_steps"] for r in records))
    assert grid["inner_steps"] == sum(r["train/inner_steps"] for r in grid_records)
    assert grid["best_val_loss"] == min(r["eval/val_loss"] for r in grid_records)
    assert [c[0] for c in grid["curve"]] == TWO_VALUES
    text = table.markdown(result)
    assert "| hypergradient descent | CG (lineax) | 4 |" in text and "| vmapped grid (2 values) | — | 2 |" in text
    assert "Every inner and hypergradient solve converged." in text
    with pytest.raises(SystemExit, match="descent run first"):
        table.collect(grid_run)


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["cg", "exact"])
def test_logged_hypergradient_matches_central_differences_of_the_validation_loss(estimator):
    # float64; the inner solves are tight (rtol = atol = 1e-9), so h = 1e-4 resolves the derivative to ~1e-6.
    config = resolve_config(QUICK, {"hypergradient.estimator": f"'{estimator}'"})
    task = build_task(member_config(config, expand_sweep(config)[0]))
    key = jax.random.PRNGKey(0)

    @jax.jit
    def step(theta):
        hp = {"seed": jnp.asarray(0), "hyper.log_lambda": theta, "optim.lr": jnp.asarray(0.3)}
        return task.train_step(task.init(hp, key), hp, key)[1]

    theta, h = -3.0, 1e-4
    metrics = step(jnp.asarray(theta))
    fd = (float(step(jnp.asarray(theta + h))["val_loss"]) - float(step(jnp.asarray(theta - h))["val_loss"])) / (2 * h)
    assert float(metrics["hypergradient_failed"]) == 0
    np.testing.assert_allclose(float(metrics["hypergradient"]), fd, rtol=1e-4)


def test_readme_table_is_what_results_json_regenerates():
    table = _table()
    results = json.loads(table.RESULTS.read_text())
    assert table.readme_section() == table.markdown(results)
    grid = [r for r in results["rows"] if "curve" in r]
    assert len(grid) == 1 and len(grid[0]["curve"]) == results["setup"]["steps"]  # equal inner solves


@pytest.mark.parametrize(
    "override,match",
    [
        ({"hypergradient.estimator": "'conjugate'"}, "hypergradient.estimator"),
        ({"outer.mode": "'random'"}, "outer.mode"),
        ({"hypergradient.terms": "0"}, "hypergradient.terms"),
    ],
)
def test_bad_settings_name_the_key(override, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        resolve_config(QUICK, override)


def test_too_much_data_is_an_error_naming_the_keys():
    config = resolve_config(QUICK, {"data.n_train": "1400"})
    with pytest.raises(ConfigError, match=r"'data.n_train' \+ 'data.n_val' \(1400 \+ 100\)"):
        build_task(member_config(config, expand_sweep(config)[0]))


def test_estimators_from_config():
    base = {"rtol": 1e-7, "atol": 1e-9, "max_steps": 50, "terms": 7}
    assert hd.make_estimator({**base, "estimator": "cg"}).linear_solver.max_steps == 50
    assert hd.make_estimator({**base, "estimator": "fixed_point"}).solver.atol == 1e-9
    assert hd.make_estimator({**base, "estimator": "neumann"}).terms == 7
    assert type(hd.make_estimator({**base, "estimator": "exact"})).__name__ == "HypergradientExact"
    with pytest.raises(ConfigError, match="cg, fixed_point, neumann, exact"):
        hd.make_estimator({**base, "estimator": "jfb"})


@pytest.mark.parametrize("obj", [hd.make_estimator])
def test_docstring_examples_run(obj):
    for code in re.findall(r"```python\n(.*?)```", inspect.getdoc(obj), flags=re.S):
        exec(compile(code, "<docstring>", "exec"), {})


@pytest.mark.slow
def test_mlp_descent_runs_and_lowers_the_validation_loss():
    # model.hidden > 0: a one-hidden-layer tanh MLP (non-convex inner problem, warm-started);
    # Anderson on the adjoint fixed point does not need a positive definite Hessian.
    config = resolve_config(QUICK, {"model.hidden": "8", "hypergradient.estimator": "'fixed_point'"})
    task = build_task(member_config(config, expand_sweep(config)[0]))
    hp = {"seed": jnp.asarray(0), "hyper.log_lambda": jnp.asarray(0.0), "optim.lr": jnp.asarray(0.3)}
    state = task.init(hp, jax.random.PRNGKey(0))
    assert sorted(state["weights"]) == ["hidden", "hidden_bias", "out", "out_bias"]
    step = jax.jit(task.train_step)
    losses = []
    for _ in range(4):
        state, metrics = step(state, hp, jax.random.PRNGKey(0))
        assert float(metrics["hypergradient_failed"]) == 0 and float(metrics["inner_failed"]) == 0
        losses.append(float(metrics["val_loss"]))
    assert losses[-1] < losses[0]
