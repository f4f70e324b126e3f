"""Exact Euclidean projections that are not in `optax.projections`."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float


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
    if isinstance(radius, (int, float)) and radius < 0:
        raise ValueError(f"`radius` must be non-negative, got {radius!r}.")
    if matrix.ndim != 2:
        raise ValueError(f"project_spectral_norm_ball expects a matrix, got shape {matrix.shape}.")
    u, s, vh = jnp.linalg.svd(matrix, full_matrices=False)
    return (u * jnp.minimum(s, radius)[None, :]) @ vh
