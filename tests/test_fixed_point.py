"""The shared driver: pytrees, jit/vmap/grad composition, throw, traces, input errors."""

import re
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fpx

A = jnp.array([[0.5, 0.25], [0.25, 0.5]])


def linear(z, b):
    return A @ z + b


def test_returns_solution_with_stats():
    sol = fpx.fixed_point(linear, jnp.zeros(2), jnp.ones(2), solver=fpx.Picard(rtol=0, atol=1e-10), max_steps=500)
    assert isinstance(sol, fpx.Solution)
    assert sol.result == fpx.RESULTS.successful
    assert bool(sol.converged)
    np.testing.assert_allclose(sol.value, [4.0, 4.0], atol=1e-9)
    k = int(sol.stats["num_steps"])
    # Picard residual is sqrt(2) * 0.75^k: the first k with sqrt(2) 0.75^k <= 1e-10.
    assert k == int(np.ceil(np.log(1e-10 / np.sqrt(2)) / np.log(0.75)))
    assert int(sol.stats["num_fn_evals"]) == k + 1
    assert float(sol.stats["residual_norm"]) <= 1e-10


def test_already_converged_start_takes_no_step():
    sol = fpx.fixed_point(linear, jnp.array([4.0, 4.0]), jnp.ones(2))
    assert int(sol.stats["num_steps"]) == 0
    assert sol.result == fpx.RESULTS.successful


def test_residual_trace_is_nan_padded():
    sol = fpx.fixed_point(linear, jnp.zeros(2), jnp.ones(2), solver=fpx.Picard(rtol=0, atol=1e-3), trace_length=64)
    trace = np.asarray(sol.stats["residual_trace"])
    k = int(sol.stats["num_steps"])
    assert trace.shape == (64,)
    np.testing.assert_allclose(trace[: k + 1], np.sqrt(2) * 0.75 ** np.arange(k + 1), rtol=1e-12)
    assert np.all(np.isnan(trace[k + 1 :]))


def test_trace_shorter_than_run_keeps_first_entries():
    sol = fpx.fixed_point(linear, jnp.zeros(2), jnp.ones(2), solver=fpx.Picard(rtol=0, atol=1e-10), trace_length=4, max_steps=500)
    np.testing.assert_allclose(sol.stats["residual_trace"], np.sqrt(2) * 0.75 ** np.arange(4), rtol=1e-12)


def test_pytree_with_mixed_float_dtypes():
    z0 = {"a": jnp.zeros(3, jnp.float32), "b": (jnp.zeros((), jnp.float64), jnp.zeros((2, 2)))}

    def fn(z, _):
        return {
            "a": (0.5 * z["a"] + 1).astype(jnp.float32),
            "b": (0.5 * z["b"][0] + 2, 0.25 * z["b"][1] + jnp.eye(2)),
        }

    for solver in [fpx.Picard(), fpx.KM(), fpx.Halpern(contraction=0.5), fpx.Anderson(), fpx.Broyden(), fpx.NewtonKrylov()]:
        sol = fpx.fixed_point(fn, z0, solver=solver, max_steps=2000)
        assert sol.value["a"].dtype == jnp.float32
        assert sol.value["b"][0].dtype == jnp.float64
        np.testing.assert_allclose(sol.value["a"], 2.0, rtol=1e-4)
        np.testing.assert_allclose(sol.value["b"][0], 4.0, rtol=1e-4)
        np.testing.assert_allclose(sol.value["b"][1], jnp.eye(2) / 0.75, rtol=1e-4)


def test_jit_vmap_and_nested_vmap():
    def steps(c):
        return fpx.fixed_point(lambda z, c: c * z + 1.0, jnp.zeros(()), c, throw=False).stats["num_steps"]

    cs = jnp.array([[0.1, 0.5], [0.9, 0.2]])
    nested = jax.jit(jax.vmap(jax.vmap(steps)))(cs)
    single = np.array([[int(steps(c)) for c in row] for row in cs])
    np.testing.assert_array_equal(nested, single)
    assert len(np.unique(single)) == 4  # every member stopped on its own test


