"""Warm starts of the iterative Darcy solvers (issue 19 §2): initial guesses, unrolled PCG, the iteration-aware loss.

Known answers: from any initial guess the solve ends at the sparse direct solution (float64)
with its residual certificate; a good guess needs fewer iterations than zero, the exact
solution none; `unrolled_pcg` is the solver's own iterate after `steps` iterations; the
iteration-aware loss with `steps=0` is the relative L2 error, and its gradient matches
central finite differences in float64. Shapes are shared (s = 17, s = 7 for the gradients)
so that few programs compile.
"""

import functools
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fpx
import fpx.data
from fpx.data import _darcy, iteration_aware_loss, solve_darcy_iterative, unrolled_pcg
from fpx.data._grf import grf2_cosine
from fpx.experiment import generated_section
from fpx.operators import relative_l2

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "neural_warm_start" / "warm_start.py"
S = 17
SUCCESS = int(fpx.RESULTS.successful._value)
MAX_STEPS = int(fpx.RESULTS.max_steps_reached._value)
METHODS = ("cg", "mg-cg")
UNROLL = 3  # the step budget of the truncated solves (one compilation per method)


def fields(n, s, seed=0):
    """The FNO Darcy coefficients (3 / 12), float64."""
    return np.where(grf2_cosine(np.random.default_rng(seed), n, s, 2.0, 3.0) >= 0, 12.0, 3.0)


def direct(a):
    return np.stack([_darcy.solve_darcy(x) for x in a])


def rel(u, ref):
    u, ref = np.asarray(u), np.asarray(ref)
    return np.linalg.norm((u - ref).reshape(len(u), -1), axis=1) / np.linalg.norm(ref.reshape(len(u), -1), axis=1)


def code(sol):
    return np.asarray(sol.result._value)


@pytest.fixture(scope="module")
def systems():
    a = fields(4, S)
    return a, direct(a)


def _guesses(a, u):
    """Initial guesses of every quality, each of the batch's shape."""
    rng = np.random.default_rng(1)
    x = np.linspace(0.0, 1.0, S)
    smooth = np.sin(np.pi * x)[:, None] * np.sin(2 * np.pi * x)[None, :]
    return {
        "previous sample": np.concatenate([u[-1:], u[:-1]]),
        "near (1e-3 smooth error)": u * (1.0 + 1e-3 * smooth),
        "rough noise": u + 0.1 * np.abs(u).max() * rng.standard_normal(u.shape),
        "far (1e3 x noise)": 1e3 * rng.standard_normal(u.shape),
        "float32 near": (u * 1.001).astype(np.float32),
        "exact": u,
    }


# ---------------------------------------------------------------------------------------------
# the solver from an initial guess


@pytest.mark.parametrize("method", METHODS)
def test_any_initial_guess_reaches_the_direct_solution(systems, method):
    a, u = systems
    rtol = 1e-10
    cold = solve_darcy_iterative(a, method=method, rtol=rtol)
    assert (code(cold) == SUCCESS).all()
    for name, guess in _guesses(a, u).items():
        warm = solve_darcy_iterative(a, method=method, rtol=rtol, x0=guess)
        assert (code(warm) == SUCCESS).all(), name
        assert (np.asarray(warm.residual_norm) <= rtol).all(), name
        # The certificate is the true residual of the returned value, recomputed here.
        res = np.array([
            np.linalg.norm(np.ones((S - 2) ** 2) - _darcy.darcy_matrix(x) @ np.asarray(v)[1:-1, 1:-1].ravel())
            / (S - 2)
            for x, v in zip(a, warm.value)
        ])
        np.testing.assert_allclose(res, np.asarray(warm.residual_norm), rtol=1e-3, atol=1e-15)
        assert rel(warm.value, u).max() < 1e-8, name
        assert rel(warm.value, cold.value).max() < 1e-8, name
        v = np.asarray(warm.value)
        assert (v[:, 0] == 0).all() and (v[:, -1] == 0).all() and (v[:, :, 0] == 0).all(), name


@pytest.mark.parametrize("method", METHODS)
def test_a_good_guess_needs_fewer_iterations_and_the_exact_one_none(systems, method):
    a, u = systems
    g = _guesses(a, u)
    cold = solve_darcy_iterative(a, method=method, rtol=1e-8)
    near = solve_darcy_iterative(a, method=method, rtol=1e-8, x0=g["near (1e-3 smooth error)"])
    exact = solve_darcy_iterative(a, method=method, rtol=1e-8, x0=u)
    cold_steps, near_steps = np.asarray(cold.num_steps), np.asarray(near.num_steps)
    assert (near_steps < cold_steps).all(), (near_steps, cold_steps)
    # A guess 1e-3 off needs about three fewer decades of error reduction than zero.
    assert near_steps.mean() <= 0.8 * cold_steps.mean()
    assert (np.asarray(exact.num_steps) == 0).all() and (code(exact) == SUCCESS).all()
    # The boundary values of the guess are ignored.
    shifted = np.array(u)
    shifted[:, 0, :] = 5.0
    same = solve_darcy_iterative(a, method=method, rtol=1e-8, x0=shifted)
    np.testing.assert_array_equal(np.asarray(same.num_steps), np.asarray(exact.num_steps))


