"""Exact projections onto the graphs of elementwise scalar maps `y = phi(x)`.

Two families:

- *monotone curves* (`project_scalar_graph`): tanh, logistic, softplus, exp, expm1, their
  inverses log and log1p, and the piecewise-linear leaky-ReLU and hard-tanh;
- *piecewise-constant maps* (`project_step_graph`, `project_quantizer_graph`): sign, round,
  floor, ceil, the Heaviside step and a general levels/thresholds quantiser.

Smooth increasing curves. Minimise `f(t) = (t - a)^2 + (phi(t) - b)^2` over `t`, for the
point `(a, b)`; the nearest point is `(t, phi(t))` at the global minimiser.

1. *Bracket.* Let `t* = phi^{-1}(b)` (`+-inf` when `b` is outside the range of phi). The
   minimiser lies between `a` and `t*`: for `t > m = max(a, t*)` both `|t - a| > |m - a|`
   (as `a <= m < t`) and `|phi(t) - b| >= |phi(m) - b|` (as `b <= phi(m) <= phi(t)`, phi
   increasing), so `f(t) > f(m)`; symmetrically below `min(a, t*)`. It also lies within
   `D` of `a`, where `D` is the distance from `(a, b)` to any point of the graph (the
   nearest point is no farther, and `|t - a|` is at most that distance). With the two
   graph points `(a, phi(a))` and `(t_c, phi(t_c))`, `t_c = phi^{-1}(b clipped into the
   range)`, this bounds the bracket even when `t*` is infinite (e.g. `b = 10^6` for tanh).
2. *Monotone pieces of f'.* `g = f'/2 = t - a + phi'(t) (phi(t) - b)` has derivative
   `g' = 1 + phi'^2 + phi'' (phi - b) =: P(s)`, which for every curve here is a function of
   one monotone reparametrisation `s(t)` with a derivative of known constant sign:
   tanh (`s = tanh t`) and logistic (`s = sigma(t)`) give quartics in `s` (`P'''' = 72`);
   softplus (`s = sigma(t)`, `phi = -log(1 - s)`) has `P''' = -2/(1-s) - 1/(1-s)^2 < 0`;
   exp (`s = e^t`) gives the quadratic `2 s^2 - b s + 1`, solved in closed form. The
   *derivative cascade* then isolates every root of P: `P^(k-1)` is monotone on the
   bracket, so it has at most one root (found by bisection); between consecutive roots of
   `P^(j+1)`, `P^(j)` is monotone and has at most one root; and so on down to P. Between
   consecutive roots of P, `g` is monotone, so it has at most one root on each such piece,
   found by safeguarded Newton-bisection to rounding level. The global minimiser is a
   root of `g` inside the bracket, so it is among these `k + 1` candidates (plus the two
   ends, also compared): the answer is global, not a local search. Extra boundaries never
   hurt (a piece of a monotone piece is monotone), so the bisections need not be exact.
3. *Inverses.* The graph of log is the graph of exp with the coordinates swapped (and
   log1p that of expm1, and expm1 that of exp shifted by -1), so those projections are
   the swapped ones.

The result is always put exactly on the graph in the arithmetic: `y' = phi(x')` is
recomputed from `x'` (for log and log1p, `x'` is kept above the domain's edge by the
smallest normal number, so `y'` stays finite).

Limits: where the curve saturates below the float resolution (e.g. tanh for |t| > 19 in
float64) the reparametrisation cannot separate roots of P any further; there the
candidate distances differ by less than the rounding of `f` itself, so the answer is
still nearest to rounding.

Piecewise-linear curves (leaky-ReLU, hard-tanh) and step maps are finite (or, for
round/floor/ceil, locally finite) unions of segments; each segment's projection is a clip,
and the nearest candidate wins.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from .._shapes import same_shape

SCALAR_FUNCTIONS = ("tanh", "logistic", "softplus", "exp", "expm1", "log", "log1p", "leaky_relu", "hard_tanh")
STEP_FUNCTIONS = ("sign", "round", "round_away", "floor", "ceil", "heaviside")
_ALIASES = {"sigmoid": "logistic"}


# ----------------------------------------------------------------------------- curves


def _logit(s):
    return jnp.log(s) - jnp.log1p(-s)


def _softplus_inverse(y):
    # log(e^y - 1), stable for small and large y (y > 0).
    return jnp.where(y > 1, y + jnp.log1p(-jnp.exp(-jnp.where(y > 1, y, 1))), jnp.log(jnp.expm1(jnp.where(y > 1, 1, y))))


class _Curve(NamedTuple):
    phi: Callable
    d1: Callable
    d2: Callable
    inverse: Callable  # for b strictly inside (low, high)
    low: float
    high: float
    s_of_t: Callable
    t_of_s: Callable
    P: Callable  # g'(t) as a function of (s, b); None: closed form (exp)
    depth: int  # P^(depth) has a constant sign
    s_range: tuple  # (low, high) of s, as fractions of the dtype handled in _s_limits


def _sech2(t):
    return 1 / jnp.cosh(t) ** 2


_CURVES = {
    "tanh": _Curve(
        jnp.tanh,
        _sech2,
        lambda t: -2 * jnp.tanh(t) * _sech2(t),
        jnp.arctanh,
        -1.0,
        1.0,
        jnp.tanh,
        jnp.arctanh,
        lambda s, b: ((3 * s - 2 * b) * s - 4) * s * s + 2 * b * s + 2,
        4,
        (-1.0, 1.0),
    ),
    "logistic": _Curve(
        jax.nn.sigmoid,
        lambda t: jax.nn.sigmoid(t) * jax.nn.sigmoid(-t),
        lambda t: jax.nn.sigmoid(t) * jax.nn.sigmoid(-t) * (jax.nn.sigmoid(-t) - jax.nn.sigmoid(t)),
        _logit,
        0.0,
        1.0,
        jax.nn.sigmoid,
        _logit,
        lambda s, b: 1 + (s * (1 - s)) ** 2 + s * (1 - s) * (1 - 2 * s) * (s - b),
        4,
        (0.0, 1.0),
    ),
    "softplus": _Curve(
        jax.nn.softplus,
        jax.nn.sigmoid,
        lambda t: jax.nn.sigmoid(t) * jax.nn.sigmoid(-t),
        _softplus_inverse,
        0.0,
        np.inf,
        jax.nn.sigmoid,
        _logit,
        lambda s, b: 1 + s * s + s * (1 - s) * (-jnp.log1p(-s) - b),
        3,
        (0.0, "1-eps"),  # log1p(-1) is -inf: keep s below 1
    ),
    "exp": _Curve(jnp.exp, jnp.exp, jnp.exp, jnp.log, 0.0, np.inf, jnp.exp, jnp.log, None, 2, (0.0, np.inf)),
}


def _s_limits(curve: _Curve, dtype):
    lo, hi = curve.s_range
    if hi == "1-eps":
        hi = 1 - float(jnp.finfo(dtype).eps)
    return lo, hi


def _bisect(q: Callable, left, right, iters: int):
    """A sign change of the monotone `q` on each `[left, right]` (an end when there is none)."""
    q_left = jnp.sign(q(left))

    def body(_, lr):
        lo, hi = lr
        mid = lo + (hi - lo) / 2
        same = jnp.sign(q(mid)) == q_left
        return jnp.where(same, mid, lo), jnp.where(same, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iters, body, (left, right))
    return lo + (hi - lo) / 2


def _boundaries(curve: _Curve, b, lo, hi):
    """Points of [lo, hi] between which g is monotone (the roots of P, see the module docstring)."""
    dtype = lo.dtype
    if curve.P is None:  # exp: P = 2 s^2 - b s + 1, roots s = (b +- sqrt(b^2 - 8)) / 4
        r = jnp.abs(b) * jnp.sqrt(jnp.maximum(1 - 8 / (b * b), 0))
        big = (b + r) / 4
        real = (b > 0) & (b * b >= 8)
        roots = jnp.stack([0.5 / jnp.where(real, big, 1), jnp.where(real, big, 1)])
        t = jnp.where(real, jnp.log(roots), lo)
        return jnp.clip(t, lo, hi)
    s_min, s_max = _s_limits(curve, dtype)
    s_lo = jnp.clip(curve.s_of_t(lo), s_min, s_max)
    s_hi = jnp.clip(curve.s_of_t(hi), s_min, s_max)
    iters = jnp.finfo(dtype).nmant + 8  # the s-range has width <= 2
    derivatives = [lambda s: curve.P(s, b)]
    for _ in range(curve.depth - 1):
        derivatives.append(jax.grad(derivatives[-1]))
    roots = jnp.zeros((0,), dtype)
    for q in reversed(derivatives):  # P^(depth-1) is monotone on the whole range
        ends = jnp.concatenate([s_lo[None], roots, s_hi[None]])
        roots = _bisect(jax.vmap(q), ends[:-1], ends[1:], iters)
    return jnp.clip(curve.t_of_s(roots), lo, hi)


def _newton_bisect(g: Callable, dg: Callable, left, right, max_steps: int):
    """The root of the monotone `g` on each `[left, right]` with a sign change (else `left`)."""
    g_left, g_right = g(left), g(right)
    has_root = (jnp.sign(g_left) != jnp.sign(g_right)) | (g_left == 0) | (g_right == 0)
    neg = jnp.where(g_left <= 0, left, right)  # an end with g <= 0
    pos = jnp.where(g_left <= 0, right, left)  # an end with g >= 0
    eps = jnp.finfo(left.dtype).eps
    x0 = jnp.where(has_root, left + (right - left) / 2, left)

    def cond(state):
        _, _, _, done, it = state
        return (it < max_steps) & ~jnp.all(done)

    def body(state):
        x, neg, pos, done, it = state
        gx = g(x)
        neg = jnp.where(gx <= 0, x, neg)
        pos = jnp.where(gx >= 0, x, pos)
        lo, hi = jnp.minimum(neg, pos), jnp.maximum(neg, pos)
        newton = x - gx / dg(x)
        # Newton when it stays strictly inside the bracket, bisection otherwise and every
        # fourth step (so that the bracket at least halves every four steps).
        use = jnp.isfinite(newton) & (newton > lo) & (newton < hi) & (it % 4 != 3)
        x_new = jnp.where(use, newton, lo + (hi - lo) / 2)
        small = jnp.abs(x_new - x) <= 2 * eps * jnp.maximum(jnp.abs(x), jnp.finfo(x.dtype).tiny)
        finished = done | (gx == 0) | small | (hi - lo <= 2 * eps * jnp.maximum(jnp.abs(lo), jnp.abs(hi)))
        return jnp.where(done | (gx == 0), x, x_new), neg, pos, finished, it + 1

    state = (x0, neg, pos, ~has_root, jnp.array(0))
    return jax.lax.while_loop(cond, body, state)[0]


def _project_curve(curve: _Curve, a, b):
    """Nearest point `(t, phi(t))` of the graph of an increasing smooth phi to `(a, b)` (scalars)."""
    dtype = a.dtype
    finfo = jnp.finfo(dtype)
    inside = (b > curve.low) & (b < curve.high)
    t_star = jnp.where(inside, curve.inverse(jnp.where(inside, b, _mid(curve, dtype))), jnp.where(b >= curve.high, jnp.inf, -jnp.inf))
    t_star = t_star.astype(dtype)
    # A graph point near the target level: b clipped strictly inside the range.
    margin = 4 * float(finfo.eps)
    low_c = jnp.asarray(float(finfo.tiny) if curve.low == 0 else curve.low + margin * abs(curve.low), dtype)
    high_c = jnp.asarray(curve.high - margin * abs(curve.high) if np.isfinite(curve.high) else float(finfo.max), dtype)
    t_c = curve.inverse(jnp.clip(b, low_c, high_c))
    d = jnp.minimum(jnp.abs(curve.phi(a) - b), jnp.abs(t_c - a) + jnp.abs(curve.phi(t_c) - b))
    lo = jnp.maximum(jnp.minimum(a, t_star), a - d)
    hi = jnp.minimum(jnp.maximum(a, t_star), a + d)
    lo, hi = jnp.minimum(lo, hi), jnp.maximum(lo, hi)
    inner = _boundaries(curve, b, lo, hi)
    ends = jnp.concatenate([lo[None], inner, hi[None]])

    def g(t):
        return t - a + curve.d1(t) * (curve.phi(t) - b)

    def dg(t):
        return 1 + curve.d1(t) ** 2 + curve.d2(t) * (curve.phi(t) - b)

    max_steps = 4 * (finfo.nmant + 12)
    roots = _newton_bisect(g, dg, ends[:-1], ends[1:], max_steps)
    candidates = jnp.concatenate([roots, ends])
    cost = (candidates - a) ** 2 + (curve.phi(candidates) - b) ** 2
    cost = jnp.where(jnp.isnan(cost), jnp.inf, cost)
    return candidates[jnp.argmin(cost)]


def _mid(curve: _Curve, dtype):
    if np.isfinite(curve.high):
        return jnp.asarray((curve.low + curve.high) / 2, dtype)
    return jnp.asarray(curve.low + 1, dtype)


def _pwl(a, b, pieces):
    """Nearest point of a union of segments `{(t, m t + c) : lo <= t <= hi}` (its `t`)."""
    best_t, best_cost = None, None
    for m, c, lo, hi in pieces:
        t = jnp.clip((a + m * (b - c)) / (1 + m * m), lo, hi)
        cost = (t - a) ** 2 + (m * t + c - b) ** 2
        if best_t is None:
            best_t, best_cost = t, cost
        else:
            better = cost < best_cost
            best_t, best_cost = jnp.where(better, t, best_t), jnp.where(better, cost, best_cost)
    return best_t


def leaky_relu(x, negative_slope=0.01):
    """`jax.nn.leaky_relu`'s formula (`x` for `x >= 0`, else `negative_slope * x`)."""
    return jnp.where(x >= 0, x, negative_slope * x)