def test_vmap_mixed_convergent_and_divergent_members():
    def solve(c):
        return fpx.fixed_point(lambda z, c: c * z + 1.0, jnp.zeros(()), c, max_steps=100, throw=False)

    sol = jax.jit(jax.vmap(solve))(jnp.array([0.5, 2.0, 0.9, 1e8, jnp.inf]))
    R = fpx.RESULTS
    # c = 2: the residual doubles every step and passes 1e6 x its start at step 20;
    # c = 1e8: a millionfold growth at the first step; c = inf: inf * 0 = NaN at z0.
    expected = [R.successful, R.diverged, R.successful, R.diverged, R.nonfinite]
    for i, want in enumerate(expected):
        assert bool((sol.result == want)[i])
    np.testing.assert_allclose(sol.value[0], 2.0, rtol=1e-4)
    np.testing.assert_allclose(sol.value[2], 10.0, rtol=1e-4)
    # Failed members return their best (smallest-residual) iterate, which is finite.
    assert np.all(np.isfinite(np.asarray(sol.value)))
    # c = 2: residual 2**k from r0 = 1, so the first k with 2**k > 1e6 is 20.
    assert int(sol.stats["num_steps"][1]) == 20
    assert int(sol.stats["num_steps"][3]) == 1


def test_nonfinite_is_reported_not_converged():
    sol = fpx.fixed_point(lambda z, _: z * jnp.inf, jnp.ones(2), throw=False)
    assert sol.result == fpx.RESULTS.nonfinite
    np.testing.assert_array_equal(sol.value, jnp.ones(2))


def test_closure_over_traced_values_grad_and_vmap():
    def outer(c):
        return fpx.fixed_point(lambda z, _: c * jnp.sin(z) + 1.0, jnp.zeros(2), solver=fpx.Anderson(rtol=0, atol=1e-12)).value.sum()

    c = 0.5
    fd = (outer(c + 1e-6) - outer(c - 1e-6)) / 2e-6
    np.testing.assert_allclose(jax.grad(outer)(c), fd, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(outer)(jnp.asarray(c)), fd, rtol=1e-6)
    batched = jax.vmap(jax.grad(outer))(jnp.array([0.1, 0.5]))
    np.testing.assert_allclose(batched[1], fd, rtol=1e-6)


def test_throw_raises_readable_error_eagerly_and_under_jit():
    def solve(b):
        return fpx.fixed_point(linear, jnp.zeros(2), b, solver=fpx.Halpern(), max_steps=20).value

    pattern = r"Halpern did not converge within max_steps=20: after 20 steps the best residual"
    with pytest.raises(fpx.FixedPointError, match=pattern):
        solve(jnp.ones(2))
    with pytest.raises(Exception, match=pattern) as info:
        jax.jit(solve)(jnp.ones(2)).block_until_ready()
    assert "Increase `max_steps`" in str(info.value)


def test_throw_false_never_raises():
    sol = jax.jit(lambda b: fpx.fixed_point(linear, jnp.zeros(2), b, solver=fpx.Halpern(), max_steps=20, throw=False))(jnp.ones(2))
    assert sol.result == fpx.RESULTS.max_steps_reached
    assert 0.1 < float(sol.stats["residual_norm"]) < 1.0


def test_throw_under_vmap_raises_for_the_failing_member():
    def solve(c):
        return fpx.fixed_point(lambda z, c: c * z + 1.0, jnp.zeros(()), c, max_steps=50).value

    # c = 0.999 converges, but far too slowly for 50 steps.
    with pytest.raises(Exception, match=r"Picard did not converge within max_steps=50"):
        jax.vmap(solve)(jnp.array([0.5, 0.999, 0.1])).block_until_ready()
    # c = 2: the residual grows by 2**k and passes the millionfold limit at step 20.
    with pytest.raises(Exception, match=r"Picard diverged: after 20 steps"):
        jax.vmap(solve)(jnp.array([0.5, 2.0, 0.1])).block_until_ready()


def test_result_messages_say_what_went_wrong_and_what_to_try():
    assert fpx.RESULTS[fpx.RESULTS.successful] == ""
    steps_msg = fpx.RESULTS[fpx.RESULTS.max_steps_reached]
    for remedy in ("Increase `max_steps`", "loosen `rtol`/`atol`", "`fpx.Anderson()`"):
        assert remedy in steps_msg
    nonfinite_msg = fpx.RESULTS[fpx.RESULTS.nonfinite]
    assert "NaN or inf" in nonfinite_msg
    assert "`fpx.KM(alpha=0.5)`" in nonfinite_msg
    assert "sol.stats['displacement']" in fpx.RESULTS[fpx.RESULTS.infeasible]


