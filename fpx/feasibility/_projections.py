"""Exact Euclidean projections onto the sets used by feasibility problems.

Every projection is a pure function `project_x(z, ...) -> z'` of JAX arrays that returns the
(a) nearest point of the set in the Euclidean norm of all entries of `z` (the Frobenius norm
for matrices). They can be jitted, vmapped and differentiated; batches go through `jax.vmap`.

- Thin wrappers around `optax.projections` (box, nonnegative orthant, linf ball,
  hyperplane, halfspace). The simplex and the l1 and l2 balls are the same sets as optax's
  but computed here, because optax divides by the simplex scale and squares the l2 radius
  (NaN for a zero scale or radius, and for tiny or infinite ones), returns float64 for
  float32 input under x64 (simplex), and fails on float32 input under x64 (l1 ball,
  `lax.cond` branches of different dtypes). The hyperplane and halfspace normalise `a`
  first (optax's `<a, a>` underflows for tiny `a`) and raise for `a = 0`. fpx names the
  radius `radius` where optax says `scale`, takes plain arrays (call optax directly for
  pytrees) and adds a `center` to the balls.
- Projections that optax lacks: affine subspaces, the second-order cone, the PSD cone, the
  spectral-norm ball, and the graphs of `y = max(u, 0)` and `y = a b` (not convex).

Shapes are always validated; values (a negative radius, `lower > upper`, `a = 0`, a
rank-deficient `A`) when they are concrete, that is, outside `jit`/`vmap`/`grad` (this reads
them on the host; under `jit` nothing is copied). Traced invalid values give NaN or an
arbitrary point, not an error. The numerical work runs in jitted kernels, so eager calls
compile once per shape and dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Float

from .._shapes import same_shape

__all__ = [
    "project_affine",
    "project_bilinear_graph",
    "project_box",
    "project_halfspace",
    "project_hyperplane",
    "project_l1_ball",
    "project_l2_ball",
    "project_linf_ball",
    "project_nonnegative",
    "project_psd_cone",
    "project_relu_graph",
    "project_second_order_cone",
    "project_simplex",
    "project_spectral_norm_ball",
]

_proj = optax.projections


# ---------------------------------------------------------------------------------------------
# helpers


def _float(x: ArrayLike, name: str = "z") -> Array:
    """`x` as a JAX array of a real floating dtype (integers and bools are promoted)."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise ValueError(f"`{name}` must be real, got dtype {x.dtype}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


def _like(x: ArrayLike, z: Array) -> Array:
    """`x` as an array in `z`'s dtype (the projections compute in the dtype of `z`)."""
    return jnp.asarray(x, dtype=z.dtype)


