"""The `fpdm` task (Fixed Point Diffusion Models on sklearn digits): the S-JFB forward and
gradient, the DDIM sampler with warm and cold starts, the quality scores, config checks, the
`:quick` preset end to end (warm-started sampling takes fewer fixed-point iterations than
cold-started at the same tolerance) and experiments/fpdm/table.py."""

import importlib.util
import json
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import fpx
from fpx.cli import main
from fpx.experiment import ConfigError, build_task, expand_sweep, load_config, member_config, resolve_config
from fpx.experiment.tasks import fpdm

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "fpdm" / "digits.py") + ":quick"
_RUNS: dict[str, pathlib.Path] = {}


def _table():
    spec = importlib.util.spec_from_file_location("fpdm_table", ROOT / "experiments/fpdm/table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model(width=6, seed=0, gamma=0.9):
    return fpdm._FPDM(jr.PRNGKey(seed), width=width, gamma=gamma, time_features=2, timesteps=10, dtype=jnp.float64)


# ------------------------------------------------------------------ S-JFB


def _iterate(model, u, n, w=None):
    w = model.weight if w is None else w
    z = jnp.zeros_like(u)
    for _ in range(n):
        z = jnp.tanh(w @ z + u)
    return z


def test_sjfb_forward_is_n_plus_k_block_iterations_from_zero():
    model = _model()
    u = model.embed(jr.normal(jr.PRNGKey(1), (64,), jnp.float64), 3)
    run = jax.jit(lambda n, k: fpdm._sjfb_state(model, u, n, k, 4))
    for n, k in ((0, 1), (3, 2), (7, 4)):
        np.testing.assert_allclose(run(n, k), _iterate(model, u, n + k), rtol=0, atol=1e-14)


def test_sjfb_gradient_is_the_last_k_iterations_from_a_frozen_start():
    # d/dθ of head(g_θ^k(z_n)) with z_n = g^n(0) held fixed at θ: central differences in float64.
    model = _model()
    x = jr.normal(jr.PRNGKey(1), (64,), jnp.float64)
    r = jr.normal(jr.PRNGKey(2), (64,), jnp.float64)
    n, k = 5, 2
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def sjfb(p):
        m = eqx.combine(p, static)
        return jnp.dot(m.head(fpdm._sjfb_state(m, m.embed(x, 4), n, k, 3)), r)

    u0 = model.embed(x, 4)
    z_n = _iterate(model, u0, n)

    def frozen_start(p):  # what S-JFB differentiates
        m = eqx.combine(p, static)
        u, z = m.embed(x, 4), z_n
        for _ in range(k):
            z = m.block(z, u)
        return jnp.dot(m.head(z), r)

    def unrolled(p):  # backpropagation through all n + k iterations
        m = eqx.combine(p, static)
        return jnp.dot(m.head(_iterate(m, m.embed(x, 4), n + k)), r)

    grad = jax.jit(jax.grad(sjfb))(params)
    direction = jax.tree_util.tree_map(lambda a: jr.normal(jr.PRNGKey(a.size), a.shape, a.dtype), params)
    along = sum(jnp.vdot(g, d) for g, d in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(direction)))
    eps = 1e-6
    shift = lambda s: jax.tree_util.tree_map(lambda a, d: a + s * d, params, direction)  # noqa: E731
    fd = (frozen_start(shift(eps)) - frozen_start(shift(-eps))) / (2 * eps)
    assert float(along) == pytest.approx(float(fd), rel=1e-6)
    full = (unrolled(shift(eps)) - unrolled(shift(-eps))) / (2 * eps)
    assert abs(float(full) - float(along)) > 1e-3 * abs(float(full))  # the no-grad iterations are cut


def test_rescale_keeps_the_block_a_gamma_contraction():
    model = _model(width=8, gamma=0.8)
    big = eqx.tree_at(lambda m: m.weight, model, 3.0 * model.weight / jnp.linalg.norm(model.weight, 2))
    u = jnp.ones(8, jnp.float64) / jnp.sqrt(8.0)
    scaled, u = big.rescale(u, iterations=100)
    assert float(jnp.linalg.norm(scaled.weight, 2)) == pytest.approx(0.8, rel=1e-6)
    small = eqx.tree_at(lambda m: m.weight, model, 0.5 * model.weight / jnp.linalg.norm(model.weight, 2))
    kept, _ = small.rescale(u, iterations=3)
    np.testing.assert_array_equal(kept.weight, small.weight)


# ------------------------------------------------------------------ sampling


