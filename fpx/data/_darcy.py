"""2-D Darcy flow data (FNO benchmark): thresholded GRF coefficient, 5-point finite differences."""

from __future__ import annotations

import sys

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
from jaxtyping import Float
from tqdm import tqdm

from . import _checks, _elliptic
from ._cache import cached
from ._grf import grf2_cosine

# Auto progress bar above this many unknowns in total (about 5 s on a 2-core CPU).
_PROGRESS_WORK = 1.5e6
SOLVERS = ("direct", "cg", "mg-cg", "recycled")


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
    solver: str = "direct",
    rtol: float | None = None,
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

    **Solvers.** `solver="direct"` (the default) is the sparse direct solve above.
    The iterative solvers (`fpx.data._elliptic`, JAX, float64, jit-compiled; one sample
    after another on a CPU, vmapped batches on an accelerator) stop at a relative residual
    `|f - A u|_2 / |f|_2 <= rtol` (default `1e-8`). Measured against the direct solve, the
    relative L2 difference is 1e-3 to 1e-1 of `rtol` (at most 7e-10 at `s = 33 ... 421`: a
    CG residual sits in the rough modes, which carry little of the error), below float32
    resolution, so the float32 arrays returned agree with `"direct"` to about one unit in the
    last place. Timings below: 2-core CPU, one XLA thread, `benchmarks/bench_pde_solvers.py`.

    - `"cg"`: Jacobi-preconditioned CG. Iterations grow like `s` (about 800 at `s = 211`,
      1600 at 421); no faster than `"direct"` on a CPU.
    - `"mg-cg"`: CG preconditioned by a geometric multigrid V-cycle (Galerkin coarse
      operators, damped-Jacobi smoothing): 8-11 iterations at every `s`, 5-7x faster
      than `"direct"` at `s = 211` and 421 (55-65 and 290-330 ms a sample).
    - `"recycled"`: the samples are put in SKR order (greedy nearest neighbour on the
      coefficient fields, Wang et al., ICLR 2024) and solved one after another by Jacobi-
      preconditioned deflated CG, warm-started from the previous solution, the deflation
      space recycled from solve to solve (Ritz vectors; `fpx.data._elliptic.solve_sequence`).
      1.1-1.3x fewer iterations than `"cg"` on the windows of 12-16 samples measured at
      `s = 211` and 421, but each iteration costs more: 2-4.5x slower than `"cg"`. Kept for
      study, not for speed. The sample values then depend on `n` (within the tolerance),
      since the order does.

    A sample that does not converge raises `RuntimeError` naming it and its residual;
    nothing is cached then. `solver` (and `rtol`) join the cache key.

    Data are cached on disk (see `fpx.data`); a progress bar on stderr shows for long runs.

    **Arguments:**

    - `n`: number of samples.
    - `s`: grid size (nodes per side, boundary included), >= 3.
    - `seed`: seed of the random fields (NumPy `default_rng`).
    - `alpha`, `tau`: GRF smoothness and inverse length scale (> 0).
    - `solver`: `"direct"`, `"cg"`, `"mg-cg"` or `"recycled"` (see above).
    - `rtol`: relative-residual tolerance of the iterative solvers (default `1e-8`; at
      least `10 eps` of float64); not taken by `"direct"`.
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
    if solver not in SOLVERS:
        raise ValueError(f"fpx.data.darcy: `solver` must be one of {', '.join(map(repr, SOLVERS))}, got {solver!r}.")
    args = dict(n=n, s=s, seed=seed, alpha=alpha, tau=tau)
    if solver == "direct":
        if rtol is not None:
            raise ValueError("fpx.data.darcy: `rtol` is the tolerance of the iterative solvers; solver='direct' takes none.")
    else:
        try:
            rtol = _elliptic.check_rtol(1e-8 if rtol is None else rtol, np.float64)
        except ValueError as e:
            raise ValueError(f"fpx.data.darcy: {e}") from None
        # The direct solve keeps its old key (and cache files); the others add theirs.
        args.update(solver=solver, rtol=rtol)
    if progress is None:
        progress = n * s * s > _PROGRESS_WORK

    def generate():
        rng = np.random.default_rng(seed)
        a = np.empty((n, s, s), np.float32)
        # Fields are drawn in blocks (one rng stream, so the blocking does not change them).
        for start in range(0, n, 64):
            g = grf2_cosine(rng, min(64, n - start), s, alpha, tau)
            a[start : start + len(g)] = np.where(g >= 0, 12.0, 3.0)
        if solver == "direct":
            u = np.empty((n, s, s), np.float32)
            with tqdm(total=n, desc="fpx.data.darcy", unit="sample", file=sys.stderr, disable=not progress) as bar:
                for k in range(n):
                    u[k] = solve_darcy(a[k].astype(np.float64))
                    bar.update(1)
        else:
            u = _elliptic.darcy_solutions(a, solver, rtol, progress=progress).astype(np.float32)
        return {"a": a, "u": u}

    out = cached(fn, args, generate, cache)
    return out["a"], out["u"]
