"""DeepONet (Lu et al., 2021): branch net on sensor values, trunk net on query points."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._operator import Operator, Zeros, check_positive_int, glorot_spec, make_init, mlp, mlp_spec


def DeepONet(
    sensors: int,
    branch: Sequence[int] = (40, 40),
    trunk: Sequence[int] = (40, 40),
    latent: int = 40,
    coord_dim: int = 1,
    activation: Callable[[Array], Array] = jax.nn.relu,
    *,
    dtype=None,
) -> Operator:
    """Unstacked DeepONet: `G(u)(y) = Σ_k b_k(u) t_k(y) + b_0`.

    `apply(params, (u, y))`: `u` of shape `(sensors,)`, the input function at the fixed
    sensor points; `y` of shape `(coord_dim,)` (one query point, returns a scalar) or
    `(p, coord_dim)` (p points, returns `(p,)`: the Cartesian-product layout, one `u`
    against many points, with the branch net evaluated once). For unaligned data (each
    `u` with its own point) vmap over `(u, y)` pairs.

    The branch net is an MLP `sensors -> branch... -> latent` with a linear last layer;
    the trunk net `coord_dim -> trunk... -> latent` applies `activation` after every
    layer, the last included (as DeepXDE does); `b_0` is a trained scalar bias. Weights
    are Glorot-normal, biases zero. `params = {"branch": [...], "trunk": [...],
    "bias": ()}`.

    ```python
    import jax, jax.numpy as jnp, jax.random as jr
    from fpx.operators import DeepONet
    net = DeepONet(sensors=10, branch=(16,), trunk=(16,), latent=8)
    params = net.init(jr.PRNGKey(0))
    u, ys = jnp.ones(10), jnp.linspace(0, 1, 5)[:, None]
    many = net.apply(params, (u, ys))                                    # (5,)
    one_by_one = jax.vmap(lambda y: net.apply(params, (u, y)))(ys)      # unaligned layout
    assert many.shape == (5,) and jnp.allclose(many, one_by_one)
    ```
    """
    check_positive_int("sensors", sensors)
    check_positive_int("latent", latent)
    check_positive_int("coord_dim", coord_dim)
    branch, trunk = tuple(branch), tuple(trunk)
    for name, sizes in [("branch", branch), ("trunk", trunk)]:
        if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in sizes):
            raise ValueError(f"`{name}` must be a tuple of positive hidden widths, got {sizes!r}.")

    def specs() -> dict:
        return {
            "branch": mlp_spec((sensors,) + branch + (latent,), glorot_spec),
            "trunk": mlp_spec((coord_dim,) + trunk + (latent,), glorot_spec),
            "bias": Zeros(()),
        }

    init = make_init(specs, dtype)

    def apply(params: dict, inputs: tuple[Float[Array, " m"], Float[Array, "*p d"]]) -> Float[Array, "*p"]:
        if not (isinstance(inputs, (tuple, list)) and len(inputs) == 2):
            raise TypeError(
                f"DeepONet.apply takes `(u, y)`: the sensor values and the query point(s), got {type(inputs).__name__}."
            )
        u, y = jnp.asarray(inputs[0]), jnp.asarray(inputs[1])
        if u.shape != (sensors,):
            raise ValueError(
                f"DeepONet was built for {sensors} sensors: `u` must have shape ({sensors},), got {u.shape}. "
                f"For a batch of functions, vmap over them."
            )
        if y.ndim not in (1, 2) or y.shape[-1] != coord_dim:
            raise ValueError(
                f"DeepONet: `y` must have shape ({coord_dim},) for one point or (p, {coord_dim}) for p points "
                f"(coord_dim={coord_dim}), got {y.shape}."
                + (" For 1-D points pass `y[:, None]`." if coord_dim == 1 and y.ndim == 1 else "")
            )
        b = mlp(params["branch"], u, activation)
        t = mlp(params["trunk"], y, activation, final_activation=True)
        out = t @ b
        return out + jnp.reshape(params["bias"], (1,) * out.ndim)

    return Operator(init, apply)