def _raised_message(fn, z0, **kwargs):
    with pytest.raises(fpx.FixedPointError) as info:
        fpx.fixed_point(fn, z0, **kwargs)
    return str(info.value)


def test_failure_message_names_solver_steps_residual_and_remedy():
    # T1 (DESIGN §9) stopped after 20 Picard steps: the best residual is the last one,
    # sqrt(2) 0.75^20 = 4.485e-03.
    msg = _raised_message(
        linear, jnp.zeros(2), args=jnp.ones(2), solver=fpx.Picard(rtol=0.0, atol=1e-10), max_steps=20
    )
    best = np.sqrt(2) * 0.75**20
    assert f"{best:.3e}" == "4.485e-03"
    assert msg.startswith(
        "fpx.fixed_point with Picard did not converge within max_steps=20: after 20 steps the best "
        "residual |z - T(z)| was 4.485e-03 (tolerance atol + rtol*|z| with rtol=0.0, atol=1e-10)."
    ), msg
    assert fpx.RESULTS[fpx.RESULTS.max_steps_reached] in msg  # what to try
    assert "Pass throw=False" in msg


def test_failure_message_for_a_nonfinite_iterate():
    # T z = 1/(1 - z) from 0: z1 = T(0) = 1 is the pole, so T(z1) = inf at step 1; the best
    # iterate is z0 with residual |0 - 1| = 1.
    msg = _raised_message(lambda z, _: 1.0 / (1.0 - z), jnp.zeros(()), solver=fpx.KM(1.0))
    assert msg.startswith(
        "fpx.fixed_point with KM hit a non-finite value (NaN or inf): after 1 steps the best "
        "residual |z - T(z)| was 1.000e+00"
    ), msg
    assert fpx.RESULTS[fpx.RESULTS.nonfinite] in msg
    assert "`fpx.KM(alpha=0.5)`" in msg


# ---------------------------------------------------------------- input errors


def test_error_output_structure_names_both():
    with pytest.raises(ValueError, match=r"same structure as z0") as info:
        fpx.fixed_point(lambda z, _: (z["a"], z["a"]), {"a": jnp.zeros(2)})
    assert "a: f64[2]" in str(info.value)


def test_error_output_shape_names_both():
    with pytest.raises(ValueError, match=re.escape("['a']: shape (2,) in z0 but (3,) in fn's output")):
        fpx.fixed_point(lambda z, _: {"a": jnp.zeros(3)}, {"a": jnp.zeros(2)})


def test_error_output_dtype():
    with pytest.raises(ValueError, match=r"dtype float32 in z0 but float64"):
        fpx.fixed_point(lambda z, _: z.astype(jnp.float64), jnp.zeros(2, jnp.float32))


def test_error_integer_z0():
    with pytest.raises(TypeError, match=r"floating-point arrays only.*int"):
        fpx.fixed_point(lambda z, _: z, jnp.zeros(2, jnp.int32))


@pytest.mark.parametrize("max_steps", [0, -3, 2.5, True])
def test_error_max_steps(max_steps):
    with pytest.raises(ValueError, match=r"`max_steps` must be a positive integer"):
        fpx.fixed_point(linear, jnp.zeros(2), jnp.ones(2), max_steps=max_steps)


def test_error_bad_solver_and_adjoint():
    with pytest.raises(TypeError, match=r"`solver` must be an fpx solver"):
        fpx.fixed_point(linear, jnp.zeros(2), jnp.ones(2), solver="picard")
    with pytest.raises(TypeError, match=r"`adjoint` must be an fpx adjoint"):
        fpx.fixed_point(linear, jnp.zeros(2), jnp.ones(2), adjoint="implicit")


# Tolerance and KM(alpha) validation: tests/test_solvers.py (test_negative_tolerances_are_rejected, ...).