@pytest.mark.parametrize("method", METHODS)
def test_a_warm_start_that_runs_out_of_steps_is_not_success(systems, method):
    a, u = systems
    g = _guesses(a, u)["far (1e3 x noise)"]
    sol = solve_darcy_iterative(a, method=method, rtol=1e-10, max_steps=UNROLL, x0=g)
    assert (code(sol) == MAX_STEPS).all()
    assert not np.asarray(sol.converged).any()
    assert (np.asarray(sol.residual_norm) > 1e-10).all() and (np.asarray(sol.num_steps) == UNROLL).all()


@pytest.mark.parametrize(
    ("x0", "match"),
    [
        (np.zeros((S + 1, S + 1)), r"initial guess, must have the shape of `a`, \(4, 17, 17\).*got \(18, 18\)"),
        (np.zeros((S, S)), r"np.broadcast_to\(x0, a.shape\)"),
        (np.zeros((2, S, S)), r"got \(2, 17, 17\)"),
        (np.full((4, S, S), np.nan), "must be finite; it has 1156 non-finite"),
        (np.zeros((4, S, S), bool), "must be a real array"),
    ],
)
def test_bad_initial_guesses_are_clear_errors(systems, x0, match):
    a, _ = systems
    with pytest.raises(ValueError, match=match):
        solve_darcy_iterative(a, x0=x0)


def test_bad_inputs_of_unrolled_pcg_and_the_loss(systems):
    a, u = systems
    with pytest.raises(ValueError, match=r"unrolled_pcg: the initial guess `x0` must have the shape of `a`, \(17, 17\)"):
        unrolled_pcg(a[0], np.zeros((S - 1, S - 1)), steps=2)
    with pytest.raises(ValueError, match=r"`a` must have shape \(s, s\).*jax.vmap"):
        unrolled_pcg(a, np.zeros_like(a), steps=2)
    with pytest.raises(ValueError, match="`steps` must be an integer >= 0"):
        unrolled_pcg(a[0], u[0], steps=-1)
    with pytest.raises(ValueError, match="`method` must be one of"):
        unrolled_pcg(a[0], u[0], steps=1, method="gmres")
    with pytest.raises(ValueError, match="must be > 0 everywhere"):
        unrolled_pcg(-a[0], u[0], steps=1)
    with pytest.raises(ValueError, match="`measure` must be one of 'error', 'residual'"):
        iteration_aware_loss(a[0], u[0], u[0], steps=1, measure="energy")
    with pytest.raises(ValueError, match=r"the solution `u` must have the shape of `a`, \(17, 17\)"):
        iteration_aware_loss(a[0], u[0], u[0, 1:], steps=1)
    with pytest.raises(ValueError, match="initial guess `x0` must have the shape"):
        iteration_aware_loss(a[0], u[0, :, 1:], u[0], steps=1)


# ---------------------------------------------------------------------------------------------
# unrolled iterations and the iteration-aware loss


_loss = jax.jit(iteration_aware_loss, static_argnames=("steps", "method", "measure"))


@pytest.mark.parametrize("method", METHODS)
def test_unrolled_pcg_is_the_solvers_iterate(systems, method):
    a, u = systems
    guess = _guesses(a, u)["rough noise"]
    fn = jax.jit(jax.vmap(lambda a, x: unrolled_pcg(a, x, steps=UNROLL, method=method)))
    got = np.asarray(fn(jnp.asarray(a), jnp.asarray(guess)))
    stopped = solve_darcy_iterative(a, method=method, rtol=1e-12, max_steps=UNROLL, x0=guess)
    assert (np.asarray(stopped.num_steps) == UNROLL).all()
    np.testing.assert_allclose(got, np.asarray(stopped.value), rtol=1e-11, atol=1e-14 * np.abs(u).max())