def hard_tanh(x):
    """`jax.nn.hard_tanh`: `x` clipped to `[-1, 1]`."""
    return jnp.where(x > 1, 1, jnp.where(x < -1, -1, x)).astype(jnp.result_type(x))


def scalar_function(function: str, negative_slope=0.01) -> Callable:
    """The map `phi` whose graph `project_scalar_graph(..., function)` projects onto."""
    function = _ALIASES.get(function, function)
    table = {
        "tanh": jnp.tanh,
        "logistic": jax.nn.sigmoid,
        "softplus": jax.nn.softplus,
        "exp": jnp.exp,
        "expm1": jnp.expm1,
        "log": jnp.log,
        "log1p": jnp.log1p,
        "hard_tanh": hard_tanh,
        "leaky_relu": partial(leaky_relu, negative_slope=negative_slope),
    }
    return table[function]


def _scalar_kernel(function: str, a, b, negative_slope):
    """(x', y') for scalars a, b."""
    tiny = jnp.finfo(a.dtype).tiny
    if function in ("tanh", "logistic", "softplus", "exp"):
        t = _project_curve(_CURVES[function], a, b)
        return t, _CURVES[function].phi(t)
    if function == "expm1":  # the graph of exp shifted by (0, -1)
        t = _project_curve(_CURVES["exp"], a, b + 1)
        return t, jnp.expm1(t)
    if function == "log":  # the graph of exp with the coordinates swapped
        t = _project_curve(_CURVES["exp"], b, a)
        x = jnp.maximum(jnp.exp(t), tiny)
        return x, jnp.log(x)
    if function == "log1p":
        t = _project_curve(_CURVES["exp"], b, a + 1)
        x = jnp.maximum(jnp.expm1(t), jnp.nextafter(jnp.asarray(-1, a.dtype), jnp.asarray(0, a.dtype)))
        return x, jnp.log1p(x)
    inf = jnp.asarray(jnp.inf, a.dtype)
    if function == "leaky_relu":
        s = negative_slope
        t = _pwl(a, b, [(1, 0, 0, inf), (s, 0, -inf, 0)])
        return t, leaky_relu(t, s)
    if function == "hard_tanh":
        t = _pwl(a, b, [(0, -1, -inf, -1), (1, 0, -1, 1), (0, 1, 1, inf)])
        return t, hard_tanh(t)
    raise AssertionError(function)


