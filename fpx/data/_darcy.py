"""2-D Darcy flow data (FNO benchmark): thresholded GRF coefficient, 5-point finite differences."""

from __future__ import annotations

import sys

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
from jaxtyping import Float
from tqdm import tqdm

from . import _checks
from ._cache import cached
from ._grf import grf2_cosine

# Auto progress bar above this many unknowns in total (about 5 s on a 2-core CPU).
_PROGRESS_WORK = 1.5e6


def darcy_matrix(a: Float[np.ndarray, "s s"]) -> scipy.sparse.csc_matrix:
    """The 5-point matrix of `-div(a grad u)` on the `(s-2)^2` interior nodes of an `s x s` grid.

    Nodes `x_i = i h`, `h = 1/(s-1)`, boundary included; `u = 0` on the boundary. The
    coefficient on the edge between two neighbouring nodes is the arithmetic mean of `a` at
    the two nodes (as in `solve_gwf.m`). Unknowns are ordered row-major: node `(i, j)` with
    `1 <= i, j <= s-2` is unknown `(i-1)(s-2) + (j-1)`. Symmetric positive definite for `a > 0`.
    """
    s = a.shape[0]
    m = s - 2
    h2 = (s - 1.0) ** 2
    idx = -np.ones((s, s), np.int64)
    idx[1:-1, 1:-1] = np.arange(m * m).reshape(m, m)
    rows, cols, vals = [], [], []
    # Edges between (i, j) and (i+1, j), then between (i, j) and (i, j+1).
    for p, q, c in (
        (idx[:-1, :], idx[1:, :], 0.5 * (a[:-1, :] + a[1:, :])),
        (idx[:, :-1], idx[:, 1:], 0.5 * (a[:, :-1] + a[:, 1:])),
    ):
        p, q, c = p.ravel(), q.ravel(), h2 * c.ravel()
        for x, y in ((p, q), (q, p)):
            inside = x >= 0
            rows.append(x[inside])
            cols.append(x[inside])
            vals.append(c[inside])
            both = inside & (y >= 0)
            rows.append(x[both])
            cols.append(y[both])
            vals.append(-c[both])
    rows, cols, vals = (np.concatenate(v) for v in (rows, cols, vals))
    return scipy.sparse.csc_matrix((vals, (rows, cols)), shape=(m * m, m * m))


def solve_darcy(a: Float[np.ndarray, "s s"], f: float = 1.0) -> Float[np.ndarray, "s s"]:
    """The finite-difference solution of `-div(a grad u) = f`, `u = 0` on the boundary (float64)."""
    s = a.shape[0]
    m = s - 2
    u = np.zeros((s, s))
    if m > 0:
        matrix = darcy_matrix(np.asarray(a, np.float64))
        u[1:-1, 1:-1] = scipy.sparse.linalg.spsolve(matrix, np.full(m * m, float(f)), permc_spec="MMD_AT_PLUS_A").reshape(m, m)
    return u


def darcy(
    n: int,
    s: int = 85,
    seed: int = 0,
    *,
    alpha: float = 2.0,
    tau: float = 3.0,
    cache: bool = True,
    progress: bool | None = None,
) -> tuple[Float[np.ndarray, "n s s"], Float[np.ndarray, "n s s"]]:
    r"""2-D Darcy flow pairs `(a, u)`, the FNO benchmark (Li et al. 2020, ICLR 2021).

    Solves `-div(a grad u) = 1` on the unit square with `u = 0` on the boundary, for `n`
    piecewise-constant coefficients `a = psi(g)`: `psi` maps `g >= 0` to 12 and `g < 0` to 3,
    and `g` is the Gaussian random field of the FNO generation script (`GRF.m`): mean zero,
    covariance `(-Delta + tau^2)^(-alpha)` with the zero-Neumann Laplacian, i.e. a cosine
    (DCT-II) Karhunen-Loeve expansion with coefficients
    `s tau^(alpha-1) (pi^2 (k1^2 + k2^2) + tau^2)^(-alpha/2) xi`, constant mode removed.

    Discretisation: the `s x s` grid of nodes `(i h, j h)`, `h = 1/(s-1)`, boundary
    included; `g` is taken directly at the nodes (`solve_gwf.m` spline-interpolates from
    cell centres to nodes and back, which smooths the jumps of `a`; not done here). 5-point
    finite differences with the arithmetic mean of `a` on each edge (as in `solve_gwf.m`),
    solved with `scipy.sparse.linalg.spsolve` (minimum-degree ordering): about 20 ms per
    sample at `s = 85`, 1.4 s at `s = 421`, on one CPU core. For a constant `a` the
    maximum of `u` converges at second order to `0.0736713533 / a` (the Poisson value at
    the centre of the square). `u[k, i, j]` is the value at `(x, y) = (i h, j h)`; `u` is exactly zero on
    the boundary rows and columns. The FNO paper solves at 421 and subsamples; here each
    resolution draws its own fields (the GRF depends on `s`). The first `k` samples do not
    depend on `n`.

    Data are cached on disk (see `fpx.data`); a progress bar on stderr shows for long runs.

    **Arguments:**

    - `n`: number of samples.
    - `s`: grid size (nodes per side, boundary included), >= 3.
    - `seed`: seed of the random fields (NumPy `default_rng`).
    - `alpha`, `tau`: GRF smoothness and inverse length scale (> 0).
    - `cache`: read/write the on-disk cache.
    - `progress`: show a progress bar (`None`: when the run is long).

    **Returns:** `(a, u)`, float32 arrays of shape `(n, s, s)`; `a` takes the values 3 and 12.

    ```python
    import numpy as np
    import fpx.data

    a, u = fpx.data.darcy(2, s=17, cache=False)
    assert a.shape == u.shape == (2, 17, 17) and set(np.unique(a)) <= {3.0, 12.0}
    assert (u[:, 0, :] == 0).all() and (u[:, 1:-1, 1:-1] > 0).all()
    ```
    """
    fn = "darcy"
    n = _checks.positive_int(fn, "n", n)
    s = _checks.positive_int(fn, "s", s)
    if s < 3:
        raise ValueError(f"fpx.data.darcy: `s` must be >= 3 (the grid includes the boundary), got {s!r}.")
    seed = _checks.seed(fn, seed)
    alpha = _checks.positive_float(fn, "alpha", alpha)
    tau = _checks.positive_float(fn, "tau", tau)
    if progress is None:
        progress = n * s * s > _PROGRESS_WORK
    args = dict(n=n, s=s, seed=seed, alpha=alpha, tau=tau)

    def generate():
        rng = np.random.default_rng(seed)
        a = np.empty((n, s, s), np.float32)
        u = np.empty((n, s, s), np.float32)
        with tqdm(total=n, desc="fpx.data.darcy", unit="sample", file=sys.stderr, disable=not progress) as bar:
            # Fields are drawn in blocks (one rng stream, so the blocking does not change them).
            for start in range(0, n, 64):
                g = grf2_cosine(rng, min(64, n - start), s, alpha, tau)
                for k, gk in enumerate(g):
                    ak = np.where(gk >= 0, 12.0, 3.0)
                    a[start + k] = ak
                    u[start + k] = solve_darcy(ak)
                    bar.update(1)
        return {"a": a, "u": u}

    out = cached(fn, args, generate, cache)
    return out["a"], out["u"]
