"""Argument checks shared by the projections of `fpx.feasibility` and `fpx.projective`."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike


def same_shape(fn: str, **arrays: ArrayLike) -> list[Array]:
    """The arrays, of one common shape, cast to one real floating dtype (integers promote).

    Raises `ValueError` naming `fn` and every argument's shape when the shapes differ, or
    when the arguments are complex.
    """
    arrays = {k: jnp.asarray(v) for k, v in arrays.items()}
    shapes = {k: v.shape for k, v in arrays.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"{fn}: the arguments must have the same shape, got {shapes}.")
    dtype = jnp.result_type(*arrays.values())
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise ValueError(f"{fn}: the arguments must be real, got dtype {dtype}.")
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)
    return [v.astype(dtype) for v in arrays.values()]