@partial(jax.jit, static_argnames=("function",))
def _scalar_graph(x, y, function, negative_slope):
    shape = x.shape
    a, b = x.reshape(-1), y.reshape(-1)
    slope = jnp.asarray(negative_slope, x.dtype)
    xs, ys = jax.vmap(lambda a, b: _scalar_kernel(function, a, b, slope))(a, b)
    return xs.reshape(shape), ys.reshape(shape)


def _check_function(owner: str, function, choices):
    name = _ALIASES.get(function, function) if isinstance(function, str) else function
    if name not in choices:
        raise ValueError(f"{owner}: unknown function={function!r}; choose from {', '.join(choices)}.")
    return name


def project_scalar_graph(
    x: Float[ArrayLike, "*shape"],
    y: Float[ArrayLike, "*shape"],
    function: str = "tanh",
    *,
    negative_slope: float = 0.01,
) -> tuple[Float[Array, "*shape"], Float[Array, "*shape"]]:
    """Nearest point of the graph `{(x, y) : y = phi(x)}` of a monotone map, entrywise.

    `function` names phi: "tanh", "logistic" (or "sigmoid"), "softplus", "exp", "expm1",
    "log", "log1p", "leaky_relu" (slope `negative_slope` for `x < 0`, as
    `jax.nn.leaky_relu`) or "hard_tanh" (`jax.nn.hard_tanh`, the clip to [-1, 1]). The
    projection is exact and global: the graph is not convex (S-shaped curves have points
    with several stationary distances), so every stationary point of the distance in a
    proven bracket is isolated by a derivative cascade and the nearest wins (see
    `fpx/projective/_scalar.py`). Works in float32 and float64, under `jit`/`vmap`, with
    finite results for huge inputs. `y'` is recomputed as `phi(x')`, so the result lies on
    the graph exactly in the arithmetic. Returns `(x', y')`.

    In `fpx.projective.Trainer` models, these primitives map to it: `tanh`, `logistic`
    (`jax.nn.sigmoid`), `exp`, `expm1`, `log`, `log1p`, and the wrappers
    `jax.nn.softplus`, `jax.nn.leaky_relu`, `jax.nn.hard_tanh`.

    ```python
    import jax.numpy as jnp
    from fpx.projective import project_scalar_graph
    x, y = project_scalar_graph(jnp.array([0.0, 3.0]), jnp.array([2.0, 1.0]), "tanh")
    assert jnp.all(y == jnp.tanh(x))
    # (3, 1) is nearly on the curve; (0, 2) goes to the upper branch
    assert abs(float(x[1]) - 3.0) < 0.01 and float(x[0]) > 0.5
    ```
    """
    name = _check_function("project_scalar_graph", function, SCALAR_FUNCTIONS)
    x, y = same_shape("project_scalar_graph", x=x, y=y)
    return _scalar_graph(x, y, name, negative_slope)


