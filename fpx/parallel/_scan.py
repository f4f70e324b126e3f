"""`fpx.parallel.scan`: every state of a recurrence at once, as a fixed point.

The states `H = (h_1, ..., h_T)` of `h_t = f(h_{t-1}, x_t)` are the fixed point of the
trajectory map `T(H)_t = f(h_{t-1}, x_t)` (with `h_0` given). Its Jacobian is block
lower-bidiagonal and nilpotent, which gives every method here the *prefix property*: after
`k` iterations the first `k` states are exact, so `T` iterations always suffice.

- `jacobi`: Picard on `T` (Song et al., 2021).
- `gauss_seidel` / `hybrid`: blocks of consecutive steps evaluated sequentially inside,
  in parallel across blocks (exact after as many iterations as there are blocks).
- `deer`: Newton on `H - T(H)` (Lim et al., 2024); the Newton system is the linear
  recurrence `d_t = A_t d_{t-1} + r_t`, solved by a parallel prefix scan.
- `quasi_deer`: the same with the diagonal of `A_t` (Gonzalez et al., 2024): O(T·D).
- `elk` / `quasi_elk`: Levenberg–Marquardt steps, evaluated as a parallel Kalman smoother
  (Särkkä & García-Fernández, 2021), with the damping adapted by a trust-region ratio test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, PyTree, Scalar

from .. import _validate as checks
from .._errors import raise_if_failed
from .._fixed_point import fixed_point
from .._misc import max_norm, stop_gradient_arrays, tree_describe, two_norm
from .._solution import Solution
from ..solvers import AbstractFixedPointSolver

_HIGHEST = jax.lax.Precision.HIGHEST
METHODS = ("jacobi", "gauss_seidel", "hybrid", "deer", "quasi_deer", "elk", "quasi_elk")
# Methods with the prefix property: exact after `T` iterations (`hybrid`: after as many as blocks).
_PREFIX_METHODS = ("jacobi", "gauss_seidel", "hybrid", "deer", "quasi_deer")
_DAMPING_RANGE = (1e-12, 1e12)


class _Recurrence(eqx.Module):
    """`h_t = step(h_{t-1}, x_t)` on flat states `h` of shape [D]; trajectories are [T, D]."""

    step: Callable
    h0: Array
    xs: PyTree
    length: int = eqx.field(static=True)

    def previous(self, H):
        """`(h_0, h_1, ..., h_{T-1})`: the state each step starts from."""
        return jnp.concatenate([self.h0[None], H[:-1]], axis=0)

    def __call__(self, H):
        return jax.vmap(self.step)(self.previous(H), self.xs)

    def linearize(self, H, diagonal: bool):
        """`(T(H), A)` with `A_t = ∂f/∂h` at `(h_{t-1}, x_t)`: [T, D, D], or its diagonal [T, D]."""
        prev = self.previous(H)
        if not diagonal:

            def with_value(h, x):
                out = self.step(h, x)
                return out, out

            jac, out = jax.vmap(jax.jacfwd(with_value, has_aux=True))(prev, self.xs)
            return out, jac
        # One jvp per state component keeps memory at O(T·D) (a dense Jacobian is O(T·D²)).
        out, lin = jax.linearize(lambda p: jax.vmap(self.step)(p, self.xs), prev)

        def column(i, diag):
            basis = jnp.zeros_like(prev).at[:, i].set(1)
            return diag.at[:, i].set(lin(basis)[:, i])

        return out, jax.lax.fori_loop(0, prev.shape[1], column, jnp.zeros_like(prev))

    def sweep(self, H, block_size: int):
        """One block Gauss–Seidel sweep: each block runs sequentially from the state before it."""
        T, B = self.length, block_size
        blocks = -(-T // B)
        pad = blocks * B - T
        starts = jnp.concatenate([self.h0[None], H[B - 1 : (blocks - 1) * B : B]], axis=0)

        def tile(x):
            if pad:
                x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)], axis=0)
            return jnp.swapaxes(x.reshape((blocks, B) + x.shape[1:]), 0, 1)

        def body(h, x):
            h = jax.vmap(self.step)(h, x)
            return h, h

        _, out = jax.lax.scan(body, starts, jtu.tree_map(tile, self.xs))
        return jnp.swapaxes(out, 0, 1).reshape((blocks * B,) + out.shape[2:])[:T]


def _matmul(a, b):
    return jnp.einsum("...ij,...jk->...ik", a, b, precision=_HIGHEST)


def _matvec(a, v):
    return jnp.einsum("...ij,...j->...i", a, v, precision=_HIGHEST)


class _Dense:
    """Matrix algebra on dense Jacobians `[..., D, D]`."""

    mm = staticmethod(_matmul)
    mv = staticmethod(_matvec)

    @staticmethod
    def t(a):
        return jnp.swapaxes(a, -1, -2)

    @staticmethod
    def solve(m, x):
        return jnp.linalg.solve(m, x)

    @staticmethod
    def eye_like(a):
        return jnp.broadcast_to(jnp.eye(a.shape[-1], dtype=a.dtype), a.shape)


class _Diagonal:
    """The same algebra on diagonal Jacobians `[..., D]` (elementwise)."""

    @staticmethod
    def mm(a, b):
        return a * b

    mv = mm

    @staticmethod
    def t(a):
        return a

    @staticmethod
    def solve(m, x):
        return x / m

    @staticmethod
    def eye_like(a):
        return jnp.ones_like(a)


def _ops(diagonal: bool):
    return _Diagonal if diagonal else _Dense


def affine_scan(A, b, diagonal: bool = False):
    """All `d_t = A_t d_{t-1} + b_t` (`d_0 = 0`) by a parallel prefix scan (depth log T)."""
    ops = _ops(diagonal)

    def compose(earlier, later):
        (a1, b1), (a2, b2) = earlier, later
        return ops.mm(a2, a1), ops.mv(a2, b1) + b2

    return jax.lax.associative_scan(compose, (A, b))[1]


def damped_newton_step(A, r, damping, diagonal: bool = False):
    """`argmin_d Σ_t |d_t - A_t d_{t-1} - r_t|² + damping Σ_t |d_t|²` with `d_0 = 0`.

    The Levenberg–Marquardt step of ELK: the posterior mean of the linear-Gaussian model
    `d_t = A_t d_{t-1} + r_t + q_t` (`q_t ~ N(0, I)`) observed as `0 = d_t + e_t`
    (`e_t ~ N(0, I / damping)`), by the parallel Kalman filter and RTS smoother of Särkkä
    and García-Fernández (2021). `damping -> 0` is the Newton (DEER) step.
    """
    ops = _ops(diagonal)
    dtype = r.dtype
    damping = jnp.asarray(damping, dtype)
    keep = 1 / (1 + damping)  # the Kalman gain's complement: the prediction's weight
    gain = damping / (1 + damping)
    eye = ops.eye_like(A)
    At = ops.t(A)
    first = jnp.arange(r.shape[0]) == 0
    first_m = first.reshape((-1,) + (1,) * (A.ndim - 1))
    first_v = first[:, None]
    # Filtering elements (A, b, C, eta, J); the first has the exact prior d_0 = 0.
    elems = (
        jnp.where(first_m, 0, keep * A),
        keep * r,
        keep * eye,
        jnp.where(first_v, 0, -gain * ops.mv(At, r)),
        jnp.where(first_m, 0, gain * ops.mm(At, A)),
    )

    def filter_compose(i, j):
        a_i, b_i, c_i, e_i, j_i = i
        a_j, b_j, c_j, e_j, j_j = j
        m = ops.eye_like(c_i) + ops.mm(c_i, j_j)
        a_j_minv = ops.t(ops.solve(ops.t(m), ops.t(a_j)))  # A_j (I + C_i J_j)^-1
        a_i_t_ninv = ops.t(ops.solve(m, a_i))  # A_i^T (I + J_j C_i)^-1
        return (
            ops.mm(a_j_minv, a_i),
            ops.mv(a_j_minv, b_i + ops.mv(c_i, e_j)) + b_j,
            ops.mm(ops.mm(a_j_minv, c_i), ops.t(a_j)) + c_j,
            ops.mv(a_i_t_ninv, e_j - ops.mv(j_j, b_i)) + e_i,
            ops.mm(ops.mm(a_i_t_ninv, j_j), a_i) + j_i,
        )

    _, mean, cov, _, _ = jax.lax.associative_scan(filter_compose, elems)
    # Smoothing elements (E, g): E_t = P_t F^T (F P_t F^T + I)^-1 with F = A_{t+1}.
    F = jnp.concatenate([A[1:], jnp.zeros_like(A[:1])], axis=0)
    u = jnp.concatenate([r[1:], jnp.zeros_like(r[:1])], axis=0)
    fp = ops.mm(F, cov)
    s = ops.mm(fp, ops.t(F)) + ops.eye_like(cov)
    E = ops.t(ops.solve(s, fp))
    g = mean - ops.mv(E, ops.mv(F, mean) + u)
    last = (jnp.arange(r.shape[0]) == r.shape[0] - 1).reshape(first_m.shape)
    E = jnp.where(last, 0, E)
    g = jnp.where(last[..., 0] if not diagonal else last, mean, g)

    def smooth_compose(later, earlier):
        e_j, g_j = later
        e_i, g_i = earlier
        return ops.mm(e_i, e_j), ops.mv(e_i, g_j) + g_i

    return jax.lax.associative_scan(smooth_compose, (E, g), reverse=True)[1]


class _TrajectorySolver(AbstractFixedPointSolver):
    """A solver that knows the recurrence behind the trajectory map it iterates."""

    vmap_free_running: ClassVar[bool] = True  # counters-only stats, no inner loops

    recurrence: _Recurrence
    rtol: float
    atol: float
    norm: Callable[[PyTree], Scalar] = max_norm
    # The trajectory map of any recurrence has exactly one fixed point.
    map_has_fixed_point = True


class Jacobi(_TrajectorySolver):
    """Picard iteration on the trajectory: every state from its predecessor's last value."""

    def init(self, fn, z0, fz0, args):
        return None

    def step(self, fn, z, fz, args, state):
        return fz, fn(fz, args), None


