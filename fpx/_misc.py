"""Small pytree helpers shared by the driver and the solvers."""

from __future__ import annotations

import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from jax.flatten_util import ravel_pytree

two_norm = optx.two_norm
rms_norm = optx.rms_norm
max_norm = optx.max_norm


def tree_sub(x, y):
    return jtu.tree_map(lambda a, b: a - b, x, y)


def tree_add(x, y):
    return jtu.tree_map(lambda a, b: a + b, x, y)


def tree_scale(alpha, x):
    return jtu.tree_map(lambda a: (alpha * a).astype(a.dtype), x)


def tree_lerp(x, y, alpha):
    """``x + alpha * (y - x)``, leafwise, keeping each leaf's dtype."""
    return jtu.tree_map(lambda a, b: (a + alpha * (b - a)).astype(a.dtype), x, y)


def tree_where(pred, x, y):
    return jtu.tree_map(lambda a, b: jnp.where(pred, a, b), x, y)


def tree_describe(tree) -> str:
    """``{'a': f32[3], 'b': f64[]}``-style summary of a pytree of arrays/shape-dtype structs."""

    def leaf(x):
        dtype = jnp.dtype(x.dtype)
        short = {"f": "f", "i": "i", "u": "u", "b": "bool", "c": "c"}.get(dtype.kind, dtype.name)
        name = short if dtype.kind == "b" else f"{short}{dtype.itemsize * 8}"
        return f"{name}{list(x.shape)}"

    described = jtu.tree_map(leaf, tree)
    return str(described).replace("'", "") if not isinstance(described, str) else described


def ravel(tree):
    """Flatten a pytree to one vector in the widest floating dtype of its leaves.

    Returns the vector and the function that restores the pytree (casting every leaf back
    to its own dtype), as `jax.flatten_util.ravel_pytree` does.
    """
    return ravel_pytree(tree)


def dtype_eps(tree) -> float:
    leaves = jtu.tree_leaves(tree)
    dtype = jnp.result_type(*leaves) if leaves else jnp.float32
    return float(jnp.finfo(dtype).eps)