# ----------------------------------------------------------------------------- step maps


def step_function(function: str, heaviside_at_zero=0.5) -> Callable:
    """The piecewise-constant map `project_step_graph(..., function)` projects onto."""
    table = {
        "sign": jnp.sign,
        "round": jnp.round,  # half to even
        "round_away": jax.lax.round,  # half away from zero
        "floor": jnp.floor,
        "ceil": jnp.ceil,
        "heaviside": lambda x: jnp.heaviside(x, jnp.asarray(heaviside_at_zero, jnp.result_type(x))),
    }
    return table[function]


def _segments_best(a, b, segments):
    """The nearest point of a union of horizontal segments `[lo, hi] x {level}` (closed, floats)."""
    best_x, best_cost = None, None
    for lo, hi, level in segments:
        xs = jnp.clip(a, lo, hi)
        cost = (xs - a) ** 2 + (level - b) ** 2
        if best_x is None:
            best_x, best_cost = xs, cost
        else:
            better = cost < best_cost
            best_x, best_cost = jnp.where(better, xs, best_x), jnp.where(better, cost, best_cost)
    return best_x


def _next(x, toward):
    """The float after x toward `toward`, skipping subnormals (flushed to zero on some backends)."""
    n = jnp.nextafter(x, jnp.full_like(x, toward))
    tiny = jnp.finfo(n.dtype).tiny
    up = jnp.asarray(toward, n.dtype) > x
    return jnp.where(jnp.abs(n) < tiny, jnp.where(up, tiny, -tiny), n)


