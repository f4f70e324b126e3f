"""`successful` means solved: divergent maps, maps without a fixed point, overflow, bad tolerances.

Every case from the issue that reported a diverging or drifting solve as converged, with
default settings, in float32 and float64, jitted and under `vmap` with mixed members.
"""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fpx

R = fpx.RESULTS
DRIFTING_SOLVERS = [fpx.Picard(), fpx.KM(), fpx.Halpern(), fpx.Anderson(), fpx.Broyden()]
ALL_SOLVERS = DRIFTING_SOLVERS + [fpx.NewtonKrylov()]
IDS = lambda s: type(s).__name__  # noqa: E731


def expansive(z, _):
    return 1.5 * z + 1.0  # fixed point -2, repelling


def translation(z, _):
    return z + 1.0  # no fixed point


@pytest.mark.parametrize("solver", [fpx.Picard(), fpx.KM(), fpx.Halpern()], ids=IDS)
@pytest.mark.parametrize("n", [2, 64])
def test_expansive_map_is_not_successful_in_float32_with_defaults(solver, n):
    z0 = jnp.zeros(n, jnp.float32)
    sol = fpx.fixed_point(expansive, z0, solver=solver, throw=False)
    assert sol.result == R.diverged
    assert not sol.converged
    # It stops at the first millionfold growth of the residual, long before float32
    # overflow (1.5**107 ~ 1e19 was reported as success): the residual grows by 1.5 per
    # step under Picard (1.5**35 > 1e6) and by 1.25 under KM(1/2) (1.25**62 > 1e6).
    expected = {"Picard": 35, "KM": 62}.get(type(solver).__name__)
    steps = int(sol.stats["num_steps"])
    assert steps == expected if expected else steps < 100
    with pytest.raises(Exception, match="diverged"):
        jax.block_until_ready(fpx.fixed_point(expansive, z0, solver=solver).value)


def test_expansive_map_in_float64_with_many_steps():
    sol = fpx.fixed_point(expansive, jnp.zeros(2), max_steps=5000, throw=False)
    assert sol.result == R.diverged
    # Residual grows by exactly 1.5 per step from r0 = |(0,0) - (1,1)| = sqrt(2): the first
    # k with 1.5**k > 1e6 is 35.
    assert int(sol.stats["num_steps"]) == 35


def test_overflowing_iterate_has_a_finite_norm():
    big = jnp.full(8, 1e20, jnp.float32)
    assert jnp.isfinite(fpx.two_norm(big))
    np.testing.assert_allclose(float(fpx.two_norm(big)), 1e20 * np.sqrt(8), rtol=1e-6)
    np.testing.assert_allclose(float(fpx.rms_norm(big)), 1e20, rtol=1e-6)


@pytest.mark.parametrize("solver", ALL_SOLVERS, ids=IDS)
def test_translation_without_fixed_point_is_never_successful(solver):
    # At rtol=1e-3 the relative test `|z - T z| <= rtol |z|` is met once |z| > 1414,
    # which Picard reached after 1000 steps and reported as success.
    solver = eqx.tree_at(lambda s: s.rtol, solver, 1e-3)
    sol = jax.jit(lambda z0: fpx.fixed_point(translation, z0, solver=solver, max_steps=3000, throw=False))(
        jnp.zeros(2)
    )
    assert not sol.converged
    expected = R.breakdown if isinstance(solver, fpx.NewtonKrylov) else R.diverged
    assert sol.result == expected, fpx.RESULTS[sol.result]


def test_translation_at_default_tolerances_in_float32():
    sol = fpx.fixed_point(translation, jnp.zeros(2, jnp.float32), max_steps=100_000, throw=False)
    assert sol.result == R.diverged
    with pytest.raises(Exception, match="diverged"):
        jax.block_until_ready(fpx.fixed_point(translation, jnp.zeros(2, jnp.float32), max_steps=2000).value)


def test_rotation_cycles_without_being_called_divergent():
    # Picard on a 90° rotation: the residual stays sqrt(2) but the iterate stays bounded.
    rot = lambda z, _: jnp.stack([-z[1], z[0]])  # noqa: E731
    sol = fpx.fixed_point(rot, jnp.array([1.0, 0.0]), max_steps=64, throw=False)
    assert sol.result == R.max_steps_reached


def test_vmap_mixed_members_each_report_their_own_truth():
    def solve(kind):
        fn = lambda z, k: jnp.where(k == 0, 0.5 * z + 1.0, jnp.where(k == 1, z + 1.0, 1.5 * z + 1.0))  # noqa: E731
        return fpx.fixed_point(fn, jnp.zeros(3, jnp.float32), kind, max_steps=500, throw=False)

    sol = jax.jit(jax.vmap(solve))(jnp.array([0, 1, 2, 0]))
    assert [int(r) for r in sol.result._value] == [
        int(R.successful._value),
        int(R.diverged._value),
        int(R.diverged._value),
        int(R.successful._value),
    ]
    np.testing.assert_allclose(sol.value[0], 2.0, rtol=1e-4)
    # Each member stops on its own test: the contraction after ~20 steps, the expansive
    # member when its residual passes 1e6 x the start (35 steps), the drifting one at max_steps.
    steps = [int(s) for s in sol.stats["num_steps"]]
    assert steps[1] == 500 and steps[2] == 35 and steps[0] == steps[3] < 40