class BlockGaussSeidel(_TrajectorySolver):
    """Jacobi across blocks of `block_size` steps, Gauss–Seidel (sequential) inside them."""

    block_size: int = eqx.field(static=True, kw_only=True)
    fn_evals_per_step = 2

    def init(self, fn, z0, fz0, args):
        return None

    def step(self, fn, z, fz, args, state):
        z_next = self.recurrence.sweep(z, self.block_size)
        return z_next, fn(z_next, args), None


class DEER(_TrajectorySolver):
    """Newton's method on the trajectory; `diagonal=True` is quasi-DEER."""

    diagonal: bool = eqx.field(static=True, kw_only=True)

    def init(self, fn, z0, fz0, args):
        return self.recurrence.linearize(z0, self.diagonal)[1]

    def step(self, fn, z, fz, args, jacobian):
        z_next = z + affine_scan(jacobian, fz - z, self.diagonal)
        fz_next, jacobian = self.recurrence.linearize(z_next, self.diagonal)
        return z_next, fz_next, jacobian


class _DampedState(eqx.Module):
    jacobian: Array
    damping: Scalar
    num_rejected: Array


class ELK(_TrajectorySolver):
    """Levenberg–Marquardt on the trajectory, damping adapted by the gain ratio; `diagonal=True` is quasi-ELK.

    A step is accepted only if it lowers `|H - T(H)|₂`. After an accepted step the damping
    falls tenfold if the step achieved more than 3/4 of the reduction its linear model
    predicted, twofold if more than 1/4; after a rejected one it rises tenfold.
    """

    diagonal: bool = eqx.field(static=True, kw_only=True)
    damping: float = eqx.field(kw_only=True)

    def init(self, fn, z0, fz0, args):
        dtype = z0.dtype
        return _DampedState(
            jacobian=self.recurrence.linearize(z0, self.diagonal)[1],
            damping=jnp.asarray(self.damping, dtype),
            num_rejected=jnp.array(0, jnp.int32),
        )

    def step(self, fn, z, fz, args, state):
        ops = _ops(self.diagonal)
        r = fz - z
        d = damped_newton_step(state.jacobian, r, state.damping, self.diagonal)
        z_try = z + d
        fz_try, jac_try = self.recurrence.linearize(z_try, self.diagonal)
        d_prev = jnp.concatenate([jnp.zeros_like(d[:1]), d[:-1]], axis=0)
        model = r - (d - ops.mv(state.jacobian, d_prev))
        now, after, predicted = two_norm(r), two_norm(fz_try - z_try), two_norm(model)
        achieved = (now - after) * (now + after)
        expected = (now - predicted) * (now + predicted)
        ratio = achieved / jnp.where(expected > 0, expected, jnp.inf)
        accept = jnp.isfinite(after) & (after <= now)
        low, high = _DAMPING_RANGE
        # Only a rejected step raises the damping: the quasi methods' diagonal model is
        # inexact by design, so a low gain ratio on an accepted step says little.
        relief = jnp.where(ratio > 0.75, 10.0, jnp.where(ratio > 0.25, 2.0, 1.0))
        damping = jnp.where(
            accept,
            jnp.maximum(state.damping / relief, low),
            jnp.minimum(state.damping * 10, high),
        )
        new = _DampedState(
            jacobian=jnp.where(accept, jac_try, state.jacobian),
            damping=damping.astype(state.damping.dtype),
            num_rejected=state.num_rejected + (~accept).astype(jnp.int32),
        )
        return jnp.where(accept, z_try, z), jnp.where(accept, fz_try, fz), new

    def stats(self, state):
        return {"damping": state.damping, "num_rejected": state.num_rejected}


