"""`fixed_point` under `vmap`: the batched driver (one loop for the batch, finished members
stepping on unmasked) gives every member exactly what its own solve gives.

Each test solves a batch whose members stop at different steps and for different reasons
(converged, diverged, non-finite, out of steps), once vmapped and once member by member,
and compares values, result codes, step counts and every solver statistic.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fpx

A = jnp.array([[0.5, 0.25], [0.25, 0.5]])


def affine(z, c):
    """Contraction for |c| < 4/3 (spectral radius 0.75 |c|); divergent beyond."""
    return c * (A @ z) + 1.0


def assert_same(batched, singles):
    for i, one in enumerate(singles):
        assert int(batched.result._value[i]) == int(one.result._value), i
        for key, value in one.stats.items():
            np.testing.assert_allclose(np.asarray(batched.stats[key])[i], np.asarray(value), rtol=1e-12, err_msg=f"{key}[{i}]")
        np.testing.assert_allclose(np.asarray(batched.value)[i], np.asarray(one.value), rtol=1e-12, atol=1e-300)


SOLVERS = [
    fpx.Picard(),
    fpx.KM(alpha=0.5),
    fpx.Halpern(restart=0.5),
    fpx.Anderson(),
    fpx.Broyden(),
    fpx.NewtonKrylov(),
    fpx.SQUAREM(),
]


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_mixed_members_match_their_own_solves(solver):
    # Converges fast, converges slowly, diverges (c = 2: spectral radius 1.5).
    cs = jnp.array([0.2, 1.2, 2.0])

    def solve(c):
        return fpx.fixed_point(affine, jnp.zeros(2), c, solver=solver, max_steps=300, throw=False)

    batched = jax.jit(jax.vmap(solve))(cs)
    singles = [jax.jit(solve)(c) for c in cs]
    assert_same(batched, singles)
    assert int(batched.result._value[0]) == int(fpx.RESULTS.successful._value)


def test_a_finished_members_counters_stay_its_own():
    # Member 0 converges in a few Anderson steps; member 1 needs the safeguard (rejections)
    # for many more. Member 0's counters must not tick on while member 1 runs.
    def fn(z, c):
        return jnp.cos(c * z)

    def solve(c):
        return fpx.fixed_point(fn, jnp.zeros(3), c, solver=fpx.Anderson(), max_steps=200, throw=False)

    cs = jnp.array([0.3, 3.0])
    batched = jax.vmap(solve)(cs)
    singles = [solve(c) for c in cs]
    assert_same(batched, singles)
    steps = np.asarray(batched.stats["num_steps"])
    assert steps[0] < steps[1]


def test_nonfinite_and_out_of_steps_members_beside_a_converged_one():
    def fn(z, c):
        return jnp.where(c > 5, jnp.log(z - 10.0), c * z + 1.0)

    def solve(c):
        return fpx.fixed_point(fn, jnp.ones(2), c, solver=fpx.Picard(), max_steps=40, throw=False, trace_length=8)

    cs = jnp.array([0.5, 0.999, 9.0])
    batched = jax.vmap(solve)(cs)
    singles = [solve(c) for c in cs]
    assert [int(r) for r in batched.result._value] == [
        int(fpx.RESULTS.successful._value),
        int(fpx.RESULTS.max_steps_reached._value),
        int(fpx.RESULTS.nonfinite._value),
    ]
    assert_same(batched, singles)


def test_batched_z0_args_and_tolerances_alone_or_together():
    zs = jnp.array([[0.0, 0.0], [5.0, -3.0]])
    cs = jnp.array([0.4, 0.9])
    rtols = jnp.array([1e-3, 1e-10])

    def solve(z0, c, rtol):
        return fpx.fixed_point(affine, z0, c, solver=fpx.Picard(rtol=rtol, atol=0.0), throw=False)

    for in_axes in [(0, None, None), (None, 0, None), (None, None, 0), (0, 0, 0)]:
        args = [full if axis == 0 else full[0] for full, axis in zip((zs, cs, rtols), in_axes)]
        batched = jax.vmap(solve, in_axes=in_axes)(*args)
        singles = [solve(*(a[i] if axis == 0 else a for a, axis in zip(args, in_axes))) for i in range(2)]
        assert_same(batched, singles)


def test_nested_vmap_and_vmap_inside_jit_inside_vmap():
    cs = jnp.array([[0.1, 0.7], [1.1, 2.5]])

    def solve(c):
        return fpx.fixed_point(affine, jnp.zeros(2), c, solver=fpx.Anderson(), throw=False)

    nested = jax.vmap(jax.vmap(solve))(cs)
    inner_jit = jax.vmap(jax.jit(jax.vmap(solve)))(cs)
    for i in range(2):
        singles = [solve(c) for c in cs[i]]
        assert_same(jax.tree_util.tree_map(lambda x: x[i], nested), singles)
        assert_same(jax.tree_util.tree_map(lambda x: x[i], inner_jit), singles)


def test_infeasibility_detection_per_member():
    # Member 0: a translation (no fixed point, displacement 1 per step); member 1: a contraction.
    def fn(z, shift):
        return jnp.where(shift > 0, z + shift, 0.5 * z + 1.0)

    def solve(shift):
        return fpx.fixed_point(fn, jnp.zeros(2), shift, detect_infeasible=True, max_steps=500, throw=False)

    shifts = jnp.array([1.0, 0.0])
    batched = jax.vmap(solve)(shifts)
    singles = [solve(s) for s in shifts]
    assert int(batched.result._value[0]) == int(fpx.RESULTS.infeasible._value)
    assert int(batched.result._value[1]) == int(fpx.RESULTS.successful._value)
    assert_same(batched, singles)
    np.testing.assert_allclose(np.asarray(batched.stats["displacement"])[0], [-1.0, -1.0], rtol=1e-2)


def test_gradients_and_tangents_of_a_vmapped_solve():
    cs = jnp.array([0.3, 0.9])

    def loss(c):
        return fpx.fixed_point(affine, jnp.zeros(2), c, solver=fpx.Picard(rtol=1e-12, atol=0.0)).value.sum()

    # z* = (I - c A)^{-1} 1, and A 1 = 0.75 * 1, so sum z* = 2 / (1 - 0.75 c).
    exact = 2 * 0.75 / (1 - 0.75 * cs) ** 2
    np.testing.assert_allclose(jax.vmap(jax.grad(loss))(cs), exact, rtol=1e-9)
    np.testing.assert_allclose(jax.grad(lambda c: jax.vmap(loss)(c).sum())(cs), exact, rtol=1e-9)
    _, tangent = jax.jvp(jax.vmap(loss), (cs,), (jnp.ones(2),))
    np.testing.assert_allclose(tangent, exact, rtol=1e-9)
