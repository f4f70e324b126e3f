"""Parallel-in-time diffusion sampling: ParaDiGMS's sliding-window Picard iteration.

A discretised sampler `x_{j+1} = x_j + d_j(x_j) + sigma_j z_j` (`j = 0 .. T-1`, the noise
`z_j` drawn up front) is a fixed point in all `T` states at once:
`x_{j+1} = x_s + sum_{i=s}^{j} (d_i(x_i) + sigma_i z_i)`. Picard iteration of that sum
evaluates the denoiser at many steps in one batched call; Shih et al. (NeurIPS 2023,
"Parallel Sampling of Diffusion Models", ParaDiGMS) iterate it on a window of `p` steps
and slide the window past the steps that have converged. The sampler here is DDIM's
(Song et al., 2021), deterministic (`eta=0`, the probability-flow ODE) or stochastic
(`eta=1`: DDPM's ancestral SDE sampler).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .. import _validate as checks
from .._errors import FixedPointError, unvmapped_worst
from .._misc import tree_describe, two_norm
from .._solution import RESULTS, Solution

EpsFn = Callable[[Array, Array], Array]


class _Schedule(eqx.Module):
    """Per-step coefficients of `x_{j+1} = x_j + am1_j x_j + b_j eps(x_j, t_j) + sigma_j z_j`."""

    times: Array  # [T]: the time eps is evaluated at in step j
    am1: Array  # [T]: a_j - 1 with a_j = sqrt(abar_{j+1} / abar_j)
    b: Array  # [T]
    sigma: Array  # [T]: eta * noise_scale
    noise_scale: Array  # [T]: the DDPM posterior std of step j (ParaDiGMS's tolerance scale)
    noise: Array | None  # [T, *shape]: z_j


def _check_x(owner: str, x_init) -> Array:
    try:
        x = x_init if isinstance(x_init, jax.Array) else jnp.asarray(x_init)
    except (TypeError, ValueError) as e:
        raise TypeError(f"`{owner}(x_init=...)` must be a floating-point array, got {x_init!r}.") from e
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"`{owner}(x_init=...)` must be a floating-point array, got dtype {x.dtype}; cast it, "
            f"e.g. `jnp.asarray(x_init, jnp.float32)`."
        )
    if x.size == 0:
        raise ValueError(f"`{owner}(x_init=...)` is empty (shape {x.shape}).")
    return x


class _Problem(eqx.Module):
    """A validated sampling problem: what the compiled samplers take."""

    eps: Callable  # closure-converted: its closed-over arrays are inputs of the compiled loop
    x: Array
    ts: Array
    abar: Array
    eta: float | Array
    key: PRNGKeyArray | None


def _prepare(owner, eps, x_init, ts, alpha_bar, eta, key) -> _Problem:
    checks.function(owner, "eps", eps, what="a denoiser eps(x, t) -> predicted noise")
    x = _check_x(owner, x_init)
    try:
        ts = ts if isinstance(ts, jax.Array) else jnp.asarray(ts)
    except (TypeError, ValueError) as e:
        raise TypeError(f"`{owner}(ts=...)` must be a 1-D array of times, got {ts!r}.") from e
    if ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(
            f"`{owner}(ts=...)` must be a 1-D array of the T+1 >= 2 times t_0 (noise) .. t_T "
            f"(data), got shape {ts.shape}."
        )
    if callable(alpha_bar):
        abar = jax.vmap(alpha_bar)(ts)
    else:
        try:
            abar = alpha_bar if isinstance(alpha_bar, jax.Array) else jnp.asarray(alpha_bar)
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"`{owner}(alpha_bar=...)` must be a function t -> alpha_bar(t) or an array of its "
                f"values at `ts`, got {alpha_bar!r}."
            ) from e
    if not isinstance(abar, jax.Array) or abar.shape != ts.shape or not jnp.issubdtype(abar.dtype, jnp.floating):
        raise ValueError(
            f"`{owner}(alpha_bar=...)` must give one real alpha_bar per time in `ts` (shape "
            f"{ts.shape}), got {tree_describe(abar)}."
        )
    if not isinstance(abar, jax.core.Tracer):
        values = np.asarray(abar, np.float64)
        if not (np.all(np.isfinite(values)) and values[0] > 0 and values[-1] <= 1 and np.all(np.diff(values) > 0)):
            raise ValueError(
                f"`{owner}(alpha_bar=...)`: the signal levels alpha_bar(t_j) must increase strictly "
                f"from the noise end to the data end, with 0 < alpha_bar(t_0) < ... < "
                f"alpha_bar(t_T) <= 1; got {np.array2string(values, precision=4, threshold=8)}."
            )
    checks.real(owner, "eta", eta, low=0, high=1)
    if not isinstance(eta, jax.core.Tracer):
        eta = float(eta)
    if isinstance(eta, jax.core.Tracer) or eta > 0:
        if key is None:
            raise ValueError(
                f"`{owner}(eta={eta!r})` is stochastic: pass `key=jax.random.key(...)` to draw the "
                f"noise z_0 .. z_(T-1) up front (the same key gives the same noise to ddim_sample "
                f"and picard_sample)."
            )
    else:
        key = None
    x_struct, t_struct = jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((), ts.dtype)
    try:
        out = jax.eval_shape(eps, x_struct, t_struct)
    except Exception as e:
        e.add_note(f"(raised while tracing {owner}'s eps(x, t) with x: {tree_describe(x)}, t: {ts.dtype}[])")
        raise
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(
            f"`{owner}`: eps(x, t) must return an array of the shape and dtype of x "
            f"({tree_describe(x)}), got {tree_describe(out)}. Cast `ts` and the denoiser's "
            f"parameters to x's dtype."
        )
    converted = eqx.filter_closure_convert(eps, x_struct, t_struct)
    return _Problem(eps=converted, x=x, ts=ts, abar=abar, eta=eta, key=key)


def _schedule(problem: _Problem) -> _Schedule:
    """The per-step coefficients (inside the compiled samplers)."""
    x, eta = problem.x, problem.eta
    dtype = x.dtype
    abar = problem.abar.astype(jnp.promote_types(problem.abar.dtype, dtype))
    now, nxt = abar[:-1], abar[1:]
    ratio = nxt / now
    am1 = (nxt - now) / now / (jnp.sqrt(ratio) + 1)
    # DDPM's posterior variance of step j: (1 - abar') / (1 - abar) * (1 - abar / abar').
    gain = (nxt - now) / ((1 - now) * nxt)
    noise_var = (1 - nxt) * gain
    sigma = eta * jnp.sqrt(noise_var)
    # sqrt(1 - abar' - sigma^2), written without the cancellation.
    direction = jnp.sqrt(jnp.maximum((1 - nxt) * (1 - eta**2 * gain), 0.0))
    b = direction - jnp.sqrt(nxt) * jnp.sqrt(1 - now) / jnp.sqrt(now)
    noise = None
    if problem.key is not None:
        noise = jax.random.normal(problem.key, (now.shape[0], *x.shape), dtype)
    return _Schedule(
        times=problem.ts[:-1],
        am1=am1.astype(dtype),
        b=b.astype(dtype),
        sigma=sigma.astype(dtype),
        noise_scale=jnp.sqrt(noise_var).astype(dtype),
        noise=noise,
    )


def _column(v, x):
    """A per-step coefficient `[T]`, shaped to broadcast against states `[T, *shape]`."""
    return v.reshape(v.shape + (1,) * (x.ndim - 1))


def _increment(sched: _Schedule, x, e):
    """`x_{j+1} - x_j` for states `x` `[k, *shape]` and their denoiser outputs `e` (the `k` steps of `sched`)."""
    am1, b, sigma = sched.am1, sched.b, sched.sigma
    out = _column(am1, x) * x + _column(b, x) * e
    if sched.noise is not None:
        out = out + _column(sigma, x) * sched.noise
    return out


def ddim_sample(
    eps: EpsFn,
    x_init: Float[Array, "..."],
    ts: Float[Array, " T+1"],
    alpha_bar: Callable[[Array], Array] | Float[Array, " T+1"],
    *,
    eta: float = 0.0,
    key: PRNGKeyArray | None = None,
    return_trajectory: bool = False,
) -> Float[Array, "..."]:
    """The sequential DDIM sampler: the reference `picard_sample` reproduces.

    **The discretisation.** With the signal levels `abar_j = alpha_bar(t_j)`,
    `0 < abar_0 < abar_1 < ... < abar_T <= 1` (`t_0` the noise end, `t_T` the data end),
    step `j = 0 .. T-1` takes `x_j` at time `t_j` to

        e_j      = eps(x_j, t_j)
        x0_j     = (x_j - sqrt(1 - abar_j) e_j) / sqrt(abar_j)
        sigma_j  = eta * sqrt((1 - abar_{j+1}) / (1 - abar_j) * (1 - abar_j / abar_{j+1}))
        x_{j+1}  = sqrt(abar_{j+1}) x0_j + sqrt(1 - abar_{j+1} - sigma_j^2) e_j + sigma_j z_j

    (Song et al., 2021, eq. 12), written as the increment `x_{j+1} = x_j + (a_j - 1) x_j +
    b_j e_j + sigma_j z_j` with `a_j = sqrt(abar_{j+1} / abar_j)`. `eta = 0` is DDIM's
    deterministic sampler (a discretisation of the probability-flow ODE); `eta = 1` is DDPM's
    ancestral SDE sampler. The noise `z_j ~ N(0, I)` is drawn up front,
    `jax.random.normal(key, (T, *x_init.shape))`, and is not needed (nor `key`) for `eta = 0`.

    **Arguments:**

    - `eps`: the denoiser, `eps(x, t) -> ` predicted noise of the shape and dtype of `x`,
      called on one state `x` (shaped like `x_init`) and a scalar time `t` from `ts`.
    - `x_init`: `x_0`, e.g. `jax.random.normal(key, shape)`.
    - `ts`: the `T + 1` times `t_0 .. t_T`; `eps` is called at `t_0 .. t_{T-1}`.
    - `alpha_bar`: a function `t -> abar(t)` or the array of `abar_j` at `ts`.
    - `eta`, `key`: as above.
    - `return_trajectory`: return all of `x_0 .. x_T` stacked `[T+1, *shape]` instead of
      the sample `x_T`.

    ```python
    import jax, jax.numpy as jnp
    import fpx.parallel

    mu, s = 2.0, 0.5  # data ~ N(mu, s^2): the exact denoiser is linear in x
    eps = lambda x, abar: jnp.sqrt(1 - abar) * (x - jnp.sqrt(abar) * mu) / (abar * s**2 + 1 - abar)
    abar = jnp.linspace(0.02, 1.0, 201)
    x = fpx.parallel.ddim_sample(eps, jnp.array([-1.0, 0.0, 1.0]), ts=abar, alpha_bar=lambda t: t)
    # DDIM with the exact denoiser follows the probability-flow ODE: x -> mu + s * z.
    z = (jnp.array([-1.0, 0.0, 1.0]) - jnp.sqrt(0.02) * mu) / jnp.sqrt(0.02 * s**2 + 0.98)
    assert jnp.allclose(x, mu + s * z, atol=2e-2)  # first order in 1/T
    ```
    """
    owner = "ddim_sample"
    problem = _prepare(owner, eps, x_init, ts, alpha_bar, eta, key)
    if not isinstance(return_trajectory, (bool, np.bool_)):
        raise TypeError(f"`{owner}(return_trajectory=...)` must be True or False, got {return_trajectory!r}.")
    return _ddim_compiled(problem, bool(return_trajectory))


@eqx.filter_jit
def _ddim_compiled(problem: _Problem, return_trajectory: bool):
    sched = _schedule(problem)
    eps, x = problem.eps, problem.x

    def step(x, inputs):
        t, am1, b, sigma, z = inputs
        out = x + am1 * x + b * eps(x, t)
        if z is not None:
            out = out + sigma * z
        return out, out

    inputs = (sched.times, sched.am1, sched.b, sched.sigma, sched.noise)
    final, path = jax.lax.scan(step, x, inputs)
    if return_trajectory:
        return jnp.concatenate([x[None], path], axis=0)
    return final


class _Carry(eqx.Module):
    states: Array
    start: Array
    rounds: Array
    evals: Array
    done: Array
    result: RESULTS
    accepted_ratio: Array
    window_ratio: Array


def _failure_message(result: int, rounds: int, ratio: float, max_steps: int, tol: float) -> str:
    member = next((n for n, item in RESULTS._name_to_item.items() if int(item._value) == int(result)), None)
    head = {
        "max_steps_reached": f"did not converge within max_steps={max_steps} parallel rounds",
        "nonfinite": "hit a non-finite value (NaN or inf) in the denoiser's output or the states",
    }.get(member, "failed")
    hint = {
        "max_steps_reached": "Raise `max_steps` (T rounds always suffice), enlarge `window`, or loosen `tol`.",
        "nonfinite": "Check eps(x, t) for overflow at the sampled times.",
    }.get(member, "")
    return (
        f"fpx.parallel.picard_sample {head}: after {rounds} rounds the largest Picard correction "
        f"in the window was {ratio:.3e} noise standard deviations (tol={tol}). {hint}\nPass "
        f"throw=False to inspect `sol.result` and `sol.stats` instead of raising."
    )


def picard_sample(
    eps: EpsFn,
    x_init: Float[Array, "..."],
    ts: Float[Array, " T+1"],
    alpha_bar: Callable[[Array], Array] | Float[Array, " T+1"],
    *,
    eta: float = 0.0,
    key: PRNGKeyArray | None = None,
    window: int = 16,
    tol: float = 1e-3,
    max_steps: int | None = None,
    throw: bool = True,
    return_trajectory: bool = False,
) -> Solution:
    """`ddim_sample` by sliding-window Picard iteration: few sequential rounds, batched denoiser calls.

    ParaDiGMS (Shih et al., 2023). The sampler's `T` steps (exactly those of `ddim_sample`
    with the same arguments and noise, see there) are solved as one system. A window of
    `p = min(window, T)` steps `s .. s+p-1` is updated each round from the current guesses
    `x_s .. x_{s+p-1}` by one batched (`jax.vmap`) call of `eps` and a cumulative sum:

        x_{j+1} <- x_s + sum_{i=s}^{j} [(a_i - 1) x_i + b_i eps(x_i, t_i) + sigma_i z_i]

    Then the window slides. Step `j`'s new state is *accepted* when its change in this
    round is below the tolerance relative to the noise level,
    `|x_{j+1}^new - x_{j+1}^old|^2 / D <= tol^2 * sigma~_{j+1}^2` (ParaDiGMS's test; `D`
    the number of entries of `x`, `sigma~_j` the DDPM posterior standard deviation of step
    `j` as in `ddim_sample` with `eta = 1`, whatever `eta` is; `sigma~_T = 0`, so the final
    sample is only ever accepted as below). The window moves to the first state that failed
    the test (its inputs were all accepted, so it is as accurate as they are), or by `p`
    if none failed; the new positions start from the last state computed. The first state of
    a window is exact, so every round advances by at least one step and `T` rounds (the
    default `max_steps`) always finish: with `tol = 0` the result is the sequential one up to
    the rounding of the sums. Norms are computed scaled (no overflow in float32).

    **Arguments:** `eps`, `x_init`, `ts`, `alpha_bar`, `eta`, `key` as in `ddim_sample`, and

    - `window`: steps per round `p` (the denoiser batch size).
    - `tol`: the tolerance `tol` above, in noise standard deviations (ParaDiGMS used 0.1 for
      images; smaller is closer to the sequential sample).
    - `max_steps`: the most parallel rounds (default `T`).
    - `throw`: if True, a solve that did not succeed raises `fpx.FixedPointError` at run time
      (under `jit` wrapped in JAX's runtime error); under `vmap` one check covers the batch.
    - `return_trajectory`: put `x_0 .. x_T` stacked `[T+1, *shape]` in `sol.aux`.

    **Returns:** an `fpx.Solution` with `value` the sample `x_T` (of the last round when the
    solve did not succeed) and `result`: `successful` only when the window passed the last
    step (every step accepted), `max_steps_reached` when the rounds ran out first,
    `nonfinite` when a state or denoiser output in the window was NaN or inf. `stats`:

    - `num_steps`: parallel rounds, i.e. sequential evaluations of (batched) `eps`;
    - `num_fn_evals`: total evaluations of `eps` on a time step of the sampler (window
      entries past `t_{T-1}` are evaluated for fixed shapes but not counted);
    - `num_sequential_steps`: `T`, what `ddim_sample` needs sequentially; `window`: `p`;
    - `residual_norm`: the largest change, in noise standard deviations, of any state when
      it was accepted by the test (at most `tol`); on failure, the largest in the last window.

    Under `jax.vmap` (e.g. over initial noises and keys) every member has its own window,
    `result` and counts.

    ```python
    import jax, jax.numpy as jnp
    import fpx.parallel

    mu, s = 2.0, 0.5
    eps = lambda x, abar: jnp.sqrt(1 - abar) * (x - jnp.sqrt(abar) * mu) / (abar * s**2 + 1 - abar)
    abar = jnp.linspace(0.02, 1.0, 101)
    x0 = jax.random.normal(jax.random.key(0), (4,))
    sol = fpx.parallel.picard_sample(eps, x0, ts=abar, alpha_bar=lambda t: t, window=16, tol=1e-4)
    assert sol.converged
    assert jnp.allclose(sol.value, fpx.parallel.ddim_sample(eps, x0, abar, lambda t: t), atol=1e-6)
    assert sol.stats["num_steps"] < 100 <= sol.stats["num_fn_evals"]
    ```
    """
    owner = "picard_sample"
    problem = _prepare(owner, eps, x_init, ts, alpha_bar, eta, key)
    num_steps = problem.ts.shape[0] - 1
    window = checks.integer(owner, "window", window, minimum=1)
    checks.real(owner, "tol", tol, low=0)
    if not isinstance(tol, jax.core.Tracer):
        tol = float(tol)
    max_steps = num_steps if max_steps is None else checks.integer(owner, "max_steps", max_steps, minimum=1)
    for name, flag in (("throw", throw), ("return_trajectory", return_trajectory)):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"`{owner}({name}=...)` must be True or False, got {flag!r}.")
    sol = _picard_compiled(problem, min(window, num_steps), tol, max_steps, bool(return_trajectory))
    if throw:
        _raise_if_failed(sol, max_steps, tol if not isinstance(tol, jax.core.Tracer) else math.nan)
    return sol


@eqx.filter_jit
def _picard_compiled(problem: _Problem, p: int, tol, max_steps: int, return_trajectory: bool) -> Solution:
    sched = _schedule(problem)
    eps, x = problem.eps, problem.x
    num_steps = sched.am1.shape[0]
    dtype = x.dtype

    # Pad every per-step array by 2p identity steps, so each window is a fixed-size slice.
    def pad(v, value):
        fill = jnp.broadcast_to(jnp.asarray(value, v.dtype), (2 * p, *v.shape[1:]))
        return jnp.concatenate([v, fill], axis=0)

    times = pad(sched.times, sched.times[-1])
    am1, b, sigma = pad(sched.am1, 0), pad(sched.b, 0), pad(sched.sigma, 0)
    noise = None if sched.noise is None else pad(sched.noise, 0)
    # Tolerance scale of state j (= the noise that step j adds); the final sample has none.
    scale = jnp.concatenate([sched.noise_scale, jnp.zeros((2 * p + 1,), dtype)])
    root_size = jnp.sqrt(jnp.asarray(x.size, dtype))
    offsets = jnp.arange(p)
    threshold_factor = jnp.asarray(tol, dtype) * root_size
    tiny = jnp.finfo(dtype).tiny

    def window_of(v, start):
        return jax.lax.dynamic_slice_in_dim(v, start, p, axis=0)

    def cond(c):
        return ~c.done & (c.rounds < max_steps)

    def body(c):
        s = c.start
        states = window_of(c.states, s)  # x_s .. x_{s+p-1}
        valid = s + offsets < num_steps
        e = jax.vmap(eps)(states, window_of(times, s))
        sub = _Schedule(
            times=None, am1=window_of(am1, s), b=window_of(b, s), sigma=window_of(sigma, s),
            noise_scale=None, noise=None if noise is None else window_of(noise, s),
        )
        increment = jnp.where(_column(valid, states), _increment(sub, states, e), 0.0)
        new = c.states[s][None] + jnp.cumsum(increment, axis=0)  # x_{s+1} .. x_{s+p}
        old = window_of(c.states, s + 1)
        change = jax.vmap(two_norm)(new - old)
        limit = window_of(scale, s + 1) * root_size
        positive = limit > tiny
        exact = jnp.where(change == 0, 0.0, jnp.inf)
        ratio = jnp.where(positive, change / jnp.where(positive, limit, 1.0), exact)
        passed = (change <= window_of(scale, s + 1) * threshold_factor) | ~valid
        finite = jnp.all(jnp.isfinite(new) | ~_column(valid, new)) & jnp.all(jnp.isfinite(e) | ~_column(valid, e))
        failed_at = jnp.where(jnp.all(passed), p, jnp.argmin(passed))
        advance = jnp.minimum(failed_at + 1, p)
        new_start = jnp.minimum(s + advance, num_steps)
        accepted = valid & (offsets < failed_at)
        states_all = jax.lax.dynamic_update_slice_in_dim(c.states, new, s + 1, axis=0)
        ahead = jnp.broadcast_to(new[-1:], new.shape)
        states_all = jax.lax.dynamic_update_slice_in_dim(states_all, ahead, s + p + 1, axis=0)
        finished = new_start >= num_steps
        result = RESULTS.where(finite, RESULTS.where(finished, RESULTS.successful, c.result), RESULTS.nonfinite)
        return _Carry(
            states=states_all,
            start=new_start.astype(jnp.int32),
            rounds=c.rounds + 1,
            evals=c.evals + jnp.sum(valid).astype(jnp.int32),
            done=finished | ~finite,
            result=result,
            accepted_ratio=jnp.maximum(c.accepted_ratio, jnp.max(jnp.where(accepted, ratio, 0.0))),
            window_ratio=jnp.max(jnp.where(valid, ratio, 0.0)),
        )

    buffer = jnp.broadcast_to(x, (num_steps + 1 + 2 * p, *x.shape))
    zero_ratio = jnp.zeros((), dtype)
    carry0 = _Carry(
        states=buffer,
        start=jnp.zeros((), jnp.int32),
        rounds=jnp.zeros((), jnp.int32),
        evals=jnp.zeros((), jnp.int32),
        done=jnp.zeros((), bool),
        result=RESULTS.max_steps_reached,
        accepted_ratio=zero_ratio,
        window_ratio=zero_ratio,
    )
    final = jax.lax.while_loop(cond, body, carry0)
    success = final.result == RESULTS.successful
    stats = {
        "num_steps": final.rounds,
        "num_fn_evals": final.evals,
        "num_sequential_steps": jnp.asarray(num_steps, jnp.int32),
        "window": jnp.asarray(p, jnp.int32),
        "residual_norm": jnp.where(success, final.accepted_ratio, final.window_ratio),
    }
    aux = final.states[: num_steps + 1] if return_trajectory else None
    return Solution(value=final.states[num_steps], result=final.result, stats=stats, aux=aux)


def _raise_if_failed(sol: Solution, max_steps: int, tol: float) -> None:
    def check(failed, result, rounds, ratio):
        if bool(failed):
            raise FixedPointError(_failure_message(int(result), int(rounds), float(ratio), max_steps, tol))

    failed = sol.result != RESULTS.successful
    any_failed, (result, rounds, ratio) = unvmapped_worst(
        failed, sol.result._value, sol.stats["num_steps"], sol.stats["residual_norm"]
    )
    jax.debug.callback(check, any_failed, result, rounds, ratio)