class _SinglePoint(eqx.Module):
    """The exact denoiser of a data set of one image `x*`, routed through a fixed point:
    `u = eps*(x_t, t)`, `g(z, u) = u + tanh(z - u) / 2` (a contraction with fixed point `u`), `eps = z`."""

    target: jax.Array
    abar: jax.Array
    weight: jax.Array

    def embed(self, x, t):
        a = self.abar[t]
        return (x - jnp.sqrt(a) * self.target) / jnp.sqrt(1 - a)

    def block(self, z, u):
        return u + 0.5 * jnp.tanh(z - u)

    def head(self, z):
        return z


@pytest.mark.parametrize("solver", [fpx.Picard(rtol=1e-8, atol=1e-10), fpx.Anderson(memory=3, rtol=1e-8, atol=1e-10)])
def test_ddim_recovers_a_single_image_and_warm_starts_solve_in_fewer_steps(solver):
    abar = fpdm._schedule(20, jnp.float64)
    times = fpdm._sampling_times(20, 10)
    target = jnp.linspace(-0.9, 0.9, 64, dtype=jnp.float64)
    model = _SinglePoint(target, abar, jnp.zeros((64, 64), jnp.float64))
    noise = jr.normal(jr.PRNGKey(0), (64,), jnp.float64)
    run = jax.jit(lambda warm: fpdm._ddim_sample(model, noise, abar, times, solver, 200, warm))
    (x_cold, steps_cold, conv_cold), (x_warm, steps_warm, conv_warm) = run(False), run(True)
    for x in (x_cold, x_warm):
        np.testing.assert_allclose(x, target, atol=1e-5)
    assert bool(jnp.all(conv_cold)) and bool(jnp.all(conv_warm)) and steps_cold.shape == (10,)
    # Along the exact DDIM path eps (hence the fixed point) is the same at every timestep: a
    # warm start is already solved after the first timestep; a cold one starts from 0 each time.
    assert int(steps_warm[0]) == int(steps_cold[0])
    assert int(jnp.min(steps_cold)) >= 3 and int(jnp.sum(steps_warm[1:])) < int(jnp.sum(steps_cold[1:])) / 3


def test_budget_caps_the_solver_steps_per_timestep():
    abar = fpdm._schedule(20, jnp.float64)
    times = fpdm._sampling_times(20, 6)
    model = _SinglePoint(jnp.zeros(64, jnp.float64), abar, jnp.zeros((64, 64), jnp.float64))
    noise = jr.normal(jr.PRNGKey(0), (64,), jnp.float64)
    _, steps, converged = fpdm._ddim_sample(model, noise, abar, times, fpx.Picard(rtol=1e-8, atol=1e-10), 2, False)
    assert steps.tolist() == [2] * 6 and not bool(jnp.any(converged))


def test_sampling_times_run_from_T_down_to_zero():
    times = fpdm._sampling_times(100, 50)
    assert times[0] == 100 and times[-1] == 0 and len(times) == 51 and np.all(np.diff(times) < 0)
    assert fpdm._sampling_times(10, 10).tolist() == list(range(10, -1, -1))
    abar = fpdm._schedule(100, jnp.float64)
    assert float(abar[0]) == 1.0 and 1e-5 < float(abar[-1]) < 1e-4 and bool(jnp.all(jnp.diff(abar) < 0))


# ------------------------------------------------------------------ scores


def test_frechet_distance_known_answers():
    a = jr.normal(jr.PRNGKey(0), (200, 3), jnp.float64)
    c = jnp.array([1.0, -2.0, 0.5])
    assert float(fpdm._frechet_distance(a, a)) == pytest.approx(0.0, abs=1e-9)
    assert float(fpdm._frechet_distance(a, a + c[None, :])) == pytest.approx(5.25, rel=1e-9)
    centred = a - jnp.mean(a, 0)[None, :]
    trace = float(jnp.trace(jnp.cov(centred, rowvar=False)))  # tr(C + 4C - 2 * 2C) = tr(C)
    assert float(fpdm._frechet_distance(centred, 2.0 * centred)) == pytest.approx(trace, rel=1e-9)


def test_nearest_distance_known_answer():
    points = jnp.array([[0.0, 0.0], [3.0, 4.0]])
    reference = jnp.array([[0.0, 1.0], [3.0, 0.0], [10.0, 10.0]])
    assert float(fpdm._nearest_distance(points, reference)) == pytest.approx(2.5)


# ------------------------------------------------------------------ config