def test_throw_under_vmap_raises_for_a_divergent_member():
    solve = lambda c: fpx.fixed_point(lambda z, c: c * z + 1.0, jnp.zeros(()), c)  # noqa: E731
    with pytest.raises(Exception, match="diverged"):
        jax.block_until_ready(jax.jit(jax.vmap(solve))(jnp.array([0.5, 1.5])).value)


def test_deq_with_an_expansive_cell_is_not_converged():
    # Picard on z -> 1.5 z + x runs away from the repelling fixed point -2x; it used to end
    # "converged" at |z| ~ 9e18 in float32.
    layer = fpx.nn.DEQ(lambda z, x: 1.5 * z + x, solver=fpx.Picard(), throw=False)
    z, stats = layer(jnp.ones(4, jnp.float32), z0=jnp.zeros(4, jnp.float32))
    assert not bool(stats["converged"])
    assert bool(jnp.all(jnp.isfinite(z)))
    # Anderson finds that repelling fixed point, which is a true solution.
    z, stats = fpx.nn.DEQ(lambda z, x: 1.5 * z + x, throw=False)(jnp.ones(4), z0=jnp.zeros(4))
    assert bool(stats["converged"])
    np.testing.assert_allclose(z, -2.0 * jnp.ones(4), rtol=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: fpx.Picard(atol=float("inf")),
        lambda: fpx.Anderson(rtol=float("inf")),
        lambda: fpx.KM(rtol=float("nan")),
        lambda: fpx.Picard(rtol=-1e-3),
    ],
)
def test_non_finite_or_negative_tolerances_are_refused(make):
    with pytest.raises(ValueError, match="tol"):
        make()


def test_tolerance_below_the_dtype_resolution_warns():
    z0 = jnp.ones(3, jnp.bfloat16)
    with pytest.warns(UserWarning, match="below the resolution of bfloat16"):
        fpx.fixed_point(lambda z, _: (0.5 * z).astype(z.dtype), z0, throw=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fpx.fixed_point(lambda z, _: (0.5 * z).astype(z.dtype), z0, solver=fpx.Picard(rtol=1e-2), throw=False)


def test_traced_tolerances_still_work_in_a_vmapped_sweep():
    def solve(rtol):
        return fpx.fixed_point(lambda z, _: 0.9 * z + 1.0, jnp.zeros(()), solver=fpx.Picard(rtol=rtol, atol=0.0), throw=False)

    sol = jax.vmap(solve)(jnp.array([1e-2, 1e-6]))
    assert bool(jnp.all(sol.converged))
    assert int(sol.stats["num_steps"][0]) < int(sol.stats["num_steps"][1])


def test_newton_krylov_reports_breakdown_where_newton_cannot_move():
    # T(z) = z + 1 has I - T' = 0: GMRES finds no direction and the line search no decrease.
    sol = fpx.fixed_point(translation, jnp.zeros(2), solver=fpx.NewtonKrylov(), throw=False)
    assert sol.result == R.breakdown
    assert int(sol.stats["num_steps"]) == 3  # max_stalls steps without any decrease
    with pytest.raises(Exception, match="broke down"):
        jax.block_until_ready(fpx.fixed_point(translation, jnp.zeros(2), solver=fpx.NewtonKrylov()).value)


def test_every_result_code_is_produced_somewhere():
    produced = {
        "successful": fpx.fixed_point(lambda z, _: 0.5 * z, jnp.ones(2), throw=False),
        "max_steps_reached": fpx.fixed_point(lambda z, _: 0.99 * z + 1, jnp.zeros(2), max_steps=3, throw=False),
        "nonfinite": fpx.fixed_point(lambda z, _: z + jnp.nan, jnp.zeros(2), throw=False),
        "infeasible": fpx.fixed_point(translation, jnp.zeros(2), detect_infeasible=True, throw=False),
        "diverged": fpx.fixed_point(expansive, jnp.zeros(2), throw=False),
        "breakdown": fpx.fixed_point(translation, jnp.zeros(2), solver=fpx.NewtonKrylov(), throw=False),
    }
    for name, sol in produced.items():
        assert sol.result == getattr(R, name), name
    # The backward solve's own code comes from the report its probe receives.
    loss = lambda a, probe: fpx.fixed_point(  # noqa: E731
        lambda z, a: z - z**3 + a, jnp.zeros(2), a, throw=False, backward_probe=probe
    ).value.sum()
    _, report = jax.grad(loss, argnums=(0, 1))(jnp.zeros(2), fpx.backward_probe())
    assert fpx.backward_result(report) == R.backward_failed
    fine = lambda a, probe: fpx.fixed_point(  # noqa: E731
        lambda z, a: 0.5 * jnp.cos(z) + a, jnp.zeros(2), a, backward_probe=probe
    ).value.sum()
    _, report = jax.grad(fine, argnums=(0, 1))(jnp.ones(2), fpx.backward_probe())
    assert fpx.backward_result(report) == R.successful
    produced["backward_failed"] = None
    listed = {name for name in R._name_to_item}
    assert listed == set(produced)