@eqx.filter_custom_jvp
def _implicit_trajectory(H, recurrence, *, gradient):
    """`H` itself; its tangent solves the linear recurrence `Ḣ_t = A_t Ḣ_{t-1} + ∂f/∂θ θ̇`."""
    del recurrence, gradient
    return H


@_implicit_trajectory.def_jvp
def _implicit_trajectory_jvp(primals, tangents, *, gradient):
    H, recurrence = primals
    _, t_recurrence = tangents
    # The primal through the rule's own function keeps higher derivatives implicit too.
    H = _implicit_trajectory(H, recurrence, gradient=gradient)
    t_recurrence = jtu.tree_map(
        eqxi.materialise_zeros, recurrence, t_recurrence, is_leaf=lambda x: x is None
    )
    _, y_dot = eqx.filter_jvp(lambda rec: rec(H), (recurrence,), (t_recurrence,))
    if gradient == "associative":
        _, jac = recurrence.linearize(H, diagonal=False)
        return H, affine_scan(jac, y_dot)
    prev = recurrence.previous(H)

    def body(d, inputs):
        h, x, y = inputs
        _, jd = jax.jvp(lambda v: recurrence.step(v, x), (h,), (d,))
        d = jd + y
        return d, d

    _, h_dot = jax.lax.scan(body, jnp.zeros_like(recurrence.h0), (prev, recurrence.xs, y_dot))
    return H, h_dot


