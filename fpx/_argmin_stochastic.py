"""`argmin_stochastic`: a minibatch training loop whose final iterate is differentiated as a minimiser.

`fpx.argmin_stochastic(loss, w0, data, args, optimizer=..., key=..., num_steps=..., batch_size=...)`
runs `num_steps` steps of an optax optimiser on minibatches of `data` from `w0` (typically
the previous outer step's weights) and differentiates the final iterate `w_T` in the
hyperparameters by the implicit function theorem on the stationarity condition of the
full-batch loss (or of a given stationarity loss), `∇_w L_S(w, θ) = 0`, at `w_T`:

    dw/dθ ≈ -H(w_T)⁻¹ ∂²L_S/∂w∂θ (w_T),    H = ∇²_w L_S,

with the same estimators, the same Hessian solve (`_argmin._hessian_solve_p`) and the
same failure reports as `fpx.argmin`. Only the forward pass (the stochastic loop and its
stationarity test) is new here.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, PyTree

from . import _validate as checks
from ._argmin import (
    HypergradientUnrolled,
    _check_adjoint,
    _check_loss,
    _dtype,
    _hvp,
    _implicit_minimiser,
    _is_optax,
    _nan_tangent_unless,
    _Objective,
    _power_curvature,
    _SolveConfig,
    _step_from_curvature,
    _tree_finite,
    _unreached_args,
)
from ._errors import FixedPointError, unvmapped_worst
from ._misc import stop_gradient_arrays, two_norm
from ._solution import RESULTS, Solution
from .solvers import AbstractFixedPointSolver

_ENTRY = "fpx.argmin_stochastic"


def argmin_stochastic(
    loss: Callable[..., Any],
    w0: PyTree,
    data: PyTree,
    args: PyTree = None,
    *,
    optimizer: Any,
    key: Array,
    num_steps: int,
    batch_size: int,
    adjoint: Any = None,
    stationarity_loss: Callable[..., Any] | None = None,
    gtol: float = 1e-3,
    opt_state: PyTree = None,
    throw: bool = True,
    has_aux: bool = False,
    backward_probe: Array | None = None,
) -> Solution:
    """Train by minibatch steps of an optax optimiser; the final iterate is differentiable in `args`.

    Runs `num_steps` steps of `optimizer` on `loss(w, batch, args)` from `w0`, each on a
    minibatch of `batch_size` examples of `data` (reshuffled every epoch with `key`), and
    returns the final iterate `w_T`. Its derivative with respect to the hyperparameters
    `θ` (the arrays of `args` and of `data`, and those `loss` closes over) is the implicit
    one of `fpx.argmin`, taken at `w_T`: the stationarity condition
    `∇_w L_S(w, θ) = 0` of the **full-batch** loss `L_S(w, θ) = loss(w, data, args)` (or of
    `stationarity_loss`) gives

        dw/dθ ≈ -H⁻¹ ∂²L_S/∂w∂θ,    H = ∇²_w L_S(w_T, θ),

    with `H⁻¹` applied by the same estimators (`adjoint=`, default CG on the Hessian; see
    `fpx.AbstractHypergradient`), reporting their residuals the same way
    (`backward_probe`), in reverse and forward mode, under `jit` and `vmap`. The
    derivative with respect to `w0` (and `opt_state`) is zero.

    **The final iterate is only approximately stationary.** A stochastic loop stops after
    a fixed budget, not at `∇L_S = 0`, so this is the hypergradient of the exact
    minimiser `w*(θ)` *evaluated at* `w_T`, not the derivative of `w_T` itself (which
    depends on the minibatches and steps taken; `HypergradientUnrolled(steps=k)`
    backpropagates through the last `k` steps of the loop for that). Its error is
    first order in the distance `|w_T - w*|`, which for a `μ`-strongly convex `L_S` is at
    most `|∇L_S(w_T)| / μ`: the full-batch gradient norm at `w_T`, reported as
    `sol.stats["grad_norm"]`, is the figure to watch (and `gtol` the one to set). A
    loss that is not convex at `w_T` can make `H` indefinite; CG then fails and says so
    (use `fpx.HypergradientLinearSolve(lineax.GMRES(...))` or
    `fpx.HypergradientExact()`).

    **Arguments:**

    - `loss`: `loss(w, batch, args) -> scalar`, with `batch` a pytree like `data` with
      `batch_size` examples along the leading axis. Write it as a *mean* over the batch,
      so that minibatch gradients estimate the full-batch one. With `has_aux=True` it
      returns `(scalar, aux)`.
    - `w0`: the starting point (warm start: the previous outer step's `sol.value`), a
      pytree of real floating-point arrays.
    - `data`: a pytree of arrays with a common leading axis of `N` examples (features,
      labels, ...). Its floating-point arrays are differentiable (e.g. learned synthetic
      data).
    - `args`: any pytree passed to `loss`; its arrays are differentiable.
    - `optimizer`: an optax `GradientTransformation` (`optax.sgd(0.1)`, `optax.adam(1e-2)`,
      with schedules): any state is fine, the loop is not a fixed-point iteration.
    - `key`: a JAX PRNG key (`jax.random.key(0)`) for the minibatch order. Each epoch is a
      fresh permutation of the `N` examples cut into `N // batch_size` batches (the
      remainder is dropped for that epoch).
    - `num_steps`: the number of optimiser steps (static).
    - `batch_size`: examples per step, `1 <= batch_size <= N`.
    - `adjoint`: the hypergradient estimator, as in `fpx.argmin`; default
      `fpx.HypergradientLinearSolve()`. The estimators' default step `α` is `1/λ̂`,
      `λ̂ ≈ |λ|_max(H)` at `w_T` from 20 power iterations.
    - `stationarity_loss`: `stationarity_loss(w, args) -> scalar` whose stationarity
      defines the hypergradient instead of the full-batch `loss(w, data, args)` (e.g.
      on a fixed large subset when the full batch is too big). `data` is then not
      differentiated (its hypergradient is zero): only `args` and closed-over arrays are.
    - `gtol`: the stationarity test: the loop is `RESULTS.successful` only when
      `|∇_w L_S(w_T)| <= gtol` (two-norm, full batch). `jnp.inf` accepts any finite final
      iterate, i.e. an approximate hypergradient without a stationarity guarantee.
    - `opt_state`: the optimiser state to start from (warm-starting its moments as well);
      default `optimizer.init(w0)`. The final state is `sol.stats["opt_state"]`.
    - `throw`: if True, a loop that ends non-finite or above `gtol` raises
      `FixedPointError` at run time, and so does a failed hypergradient solve. If False,
      check `sol.result`; the hypergradient is NaN wherever either failed (per `vmap`
      member).
    - `has_aux`: whether `loss` (and `stationarity_loss`) return `(value, aux)`; `sol.aux`
      is the stationarity loss's `aux` at `w_T`.
    - `backward_probe`: an optional `fpx.backward_probe()`, as in `fpx.argmin`.

    **Returns:** an `fpx.Solution`: `value` (`w_T`), `result` (`RESULTS.successful`,
    `RESULTS.max_steps_reached` when `|∇L_S(w_T)| > gtol`, `RESULTS.nonfinite` when the
    loop diverged), `stats` (`num_steps`; `grad_norm`, `|∇_w L_S|` at `w_T`, also as
    `residual_norm`; `grad_norm_0` at `w0`; `loss`, `L_S(w_T)`; `loss_trace`, the
    minibatch losses of every step; `opt_state`, the final optimiser state) and `aux`.

    ```python
    import jax, jax.numpy as jnp, optax, fpx
    X = jax.random.normal(jax.random.key(0), (64, 3)); y = X @ jnp.array([1.0, -2.0, 0.5])
    def loss(w, batch, lam):                                 # ridge regression, a mean over the batch
        xb, yb = batch
        return 0.5 * jnp.mean((xb @ w - yb) ** 2) + 0.5 * lam * jnp.sum(w ** 2)
    sgd = optax.sgd(optax.exponential_decay(0.2, 50, 0.5))  # a decaying step: the SGD noise fades
    def fit(lam):
        sol = fpx.argmin_stochastic(loss, jnp.zeros(3), (X, y), lam, optimizer=sgd, key=jax.random.key(1),
                                    num_steps=300, batch_size=16, gtol=1e-3)
        return sol.value, sol.stats["grad_norm"]
    # The final iterate and its derivative in lam (forward mode, implicit at the final iterate).
    w, dw, grad_norm = jax.jit(lambda lam: jax.jvp(fit, (lam,), (jnp.ones_like(lam),), has_aux=True))(jnp.asarray(0.1))
    A = X.T @ X / 64 + 0.1 * jnp.eye(3)
    w_star = jnp.linalg.solve(A, X.T @ y / 64)               # the exact minimiser, dw*/dlam = -A^{-1} w*
    assert grad_norm <= 1e-3 and jnp.allclose(w, w_star, atol=1e-3)
    assert jnp.allclose(dw, -jnp.linalg.solve(A, w_star), atol=1e-2)
    ```
    """
    checks.function("", "loss", loss, what="a function loss(w, batch, args) -> scalar")
    _check_optimizer(optimizer)
    adjoint = _check_adjoint(adjoint)
    num_steps = checks.integer("", "num_steps", num_steps, minimum=1)
    batch_size = checks.integer("", "batch_size", batch_size, minimum=1)
    checks.real(
        "", "gtol", gtol, low=0, allow_inf=True,
        hint=" `gtol` bounds the full-batch gradient norm at the final iterate; jnp.inf disables the test.",
    )
    if not isinstance(throw, (bool, np.bool_)):
        raise TypeError(f"`throw` must be True or False, got {throw!r}.")
    if not isinstance(has_aux, (bool, np.bool_)):
        raise TypeError(f"`has_aux` must be True or False, got {has_aux!r}.")
    if stationarity_loss is not None:
        checks.function("", "stationarity_loss", stationarity_loss, what="a function stationarity_loss(w, args) -> scalar")
    key = _check_key(key)
    w0 = checks.float_tree(
        "`w0`", w0, empty=f"{_ENTRY} needs at least one floating-point array to train.",
        kind="real floating-point",
        why=": the optimiser steps need real floating-point weights",
    )
    data, n = _check_data(data, batch_size)
    batch0 = jtu.tree_map(lambda x: x[:batch_size], data)
    _check_loss(lambda w, a: loss(w, batch0, a), w0, args, bool(has_aux), call="loss(w, batch, args)", entry=_ENTRY)
    if stationarity_loss is not None:
        _check_loss(stationarity_loss, w0, args, bool(has_aux), call="stationarity_loss(w, args)", entry=_ENTRY)
    state0 = _init_state(optimizer, w0, opt_state)
    dtype = _dtype(w0)

    dynamic_args, static_args = eqx.partition(args, eqx.is_array)

    def value_of(out):
        return out[0] if has_aux else out

    def batch_loss(w, batch, dyn):
        return value_of(loss(w, batch, eqx.combine(dyn, static_args)))

    # What the hypergradient differentiates: (data, args), data left out for a given
    # stationarity loss (which does not see it).
    if stationarity_loss is None:
        dynamic = (data, dynamic_args)

        def stationarity(w, dyn):
            return loss(w, dyn[0], eqx.combine(dyn[1], static_args))
    else:
        dynamic = (None, dynamic_args)

        def stationarity(w, dyn):
            return stationarity_loss(w, eqx.combine(dyn[1], static_args))

    objective = _Objective(eqx.filter_closure_convert(stationarity, w0, dynamic), bool(has_aux))
    unreached = [
        p.replace("args[0]", "data", 1).replace("args[1]", "args", 1) for p in _unreached_args(objective, w0, dynamic)
    ]
    if unreached:
        warnings.warn(
            f"{_ENTRY}: {', '.join(unreached)} does not reach the gradient of the stationarity loss, so its "
            f"hypergradient is zero by construction (a hyperparameter that is unused, or only shifts the loss "
            f"by a constant). Make the loss depend on it through w, or close over it instead of passing it.",
            stacklevel=2,
        )

    # The loop's minibatches: one permutation per epoch, cut into N // batch_size batches.
    # An argsort of random 32-bit integers (one call of the PRNG for all epochs) rather
    # than `jax.random.permutation` per epoch, which compiles several times slower; ties
    # (likely only beyond about 10^4 examples) keep their order, a negligible bias.
    per_epoch = n // batch_size
    epochs = -(-num_steps // per_epoch)
    perms = jnp.argsort(jr.bits(key, (epochs, n), jnp.uint32), axis=-1)
    batches = perms[:, : per_epoch * batch_size].reshape(epochs * per_epoch, batch_size)[:num_steps]

    train = eqx.filter_closure_convert(batch_loss, w0, batch0, dynamic_args)

    def run(train, data, dyn, w, state, indices):
        import optax

        def step(carry, idx):
            w, state = carry
            batch = jtu.tree_map(lambda x: x[idx], data)
            value, g = jax.value_and_grad(train)(w, batch, dyn)
            updates, state = optimizer.update(g, state, w)
            return (optax.apply_updates(w, updates), state), value

        (w, state), trace = jax.lax.scan(step, (w, state), indices)
        return w, state, trace

    frozen_train, frozen_data, frozen_args = stop_gradient_arrays((train, data, dynamic_args))
    w0 = stop_gradient_arrays(w0)
    state0 = stop_gradient_arrays(state0)
    unrolled = isinstance(adjoint, HypergradientUnrolled)
    live = min(adjoint.steps, num_steps) if unrolled else 0
    # The first num_steps - live steps are cut from differentiation; the last `live` steps
    # (HypergradientUnrolled only) are the same computation with live inputs.
    w_mid, state_mid, trace = run(frozen_train, frozen_data, frozen_args, w0, state0, batches[: num_steps - live])
    if live:
        w_mid, state_mid = jax.lax.stop_gradient((w_mid, state_mid))
        w_live, state_end, trace_live = run(train, data, dynamic_args, w_mid, state_mid, batches[num_steps - live :])
        trace = jnp.concatenate([trace, jax.lax.stop_gradient(trace_live)])
        w_end = jax.lax.stop_gradient(w_live)
    else:
        w_end, state_end = w_mid, state_mid

    frozen = stop_gradient_arrays((objective, dynamic))
    grad_norm = two_norm(frozen[0].grad(w_end, frozen[1]))
    grad_norm_0 = two_norm(frozen[0].grad(w0, frozen[1]))
    loss_end = frozen[0].value(w_end, frozen[1])
    finite = _tree_finite(w_end) & jnp.isfinite(grad_norm) & jnp.isfinite(loss_end)
    gtol_ = jnp.asarray(gtol, grad_norm.dtype)
    result = RESULTS.where(
        finite, RESULTS.where(grad_norm <= gtol_, RESULTS.successful, RESULTS.max_steps_reached), RESULTS.nonfinite
    )
    if throw:
        _raise_if_loop_failed(result, grad_norm, grad_norm_0, gtol_, num_steps)
    solved = result == RESULTS.successful
    stats = {
        "num_steps": jnp.asarray(num_steps),
        "residual_norm": grad_norm,
        "grad_norm": grad_norm,
        "grad_norm_0": grad_norm_0,
        "loss": loss_end,
        "loss_trace": trace,
        "opt_state": jax.lax.stop_gradient(state_end),
    }

    if unrolled:
        # The derivative of the last `live` steps; the value is w_T either way.
        value = w_live
    else:
        alpha = getattr(adjoint, "alpha", None)
        if alpha is None and adjoint.uses_alpha:
            alpha = _step_from_curvature(_power_curvature(_hvp((frozen[0], w_end, frozen[1])), w_end), dtype)
        alpha = jax.lax.stop_gradient(jnp.asarray(1.0 if alpha is None else alpha, dtype))
        config = _SolveConfig(estimator=adjoint, alpha=alpha, throw=bool(throw))
        value = _implicit_minimiser(w_end, objective, dynamic, backward_probe, config)
    value = _nan_tangent_unless(value, solved)
    aux = objective.fn(value, dynamic)[1] if has_aux else None
    return Solution(value=value, result=result, stats=stats, aux=aux)


# ------------------------------------------------------------------------- checks


def _check_optimizer(optimizer) -> None:
    hint = "pass an optax GradientTransformation, e.g. optimizer=optax.sgd(0.1) or optax.adam(1e-3)"
    if _is_optax(optimizer):
        return
    if optimizer is None:
        raise TypeError(f"{_ENTRY} needs `optimizer`, the optimiser of the inner loop: {hint}.")
    if isinstance(optimizer, AbstractFixedPointSolver):
        raise TypeError(
            f"`optimizer` is the optax optimiser of the stochastic inner loop, got the fpx solver "
            f"{type(optimizer).__name__}: {hint}. fpx solvers find deterministic minimisers with "
            f"fpx.argmin(loss, w0, args, solver=fpx.{type(optimizer).__name__}(...))."
        )
    if callable(optimizer):
        name = getattr(optimizer, "__name__", repr(optimizer))
        raise TypeError(
            f"`optimizer` must be an optax GradientTransformation (an object with init and update), got "
            f"the function {name!r}: optax optimisers are built by calling their constructor, e.g. "
            f"optimizer=optax.{name}(1e-3) rather than optax.{name}."
        )
    if isinstance(optimizer, (int, float)) and not isinstance(optimizer, bool):
        raise TypeError(
            f"`optimizer` must be an optax GradientTransformation, got the number {optimizer!r}: for plain "
            f"SGD with that learning rate pass optimizer=optax.sgd({optimizer!r})."
        )
    raise TypeError(f"`optimizer` must be an optax GradientTransformation, got {optimizer!r}: {hint}.")


def _init_state(optimizer, w0, opt_state):
    try:
        state = optimizer.init(w0) if opt_state is None else opt_state
        reference = jax.eval_shape(optimizer.init, w0)
        jax.eval_shape(optimizer.update, jax.eval_shape(lambda: w0), reference, jax.eval_shape(lambda: w0))
    except Exception as e:
        e.add_note(
            f"(raised while calling optimizer.init(w0) / optimizer.update(grads, state, w0) in {_ENTRY}: the "
            "inner loop calls update(grads, state, params) with no extra arguments, so optimisers that need "
            "more (optax.lbfgs's value and value_fn) are not supported)"
        )
        raise
    if opt_state is not None:
        ref_def, got_def = jtu.tree_structure(reference), jtu.tree_structure(opt_state)
        ref_shapes = [(x.shape, x.dtype) for x in jtu.tree_leaves(reference)]
        got_shapes = [(np.shape(x), jnp.result_type(x)) for x in jtu.tree_leaves(opt_state)]
        if ref_def != got_def or ref_shapes != got_shapes:
            raise ValueError(
                f"`opt_state` must be a state of `optimizer` for weights like w0 (what optimizer.init(w0) "
                f"returns, or a previous sol.stats['opt_state']), got a pytree of structure {got_def} where "
                f"{ref_def} was expected."
            )
    return state


def _check_key(key):
    if isinstance(key, (jax.Array, np.ndarray)):
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ():
            return key
        if key.dtype == jnp.uint32 and key.shape == (2,):  # a legacy jax.random.PRNGKey
            return key
    raise TypeError(
        f"`key` must be one JAX PRNG key, e.g. jax.random.key(0) (it orders the minibatches), got "
        f"{key!r}" + (f" of shape {key.shape}" if hasattr(key, "shape") else "") + ". Under vmap, vmap "
        "over a batch of keys (jax.random.split(key, n))."
    )


def _check_data(data, batch_size: int):
    leaves, treedef = jtu.tree_flatten(data)
    if not leaves:
        raise ValueError(
            f"{_ENTRY}: `data` has no arrays; it must be a pytree of arrays with the examples along the leading "
            "axis, e.g. data=(x, y)."
        )
    out, sizes = [], []
    for path, leaf in jtu.tree_flatten_with_path(data)[0]:
        where = "data" + jtu.keystr(path)
        if not isinstance(leaf, (jax.Array, np.ndarray)):
            raise TypeError(
                f"{_ENTRY}: every leaf of `data` must be an array with the examples along the leading axis, got "
                f"{type(leaf).__name__} at {where}. Convert it (jnp.asarray), or pass constants in `args`."
            )
        if leaf.ndim == 0:
            raise ValueError(
                f"{_ENTRY}: {where} is a scalar; every leaf of `data` needs a leading axis of examples. "
                "Pass per-run constants in `args`."
            )
        sizes.append((where, leaf.shape[0]))
        out.append(jnp.asarray(leaf))
    n = sizes[0][1]
    if any(s != n for _, s in sizes):
        raise ValueError(
            f"{_ENTRY}: the leaves of `data` must share their leading (example) axis, got "
            + ", ".join(f"{w}: {s}" for w, s in sizes) + "."
        )
    if batch_size > n:
        raise ValueError(
            f"{_ENTRY}: `batch_size` = {batch_size} is larger than the {n} examples in `data`: use "
            f"batch_size <= {n} (batch_size={n} is full-batch training; fpx.argmin solves that to a fixed "
            "point)."
        )
    return jtu.tree_unflatten(treedef, out), n


def _raise_if_loop_failed(result, grad_norm, grad_norm_0, gtol, num_steps: int) -> None:
    def check(failed, code, g, g0, tol):
        if not bool(failed):
            return
        if int(code) == RESULTS.nonfinite._value:
            why = (
                "the final iterate (or the stationarity loss / gradient there) is not finite: the loop diverged. "
                "Lower the learning rate, clip gradients (optax.clip_by_global_norm), or check the loss for overflow."
            )
        else:
            why = (
                f"the final iterate is not stationary enough: |grad L_S(w_T)| = {float(g):.3e} > gtol = "
                f"{float(tol):.3e} (it was {float(g0):.3e} at w0). The hypergradient is taken at w_T as if it were "
                "the minimiser, with an error growing with that gradient norm. Run more steps, decay the learning "
                "rate (an optax schedule), use larger batches, warm-start from a nearer w0, or loosen gtol."
            )
        raise FixedPointError(
            f"{_ENTRY}: after {num_steps} optimiser steps {why}\nPass throw=False to get the result code and "
            "a NaN hypergradient instead."
        )

    failed = result != RESULTS.successful
    any_failed, (code, g, g0, tol) = unvmapped_worst(
        failed, result._value, grad_norm, grad_norm_0, jnp.broadcast_to(gtol, grad_norm.shape)
    )
    jax.debug.callback(check, any_failed, code, g, g0, tol)
