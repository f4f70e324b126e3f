"""Run-time failure reports shared by the driver, the adjoints and the feasibility layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._solution import RESULTS, Solution


class FixedPointError(RuntimeError):
    """Raised (at run time, also under `jax.jit`) by `fixed_point(..., throw=True)`.

    ```python
    import jax.numpy as jnp, fpx
    try:
        fpx.fixed_point(lambda z, _: 0.999 * z + 1.0, jnp.zeros(2), max_steps=10)   # too few steps
    except fpx.FixedPointError as e:                 # under jax.jit: wrapped in JAX's runtime error
        assert "max_steps=10" in str(e) and "throw=False" in str(e)
    else:
        raise AssertionError("expected a FixedPointError")
    sol = fpx.fixed_point(lambda z, _: 0.999 * z + 1.0, jnp.zeros(2), max_steps=10, throw=False)
    assert sol.result == fpx.RESULTS.max_steps_reached                              # throw=False never raises
    ```
    """


_HEADS = {
    "max_steps_reached": "did not converge within max_steps={max_steps}",
    "nonfinite": "hit a non-finite value (NaN or inf)",
    "infeasible": "found that the operator has no fixed point",
    "diverged": "diverged",
    "breakdown": "broke down",
}


def failure_message(
    result: int, steps: int, residual: float, max_steps: int, solver, entry: str = "fpx.fixed_point"
) -> str:
    name = type(solver).__name__
    member = next((n for n, item in RESULTS._name_to_item.items() if int(item._value) == int(result)), None)
    head = _HEADS.get(member, "failed").format(max_steps=max_steps)
    message = RESULTS._index_to_message[int(result)]
    return (
        f"{entry} with {name} {head}: after {steps} steps the best residual "
        f"|z - T(z)| was {residual:.3e} (tolerance atol + rtol*|z| with rtol={solver.rtol}, "
        f"atol={solver.atol}).\n{message}\nPass throw=False to inspect `sol.result` and "
        f"`sol.stats` instead of raising."
    )


def unvmapped_worst(failed, *values):
    """Reduce over every `vmap`ped axis: (any failed, and each value's max over failed members).

    `equinox.internal.unvmap_*` leave the vmapped world, so a host callback built on the
    results runs once per call instead of once per batch member (which under `vmap` of
    a 128-sample batch cost a few times the solve itself).
    """
    import equinox.internal as eqxi

    any_failed = eqxi.unvmap_any(failed)
    worst = []
    for v in jax.lax.stop_gradient(values):
        low = jnp.asarray(-jnp.inf if jnp.issubdtype(v.dtype, jnp.floating) else jnp.iinfo(v.dtype).min, v.dtype)
        worst.append(eqxi.unvmap_max(jnp.where(failed, v, low)))
    return any_failed, worst


def raise_if_failed(sol: Solution, solver, max_steps: int, entry: str = "fpx.fixed_point") -> Solution:
    """Attach a run-time check that raises `FixedPointError` if `sol` failed.

    Eagerly the error is a `FixedPointError`; under `jit` JAX re-raises it as a
    `JaxRuntimeError` carrying the same message. Under `vmap` the figures are the worst
    over the failed members (largest result code, steps and residual).
    """

    def check(failed, result, steps, residual):
        if bool(failed):
            raise FixedPointError(failure_message(int(result), int(steps), float(residual), max_steps, solver, entry))

    failed = sol.result != RESULTS.successful
    any_failed, (result, steps, residual) = unvmapped_worst(
        failed, sol.result._value, sol.stats["num_steps"], sol.stats["residual_norm"]
    )
    jax.debug.callback(check, any_failed, result, steps, residual)
    return sol