def _default_tolerance(dtype) -> float:
    """Newton-type methods reach rounding level in a step or two: default near it."""
    eps = float(jnp.finfo(dtype).eps)
    if eps <= 1e-15:
        return 1e-12
    if eps <= 1e-6:
        return 1e-6
    return 10 * eps


def _sequence_length(xs, length) -> int:
    leaves = jtu.tree_flatten_with_path(xs)[0]
    lengths = {}
    for path, leaf in leaves:
        where = jtu.keystr(path) or "xs"
        if not hasattr(leaf, "shape") or np.ndim(leaf) == 0:
            raise ValueError(
                f"Every leaf of `xs` needs a leading time axis, but the leaf at {where} is "
                f"{leaf!r}, which has none. Stack the inputs along axis 0 (as for jax.lax.scan)."
            )
        lengths[where] = int(np.shape(leaf)[0])
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{k}: {v}" for k, v in lengths.items())
        raise ValueError(f"The leaves of `xs` must share their leading (time) length; got {listed}.")
    if length is not None:
        length = checks.integer("", "length", length, minimum=1)
        if lengths and length != next(iter(lengths.values())):
            raise ValueError(f"`length={length}` disagrees with the leading length {next(iter(lengths.values()))} of `xs`.")
        return length
    if not lengths:
        raise ValueError("Pass `length=` when `xs` is None (or has no array leaves): scan cannot tell how many steps to take.")
    (T,) = set(lengths.values())
    if T == 0:
        raise ValueError("`xs` has length 0: there is no step to take.")
    return T


