"""Pieces shared by `fpx.nn` and `fpx.operators` (private; both packages import from here).

Kept below both packages so that neither imports the other: `layer_stats` (the statistics
a DEQ layer returns) and `normalized_adjacency` (the degree-normalised graph operator of
the CGS cell and of `fpx.operators.graph_operator`).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jaxtyping import Array, Float

from ._solution import RESULTS


def layer_stats(sol) -> dict[str, Any]:
    """The solver statistics a DEQ layer returns, plus a per-sample `converged` flag."""
    stats = {**sol.stats, "converged": sol.result == RESULTS.successful}
    if sol.aux is not None:
        stats["aux"] = sol.aux
    return stats


def normalized_adjacency(adjacency: Float[Array, "n n"], mask: Float[Array, " n"] | None = None) -> Float[Array, "n n"]:
    """`D^{-1/2} (A + I) D^{-1/2}` on the real nodes of a padded graph; spectral norm <= 1.

    `A` must be symmetric and non-negative; padded nodes (`mask == 0`) are disconnected
    and get zero rows and columns.

    ```python
    import jax.numpy as jnp, fpx
    adjacency = jnp.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])   # an edge 0-1, node 2 padding
    a_hat = fpx.nn.normalized_adjacency(adjacency, mask=jnp.array([1.0, 1.0, 0.0]))
    assert jnp.allclose(a_hat[:2, :2], 0.5) and jnp.all(a_hat[2] == 0)
    assert jnp.linalg.norm(a_hat, 2) <= 1 + 1e-6
    ```
    """
    n = adjacency.shape[0]
    if mask is None:
        mask = jnp.ones((n,), adjacency.dtype)
    a = (adjacency + jnp.eye(n, dtype=adjacency.dtype)) * mask[:, None] * mask[None, :]
    degree = a.sum(axis=1)
    inv_sqrt = jnp.where(degree > 0, 1.0 / jnp.sqrt(jnp.where(degree > 0, degree, 1.0)), 0.0)
    return inv_sqrt[:, None] * a * inv_sqrt[None, :]
