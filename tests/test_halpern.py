"""Halpern with adaptive restarts (`Halpern(restart=theta)`): worst-case O(1/k) kept, linear rate on contractions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fpx

A1 = jnp.array([[0.5, 0.25], [0.25, 0.5]])  # T1 of tests/test_solvers.py: z* = (4, 4), rate 0.75


def t1(z, _):
    return A1 @ z + 1.0


def rotation(theta):
    m = jnp.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    return lambda z, _: m @ z


def _trace(sol):
    return np.asarray(sol.stats["residual_trace"])


def test_default_is_plain_halpern():
    assert fpx.Halpern().restart is None
    assert "num_restarts" not in fpx.fixed_point(rotation(math.pi / 2), jnp.array([1.0, 0.0]), solver=fpx.Halpern()).stats


@pytest.mark.parametrize("theta", [0.5, 1 / math.e])
def test_linear_rate_on_a_contraction_of_unknown_rate(theta):
    picard = fpx.fixed_point(t1, jnp.zeros(2), solver=fpx.Picard(rtol=0.0, atol=1e-10))
    assert int(picard.stats["num_steps"]) == 82
    length = 400
    sol = fpx.fixed_point(
        t1, jnp.zeros(2), solver=fpx.Halpern(restart=theta, rtol=0.0, atol=1e-10), max_steps=length - 1, trace_length=length
    )
    np.testing.assert_allclose(sol.value, [4.0, 4.0], atol=1e-9)
    steps = int(sol.stats["num_steps"])
    # Measured: 200 (theta = 1/2) and 222 (1/e) steps, against Picard's 82; plain Halpern
    # would need about 6e10 (its residual here is exactly 4 sqrt(2) (1 - 0.75^(k+1)) / (k+1)).
    assert steps <= 3 * 82
    # Linear: each restart cuts the anchor residual by theta or more, and an epoch lasts at
    # most 2 / (theta (1 - rho)) steps (Halpern's bound with |a - z*| <= r_a / (1 - rho)).
    restarts = int(sol.stats["num_restarts"])
    tr = _trace(sol)[: steps + 1]
    assert restarts <= math.log(tr[0] / tr[-2]) / math.log(1 / theta) + 1
    assert steps <= (restarts + 1) * math.ceil(2 / (theta * (1 - 0.75)))


@pytest.mark.parametrize("angle", [math.pi / 2, 1.0, 0.05])
@pytest.mark.parametrize("theta", [0.5, 0.2, 0.8])
def test_worst_case_bound_on_rotations(angle, theta):
    """Nonexpansive T: min_{i<=k} |z_i - T z_i| <= 2 |z0 - z*| / (theta (1 - theta) k).

    Each epoch is plain Halpern from its anchor a (|a - z*| <= |z0 - z*|, Halpern never
    moves away from a fixed point), so it ends within 2 |z0 - z*| / (theta r_a) steps; the
    anchor residuals fall geometrically, so the epochs up to the current one sum to at most
    2 |z0 - z*| / ((1 - theta) theta r_current). theta = 1/2 gives 8 |z0 - z*| / k.
    """
    z0 = jnp.array([3.0, -1.0])
    d0 = math.sqrt(10.0)  # the only fixed point is 0
    length = 2000
    sol = fpx.fixed_point(
        rotation(angle), z0, solver=fpx.Halpern(restart=theta, rtol=0.0, atol=0.0),
        max_steps=length - 1, throw=False, trace_length=length,
    )
    n = int(sol.stats["num_steps"]) + 1  # it may stop early, at a residual of exactly 0
    tr = _trace(sol)[:n]
    k = np.arange(1, n)
    best = np.minimum.accumulate(tr)[1:]
    bound = 2 * d0 / (theta * (1 - theta) * k)
    assert np.all(best <= bound * (1 + 1e-12))
    # the first epoch is plain Halpern's
    plain = fpx.fixed_point(
        rotation(angle), z0, solver=fpx.Halpern(rtol=0.0, atol=0.0), max_steps=length - 1, throw=False, trace_length=length
    )
    first = min(int(np.argmax(tr[1:] <= theta * tr[0])) + 2, n)  # iterates before the first restart takes effect
    np.testing.assert_allclose(tr[:first], _trace(plain)[:first], rtol=1e-13, atol=1e-15)


def test_rotation_converges_linearly_with_restarts():
    # I - R is invertible for a rotation (a sharp problem: |z - z*| <= |z - R z| / |1 - e^{i angle}|),
    # so restarts give a linear rate where plain Halpern stays at O(1/k).
    z0 = jnp.array([1.0, 0.0])
    restarted = fpx.fixed_point(rotation(1.0), z0, solver=fpx.Halpern(restart=0.5, rtol=0.0, atol=1e-12), max_steps=1000)
    plain = fpx.fixed_point(rotation(1.0), z0, solver=fpx.Halpern(rtol=0.0, atol=1e-12), max_steps=1000, throw=False)
    assert restarted.converged and int(restarted.stats["num_steps"]) < 200
    assert not plain.converged


def douglas_rachford(project_a, project_b):
    def T(z, _):
        a = project_a(z)
        return z + project_b(2 * a - z) - a

    return T


def test_infeasible_parallel_lines_are_detected():
    # T z = z + (-1, 0)... every Halpern step moves by v/2, restart or not: drift law k/2.
    T = douglas_rachford(lambda z: z.at[0].set(0.0), lambda z: z.at[0].set(1.0))
    sol = fpx.fixed_point(
        T, jnp.array([0.3, -2.0]), solver=fpx.Halpern(restart=0.5), detect_infeasible=True, throw=False, max_steps=500
    )
    assert sol.result == fpx.RESULTS.infeasible
    np.testing.assert_allclose(sol.stats["displacement"], [-1.0, 0.0], atol=1e-10)


def test_infeasible_disjoint_balls_are_detected():
    def ball(center):
        center = jnp.asarray(center)
        return lambda z: center + (z - center) / jnp.maximum(1.0, jnp.linalg.norm(z - center))

    sol = fpx.fixed_point(
        douglas_rachford(ball([0.0, 0.0]), ball([3.0, 0.0])), jnp.array([0.3, -2.0]),
        solver=fpx.Halpern(restart=0.5), detect_infeasible=True, throw=False, max_steps=3000,
    )
    assert sol.result == fpx.RESULTS.infeasible
    assert np.linalg.norm(np.asarray(sol.stats["displacement"]) - np.array([-1.0, 0.0])) <= 0.02


def test_feasible_contraction_is_solved_not_flagged():
    sol = fpx.fixed_point(t1, jnp.zeros(2), solver=fpx.Halpern(restart=0.5), detect_infeasible=True, max_steps=2000)
    assert sol.result == fpx.RESULTS.successful
    np.testing.assert_allclose(sol.value, [4.0, 4.0], atol=1e-3)


def test_truth_rules_hold():
    expansive = fpx.fixed_point(lambda z, _: 1.5 * z + 1.0, jnp.zeros(2, jnp.float32), solver=fpx.Halpern(restart=0.5), throw=False)
    assert expansive.result == fpx.RESULTS.diverged
    translation = fpx.fixed_point(lambda z, _: z + 1.0, jnp.zeros(2), solver=fpx.Halpern(restart=0.5, rtol=1e-3), max_steps=3000, throw=False)
    assert translation.result == fpx.RESULTS.diverged


def test_jit_vmap_mixed_members_and_gradient():
    def solve(c):
        return fpx.fixed_point(lambda z, c: c * z + 1.0, jnp.zeros(3), c,
                               solver=fpx.Halpern(restart=0.5, rtol=0.0, atol=1e-10), max_steps=2000, throw=False)

    sol = jax.jit(jax.vmap(solve))(jnp.array([0.5, 0.95, 1.5]))
    assert [bool(x) for x in np.asarray(sol.converged)] == [True, True, False]
    assert int(sol.result._value[2]) == int(fpx.RESULTS.diverged._value)
    np.testing.assert_allclose(np.asarray(sol.value)[:2], [[2.0] * 3, [20.0] * 3], atol=1e-8)
    steps = np.asarray(sol.stats["num_steps"])
    assert steps[0] < steps[1] < 2000  # each member stops on its own test

    def loss(c):
        return jnp.sum(fpx.fixed_point(lambda z, c: c * jnp.tanh(z) + 1.0, jnp.zeros(3), c,
                                       solver=fpx.Halpern(restart=0.5, rtol=0.0, atol=1e-12), max_steps=2000).value)

    grad = float(jax.grad(loss)(0.5))
    eps = 1e-6
    np.testing.assert_allclose(grad, (loss(0.5 + eps) - loss(0.5 - eps)) / (2 * eps), rtol=1e-6)


def test_arguments_are_validated():
    for bad in (0.0, 1.0, 1.5, -0.1, math.nan):
        with pytest.raises(ValueError, match=r"Halpern\(restart=\.\.\.\)` must lie in \(0, 1\)"):
            fpx.Halpern(restart=bad)
    with pytest.raises(TypeError, match=r"restart"):
        fpx.Halpern(restart="yes")
    with pytest.raises(ValueError, match="exclude each other"):
        fpx.Halpern(contraction=0.5, restart=0.5)
    assert fpx.Halpern(0.3).contraction == 0.3  # the first positional argument is unchanged