def _check_step(f, h0, x0) -> None:
    want = eqx.filter_eval_shape(lambda: h0)
    try:
        got = eqx.filter_eval_shape(f, h0, x0)
    except Exception as e:
        e.add_note(f"(raised while tracing f(h0, xs[0]) with h0: {tree_describe(want)})")
        raise
    same = jtu.tree_structure(want) == jtu.tree_structure(got) and all(
        isinstance(b, jax.ShapeDtypeStruct) and a.shape == b.shape and a.dtype == b.dtype
        for a, b in zip(jtu.tree_leaves(want), jtu.tree_leaves(got))
    )
    if not same:
        raise ValueError(
            "f(h, x) must return the next state: a pytree with the structure, shapes and dtypes of h0.\n"
            f"  h0:            {tree_describe(want)}\n"
            f"  f(h0, xs[0]):  {tree_describe(got)}\n"
            "For outputs other than the state, compute them from the returned trajectory afterwards."
        )


def _solver(method, recurrence, rtol, atol, norm, block_size, damping):
    if method == "jacobi":
        return Jacobi(recurrence, rtol, atol, norm)
    if method in ("gauss_seidel", "hybrid"):
        size = recurrence.length if method == "gauss_seidel" else block_size
        return BlockGaussSeidel(recurrence, rtol, atol, norm, block_size=size)
    if method in ("deer", "quasi_deer"):
        return DEER(recurrence, rtol, atol, norm, diagonal=method == "quasi_deer")
    return ELK(recurrence, rtol, atol, norm, diagonal=method == "quasi_elk", damping=damping)


