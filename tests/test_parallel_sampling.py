"""ParaDiGMS-style parallel sampling (`fpx.parallel.picard_sample`) against the sequential sampler.

Ground truth: data `x ~ N(mu, s^2 I)`. The exact denoiser is linear,
`eps(x, abar) = sqrt(1 - abar) (x - sqrt(abar) mu) / (abar s^2 + 1 - abar)`, so one DDIM step
maps `y = x - sqrt(abar) mu` to `y' = y (sqrt(abar abar') s^2 + sqrt((1 - abar)(1 - abar'))) /
(abar s^2 + 1 - abar)`: the sequential sampler has a closed form, and as T grows it tends to
the probability-flow ODE's `mu + s (x_0 - sqrt(abar_0) mu) / sqrt(abar_0 s^2 + 1 - abar_0)`.
The time variable is `abar` itself (`alpha_bar = identity`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fpx
import fpx.parallel as fp

MU, S = 1.5, 0.4


def gaussian_eps(x, abar):
    return jnp.sqrt(1 - abar) * (x - jnp.sqrt(abar) * MU) / (abar * S**2 + 1 - abar)


def identity(t):
    return t


def grid(T, dtype=jnp.float64, start=0.02):
    return jnp.linspace(start, 1.0, T + 1, dtype=dtype)


X0 = jax.random.normal(jax.random.key(0), (3, 5))


def closed_form(x0, abar):
    abar = np.asarray(abar, np.float64)
    y = np.asarray(x0, np.float64) - np.sqrt(abar[0]) * MU
    for a, b in zip(abar[:-1], abar[1:]):
        y = y * (np.sqrt(a * b) * S**2 + np.sqrt((1 - a) * (1 - b))) / (a * S**2 + 1 - a)
    return np.sqrt(abar[-1]) * MU + y


def test_sequential_sampler_is_the_stated_discretisation():
    abar = grid(60)
    x = fp.ddim_sample(gaussian_eps, X0, abar, identity)
    np.testing.assert_allclose(np.asarray(x), closed_form(X0, abar), rtol=1e-12, atol=1e-12)
    path = fp.ddim_sample(gaussian_eps, X0, abar, identity, return_trajectory=True)
    assert path.shape == (61, 3, 5)
    np.testing.assert_array_equal(np.asarray(path[0]), np.asarray(X0))
    np.testing.assert_allclose(np.asarray(path[-1]), np.asarray(x), rtol=0, atol=1e-14)
    # alpha_bar given as an array of its values at ts: the same sampler.
    same = fp.ddim_sample(gaussian_eps, X0, abar, abar)
    np.testing.assert_allclose(np.asarray(same), np.asarray(x), rtol=0, atol=1e-15)


@pytest.mark.parametrize("tol, bound", [(1e-3, 1e-4), (1e-7, 1e-8), (0.0, 1e-13)])
def test_picard_equals_sequential_float64(tol, bound):
    T = 200
    abar = grid(T)
    reference = fp.ddim_sample(gaussian_eps, X0, abar, identity)
    sol = fp.picard_sample(gaussian_eps, X0, abar, identity, window=32, tol=tol)
    assert sol.result == fpx.RESULTS.successful
    err = float(jnp.max(jnp.abs(sol.value - reference)))
    assert err <= bound, err
    stats = sol.stats
    rounds, evals = int(stats["num_steps"]), int(stats["num_fn_evals"])
    assert int(stats["num_sequential_steps"]) == T and int(stats["window"]) == 32
    assert rounds <= T and evals >= rounds and evals <= 32 * rounds
    assert float(stats["residual_norm"]) <= tol
    if tol > 0:  # a smooth problem: far fewer sequential rounds than steps
        assert rounds < T // 4


def test_picard_equals_sequential_float32_loosely():
    T = 100
    abar = grid(T, jnp.float32)
    x0 = X0.astype(jnp.float32)
    eps32 = lambda x, a: gaussian_eps(x, a).astype(jnp.float32)
    reference = fp.ddim_sample(eps32, x0, abar, identity)
    sol = fp.picard_sample(eps32, x0, abar, identity, window=16, tol=1e-3)
    assert sol.converged and sol.value.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(sol.value - reference))) < 1e-3
    np.testing.assert_allclose(np.asarray(reference), closed_form(X0, grid(T)), atol=1e-5)
    assert int(sol.stats["num_steps"]) < T // 2


def test_stochastic_sampler_with_noise_drawn_up_front():
    T = 120
    abar = grid(T)
    key = jax.random.key(7)
    reference = fp.ddim_sample(gaussian_eps, X0, abar, identity, eta=1.0, key=key)
    deterministic = fp.ddim_sample(gaussian_eps, X0, abar, identity)
    assert float(jnp.max(jnp.abs(reference - deterministic))) > 0.1  # the noise matters
    sol = fp.picard_sample(
        gaussian_eps, X0, abar, identity, eta=1.0, key=key, window=24, tol=1e-6, return_trajectory=True
    )
    assert sol.converged
    assert float(jnp.max(jnp.abs(sol.value - reference))) < 1e-6
    path = fp.ddim_sample(gaussian_eps, X0, abar, identity, eta=1.0, key=key, return_trajectory=True)
    assert sol.aux.shape == path.shape
    assert float(jnp.max(jnp.abs(sol.aux - path))) < 1e-6
    assert int(sol.stats["num_steps"]) < T // 2


def test_window_of_one_is_the_sequential_sampler():
    T = 30
    abar = grid(T)
    sol = fp.picard_sample(gaussian_eps, X0, abar, identity, window=1, tol=0.5)
    assert sol.converged
    assert int(sol.stats["num_steps"]) == T and int(sol.stats["num_fn_evals"]) == T
    reference = fp.ddim_sample(gaussian_eps, X0, abar, identity)
    np.testing.assert_allclose(np.asarray(sol.value), np.asarray(reference), rtol=0, atol=1e-14)


def test_nan_denoiser_is_nonfinite_never_successful():
    abar = grid(40)
    bad = lambda x, a: jnp.where(a > 0.5, jnp.nan, 1.0) * gaussian_eps(x, a)
    sol = fp.picard_sample(bad, X0, abar, identity, window=8, throw=False)
    assert sol.result == fpx.RESULTS.nonfinite
    assert not bool(sol.converged)
    with pytest.raises(Exception, match="picard_sample hit a non-finite value"):
        jax.block_until_ready(fp.picard_sample(bad, X0, abar, identity, window=8).value)


def test_too_few_rounds_is_max_steps_reached_never_successful():
    abar = grid(100)
    sol = fp.picard_sample(gaussian_eps, X0, abar, identity, window=8, tol=1e-6, max_steps=5, throw=False)
    assert sol.result == fpx.RESULTS.max_steps_reached
    assert int(sol.stats["num_steps"]) == 5
    assert float(sol.stats["residual_norm"]) > 1e-6
    with pytest.raises(Exception, match=r"did not converge within max_steps=5 parallel rounds"):
        jax.block_until_ready(fp.picard_sample(gaussian_eps, X0, abar, identity, window=8, tol=1e-6, max_steps=5).value)


def test_vmap_over_initial_noises_and_jit():
    T = 80
    abar = grid(T)
    noises = jax.random.normal(jax.random.key(1), (4, 6))
    keys = jax.random.split(jax.random.key(2), 4)

    @jax.jit
    def run(x, key):
        sol = fp.picard_sample(gaussian_eps, x, abar, identity, eta=0.5, key=key, window=16, tol=1e-7)
        return sol.value, sol.result, sol.stats["num_steps"]

    values, results, rounds = jax.vmap(run)(noises, keys)
    assert bool(jnp.all(results == fpx.RESULTS.successful))
    for i in range(4):
        reference = fp.ddim_sample(gaussian_eps, noises[i], abar, identity, eta=0.5, key=keys[i])
        assert float(jnp.max(jnp.abs(values[i] - reference))) < 1e-7
    assert rounds.shape == (4,) and int(rounds.max()) < T // 2
    # A failure of one member under vmap raises once for the batch.
    batched = jax.jit(jax.vmap(lambda x: fp.picard_sample(gaussian_eps, x, abar, identity, max_steps=2).value))
    with pytest.raises(Exception, match="did not converge within max_steps=2"):
        jax.block_until_ready(batched(noises))


def test_bad_arguments_raise_clear_errors():
    abar = grid(10)
    with pytest.raises(ValueError, match=r"must increase strictly"):
        fp.picard_sample(gaussian_eps, X0, abar[::-1], identity)
    with pytest.raises(ValueError, match=r"must increase strictly"):
        fp.ddim_sample(gaussian_eps, X0, jnp.linspace(0.0, 1.0, 11), identity)
    with pytest.raises(ValueError, match=r"is stochastic: pass `key=jax.random.key"):
        fp.picard_sample(gaussian_eps, X0, abar, identity, eta=1.0)
    with pytest.raises(ValueError, match=r"`picard_sample\(eta=...\)` must lie in \[0, 1\]"):
        fp.picard_sample(gaussian_eps, X0, abar, identity, eta=2.0, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"`picard_sample\(window=...\)` must be a positive integer"):
        fp.picard_sample(gaussian_eps, X0, abar, identity, window=0)
    with pytest.raises(ValueError, match=r"`picard_sample\(tol=...\)` must be a non-negative number"):
        fp.picard_sample(gaussian_eps, X0, abar, identity, tol=-1.0)
    with pytest.raises(ValueError, match=r"`picard_sample\(max_steps=...\)` must be a positive integer"):
        fp.picard_sample(gaussian_eps, X0, abar, identity, max_steps=0)
    with pytest.raises(ValueError, match=r"eps\(x, t\) must return an array of the shape and dtype of x"):
        fp.picard_sample(lambda x, t: x[0], X0, abar, identity)
    with pytest.raises(ValueError, match=r"1-D array of the T\+1 >= 2 times"):
        fp.picard_sample(gaussian_eps, X0, abar[:1], identity)
    with pytest.raises(ValueError, match=r"one real alpha_bar per time"):
        fp.picard_sample(gaussian_eps, X0, abar, abar[:-1])
    with pytest.raises(TypeError, match=r"`picard_sample\(x_init=...\)` must be a floating-point array"):
        fp.picard_sample(gaussian_eps, jnp.zeros((3,), jnp.int32), abar, identity)
    with pytest.raises(TypeError, match="must be a denoiser"):
        fp.ddim_sample(None, X0, abar, identity)