def _integer_levels(function, a, b):
    """round/floor/ceil: the level k lives on an interval around k; its cost is convex in k."""
    shift = {"floor": 0.0, "ceil": 1.0, "round": 0.5, "round_away": 0.5}[function]
    # dist(a, I_k) = dist(a + shift, [k, k + 1]); minimise dist^2 + (k - b)^2 over real k.
    s = a + shift
    kappa = jnp.where(b > s, (s + b) / 2, jnp.where(b < s - 1, (s - 1 + b) / 2, b))
    base = jnp.floor(kappa)
    inf = jnp.inf
    best_x, best_cost = None, None
    for off in (-1, 0, 1, 2):  # the integer minimiser is floor or ceil of kappa; one spare each side
        k = base + off
        if function == "floor":
            lo, hi = k, _next(k + 1, -inf)
        elif function == "ceil":
            lo, hi = _next(k - 1, inf), k
        elif function == "round":
            even = jnp.mod(k, 2) == 0
            lo = jnp.where(even, k - 0.5, _next(k - 0.5, inf))
            hi = jnp.where(even, k + 0.5, _next(k + 0.5, -inf))
        else:  # round_away: k > 0 owns [k - 1/2, k + 1/2), k < 0 owns (k - 1/2, k + 1/2]
            lo = jnp.where(k > 0, k - 0.5, _next(k - 0.5, inf))
            hi = jnp.where(k < 0, k + 0.5, _next(k + 0.5, -inf))
        xs = jnp.clip(a, jnp.minimum(lo, hi), jnp.maximum(lo, hi))
        cost = (xs - a) ** 2 + (k - b) ** 2
        if best_x is None:
            best_x, best_cost = xs, cost
        else:
            better = cost < best_cost
            best_x, best_cost = jnp.where(better, xs, best_x), jnp.where(better, cost, best_cost)
    return best_x


