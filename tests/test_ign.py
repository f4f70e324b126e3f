"""The `ign` task (idempotent generative network, Shocher et al. 2024): the loss terms'
gradient routing (the tightness gradient flows through the outer application and is exactly
zero when the frozen copy sits there), the energy distance, the evaluation of an exactly
idempotent map, the `:quick` preset end to end, and the README table of experiments/ign."""

import importlib.util
import json
import math
import pathlib

import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import scipy.stats

import fpx.experiment as fx
from fpx.cli import main
from fpx.experiment.tasks import ign

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "ign" / "moons.py") + ":quick"


def _net(key=0, dim=2, width=5, depth=2):
    params = ign._init_mlp(jr.PRNGKey(key), dim, width, depth, jnp.float64)
    return params, (lambda p, y: ign._apply(p, y, "silu"))


def _batch(key=1, n=7, dim=2):
    kx, kz = jr.split(jr.PRNGKey(key))
    return jr.normal(kx, (n, dim), jnp.float64), jr.normal(kz, (n, dim), jnp.float64)


def _flat(tree):
    return jnp.concatenate([jnp.ravel(g) for g in jax.tree_util.tree_leaves(tree)])


def _fd_grad(fn, params, eps=1e-6):
    """Central finite differences of `fn(params)` (a scalar) in every parameter, flattened."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    steps = eps * jnp.eye(flat.size, dtype=flat.dtype)
    at = jax.jit(jax.vmap(lambda d: fn(unravel(flat + d))))
    return (at(steps) - at(-steps)) / (2 * eps)


# ------------------------------------------------------------------ gradient routing
@pytest.mark.parametrize("distance", ["l1", "mse"])
def test_tightness_gradient_flows_through_the_outer_application_only(distance):
    params, f = _net()
    x, z = _batch()
    grad = jax.grad(lambda p: ign._ign_terms(p, x, z, f, distance=distance, tight_clamp=0.0)["tight_raw"])(params)
    assert float(jnp.linalg.norm(_flat(grad))) > 1e-3
    # The same figure by finite differences of theta -> -D(f_theta(y0), y0), y0 = f_theta0(z) held fixed.
    y0 = f(params, z)
    fd = _fd_grad(lambda p: -ign._distance(f(p, y0), y0, distance), params)
    np.testing.assert_allclose(_flat(grad), fd, rtol=1e-6, atol=1e-8)


def test_frozen_copy_in_the_outer_application_makes_the_tightness_gradient_zero():
    # The failure the suite must be able to catch: same value, zero gradient.
    params, f = _net()
    x, z = _batch()
    right = ign._ign_terms(params, x, z, f, tight_grad="outer", tight_clamp=0.0)
    wrong = ign._ign_terms(params, x, z, f, tight_grad="frozen_outer", tight_clamp=0.0)
    assert float(right["tight_raw"]) == pytest.approx(float(wrong["tight_raw"]), rel=1e-12) and float(right["tight_raw"]) < 0
    g_right = jax.grad(lambda p: ign._ign_terms(p, x, z, f, tight_grad="outer")["tight_raw"])(params)
    g_wrong = jax.grad(lambda p: ign._ign_terms(p, x, z, f, tight_grad="frozen_outer")["tight_raw"])(params)
    assert float(jnp.linalg.norm(_flat(g_right))) > 1e-3
    assert float(jnp.max(jnp.abs(_flat(g_wrong)))) == 0.0
    with pytest.raises(ValueError, match="tight_grad"):
        ign._ign_terms(params, x, z, f, tight_grad="inner")


def test_idempotence_gradient_flows_through_the_inner_application_only():
    params, f = _net()
    x, z = _batch()
    grad = jax.grad(lambda p: ign._ign_terms(p, x, z, f)["idem"])(params)
    p0 = params  # the frozen copy theta' at the current parameters
    fd = _fd_grad(lambda p: ign._distance(f(p0, f(p, z)), f(p, z), "l1"), params)
    np.testing.assert_allclose(_flat(grad), fd, rtol=1e-6, atol=1e-8)
    # ... which is not the gradient of D(f(f(z)), f(z)) through both applications.
    both = _fd_grad(lambda p: ign._distance(f(p, f(p, z)), f(p, z), "l1"), params)
    assert float(jnp.linalg.norm(both - fd)) > 1e-3


def test_reconstruction_and_the_tanh_clamp():
    params, f = _net()
    x, z = _batch()
    t = ign._ign_terms(params, x, z, f, tight_clamp=1.5)
    assert float(t["rec"]) == pytest.approx(float(jnp.mean(jnp.abs(f(params, x) - x))), rel=1e-12)
    a_rec = 1.5 * t["rec"]
    assert float(t["tight"]) == pytest.approx(float(jnp.tanh(t["tight_raw"] / a_rec) * a_rec), rel=1e-12)
    # |tanh u| <= |u|, and the clamped term is bounded by a L_rec: raw <= clamped <= 0, clamped > -a L_rec.
    assert float(t["tight_raw"]) <= float(t["tight"]) <= 0.0 and float(t["tight"]) > -float(a_rec)
    assert float(ign._ign_terms(params, x, z, f, tight_clamp=0.0)["tight"]) == float(t["tight_raw"])


# ------------------------------------------------------------------ energy distance
def test_energy_distance_known_answers():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 1)), rng.normal(size=(30, 1)) + 0.7
    assert float(ign._energy_distance(jnp.asarray(a), jnp.asarray(b))) == pytest.approx(
        scipy.stats.energy_distance(a[:, 0], b[:, 0]), rel=1e-10
    )
    pts = jnp.asarray(rng.normal(size=(25, 3)))
    assert float(ign._energy_distance(pts, pts)) == 0.0
    # One point each: sqrt(2 |a - b|).
    assert float(ign._energy_distance(jnp.array([[0.0, 0.0]]), jnp.array([[3.0, 4.0]]))) == pytest.approx(math.sqrt(10.0))
    # Two edges of the unit square shifted by (0, 1): 2 (1 + sqrt 2)/2 - 1/2 - 1/2 = sqrt 2.
    lower, upper = jnp.array([[0.0, 0.0], [1.0, 0.0]]), jnp.array([[0.0, 1.0], [1.0, 1.0]])
    assert float(ign._energy_distance(lower, upper)) == pytest.approx(math.sqrt(math.sqrt(2.0)), rel=1e-12)
    # A precomputed E|Y - Y'| gives the same figure.
    within = ign._pairwise_mean_distance(upper, upper)
    assert float(ign._energy_distance(lower, upper, within)) == pytest.approx(math.sqrt(math.sqrt(2.0)), rel=1e-12)
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        ign._energy_distance(jnp.zeros((3, 2)), jnp.zeros((3, 3)))


def test_nearest_distance():
    a = jnp.array([[0.0, 0.0], [2.0, 0.0]])
    b = jnp.array([[0.0, 1.0], [5.0, 0.0], [2.0, -0.5]])
    assert float(ign._nearest_distance(a, b)) == pytest.approx(0.75)
    assert float(ign._nearest_distance(a, a)) == 0.0


# ------------------------------------------------------------------ evaluation
def _task(**overrides):
    config = fx.resolve_config(QUICK, {k: str(v) if not isinstance(v, str) else v for k, v in overrides.items()})
    return ign.IGN(fx.member_config(config, fx.expand_sweep(config)[0]))


def test_an_exactly_idempotent_map_scores_as_one():
    # f(y) = (y1, 0) as a ReLU network: W1 = [[1, -1], [0, 0]], W2 = [[1, 0], [-1, 0]].
    task = _task(**{"model.width": 2, "model.depth": 1, "model.activation": "relu"})
    dt = task.dtype
    params = [
        {"w": jnp.array([[1.0, -1.0], [0.0, 0.0]], dt), "b": jnp.zeros(2, dt)},
        {"w": jnp.array([[1.0, 0.0], [-1.0, 0.0]], dt), "b": jnp.zeros(2, dt)},
    ]
    z = task.z_eval
    np.testing.assert_allclose(task.f(params, z), jnp.stack([z[:, 0], jnp.zeros_like(z[:, 0])], 1), atol=1e-6)
    state = {"params": params}
    out = jax.jit(task.evaluate)(state, {"seed": 0, "optim.lr": 1e-3})
    assert float(out["idem_error"]) == 0.0
    assert all(float(out[f"rel_change_k{k}"]) == 0.0 for k in range(1, task.config.eval.iterations + 1))
    # fpx.fixed_point from z: z* = f(z) after one step, every solve successful.
    assert float(out["fp_steps"]) == 1.0 and float(out["fp_converged"]) == 1.0 and float(out["fp_dist"]) == 0.0
    assert float(out["energy_fp"]) == pytest.approx(float(out["energy_fz"]), rel=1e-6)
    assert float(out["energy_fz"]) > float(out["energy_floor"])  # a line is not the moons
    assert float(out["tight_grad_norm"]) > 0.0  # D(f(f'(z)), f'(z)) = 0 but its gradient is not


def test_config_errors_name_the_key():
    with pytest.raises(fx.ConfigError, match="loss.tight_grad"):
        fx.resolve_config(QUICK, {"loss.tight_grad": "inner"})
    with pytest.raises(fx.ConfigError, match="data.batch_size"):
        _task(**{"data.batch_size": 5000})
    with pytest.raises(fx.ConfigError, match="eval.grad_batch"):
        _task(**{"eval.grad_batch": 100000})


# ------------------------------------------------------------------ the :quick preset
def _records(workdir):
    return sorted(fx.read_metrics(workdir), key=lambda r: (r["member"], r["step"]))


_RUNS = {}  # the :quick run directory, shared with the table test


def test_quick_preset_trains_towards_an_idempotent_generator(tmp_path, monkeypatch):
    monkeypatch.setenv("FPX_DATA_DIR", str(tmp_path / "data"))
    quick_run = tmp_path / "run"
    assert main(["run", QUICK, "--workdir", str(quick_run), "--quiet"]) == 0
    _RUNS["quick"] = quick_run
    summary = json.loads((quick_run / "summary.json").read_text())
    config = fx.load_config(QUICK)
    assert summary["success_mask"] == [True] and summary["members"][0]["step"] == config.train.steps
    records = _records(quick_run)
    assert [r["step"] for r in records] == list(range(50, config.train.steps + 1, 50))
    # The tightness gradient is non-zero at every evaluation (the frozen copy is in the inner application).
    assert all(r["eval/tight_grad_norm"] > 1e-2 for r in records)
    assert all(r["eval/idem_grad_norm"] > 1e-3 and r["eval/rec_grad_norm"] > 1e-3 for r in records)
    # The idempotence error, the reconstruction error and the distance of f(z) to the data fall
    # from their values at initialisation (evaluated on the same noises).
    task = ign.IGN(fx.member_config(fx.resolve_config(QUICK), fx.expand_sweep(fx.resolve_config(QUICK))[0]))
    hp = {"seed": jnp.asarray(0), "optim.lr": jnp.asarray(config.optim.lr, jnp.float32)}
    start = jax.jit(task.evaluate)(task.init(hp, jr.PRNGKey(0)), hp)
    first, last = records[0], records[-1]
    assert last["eval/idem_error"] < 0.6 * float(start["idem_error"]), (last["eval/idem_error"], float(start["idem_error"]))
    assert last["eval/idem_error"] < first["eval/idem_error"]
    assert last["eval/rec_error"] < 0.1 * float(start["rec_error"])
    assert last["eval/energy_fz"] < 0.5 * float(start["energy_fz"])
    assert last["eval/nn_fz"] < 0.7 * float(start["nn_fz"])
    # f^k(z) settles: the relative change shrinks with k; fpx.fixed_point iterates f from z.
    assert last["eval/rel_change_k3"] < last["eval/rel_change_k1"] < 0.2
    assert 1.0 <= last["eval/fp_steps"] <= config.max_steps and 0.0 <= last["eval/fp_converged"] <= 1.0
    assert last["eval/energy_floor"] < last["eval/energy_fz"]
    text = (quick_run / "summary.json").read_text()
    assert "NaN" not in text and "Infinity" not in text


# ------------------------------------------------------------------ experiments/ign/table.py
def _table():
    spec = importlib.util.spec_from_file_location("ign_table", ROOT / "experiments/ign/table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_table_is_what_results_json_regenerates():
    table = _table()
    results = json.loads(table.RESULTS.read_text())
    assert table.readme_section() == table.markdown(results)


def test_table_collects_the_quick_run(tmp_path, monkeypatch):
    quick_run = _RUNS.get("quick")
    if quick_run is None:  # run on its own (pytest -k)
        monkeypatch.setenv("FPX_DATA_DIR", str(tmp_path / "data"))
        quick_run = tmp_path / "run"
        assert main(["run", QUICK, "--workdir", str(quick_run), "--quiet"]) == 0
    table = _table()
    result = table.collect(quick_run)
    (row,) = result["rows"]
    last = _records(quick_run)[-1]
    assert row["variant"] == "ign" and row["seeds"] == 1 and row["step"] == fx.load_config(QUICK).train.steps
    assert row["idem_error"]["mean"] == pytest.approx(last["eval/idem_error"]) and row["idem_error"]["sd"] == 0.0
    assert row["energy_fz"]["mean"] == pytest.approx(last["eval/energy_fz"])
    assert row["fp_steps"]["mean"] == pytest.approx(last["eval/fp_steps"])
    assert row["ms_per_step"] is not None and row["ms_per_step"] > 0
    assert result["setup"]["steps"] == fx.load_config(QUICK).train.steps
    assert "| ign |" in table.markdown(result)