def scan(
    f: Callable[[PyTree, Any], PyTree],
    h0: PyTree,
    xs: PyTree = None,
    *,
    method: Literal["jacobi", "gauss_seidel", "hybrid", "deer", "quasi_deer", "elk", "quasi_elk"] = "deer",
    length: int | None = None,
    reverse: bool = False,
    h_init: PyTree | None = None,
    max_steps: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    norm: Callable[[PyTree], Scalar] = max_norm,
    block_size: int | None = None,
    damping: float = 1e-2,
    gradient: Literal["associative", "sequential"] | None = None,
    trace_length: int = 0,
    throw: bool = True,
) -> Solution:
    """All states of `h_t = f(h_{t-1}, x_t)` at once, as the fixed point of the trajectory map.

    The states `h_1 .. h_T` solve the `T` equations `h_t = f(h_{t-1}, x_t)` jointly; each
    method below iterates on all of them in parallel, in fpx's one driver: the stopping
    test is on the residual `max_t |h_t - f(h_{t-1}, x_t)|` (`norm`, default
    `fpx.max_norm`), not on the change of the iterate; the best iterate, non-finite and
    divergence detection, `throw`, and a `result` and `num_steps` per sequence under
    `jax.vmap` are those of `fpx.fixed_point`.

    **Arguments:**

    - `f`: one step, `f(h, x) -> h'`, with `h'` of the structure, shapes and dtypes of `h0`.
    - `h0`: the initial state, any pytree of floating-point arrays.
    - `xs`: the inputs, a pytree whose leaves share a leading time axis of length `T`
      (`None` with `length=T` for an autonomous recurrence).
    - `method`:
        - `"jacobi"`: Picard on the trajectory; exact after at most `T` iterations.
        - `"gauss_seidel"`: one sequential sweep (exact after one iteration; the reference).
        - `"hybrid"`: blocks of `block_size` steps evaluated sequentially inside and in
          parallel across blocks; exact after at most `ceil(T / block_size)` iterations.
        - `"deer"` (default): Newton's method with the Jacobians `∂f/∂h` (`jax.jacfwd` per
          step, O(T·D²) memory) and a parallel prefix scan for each Newton system;
          quadratic convergence, exact after at most `T` iterations, but it can diverge
          on an unstable recurrence (reported as `RESULTS.diverged` or `nonfinite`).
        - `"quasi_deer"`: the diagonal of the Jacobians only; O(T·D) memory and work.
        - `"elk"` / `"quasi_elk"`: Levenberg–Marquardt (damped Newton) steps, each a
          parallel Kalman smoother, accepted only where they lower the residual; the
          damping (starting at `damping`) adapts by a trust-region ratio test, so it need
          not be swept. Stable where DEER diverges.
    - `length`: the number of steps, needed only when `xs` is None.
    - `reverse`: run the recurrence from the last input to the first (as `lax.scan`).
    - `h_init`: a starting guess for the trajectory (leading axis `T`), e.g. the solution
      for the previous parameters; default: `h0` at every step.
    - `max_steps`: iteration budget; default and upper bound for the methods with the
      prefix property: `T` (`ceil(T / block_size)` for `"hybrid"`), more cannot help;
      default 256 for the damped methods.
    - `rtol`, `atol`: stopping tolerances, default by dtype (1e-12 in float64, 1e-6 in
      float32, `10 * eps` below): `norm(H - T(H)) <= atol + rtol * norm(H)`.
    - `gradient`: how the implicit derivative's linear recurrence is solved:
      `"associative"` (a parallel prefix scan with dense Jacobians; the default for
      `deer`/`elk`) or `"sequential"` (a `lax.scan` of Jacobian-vector products, O(T·D)
      memory; the default otherwise). Either is exact.
    - `trace_length`, `throw`: as in `fpx.fixed_point`.

    **Gradients** with respect to `h0`, `xs` and the arrays `f` closes over follow from the
    implicit function theorem at the solution: one linear recurrence (forward mode) or its
    transpose, a reverse scan with the transposed Jacobians (reverse mode). Memory does not
    grow with the number of iterations.

    **Returns:** an `fpx.Solution` whose `value` stacks `h_1 .. h_T` along a new leading
    axis (the `ys` of `lax.scan(lambda h, x: (f(h, x), f(h, x)), h0, xs)`); `stats` holds
    `num_steps`, `residual_norm` and, for the damped methods, `damping` and `num_rejected`.

    ```python
    import jax, jax.numpy as jnp, fpx
    W = 0.5 * jax.random.normal(jax.random.key(0), (4, 4)) / 2
    cell = lambda h, x: jnp.tanh(W @ h + x)
    xs = jax.random.normal(jax.random.key(1), (500, 4))
    sol = fpx.parallel.scan(cell, jnp.zeros(4), xs)
    _, reference = jax.lax.scan(lambda h, x: (cell(h, x), cell(h, x)), jnp.zeros(4), xs)
    assert sol.converged and sol.stats["num_steps"] <= 10
    assert jnp.max(jnp.abs(sol.value - reference)) < 1e-5
    grad = jax.grad(lambda xs: fpx.parallel.scan(cell, jnp.zeros(4), xs).value[-1].sum())(xs)
    assert grad.shape == xs.shape
    ```
    """
    checks.function("", "f", f, what="a function f(h, x) -> h")
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {', '.join(map(repr, METHODS))}; got {method!r}.")
    if gradient not in (None, "associative", "sequential"):
        raise ValueError(f"`gradient` must be 'associative', 'sequential' or None; got {gradient!r}.")
    if not isinstance(throw, (bool, np.bool_)) or not isinstance(reverse, (bool, np.bool_)):
        raise TypeError("`throw` and `reverse` must be True or False.")
    checks.function("", "norm", norm, what="a function of a pytree, e.g. fpx.max_norm")
    trace_length = checks.integer("", "trace_length", trace_length, minimum=0)
    h0 = checks.float_tree("`h0`", h0, empty="scan needs a state of floating-point arrays.")
    T = _sequence_length(xs, length)
    if method == "hybrid":
        if block_size is None:
            raise ValueError("method='hybrid' needs `block_size=`, the number of steps evaluated sequentially per block.")
        block_size = checks.integer("", "block_size", block_size, minimum=1)
    elif block_size is not None:
        raise ValueError(f"`block_size` applies to method='hybrid' only, not {method!r}.")
    if method in ("elk", "quasi_elk"):
        checks.real("", "damping", damping, low=0, low_open=True)
    flat_h0, unravel = ravel_pytree(h0)
    dtype = flat_h0.dtype
    rtol = _default_tolerance(dtype) if rtol is None else rtol
    atol = _default_tolerance(dtype) if atol is None else atol
    if reverse:
        xs = jtu.tree_map(lambda x: jnp.flip(x, axis=0), xs)
    x0 = jtu.tree_map(lambda x: x[0], xs)
    _check_step(f, h0, x0)

    def flat_step(h, x):
        return ravel_pytree(f(unravel(h), x))[0].astype(dtype)

    recurrence = _Recurrence(eqx.filter_closure_convert(flat_step, flat_h0, x0), flat_h0, xs, T)
    if h_init is None:
        H0 = jnp.broadcast_to(flat_h0, (T, flat_h0.shape[0]))
    else:
        h_init = checks.float_tree("`h_init`", h_init, empty="pass the guessed trajectory, stacked like h0.")
        want = jtu.tree_map(lambda a: (T,) + a.shape, h0)
        got = jtu.tree_map(jnp.shape, h_init)
        if jtu.tree_structure(h_init) != jtu.tree_structure(h0) or want != got:
            raise ValueError(
                f"`h_init` must stack T={T} states like h0 along a leading axis: expected shapes "
                f"{want}, got {got}."
            )
        if reverse:
            h_init = jtu.tree_map(lambda x: jnp.flip(x, axis=0), h_init)
        H0 = jax.vmap(lambda h: ravel_pytree(h)[0].astype(dtype))(h_init)
    if method in _PREFIX_METHODS:
        bound = -(-T // block_size) if method == "hybrid" else (1 if method == "gauss_seidel" else T)
        max_steps = bound if max_steps is None else min(checks.integer("", "max_steps", max_steps, minimum=1), bound)
    else:
        max_steps = 256 if max_steps is None else checks.integer("", "max_steps", max_steps, minimum=1)
    frozen = stop_gradient_arrays(recurrence)
    solver = _solver(method, frozen, rtol, atol, norm, block_size, damping)
    sol = fixed_point(
        lambda H, rec: rec(H),
        stop_gradient_arrays(H0),
        frozen,
        solver=solver,
        max_steps=max_steps,
        throw=False,
        trace_length=trace_length,
    )
    if gradient is None:
        gradient = "associative" if method in ("deer", "elk") else "sequential"
    H = _implicit_trajectory(sol.value, recurrence, gradient=gradient)
    value = jax.vmap(unravel)(H)
    if reverse:
        value = jtu.tree_map(lambda x: jnp.flip(x, axis=0), value)
    out = Solution(value=value, result=sol.result, stats=sol.stats)
    if throw:
        out = raise_if_failed(out, solver, max_steps, entry=f"fpx.parallel.scan(method={method!r})")
    return out