@partial(jax.jit, static_argnames=("function",))
def _step_graph(x, y, function, heaviside_at_zero):
    dtype = x.dtype
    tiny = jnp.finfo(dtype).tiny  # smallest *normal*: safe under flush-to-zero
    inf = jnp.asarray(jnp.inf, dtype)
    if function in ("sign", "heaviside"):
        low, mid = (-1, 0) if function == "sign" else (0, jnp.asarray(heaviside_at_zero, dtype))
        segments = [(-inf, -tiny, low), (0, 0, mid), (tiny, inf, 1)]
        xs = _segments_best(x, y, segments)
    else:
        xs = _integer_levels(function, x, y)
    return xs, step_function(function, heaviside_at_zero)(xs).astype(dtype)


def project_step_graph(
    x: Float[ArrayLike, "*shape"],
    y: Float[ArrayLike, "*shape"],
    function: str = "sign",
    *,
    heaviside_at_zero: float = 0.5,
) -> tuple[Float[Array, "*shape"], Float[Array, "*shape"]]:
    """Nearest point of the graph of a piecewise-constant map, entrywise.

    `function`: "sign" (`jnp.sign`, 0 at 0), "round" (`jnp.round`, half to even),
    "round_away" (`jax.lax.round`'s default, half away from zero), "floor", "ceil", or
    "heaviside" (`jnp.heaviside(x, heaviside_at_zero)`). The graph is a union of
    horizontal segments, each with the function's own closed or open ends; the projection
    onto each is a clip (an open end is replaced by the nearest float inside it, so the
    nearest point may be an infimum approached but not attained), and the nearest wins.
    For round/floor/ceil the cost of level k is convex in k, so only the integers around
    the continuous minimiser are candidates. `y'` is recomputed as `q(x')`, so
    `q(x') == y'` holds exactly. Returns `(x', y')`.

    In `fpx.projective.Trainer` models the primitives `sign`, `round`, `floor`, `ceil` and
    the wrapper `jnp.heaviside` map to it, as do straight-through estimators
    `x + jax.lax.stop_gradient(q(x) - x)` (the value is `q(x)`): a binary-weight layer
    `x @ jnp.sign(W)` is a model.

    ```python
    import jax.numpy as jnp
    from fpx.projective import project_step_graph
    x, y = project_step_graph(jnp.array([0.2, -0.1, 2.5]), jnp.array([0.9, 0.1, 2.4]), "sign")
    assert jnp.all(jnp.sign(x) == y) and jnp.allclose(y, jnp.array([1.0, 0.0, 1.0]))
    ```
    """
    name = _check_function("project_step_graph", function, STEP_FUNCTIONS)
    x, y = same_shape("project_step_graph", x=x, y=y)
    return _step_graph(x, y, name, heaviside_at_zero)


