"""DeepONet data (Lu et al. 2021): GRF input functions at sensors, exact targets at query points."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.interpolate
from jaxtyping import Float

from . import _checks
from ._cache import cached
from ._grf import grf_rbf


class DeepONetData(NamedTuple):
    """Input functions at fixed sensors and targets at fixed query points (all float32).

    - `x`: `(m,)` sensor locations.
    - `sensors`: `(n, m)` input function `v_i(x_k)`: the branch-net input.
    - `y`: `(num_points,)` query locations, the same for every sample (the trunk-net input).
    - `u`: `(n, num_points)` target `G(v_i)(y_j)`.

    This is the "aligned" (Cartesian-product) layout; the triplet layout of the DeepONet
    paper is `(sensors[i], y[j], u[i, j])` for sampled index pairs `(i, j)`.

    ```python
    import fpx
    data = fpx.data.antiderivative(8, m=50, num_points=20, cache=False)
    assert isinstance(data, fpx.data.DeepONetData)
    assert data.x.shape == (50,) and data.sensors.shape == (8, 50)
    assert data.y.shape == (20,) and data.u.shape == (8, 20)
    ```
    """

    x: Float[np.ndarray, " m"]
    sensors: Float[np.ndarray, "n m"]
    y: Float[np.ndarray, " p"]
    u: Float[np.ndarray, "n p"]


def _checked(fn, n, m, seed, length_scale, num_points, resolution):
    n = _checks.positive_int(fn, "n", n)
    m = _checks.positive_int(fn, "m", m)
    if m < 2:
        raise ValueError(f"fpx.data.{fn}: `m` (number of sensors) must be >= 2, got {m!r}.")
    seed = _checks.seed(fn, seed)
    length_scale = _checks.positive_float(fn, "length_scale", length_scale)
    num_points = m if num_points is None else _checks.positive_int(fn, "num_points", num_points)
    resolution = _checks.positive_int(fn, "resolution", resolution)
    if resolution < 4:
        raise ValueError(f"fpx.data.{fn}: `resolution` must be >= 4 (a cubic spline), got {resolution!r}.")
    return n, m, seed, length_scale, num_points, resolution


def _splines(n, seed, length_scale, resolution):
    """The input functions: cubic splines through GRF samples on a uniform grid (as DeepONet's `interp1d`)."""
    grid = np.linspace(0.0, 1.0, resolution)
    values = grf_rbf(np.random.default_rng(seed), n, resolution, length_scale)
    return scipy.interpolate.CubicSpline(grid, values, axis=1)


def _points(k):
    return np.linspace(0.0, 1.0, k)


def _pack(x, v, y, u) -> DeepONetData:
    return DeepONetData(*(np.ascontiguousarray(t, dtype=np.float32) for t in (x, v, y, u)))


def antiderivative(
    n: int,
    m: int = 100,
    seed: int = 0,
    *,
    length_scale: float = 0.2,
    num_points: int | None = None,
    resolution: int = 1000,
    cache: bool = True,
) -> DeepONetData:
    r"""The antiderivative operator `G(v)(y) = int_0^y v(t) dt` of the DeepONet paper (Lu et al. 2021).

    Input functions `v` on [0, 1] are a mean-zero Gaussian random field with the RBF kernel
    `exp(-(x - x')^2 / (2 length_scale^2))`, sampled on `resolution` uniform grid points
    (Cholesky factor of the kernel matrix) and interpolated by a cubic spline, as in the
    paper's code; `v` *is* that spline, and `u` is its exact antiderivative (no quadrature
    error). Sensors: `m` equispaced points `x = linspace(0, 1, m)`; query points:
    `y = linspace(0, 1, num_points)` (default `num_points = m`). The first `k` samples do not
    depend on `n`; `poisson1d` with the same arguments uses the same input functions.

    **Returns:** a `DeepONetData` `(x, sensors, y, u)` of float32 arrays with shapes
    `(m,)`, `(n, m)`, `(num_points,)`, `(n, num_points)`.

    ```python
    import numpy as np
    import fpx.data

    d = fpx.data.antiderivative(3, m=50, num_points=20, cache=False)
    assert d.sensors.shape == (3, 50) and d.u.shape == (3, 20) and d.y.shape == (20,)
    assert np.allclose(d.u[:, 0], 0.0)  # G(v)(0) = 0
    # trapezoid rule on the sensors agrees with the exact antiderivative at y = 1
    assert np.allclose(np.trapezoid(d.sensors, d.x, axis=1), d.u[:, -1], atol=1e-3)
    ```
    """
    n, m, seed, length_scale, num_points, resolution = _checked(
        "antiderivative", n, m, seed, length_scale, num_points, resolution
    )
    args = dict(n=n, m=m, seed=seed, length_scale=length_scale, num_points=num_points, resolution=resolution)

    def generate():
        v = _splines(n, seed, length_scale, resolution)
        x, y = _points(m), _points(num_points)
        return _pack(x, v(x), y, v.antiderivative()(y))._asdict()

    return DeepONetData(**cached("antiderivative", args, generate, cache))


def poisson1d(
    n: int,
    m: int = 100,
    seed: int = 0,
    *,
    length_scale: float = 0.2,
    num_points: int | None = None,
    resolution: int = 1000,
    cache: bool = True,
) -> DeepONetData:
    r"""The 1-D Poisson solution operator `f -> u`, `-u'' = f` on [0, 1], `u(0) = u(1) = 0`.

    Same input functions, sensors and query points as `antiderivative` (the right-hand
    sides `f` are the RBF Gaussian random field, as cubic splines). The solution is exact
    for the spline `f`: with `F(y) = int_0^y int_0^t f`, `u(y) = y F(1) - F(y)`.

    **Returns:** a `DeepONetData` `(x, sensors, y, u)`: `sensors` holds `f` at `x`, `u` the
    solution at `y`; float32, shapes `(m,)`, `(n, m)`, `(num_points,)`, `(n, num_points)`.

    ```python
    import numpy as np
    import fpx.data

    d = fpx.data.poisson1d(2, m=101, num_points=101, cache=False)
    assert np.allclose(d.u[:, [0, -1]], 0.0)
    # -u'' = f, checked with second differences on the uniform grid
    h = d.y[1] - d.y[0]
    lap = (d.u[:, 2:] - 2 * d.u[:, 1:-1] + d.u[:, :-2]) / h**2
    assert np.allclose(-lap, d.sensors[:, 1:-1], atol=1e-2)
    ```
    """
    n, m, seed, length_scale, num_points, resolution = _checked(
        "poisson1d", n, m, seed, length_scale, num_points, resolution
    )
    args = dict(n=n, m=m, seed=seed, length_scale=length_scale, num_points=num_points, resolution=resolution)

    def generate():
        f = _splines(n, seed, length_scale, resolution)
        F = f.antiderivative(2)
        x, y = _points(m), _points(num_points)
        u = y[None, :] * F(1.0)[:, None] - F(y)
        return _pack(x, f(x), y, u)._asdict()

    return DeepONetData(**cached("poisson1d", args, generate, cache))