@pytest.mark.parametrize("overrides,key", [
    ({"model.no_grad_min": "5", "model.no_grad_max": "2"}, "model.no_grad_min"),
    ({"model.with_grad_min": "4", "model.with_grad_max": "3"}, "model.with_grad_min"),
    ({"sampling.steps": "200"}, "sampling.steps"),
    ({"sampling.rtol": "0", "sampling.atol": "0"}, "sampling.rtol"),
])
def test_inconsistent_settings_are_config_errors_naming_the_key(overrides, key):
    config = resolve_config(QUICK, overrides)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_task(member_config(config, expand_sweep(config)[0]))


def test_unknown_solver_name_is_rejected():
    with pytest.raises(ConfigError, match="sampling.solvers"):
        resolve_config(QUICK, {"sampling.solvers": '["picard", "broyden"]'})


# ------------------------------------------------------------------ the quick preset


def _quick_run(tmp_path, monkeypatch) -> pathlib.Path:
    monkeypatch.setenv("FPX_DATA_DIR", str(tmp_path / "data"))
    workdir = tmp_path / "run"
    assert main(["run", QUICK, "--workdir", str(workdir)]) == 0
    _RUNS["quick"] = workdir
    return workdir


def test_quick_preset_warm_starts_save_fixed_point_iterations(tmp_path, monkeypatch):
    monkeypatch.setenv("FPX_DATA_DIR", str(tmp_path / "data"))
    workdir = tmp_path / "run"
    assert main(["run", QUICK, "--workdir", str(workdir)]) == 0
    _RUNS["quick"] = workdir
    config = load_config(QUICK)
    row = json.loads((workdir / "summary.json").read_text())["members"][0]
    S = len(fpdm._sampling_times(config.diffusion.timesteps, config.sampling.steps)) - 1
    assert row["step"] == config.train.steps and row["status"] == "ok"
    for solver in config.sampling.solvers:
        cold, warm, saving = (row[f"eval/{solver}_{k}"] for k in ("cold_iters", "warm_iters", "saving"))
        # the guarantee: the same tolerance, fewer total fixed-point iterations when warm-started
        assert warm < cold and saving > 0, f"{solver}: warm {warm:.2f} vs cold {cold:.2f} iterations, saving {saving:.1%}"
        assert saving == pytest.approx(1 - warm / cold, rel=1e-5)
        assert S <= warm and cold <= config.sampling.max_steps * S
        assert row[f"eval/{solver}_cold_converged"] == 1.0 and row[f"eval/{solver}_warm_converged"] == 1.0
        # the same samples up to the tolerance (pixels in [-1, 1])
        assert row[f"eval/{solver}_warm_cold_dev"] < 0.05, row[f"eval/{solver}_warm_cold_dev"]
    assert row["eval/anderson_picard_dev"] < 0.1
    for b in config.sampling.budgets:
        for solver in config.sampling.budget_solvers:
            for start in ("cold", "warm"):
                assert 0 < row[f"eval/b{b}_{solver}_{start}_iters"] <= b * S
                assert row[f"eval/b{b}_{solver}_{start}_nn"] > 0
    assert row["eval/block_lipschitz"] <= config.model.gamma * (1 + 1e-4)
    # data-only figures (the split and the classifier are deterministic)
    assert row["eval/real_nn"] == pytest.approx(2.1427, abs=1e-3)
    assert row["eval/classifier_accuracy"] == pytest.approx(0.9694, abs=1e-3)
    assert 0 < row["eval/test_loss"] < 2 and row["train/loss"] > 0


def test_table_collect_reads_the_quick_run(tmp_path, monkeypatch):
    workdir = _RUNS.get("quick") or _quick_run(tmp_path, monkeypatch)
    table = _table()
    result = table.collect(workdir)
    config = load_config(QUICK)
    assert result["setup"]["steps"] == config.train.steps and result["setup"]["seeds"] == 1
    rows = {(r["solver"], r["start"]): r for r in result["tolerance"]}
    assert sorted(rows) == sorted((s, st) for s in config.sampling.solvers for st in ("cold", "warm"))
    assert rows[("picard", "warm")]["saving"]["mean"] > 0 and rows[("picard", "cold")]["saving"] is None
    assert {(b["budget"], b["solver"]) for b in result["budgets"]} == {
        (b, s) for b in config.sampling.budgets for s in config.sampling.budget_solvers}
    text = table.markdown(result)
    assert "| Picard | warm |" in text and "to tolerance" in text
    table.plot(result, tmp_path / "budget.png")
    assert (tmp_path / "budget.png").stat().st_size > 1000


def test_readme_table_is_what_results_json_regenerates():
    table = _table()
    results = json.loads(table.RESULTS.read_text())
    assert table.readme_section() == table.markdown(results)