def quantize(x: ArrayLike, levels: ArrayLike, thresholds: ArrayLike) -> Array:
    """`levels[j]` for `thresholds[j-1] <= x < thresholds[j]` (thresholds increasing).

    `quantize(x, [-1, 1], [0])` is the binary quantiser (`+1` at 0); `quantize(x, [-1, 0, 1],
    [-t, t])` the ternary one. Inside a model trained by `fpx.projective.Trainer` it is one
    node projected exactly by `project_quantizer_graph`; wrapped as a straight-through
    estimator, `w + jax.lax.stop_gradient(quantize(w, ...) - w)`, the same model also trains
    by gradients (the estimator's identity derivative), and the Trainer still sees the
    quantiser.

    ```python
    import jax.numpy as jnp
    from fpx.projective import quantize
    assert jnp.all(quantize(jnp.array([-0.7, 0.2, 0.5]), [-1, 0, 1], [-0.5, 0.5]) == jnp.array([-1.0, 0.0, 1.0]))
    ```
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    levels, thresholds = _quantizer_levels("quantize", levels, thresholds)
    return _quantizer_call(x, jnp.asarray(levels, x.dtype), jnp.asarray(thresholds, x.dtype))


@jax.jit
def _quantizer_call(x, levels, thresholds):
    # A named call, so that the projective graph builder recognises it (by this name, and
    # by value) as one quantiser node instead of a searchsorted and a gather.
    return levels[jnp.searchsorted(thresholds, x, side="right")]


def _quantizer_levels(caller, levels, thresholds):
    levels_np, thresholds_np = np.asarray(levels, dtype=float), np.asarray(thresholds, dtype=float)
    if levels_np.ndim != 1 or thresholds_np.ndim != 1 or levels_np.size != thresholds_np.size + 1:
        raise ValueError(
            f"{caller}: levels and thresholds must be 1-d with len(levels) == len(thresholds) + 1; "
            f"got levels {levels_np.shape}, thresholds {thresholds_np.shape}."
        )
    if np.any(np.diff(thresholds_np) <= 0):
        raise ValueError(f"{caller}: thresholds must be strictly increasing, got {thresholds_np}.")
    return levels_np, thresholds_np


def project_quantizer_graph(
    x: Float[ArrayLike, "*shape"],
    y: Float[ArrayLike, "*shape"],
    levels: ArrayLike,
    thresholds: ArrayLike,
) -> tuple[Float[Array, "*shape"], Float[Array, "*shape"]]:
    """Nearest point of the graph of `quantize(., levels, thresholds)`, entrywise.

    Level `levels[j]` is taken on `[thresholds[j-1], thresholds[j])` (closed on the left;
    `thresholds` strictly increasing, one fewer than `levels`). Each level's segment is
    projected by a clip (its open right end replaced by the float just below) and the
    nearest wins, so `quantize(x', levels, thresholds) == y'` exactly. Returns `(x', y')`.

    ```python
    import jax.numpy as jnp
    from fpx.projective import project_quantizer_graph, quantize
    x, y = project_quantizer_graph(jnp.array([0.1, 0.6]), jnp.array([0.8, 0.2]), [-1, 0, 1], [-0.5, 0.5])
    assert jnp.all(quantize(x, [-1, 0, 1], [-0.5, 0.5]) == y)
    ```
    """
    x, y = same_shape("project_quantizer_graph", x=x, y=y)
    levels_np, thresholds_np = _quantizer_levels("project_quantizer_graph", levels, thresholds)
    return _quantizer_graph(x, y, jnp.asarray(levels_np, x.dtype), jnp.asarray(thresholds_np, x.dtype))


@jax.jit
def _quantizer_graph(x, y, levels, thresholds):
    inf = jnp.asarray(jnp.inf, x.dtype)
    starts = jnp.concatenate([-inf[None], thresholds])
    ends = jnp.concatenate([_next(thresholds, -jnp.inf), inf[None]])
    segments = [(starts[j], ends[j], levels[j]) for j in range(levels.shape[0])]
    xs = _segments_best(x, y, segments)
    return xs, _quantizer_call(xs, levels, thresholds)