def test_error_fn_raises_while_tracing_mentions_z0():
    def bad(z, _):
        return z @ jnp.ones((3, 3))

    with pytest.raises(Exception) as info:
        fpx.fixed_point(bad, jnp.zeros(2))
    assert "raised while tracing fn(z0, args) with z0: f64[2]" in "".join(getattr(info.value, "__notes__", []))


# ---------------------------------------------------------------- the solver protocol


class _CountingKM(fpx.AbstractFixedPointSolver):
    """A user-written solver: KM(1/2) whose state counts the steps (the init/step/terminate protocol)."""

    rtol: float = 0.0
    atol: float = 1e-10
    norm: Callable = fpx.two_norm
    stop_after: int | None = None
    stop_result: str = "successful"

    def init(self, fn, z0, fz0, args):
        return jnp.array(0)

    def step(self, fn, z, fz, args, state):
        z_next = 0.5 * (z + fz)
        return z_next, fn(z_next, args), state + 1

    def terminate(self, z, fz, residual_norm, state):
        if self.stop_after is None:
            return super().terminate(z, fz, residual_norm, state)
        return state >= self.stop_after, getattr(fpx.RESULTS, self.stop_result)

    def stats(self, state):
        return {"my_steps": state}


def test_user_solver_runs_in_the_driver_like_the_builtin_one():
    # On T1 the averaged map has eigenvalue 0.875 along (1, 1): residual sqrt(2) 0.875^k, and
    # the first k with sqrt(2) 0.875^k <= 1e-10 is 176 (tests/test_solvers.py).
    kw = dict(max_steps=500, throw=False, trace_length=200)
    mine = fpx.fixed_point(linear, jnp.zeros(2), jnp.ones(2), solver=_CountingKM(), **kw)
    builtin = fpx.fixed_point(linear, jnp.zeros(2), jnp.ones(2), solver=fpx.KM(0.5, rtol=0.0, atol=1e-10), **kw)
    assert mine.result == fpx.RESULTS.successful
    assert int(mine.stats["num_steps"]) == 176
    assert int(mine.stats["my_steps"]) == 176  # solver stats are merged into sol.stats
    assert int(mine.stats["num_fn_evals"]) == 177  # fn_evals_per_step = 1 by default
    np.testing.assert_array_equal(mine.stats["residual_trace"], builtin.stats["residual_trace"])
    np.testing.assert_array_equal(mine.value, builtin.value)
    k = np.arange(177)
    np.testing.assert_allclose(mine.stats["residual_trace"][:177], np.sqrt(2) * 0.875**k, rtol=1e-12, atol=1e-15)


def test_user_terminate_decides_when_and_how_the_solve_ends():
    sol = fpx.fixed_point(linear, jnp.zeros(2), jnp.ones(2), solver=_CountingKM(stop_after=50), throw=False)
    assert sol.result == fpx.RESULTS.successful
    assert int(sol.stats["num_steps"]) == 50
    # z_50 = 4 (1 - 0.875^50) (1, 1): the driver returns the iterate at which terminate stopped.
    np.testing.assert_allclose(sol.value, 4.0 * (1.0 - 0.875**50) * np.ones(2), rtol=1e-13)
    np.testing.assert_allclose(sol.stats["residual_norm"], np.sqrt(2) * 0.875**50, rtol=1e-12)
    # A solver may also stop with a failure of its own; the driver reports it as it is.
    failed = fpx.fixed_point(
        linear, jnp.zeros(2), jnp.ones(2), solver=_CountingKM(stop_after=3, stop_result="breakdown"), throw=False
    )
    assert failed.result == fpx.RESULTS.breakdown
    assert int(failed.stats["num_steps"]) == 3


def test_solver_without_step_cannot_be_built():
    class NoStep(fpx.AbstractFixedPointSolver):
        rtol: float = 0.0
        atol: float = 1e-10
        norm: Callable = fpx.two_norm

        def init(self, fn, z0, fz0, args):
            return None

    with pytest.raises(TypeError, match="abstract"):
        NoStep()
    for cls in [fpx.Picard, fpx.KM, fpx.Halpern, fpx.Anderson, fpx.Broyden, fpx.NewtonKrylov]:
        assert isinstance(cls(), fpx.AbstractFixedPointSolver)
