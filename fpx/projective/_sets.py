"""Exact projections onto the graphs of max-type primitives and onto the label sets of a loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int

from .._shapes import same_shape


def _max2_graph(u: Array, v: Array, y: Array) -> tuple[Array, Array, Array]:
    # The graph {y = max(u, v)} is the union of the convex pieces {y = u >= v} and
    # {y = v >= u}. On the first, y = u = s and the cost 2 (s - m)^2 + (v' - v)^2 with
    # m = (u + y)/2 is minimised at (m, v) if m >= v, else on the edge s = v' = (2m + v)/3.
    def piece(u, v, y):
        m = (u + y) / 2
        edge = (2 * m + v) / 3
        inside = m >= v
        s = jnp.where(inside, m, edge)
        v_new = jnp.where(inside, v, edge)
        return s, v_new, (u - s) ** 2 + (y - s) ** 2 + (v - v_new) ** 2

    s1, v1, d1 = piece(u, v, y)
    s2, u2, d2 = piece(v, u, y)
    first = d1 <= d2
    u_new = jnp.where(first, s1, u2)
    v_new = jnp.where(first, v1, s2)
    return u_new, v_new, jnp.maximum(u_new, v_new)


def project_max_graph(u: ArrayLike, v: ArrayLike, y: ArrayLike) -> tuple[Array, Array, Array]:
    """Nearest point of the graph `{(u, v, y) : y = max(u, v)}`, entrywise on triples.

    The graph is the union of two convex pieces (`y = u >= v` and `y = v >= u`); each
    projection is explicit and the nearer one wins, so negative targets and targets below
    both inputs are handled exactly. `jax.nn.relu(u)` is the case `v = 0` held fixed (see
    `fpx.feasibility.project_relu_graph`). Returns `(u', v', y')` with `y' = max(u', v')`.

    ```python
    import jax.numpy as jnp
    from fpx.projective import project_max_graph
    u, v, y = project_max_graph(jnp.array([0.0]), jnp.array([0.0]), jnp.array([3.0]))
    assert jnp.allclose(u, 1.5) and jnp.allclose(v, 0.0) and jnp.allclose(y, 1.5)
    ```
    """
    return _max2_graph(*same_shape("project_max_graph", u=u, v=v, y=y))


def _top_k_threshold(values: Array, anchor: Array, k_min: int) -> tuple[Array, Array]:
    """Minimise `(t - anchor)^2 + sum_i (values_i - t)_+^2` over `t`, with at least `k_min` active.

    The objective is convex and piecewise quadratic in t; with the values sorted
    decreasingly and k of them above t the minimiser is `(anchor + S_k) / (1 + k)`, where
    S_k is the sum of the k largest. The right k is the first (from k_min) whose threshold
    is at least the next value. Works on the last axis; returns `(t, k)`.
    """
    n = values.shape[-1]
    ordered = -jnp.sort(-values, axis=-1)
    partial = jnp.cumsum(ordered, axis=-1)
    ks = jnp.arange(1, n + 1, dtype=values.dtype).reshape((1,) * (values.ndim - 1) + (n,))
    t_k = (anchor[..., None] + partial) / (1 + ks)  # k = 1..n active
    next_value = jnp.concatenate([ordered[..., 1:], jnp.full(ordered.shape[:-1] + (1,), -jnp.inf, values.dtype)], -1)
    valid = t_k >= next_value
    if k_min == 0:
        t_0 = anchor
        valid_0 = t_0 >= ordered[..., 0]
        t_k = jnp.concatenate([t_0[..., None], t_k], -1)
        valid = jnp.concatenate([valid_0[..., None], valid], -1)
    index = jnp.argmax(valid, axis=-1)  # the first valid k (one always is: k = n)
    t = jnp.take_along_axis(t_k, index[..., None], -1)[..., 0]
    return t, index + k_min


def project_reduce_max_graph(u: ArrayLike, y: ArrayLike) -> tuple[Array, Array]:
    """Nearest point of `{(u, y) : y = max_i u_i}` (maximum over the last axis of `u`).

    For a threshold `t` the best `u'` clips every entry to `t` and raises the largest to
    `t` if all lie below it; the cost is convex piecewise quadratic in `t`, minimised in
    closed form after one sort (`O(n log n)`, exact). Returns `(u', y')`, `y' = max u'`.

    ```python
    import jax.numpy as jnp
    from fpx.projective import project_reduce_max_graph
    u, y = project_reduce_max_graph(jnp.array([3.0, 1.0, 2.0]), jnp.array(0.0))
    assert jnp.allclose(y, 5.0 / 3.0) and jnp.allclose(u, jnp.array([5 / 3, 1.0, 5 / 3]))
    ```
    """
    u = jnp.asarray(u)
    y = jnp.asarray(y, dtype=u.dtype)
    if u.ndim == 0 or y.shape != u.shape[:-1]:
        raise ValueError(f"project_reduce_max_graph: y must have shape u.shape[:-1]; got u {u.shape}, y {y.shape}.")
    return _reduce_max_graph(u, y)


def _reduce_max_graph(u, y):
    t, k = _top_k_threshold(u, y, k_min=1)
    rank = jnp.argsort(jnp.argsort(-u, axis=-1), axis=-1)
    u_new = jnp.where(rank < k[..., None], t[..., None], u)
    return u_new, jnp.max(u_new, axis=-1)


def _logits_and_labels(fn: str, logits, label):
    logits = jnp.asarray(logits)
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        logits = logits.astype(float)
    label = jnp.asarray(label)
    if label.shape != logits.shape[:-1] or not jnp.issubdtype(label.dtype, jnp.integer):
        raise ValueError(
            f"{fn}: label must be an integer array of shape {logits.shape[:-1]}, got {label.dtype}{list(label.shape)}."
        )
    return logits, label


def project_margin(logits: Float[ArrayLike, "*batch classes"], label: Int[ArrayLike, "*batch"], margin: float = 1.0):
    """Nearest logits whose true class beats every other class by at least `margin`.

    The set `{o : o_label - o_j >= margin for all j != label}` is a polyhedral cone shifted
    by the margin (a multiclass hinge set). Its projection keeps the other logits below
    `t - margin`, where `t` is the new true-class logit; the cost is convex piecewise
    quadratic in `t` and is minimised exactly after one sort.

    ```python
    import jax.numpy as jnp
    from fpx.projective import project_margin
    o = project_margin(jnp.array([0.0, 0.0, 0.0]), 1, margin=1.0)
    assert jnp.allclose(o, jnp.array([-1 / 3, 2 / 3, -1 / 3]))
    ```
    """
    logits, label = _logits_and_labels("project_margin", logits, label)
    return _margin(logits, label, jnp.asarray(margin, logits.dtype))


def _margin(logits, label, margin):
    classes = logits.shape[-1]
    is_label = jax.nn.one_hot(label, classes, dtype=bool)
    anchor = jnp.sum(jnp.where(is_label, logits, 0), -1)
    # Other logits shifted by the margin; the label's own slot is excluded with -inf.
    shifted = jnp.where(is_label, -jnp.inf, logits + margin)
    t, _ = _top_k_threshold(shifted, anchor, k_min=0)
    others = jnp.minimum(logits, t[..., None] - margin)
    return jnp.where(is_label, t[..., None], others)


def _ce_objective(v, center, onehot, step):
    return 0.5 * jnp.sum((v - center) ** 2, -1) + step * (jax.nn.logsumexp(v, -1) - jnp.sum(onehot * v, -1))


def prox_cross_entropy(
    logits: Float[ArrayLike, "*batch classes"],
    label: Int[ArrayLike, "*batch"],
    step: float | Array = 1.0,
    *,
    tol: float | None = None,
    max_steps: int = 50,
) -> Float[Array, "*batch classes"]:
    """The proximal map of `step * CE(., label)`: `argmin_v step*CE(v) + |v - logits|^2 / 2`.

    Solved by Newton's method with a backtracking (Armijo) line search on this strongly
    convex problem, to a gradient norm `tol` (default `10 eps`, relative to `1 + |v|`).
    The Newton system `(I + step (diag p - p p^T)) d = g` is solved in closed form
    (Sherman–Morrison). PJAX's fixed-point update `v <- logits + step (onehot - softmax v)`
    is not a contraction for `step >= 2` (softmax is only 1/2-Lipschitz), so it can
    oscillate instead of converging; Newton converges for every step size.

    ```python
    import jax, jax.numpy as jnp
    from fpx.projective import prox_cross_entropy
    o = jnp.array([1.0, 2.0, 0.5])
    v = prox_cross_entropy(o, 0, step=5.0)
    residual = v - o + 5.0 * (jax.nn.softmax(v) - jnp.array([1.0, 0.0, 0.0]))
    assert jnp.max(jnp.abs(residual)) < 1e-4
    ```
    """
    logits, label = _logits_and_labels("prox_cross_entropy", logits, label)
    step = jnp.asarray(step, logits.dtype)
    if tol is None:
        tol = 10 * float(jnp.finfo(logits.dtype).eps)
    onehot = jax.nn.one_hot(label, logits.shape[-1], dtype=logits.dtype)
    return _prox_ce(logits, onehot, jnp.broadcast_to(step, logits.shape[:-1]), tol, max_steps)


def _prox_ce(center, onehot, step, tol, max_steps):
    step_ = step[..., None]

    def gradient(v):
        p = jax.nn.softmax(v, -1)
        return v - center + step_ * (p - onehot), p

    def newton_direction(g, p):
        # H = diag(1 + step p) - step p p^T; Sherman–Morrison with D = diag(1 + step p).
        dinv = 1 / (1 + step_ * p)
        dg, dp = dinv * g, dinv * p
        coef = step * jnp.sum(p * dg, -1) / (1 - step * jnp.sum(p * dp, -1))
        return dg + coef[..., None] * dp

    def small(v, g):
        return jnp.sqrt(jnp.sum(g * g, -1)) <= tol * (1 + jnp.sqrt(jnp.sum(v * v, -1)))

    def not_done(state):
        v, g, done, it = state
        return (it < max_steps) & ~jnp.all(done)

    def body(state):
        v, g, done, it = state
        _, p = gradient(v)
        d = newton_direction(g, p)
        f0 = _ce_objective(v, center, onehot, step)
        slope = jnp.sum(g * d, -1)
        # Backtracking over a fixed ladder of step sizes; the largest with Armijo decrease wins.
        ladder = jnp.asarray([1.0, 0.5, 0.25, 0.125, 1 / 16, 1 / 64, 1 / 256], v.dtype)
        ladder_b = ladder.reshape((1,) * (v.ndim - 1) + (-1,))
        trial = v[..., None, :] - ladder_b[..., None] * d[..., None, :]
        f_trial = _ce_objective(trial, center[..., None, :], onehot[..., None, :], step[..., None])
        ok = f_trial <= f0[..., None] - 1e-4 * ladder_b * slope[..., None]
        # Near the optimum float rounding hides the decrease of the objective; there the
        # full Newton step is taken if it shrinks the gradient (quadratic convergence).
        shrinks = jnp.sum(gradient(v - d)[0] ** 2, -1) < jnp.sum(g * g, -1)
        alpha = jnp.where(jnp.any(ok, -1), ladder[jnp.argmax(ok, -1)], jnp.where(shrinks, 1, 0))
        move = alpha[..., None] * d
        # A row is done when its gradient is at rounding level or no step decreases the
        # objective any more (float32 stalls there before reaching `tol`).
        stalled = jnp.sqrt(jnp.sum(move * move, -1)) <= 4 * eps * (1 + jnp.sqrt(jnp.sum(v * v, -1)))
        v = jnp.where(done[..., None], v, v - move)
        g = gradient(v)[0]
        return v, g, done | stalled | small(v, g), it + 1

    eps = jnp.finfo(center.dtype).eps
    g0 = gradient(center)[0]
    state = (center, g0, small(center, g0), jnp.array(0))
    return jax.lax.while_loop(not_done, body, state)[0]