def test_loss_with_no_iterations_is_the_relative_l2_error(systems):
    a, u = systems
    guess = jnp.asarray(_guesses(a, u)["rough noise"][0])
    a0, u0 = jnp.asarray(a[0]), jnp.asarray(u[0])
    got = _loss(a0, guess, u0, steps=0, method="cg", measure="error")
    np.testing.assert_allclose(got, relative_l2(guess[1:-1, 1:-1], u0[1:-1, 1:-1]), rtol=1e-14)
    res = _loss(a0, guess, u0, steps=0, method="cg", measure="residual")
    b = np.ones((S - 2) ** 2)
    expected = np.linalg.norm(b - _darcy.darcy_matrix(a[0]) @ np.asarray(guess)[1:-1, 1:-1].ravel()) / np.linalg.norm(b)
    np.testing.assert_allclose(res, expected, rtol=1e-12)
    # Iterations leave less; the multigrid iteration removes far more per step.
    cg = float(_loss(a0, guess, u0, steps=UNROLL, method="cg", measure="residual"))
    mg = float(_loss(a0, guess, u0, steps=UNROLL, method="mg-cg", measure="residual"))
    assert mg < 1e-2 * cg < 1e-2 * float(res)
    # At the exact solution the loss is exactly zero and its gradient finite (the norm is made safe there).
    zero, grad = jax.jit(jax.value_and_grad(iteration_aware_loss, argnums=1), static_argnames="steps")(a0, u0, u0, steps=0)
    assert float(zero) == 0.0 and bool(jnp.all(jnp.isfinite(grad)))


@functools.partial(jax.jit, static_argnames=("method", "measure", "steps"))
def _model_loss(theta, a, u, basis, rough, *, method, measure, steps):
    """The iteration-aware loss of a tiny guess model: the solution, two smooth modes and a rough part."""
    guess = theta[0] * u + jnp.tensordot(theta[1:3], basis, axes=1) + theta[3] * rough
    return iteration_aware_loss(a, guess, u, steps=steps, method=method, measure=measure)


@pytest.mark.parametrize(("method", "measure"), [("cg", "error"), ("cg", "residual"), ("mg-cg", "error")])
def test_iteration_aware_loss_gradient_matches_finite_differences(method, measure):
    """float64, an 11 x 11 grid (9 interior nodes a side: two multigrid levels, so that MG-PCG is
    not exact after one step): the gradient with respect to the parameters of a tiny guess model."""
    s = 11
    a = fields(1, s, seed=3)[0]
    u = direct(a[None])[0]
    x = np.linspace(0.0, 1.0, s)
    basis = np.stack([np.outer(np.sin(np.pi * k * x), np.sin(np.pi * x)) for k in (1, 2)]) * u.max()
    rough = np.outer(x * (1 - x), x * (1 - x)) * np.tanh(a - 7.5)
    opts = dict(method=method, measure=measure, steps=3 if method == "cg" else 1)
    args = tuple(jnp.asarray(v) for v in (a, u, basis, rough))
    grad_fn = jax.jit(jax.grad(_model_loss), static_argnames=tuple(opts))
    theta = jnp.array([0.9, 0.1, -0.05, 0.02])
    grad = np.asarray(grad_fn(theta, *args, **opts))
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0
    eps = 1e-6
    fd = np.array([
        (_model_loss(theta + eps * e, *args, **opts) - _model_loss(theta - eps * e, *args, **opts)) / (2 * eps)
        for e in jnp.eye(4)
    ])
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-7 * np.abs(fd).max())
    # At the solution itself (a residual of rounding size) the gradient stays finite.
    assert np.all(np.isfinite(np.asarray(grad_fn(jnp.array([1.0, 0.0, 0.0, 0.0]), *args, **opts))))


# ---------------------------------------------------------------------------------------------
# the experiment


def _script():
    spec = importlib.util.spec_from_file_location("warm_start", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_section_is_what_the_committed_json_regenerates():
    module = _script()
    results = json.loads((SCRIPT.parent / "warm_start.json").read_text())
    assert generated_section(module.README, "neural_warm_start") == module.markdown(results).rstrip("\n"), (
        "experiments/neural_warm_start/README.md differs from warm_start.json: rerun warm_start.py --update-committed"
    )


def test_committed_results_keep_the_solvers_accuracy():
    r = json.loads((SCRIPT.parent / "warm_start.json").read_text())
    assert r["preset"] == "default"
    for res in r["resolutions"]:
        for row in res["rows"]:
            for cell in row["solves"].values():
                assert cell["converged"] == cell["samples"], (res["s"], row["start"])
                assert cell["max_residual"] <= cell["rtol"]
                assert cell["max_rel_diff_direct"] <= 100 * cell["rtol"]


def test_quick_run(tmp_path):
    module = _script()
    results = module.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "warm_start.json").exists()
    starts = [row["start"] for row in results["resolutions"][0]["rows"]]
    assert starts == list(module.start_names(module.PRESETS["quick"]))
    assert len(results["resolutions"]) == 2 and results["resolutions"][1]["zero_shot"]
    for res in results["resolutions"]:
        for row in res["rows"]:
            for cell in row["solves"].values():
                assert cell["converged"] == cell["samples"] and cell["max_residual"] <= cell["rtol"]