def _concrete(x) -> np.ndarray | None:
    """The value of `x` as a NumPy array, or None when `x` is traced (jit, vmap, grad)."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def _check_scalar(name: str, value, fn: str) -> None:
    if jnp.ndim(value) != 0:
        raise ValueError(f"{fn}: `{name}` must be a scalar, got shape {jnp.shape(value)}.")


def _check_radius(name: str, value, fn: str) -> None:
    """A scalar that is `>= 0` (`inf` allowed) when concrete."""
    _check_scalar(name, value, fn)
    v = _concrete(value)
    if v is not None and not (v >= 0):  # also rejects NaN
        raise ValueError(f"{fn}: `{name}` must be non-negative, got {v!r}.")


def _check_broadcast(name: str, value: Array, shape: tuple[int, ...], fn: str) -> None:
    try:
        ok = np.broadcast_shapes(value.shape, shape) == tuple(shape)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{fn}: `{name}` of shape {value.shape} does not broadcast to the shape {shape} of `z`.")


def _safe_sqrt(x: Array) -> Array:
    """`sqrt(max(x, 0))` with a finite gradient at 0.

    Not the usual `where(x > 0, sqrt(where(x > 0, x, 1)), 0)`: XLA may recompute `x` in two
    fusions with different FMA contraction, so the two tests can disagree on an `x` that is
    0 up to rounding and return `sqrt(1) = 1`. Clamping at the smallest normal number errs by
    at most `sqrt(tiny)` (1.5e-154 in float64) instead.
    """
    return jnp.sqrt(jnp.maximum(x, jnp.finfo(x.dtype).tiny))


def _safe_norm(x: Array) -> tuple[Array, Array]:
    """Euclidean norm of all entries, and the same with 0 replaced by 1 (safe to divide by).

    Computed as `m |x / m|` with `m = max|x|`, so squares neither underflow nor overflow, and
    with finite derivatives at `x = 0`.
    """
    m = jnp.max(jnp.abs(x), initial=0)
    pos = m > 0
    safe_m = jnp.where(pos, m, 1)
    norm = safe_m * jnp.sqrt(jnp.sum((x / safe_m) ** 2) + jnp.where(pos, 0, 1))
    return jnp.where(pos, norm, 0), jnp.where(pos, norm, 1)


def _ball_args(z, radius, center, fn):
    z = _float(z)
    _check_radius("radius", radius, fn)
    radius = _like(radius, z)
    if center is not None:
        center = _float(center, "center")
        if center.shape != z.shape:
            raise ValueError(f"{fn}: `center` must have the shape {z.shape} of `z`, got {center.shape}.")
        center = _like(center, z)
    return z, radius, center


# ---------------------------------------------------------------------------------------------
# optax-backed convex sets


def project_nonnegative(z: ArrayLike) -> Float[Array, "..."]:
    """Nearest point of the nonnegative orthant `{x : x >= 0}`: `max(z, 0)` entrywise.

    Wraps `optax.projections.projection_non_negative`.

    ```python
    import jax.numpy as jnp
    from fpx.feasibility import project_nonnegative
    assert jnp.array_equal(project_nonnegative(jnp.array([-1.0, 0.0, 2.0])), jnp.array([0.0, 0.0, 2.0]))
    ```
    """
    return _nonnegative(_float(z))


_nonnegative = jax.jit(_proj.projection_non_negative)


def project_box(z: ArrayLike, lower: ArrayLike, upper: ArrayLike) -> Float[Array, "..."]:
    """Nearest point of the box `{x : lower <= x <= upper}`: `clip(z, lower, upper)` entrywise.

    `lower` and `upper` are scalars or arrays that broadcast to the shape of `z` (`-inf` and
    `inf` allowed) with `lower <= upper`. Wraps `optax.projections.projection_box`.

    ```python
    import jax.numpy as jnp
    from fpx.feasibility import project_box
    z = jnp.array([-3.0, 0.5, 7.0])
    assert jnp.array_equal(project_box(z, 0.0, jnp.array([1.0, 1.0, jnp.inf])), jnp.array([0.0, 0.5, 7.0]))
    ```
    """
    fn = "project_box"
    z = _float(z)
    lower, upper = _like(lower, z), _like(upper, z)
    _check_broadcast("lower", lower, z.shape, fn)
    _check_broadcast("upper", upper, z.shape, fn)
    lo, hi = _concrete(lower), _concrete(upper)
    if lo is not None and hi is not None and not np.all(lo <= hi):
        raise ValueError(f"{fn}: the box is empty: need `lower <= upper` entrywise.")
    return _box(z, lower, upper)


@jax.jit
def _box(z, lower, upper):
    return _proj.projection_box(z, jnp.broadcast_to(lower, z.shape), jnp.broadcast_to(upper, z.shape))


def project_simplex(z: ArrayLike, scale: ArrayLike = 1.0) -> Float[Array, "..."]:
    """Nearest point of the simplex `{x : x >= 0, sum(x) = scale}` (all entries of `z`).

    The solution is `max(z - tau, 0)` with the threshold `tau` that makes the sum `scale`
    (found by sorting, O(n log n)). `scale = 1` is the probability simplex; `scale = 0` gives
    the single point 0. Same set and algorithm as `optax.projections.projection_simplex`,
    computed here because optax divides by `scale` (NaN for `scale = 0`, overflow to NaN for
    tiny scales) and returns float64 for float32 input under x64.

    ```python
    import jax.numpy as jnp
    from fpx.feasibility import project_simplex
    p = project_simplex(jnp.array([2.0, 1.0, -1.0]))
    assert jnp.allclose(p, jnp.array([1.0, 0.0, 0.0]))
    assert jnp.allclose(project_simplex(jnp.array([0.5, 0.5, 0.5]), 3.0), jnp.array([1.0, 1.0, 1.0]))
    ```
    """
    fn = "project_simplex"
    z = _float(z)
    if z.size == 0:
        raise ValueError(f"{fn}: the simplex needs at least one entry, got shape {z.shape}.")
    _check_radius("scale", scale, fn)
    return _simplex(z, _like(scale, z))


@jax.jit
def _simplex(z: Array, scale: Array) -> Array:
    # Sort decreasingly, u; tau = (u_1 + ... + u_k - scale) / k for the largest k with
    # u_k > tau_k (the support size). No division by `scale`, unlike optax.
    u = jnp.sort(z.ravel())[::-1]
    css = jnp.cumsum(u) - scale
    k = jnp.arange(1, u.size + 1, dtype=z.dtype)
    support = u * k > css  # u_k > tau_k; all false only when scale = 0 (then tau = max z)
    rho = jnp.max(jnp.where(support, jnp.arange(u.size), 0))
    tau = css[rho] / k[rho]
    return jnp.maximum(z - tau, 0)


def project_l2_ball(z: ArrayLike, radius: ArrayLike = 1.0, center: ArrayLike | None = None) -> Float[Array, "..."]:
    """Nearest point of the ball `{x : |x - center|_2 <= radius}` (all entries of `z`).

    `P z = c + (z - c) min(1, radius / |z - c|)`, with `c = center` (default 0). Same set
    as `optax.projections.projection_l2_ball` (its `scale` is fpx's `radius`), but computed
    here: optax returns NaN for `radius = inf` and, because it squares the radius, for
    `radius < ~1e-154` (float64) at points with `|z - c|^2` below `radius^2`.

    ```python
    import jax.numpy as jnp
    from fpx.feasibility import project_l2_ball
    assert jnp.allclose(project_l2_ball(jnp.array([3.0, 4.0]), 1.0), jnp.array([0.6, 0.8]))
    c = jnp.array([1.0, 1.0])
    assert jnp.allclose(project_l2_ball(jnp.array([1.0, 5.0]), 2.0, center=c), jnp.array([1.0, 3.0]))
    ```
    """
    return _l2_ball(*_ball_args(z, radius, center, "project_l2_ball"))


@jax.jit
def _l2_ball(z, radius, center):
    d = z if center is None else z - center
    norm, safe = _safe_norm(d)
    p = d * jnp.where(norm > radius, radius / safe, 1)
    return p if center is None else p + center


def project_l1_ball(z: ArrayLike, radius: ArrayLike = 1.0, center: ArrayLike | None = None) -> Float[Array, "..."]:
    """Nearest point of the ball `{x : |x - center|_1 <= radius}` (all entries of `z`).

    Inside the ball `z` is returned; outside, `P z = c + sign(d) * P_simplex(|d|, radius)` with
    `d = z - c`, i.e. soft-thresholding `sign(d) max(|d| - tau, 0)` at the `tau` that puts the
    result on the sphere. Same set as `optax.projections.projection_l1_ball` (its `scale` is
    fpx's `radius`), computed from the simplex projection with a `where` instead of optax's
    `lax.cond`, which fails for float32 input under x64 (its branches return float32 and
    float64); `radius = 0` is handled (optax returns NaN).

    ```python
    import jax.numpy as jnp
    from fpx.feasibility import project_l1_ball
    p = project_l1_ball(jnp.array([3.0, -1.0, 0.2]), 2.0)
    assert jnp.allclose(p, jnp.array([2.0, 0.0, 0.0]))
    assert jnp.allclose(jnp.abs(project_l1_ball(jnp.array([2.0, -2.0]), 2.0)).sum(), 2.0)
    ```
    """
    return _l1_ball(*_ball_args(z, radius, center, "project_l1_ball"))


@jax.jit
def _l1_ball(z, radius, center):
    d = z if center is None else z - center
    inside = jnp.sum(jnp.abs(d)) <= radius
    sphere = jnp.sign(d) * _simplex(jnp.abs(d), jnp.where(inside, 1, radius))
    p = jnp.where(inside, d, sphere)
    return p if center is None else p + center


def project_linf_ball(z: ArrayLike, radius: ArrayLike = 1.0, center: ArrayLike | None = None) -> Float[Array, "..."]:
    """Nearest point of the ball `{x : max|x - center| <= radius}`: `clip(z, c - r, c + r)`.

    Wraps `optax.projections.projection_linf_ball` (its `scale` is fpx's `radius`).

    ```python
    import jax.numpy as jnp
    from fpx.feasibility import project_linf_ball
    assert jnp.array_equal(project_linf_ball(jnp.array([3.0, -0.5, -2.0]), 1.0), jnp.array([1.0, -0.5, -1.0]))
    ```
    """
    return _linf_ball(*_ball_args(z, radius, center, "project_linf_ball"))


@jax.jit
def _linf_ball(z, radius, center):
    d = z if center is None else z - center
    p = _proj.projection_linf_ball(d, radius)
    return p if center is None else p + center


def _plane_args(z, a, b, fn):
    z = _float(z)
    a = _like(_float(a, "a"), z)
    if a.shape != z.shape:
        raise ValueError(f"{fn}: `a` must have the shape {z.shape} of `z`, got {a.shape}.")
    _check_scalar("b", b, fn)
    b = _like(b, z)
    av = _concrete(a)
    if av is not None and not np.any(np.abs(av) >= np.finfo(av.dtype).tiny):
        raise ValueError(f"{fn}: the normal `a` must be nonzero (and not only subnormal entries).")
    return z, a, b


@jax.jit
def _normalised(a, b):
    # The same set with |a| = 1: optax divides by <a, a>, which underflows for tiny `a`.
    _, safe = _safe_norm(a)
    return a / safe, b / safe


@jax.jit
def _hyperplane(z, a, b):
    return _proj.projection_hyperplane(z, *_normalised(a, b))


@jax.jit
def _halfspace(z, a, b):
    return _proj.projection_halfspace(z, *_normalised(a, b))


def project_hyperplane(z: ArrayLike, a: ArrayLike, b: ArrayLike) -> Float[Array, "..."]:
    """Nearest point of the hyperplane `{x : <a, x> = b}`: `z + (b - <a, z>) / |a|^2 a`.

    `a` (nonzero) has the shape of `z`, `b` is a scalar; `<., .>` sums over all entries.
    Wraps `optax.projections.projection_hyperplane` (same convention), after normalising
    `(a, b)` by `|a|` so that `<a, a>` cannot underflow.

    ```python
    import jax.numpy as jnp
    from fpx.feasibility import project_hyperplane
    p = project_hyperplane(jnp.array([3.0, 1.0]), jnp.array([1.0, 1.0]), 2.0)
    assert jnp.allclose(p, jnp.array([2.0, 0.0]))
    ```
    """
    return _hyperplane(*_plane_args(z, a, b, "project_hyperplane"))


def project_halfspace(z: ArrayLike, a: ArrayLike, b: ArrayLike) -> Float[Array, "..."]:
    """Nearest point of the halfspace `{x : <a, x> <= b}`: `z - max(<a, z> - b, 0) / |a|^2 a`.

    `a` (nonzero) has the shape of `z`, `b` is a scalar; `<., .>` sums over all entries.
    Wraps `optax.projections.projection_halfspace` (same convention, `<=`), after
    normalising `(a, b)` by `|a|` so that `<a, a>` cannot underflow.

    ```python
    import jax.numpy as jnp
    from fpx.feasibility import project_halfspace
    a = jnp.array([1.0, 1.0])
    assert jnp.allclose(project_halfspace(jnp.array([3.0, 1.0]), a, 2.0), jnp.array([2.0, 0.0]))
    assert jnp.array_equal(project_halfspace(jnp.array([0.0, 1.0]), a, 2.0), jnp.array([0.0, 1.0]))
    ```
    """
    return _halfspace(*_plane_args(z, a, b, "project_halfspace"))


# ---------------------------------------------------------------------------------------------
# convex sets that optax lacks


def project_affine(
    z: Float[ArrayLike, " n"],
    A: Float[ArrayLike, "m n"] | None,
    b: Float[ArrayLike, " m"],
    *,
    qr: tuple[Float[ArrayLike, "n m"], Float[ArrayLike, "m m"]] | None = None,
) -> Float[Array, " n"]:
    """Nearest point of the affine subspace `{x : A x = b}` for `A` of full row rank `m <= n`.

    `P z = z - A^T (A A^T)^{-1} (A z - b)`, computed stably from the thin QR factorisation
    `A^T = Q R` (`Q` is `n x m` with orthonormal columns, `R` is `m x m` upper triangular):
    `P z = z - Q (Q^T z - R^{-T} b)`, without forming `A A^T`. Pass `qr=jnp.linalg.qr(A.T)`
    to reuse the factorisation across calls (then `A` may be None). For a single equation
    `project_hyperplane` is the same set.

    Full row rank is checked when `A` (or `R`) is concrete (a diagonal entry of `R` below
    `max(m, n) * eps * max|diag R|` raises); a traced rank-deficient `A` gives inf/NaN.

    ```python
    import jax.numpy as jnp
    from fpx.feasibility import project_affine
    A = jnp.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    b = jnp.array([1.0, 2.0])
    p = project_affine(jnp.zeros(3), A, b)
    assert jnp.allclose(A @ p, b)
    qr = jnp.linalg.qr(A.T)  # factor once, project many times
    assert jnp.allclose(project_affine(jnp.zeros(3), None, b, qr=qr), p)
    ```
    """
    fn = "project_affine"
    z = _float(z)
    if z.ndim != 1:
        raise ValueError(f"{fn}: `z` must be a vector, got shape {z.shape}.")
    n = z.shape[0]
    if qr is None:
        if A is None:
            raise ValueError(f"{fn}: pass the matrix `A` or its factorisation `qr=jnp.linalg.qr(A.T)`.")
        A = _like(_float(A, "A"), z)
        if A.ndim != 2 or A.shape[1] != n:
            raise ValueError(f"{fn}: `A` must be a matrix with {n} columns (the size of `z`), got shape {A.shape}.")
        if A.shape[0] > n:
            raise ValueError(f"{fn}: `A` of shape {A.shape} has more rows than columns, so not full row rank.")
        q, r = _qr_transpose(A)
    else:
        q, r = (_like(_float(x, "qr"), z) for x in qr)
        m = r.shape[0] if r.ndim == 2 else -1
        if q.ndim != 2 or r.ndim != 2 or q.shape != (n, m) or r.shape != (m, m) or m > n:
            raise ValueError(
                f"{fn}: `qr` must be the thin QR `(Q, R)` of `A.T`, shapes ({n}, m) and (m, m); "
                f"got {q.shape} and {r.shape}."
            )
        if A is not None and jnp.shape(A) != (m, n):
            raise ValueError(f"{fn}: `A` of shape {jnp.shape(A)} does not match `qr` ({m} equations, {n} unknowns).")
    m = r.shape[0]
    b = _like(_float(b, "b"), z)
    if b.shape != (m,):
        raise ValueError(f"{fn}: `b` must have shape ({m},) (one entry per row of `A`), got {b.shape}.")
    diag = _concrete(jnp.diagonal(r)) if m else None
    if diag is not None:
        d = np.abs(diag)
        if not d.max() > 0 or d.min() <= max(m, n) * np.finfo(d.dtype).eps * d.max():
            raise ValueError(f"{fn}: `A` must have full row rank ({m}); it is (numerically) rank deficient.")
    return _affine(z, q, r, b)


_qr_transpose = jax.jit(lambda A: jnp.linalg.qr(A.T))


@jax.jit
def _affine(z, q, r, b):
    w = jax.scipy.linalg.solve_triangular(r, b, trans="T", lower=False)  # R^T w = b
    return z - q @ (q.T @ z - w)


def project_second_order_cone(z: Float[ArrayLike, " n+1"]) -> Float[Array, " n+1"]:
    """Nearest point of the second-order (Lorentz, ice-cream) cone `{(x, t) : |x|_2 <= t}`.

    Layout: `z = (x, t)` with `t = z[-1]` the LAST entry and `x = z[:-1]` (SCS and some
    other solvers put `t` first). With `s = |x|`:

    - `s <= t`: `z` is in the cone, `P z = z`;
    - `s <= -t`: `z` is in the polar cone, `P z = 0`;
    - otherwise `P z = (s + t) / 2 * (x / s, 1)`.

    A 1-entry `z = (t,)` is the cone `t >= 0`. Use `jax.vmap` for a product of cones.

    ```python
    import jax.numpy as jnp
    from fpx.feasibility import project_second_order_cone
    assert jnp.allclose(project_second_order_cone(jnp.array([3.0, 4.0, 0.0])), jnp.array([1.5, 2.0, 2.5]))
    assert jnp.array_equal(project_second_order_cone(jnp.array([3.0, 4.0, 6.0])), jnp.array([3.0, 4.0, 6.0]))
    assert jnp.array_equal(project_second_order_cone(jnp.array([3.0, 4.0, -6.0])), jnp.zeros(3))
    ```
    """
    z = _float(z)
    if z.ndim != 1 or z.shape[0] < 1:
        raise ValueError(f"project_second_order_cone: `z` must be a non-empty vector (x, t), got shape {z.shape}.")
    return _second_order_cone(z)


@jax.jit
def _second_order_cone(z):
    x, t = z[:-1], z[-1]
    s, safe_s = _safe_norm(x)
    alpha = (s + t) / 2
    boundary = jnp.concatenate([alpha * x / safe_s, alpha[None]])
    return jnp.where(s <= t, z, jnp.where(s <= -t, jnp.zeros_like(z), boundary))


def _scaled(matrix: Array) -> tuple[Array, Array]:
    """`matrix / m` and `m = max|matrix|` (1 when 0), so LAPACK never sees subnormal-only input."""
    m = jnp.max(jnp.abs(matrix))
    pos = m > 0
    safe = jnp.where(pos, m, 1)
    return jnp.where(pos, matrix / safe, 0), safe


def project_psd_cone(matrix: Float[ArrayLike, "n n"]) -> Float[Array, "n n"]:
    """Frobenius-nearest symmetric positive semidefinite matrix: clip the eigenvalues at 0.

    The PSD cone lies in the symmetric matrices and the antisymmetric part of `M` is
    orthogonal to them, so `P M` projects `S = (M + M^T) / 2`: with `S = V diag(w) V^T`,
    `P M = V diag(max(w, 0)) V^T` (returned exactly symmetric).

    ```python
    import jax.numpy as jnp
    from fpx.feasibility import project_psd_cone
    M = jnp.array([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3 and -1
    assert jnp.allclose(project_psd_cone(M), jnp.array([[1.5, 1.5], [1.5, 1.5]]))
    assert jnp.allclose(project_psd_cone(jnp.array([[0.0, 1.0], [-1.0, 0.0]])), jnp.zeros((2, 2)))
    ```
    """
    matrix = _float(matrix, "matrix")
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"project_psd_cone expects a square matrix, got shape {matrix.shape}.")
    if matrix.size == 0:
        return matrix
    return _psd_cone(matrix)


@jax.jit
def _psd_cone(matrix):
    sym, scale = _scaled((matrix + matrix.T) / 2)
    w, v = jnp.linalg.eigh(sym)
    p = (v * jnp.maximum(w, 0)[None, :]) @ v.T
    return (p + p.T) / 2 * scale


def project_spectral_norm_ball(matrix: Float[Array, "m n"], radius: float = 1.0) -> Float[Array, "m n"]:
    """Frobenius-nearest matrix with spectral norm `<= radius`: clip the singular values.

    The set `{W : |W|_2 <= radius}` is convex and unitarily invariant, so the projection
    keeps the singular vectors and clips the singular values at `radius`
    (von Neumann's trace inequality makes this optimal in the Frobenius norm).

    ```python
    import jax.numpy as jnp
    from fpx.feasibility import project_spectral_norm_ball
    W = jnp.array([[3.0, 0.0], [0.0, 0.5]])
    assert jnp.allclose(project_spectral_norm_ball(W, 1.0), jnp.array([[1.0, 0.0], [0.0, 0.5]]))
    ```
    """
    matrix = _float(matrix, "matrix")
    if matrix.ndim != 2:
        raise ValueError(f"project_spectral_norm_ball expects a matrix, got shape {matrix.shape}.")
    _check_radius("radius", radius, "project_spectral_norm_ball")
    if matrix.size == 0:
        return matrix
    return _spectral_norm_ball(matrix, radius)


@jax.jit
def _spectral_norm_ball(matrix, radius):
    # The SVD is taken of `matrix / max|matrix|`: LAPACK returns NaN singular vectors for a
    # matrix of subnormal entries, and the scaling also avoids overflow.
    scaled, scale = _scaled(matrix)
    u, s, vh = jnp.linalg.svd(scaled, full_matrices=False)
    return (u * jnp.minimum(s * scale, radius)[None, :]) @ vh


# ---------------------------------------------------------------------------------------------
# graphs of scalar functions (not convex)


def project_relu_graph(u: ArrayLike, y: ArrayLike) -> tuple[Array, Array]:
    """Nearest point of the graph `{(u, y) : y = max(u, 0)}`, entrywise on pairs `(u_i, y_i)`.

    The graph is the union of two rays; the projection onto each ray is explicit and the
    nearer candidate wins:

    - ray `y = u >= 0`: `(s, s)` with `s = max((u + y) / 2, 0)`;
    - ray `y = 0 >= u`: `(min(u, 0), 0)`.

    Both candidates are always computed and compared by distance, which also covers
    negative targets `y < 0` (the nearest point may then be on either ray). The set is not
    convex and the projection is not unique on the half-line `u < 0, y = -(1 + sqrt 2) u`;
    there the point on the ray `y = u` is returned. `y'` is computed as `max(u', 0)`, so the
    result is exactly on the graph. Returns `(u', y')`.

    ```python
    import jax.numpy as jnp
    from fpx.feasibility import project_relu_graph
    u, y = project_relu_graph(jnp.array([2.0, -1.0, 3.0, -1.0]), jnp.array([0.0, 1.0, -1.0, -3.0]))
    assert jnp.allclose(u, jnp.array([1.0, -1.0, 1.0, -1.0]))
    assert jnp.allclose(y, jnp.array([1.0, 0.0, 1.0, 0.0]))
    ```
    """
    return _relu_graph(*same_shape("project_relu_graph", u=u, y=y))


@jax.jit
def _relu_graph(u, y):
    s = jnp.maximum((u + y) / 2, 0)
    d_pos = (u - s) ** 2 + (y - s) ** 2
    u_neg = jnp.minimum(u, 0)
    d_neg = (u - u_neg) ** 2 + y**2
    u_new = jnp.where(d_pos <= d_neg, s, u_neg)
    return u_new, jnp.maximum(u_new, 0)  # exactly on the graph, whichever way a tie went


def _bilinear_f(lam, u, v, y):
    """f(l) = y - l - u^2 / (2 (1 - l)^2) + v^2 / (2 (1 + l)^2) and f'(l) <= -1."""
    ip, iq = 1 / (1 - lam), 1 / (1 + lam)
    a2, b2 = (u * ip) ** 2, (v * iq) ** 2
    return y - lam - a2 / 2 + b2 / 2, -1 - a2 * ip - b2 * iq


@jax.custom_jvp
def _bilinear_multiplier(u: Array, v: Array, y: Array) -> Array:
    """The root of `f` in (-1, 1) (or the end +-1 that f tends to when there is none)."""
    finfo = jnp.finfo(u.dtype)
    max_iterations = 4 * (finfo.nmant + 1) + 8  # every 2 steps halve the bracket or |f|
    unroll = 2  # safeguarded steps fused per loop trip; the loop stops once every root is found
    one = jnp.ones_like(u)
    l_min, l_max = jnp.nextafter(-one, one), jnp.nextafter(one, -one)

    def update(lam, f, lo, hi):  # f is decreasing: the root is right of lam where f > 0
        return jnp.where(f >= 0, lam, lo), jnp.where(f <= 0, lam, hi)

    # Start from the linearised (Gauss–Newton) multiplier, exact to first order near the
    # surface, so that Newton typically needs two or three steps.
    lam0 = jnp.clip((y - (u * u - v * v) / 2) / (1 + u * u + v * v), -0.5, 0.5)
    f0, df0 = _bilinear_f(lam0, u, v, y)
    lo0, hi0 = update(lam0, f0, -one, one)

    def step(state):
        lam, f, df, lo, hi, force, best, best_abs = state
        newton = lam - f / df
        use_newton = ~force & (newton > lo) & (newton < hi)
        cand = jnp.clip(jnp.where(use_newton, newton, (lo + hi) / 2), l_min, l_max)
        fc, dfc = _bilinear_f(cand, u, v, y)
        width = hi - lo
        lo, hi = update(cand, fc, lo, hi)
        # Bisect next unless this step halved the bracket or |f| (Newton approaching the
        # root from one side shrinks |f| quadratically but the bracket hardly at all).
        force = ((hi - lo) > width / 2) & (jnp.abs(fc) > jnp.abs(f) / 2)
        better = jnp.abs(fc) < best_abs  # |f'| >= 1, so |lam - root| <= |f(lam)|
        best = jnp.where(better, cand, best)
        best_abs = jnp.where(better, jnp.abs(fc), best_abs)
        return cand, fc, dfc, lo, hi, force, best, best_abs

    # |f| below the rounding error of its own terms, or a bracket at machine resolution,
    # means no further step can improve the root.
    def settled(state):
        lam, f, df, lo, hi, force, best, best_abs = state
        p, q = 1 - best, 1 + best
        scale = 1 + jnp.abs(y) + jnp.abs(best) + u * u / (2 * p * p) + v * v / (2 * q * q)
        return (best_abs <= 4 * finfo.eps * scale) | (hi - lo <= 4 * finfo.eps)

    def cond(carry):
        trips, state = carry
        return (trips * unroll < max_iterations) & ~jnp.all(settled(state))

    def body(carry):
        trips, state = carry
        for _ in range(unroll):
            state = step(state)
        return trips + 1, state

    state = (lam0, f0, df0, lo0, hi0, jnp.zeros(u.shape, bool), lam0, jnp.abs(f0))
    return jax.lax.while_loop(cond, body, (jnp.array(0), state))[1][6]


@_bilinear_multiplier.defjvp
def _bilinear_multiplier_jvp(primals, tangents):
    # Implicit function theorem on f(l; u, v, y) = 0: dl = -(df/du du + df/dv dv + dy) / f'(l).
    u, v, y = primals
    du, dv, dy = tangents
    lam = _bilinear_multiplier(u, v, y)
    p, q = 1 - lam, 1 + lam
    _, df = _bilinear_f(lam, u, v, y)
    return lam, -(dy - u * du / (p * p) + v * dv / (q * q)) / df


@jax.jit
def _bilinear_kernel(a: Array, b: Array, y: Array) -> tuple[Array, Array, Array]:
    # Rotate to u = (a + b)/sqrt2, v = (a - b)/sqrt2, so that a b = (u^2 - v^2)/2 and the
    # stationarity conditions decouple: u' = u/(1 - l), v' = v/(1 + l), y' = y - l, where
    # l = y - a'b' is the multiplier; it is the unique root in (-1, 1) of the decreasing f.
    r2 = jnp.sqrt(jnp.asarray(0.5, a.dtype))
    u, v = (a + b) * r2, (a - b) * r2
    lam = _bilinear_multiplier(u, v, y)
    # Where the root is (numerically) at l = +-1 the divisions lose accuracy (and u = 0 or
    # v = 0 exactly has no root inside: the multiplier is +-1 and the projection is not
    # unique); there the constraint gives that coordinate: u'^2 = 2 (y - l) + v'^2 and
    # v'^2 = u'^2 - 2 (y - l), with the sign of u (of v), + for 0.
    p, q, yl = 1 - lam, 1 + lam, y - lam
    u_div, v_div = u / p, v / q
    small = jnp.sqrt(jnp.finfo(a.dtype).eps)
    u_new = jnp.where(p < small, jnp.where(u >= 0, 1, -1) * _safe_sqrt(2 * yl + v_div * v_div), u_div)
    v_new = jnp.where(q < small, jnp.where(v >= 0, 1, -1) * _safe_sqrt(u_div * u_div - 2 * yl), v_div)
    a_new, b_new = (u_new + v_new) * r2, (u_new - v_new) * r2
    return a_new, b_new, a_new * b_new


def project_bilinear_graph(a: ArrayLike, b: ArrayLike, y: ArrayLike) -> tuple[Array, Array, Array]:
    """Nearest point of the surface `{(a, b, y) : y = a b}`, entrywise on triples.

    Minimise `(a' - a)^2 + (b' - b)^2 + (y' - y)^2` subject to `y' = a' b'`. With the
    multiplier `l = y - y'`, stationarity reads `a' = a + l b'`, `b' = b + l a'`, so

        a' = (a + l b) / (1 - l^2),   b' = (b + l a) / (1 - l^2),   y' = y - l,

    and `l` solves `y - l = a' b'`. The global minimiser has `|l| <= 1` (second-order
    condition: the Hessian of the Lagrangian `[[1, -l], [-l, 1]]` must be PSD for a single
    quadratic constraint). In `u = (a + b)/sqrt 2`, `v = (a - b)/sqrt 2` the equation is

        f(l) = y - l - u^2 / (2 (1 - l)^2) + v^2 / (2 (1 + l)^2) = 0,

    with `f' <= -1` on `(-1, 1)`, so the root there is unique. It is found by a safeguarded
    Newton iteration (bisection whenever Newton leaves the bracket or fails to halve it), a
    loop that stops once every root is at rounding level (at most `4 (mantissa bits) + 12`
    steps; jit/vmap friendly).

    Degenerate cases: if `a = -b` and `y > 1 - a^2/4`, there is no root inside, `l = 1`, and
    the projection is not unique (two points mirrored through `a' + b' = 0`); the one with
    `a' + b' >= 0` is returned. Likewise if `a = b` and `y < a^2/4 - 1`: `l = -1` and the
    point with `a' - b' >= 0` is returned. Close to these cases the coordinate divided by
    `1 -+ l` is taken from the constraint instead. The returned `y'` is `a' * b'` (up to
    the rounding of the product).
    Inputs should be moderate (`|a|, |b|, |y| < 1e100`) to avoid overflow.

    Returns `(a', b', y')`. Derivatives use the implicit function theorem on `f(l) = 0`
    (not the iterations); they are undefined where the projection is not unique.

    ```python
    import jax.numpy as jnp
    from fpx.feasibility import project_bilinear_graph
    a, b, y = project_bilinear_graph(jnp.array([1.0, 0.0]), jnp.array([2.0, 0.0]), jnp.array([2.0, 5.0]))
    assert jnp.allclose(a, jnp.array([1.0, 2.0])) and jnp.allclose(b, jnp.array([2.0, 2.0]))
    assert jnp.allclose(y, a * b)  # (0, 0, 5) projects onto (2, 2, 4) (or its mirror (-2, -2, 4))
    ```
    """
    a, b, y = same_shape("project_bilinear_graph", a=a, b=b, y=y)
    return _bilinear_kernel(a, b, y)
