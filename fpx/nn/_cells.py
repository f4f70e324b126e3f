"""Fixed-point cells: contractive tanh cell, SubDEQ cell, CGS graph cell."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jaxtyping import Array, Float, PRNGKeyArray

from ..feasibility import project_spectral_norm_ball


class ContractiveCell(eqx.Module):
    """`T(z, x) = tanh(W z + U x + b)` with `|W|_2 <= gamma`, hence a `gamma`-contraction.

    `tanh` is 1-Lipschitz, so `|W|_2 <= gamma < 1` makes `T` a contraction in `z` for every
    input: the fixed point exists, is unique, and Picard converges (Banach). The constraint
    is kept by projection: call `fpx.nn.project(model)` after each optimizer step
    (it calls `.project()` on every cell in the model), which clips `W`'s singular values
    at `gamma` (`fpx.feasibility.project_spectral_norm_ball`).

    ```python
    import jax.numpy as jnp, jax.random as jr, fpx
    cell = fpx.nn.ContractiveCell(jr.PRNGKey(0), state_size=4, input_size=2, gamma=0.5)
    assert jnp.linalg.norm(cell.weight, 2) <= 0.5 + 1e-6
    z = cell(jnp.zeros(4), jnp.ones(2))
    ```
    """

    weight: Float[Array, "d d"]
    input_weight: Float[Array, "d n"]
    bias: Float[Array, " d"]
    gamma: float = eqx.field(static=True)

    def __init__(self, key: PRNGKeyArray, state_size: int, input_size: int, gamma: float = 0.9, dtype=None):
        if not 0 < gamma < 1:
            raise ValueError(f"`gamma` is the contraction factor and must lie in (0, 1), got {gamma!r}.")
        dtype = dtype or jnp.result_type(float)
        kw, ku = jr.split(key)
        w = jr.normal(kw, (state_size, state_size), dtype) / math.sqrt(state_size)
        self.weight = project_spectral_norm_ball(w, gamma)
        self.input_weight = jr.normal(ku, (state_size, input_size), dtype) / math.sqrt(input_size)
        self.bias = jnp.zeros((state_size,), dtype)
        self.gamma = gamma

    def __call__(self, z, x):
        return jnp.tanh(self.weight @ z + self.input_weight @ x + self.bias)

    def init_state(self, x):
        return jnp.zeros(self.bias.shape, self.bias.dtype)

    def project(self) -> "ContractiveCell":
        return eqx.tree_at(lambda c: c.weight, self, project_spectral_norm_ball(self.weight, self.gamma))


class SubDEQCell(eqx.Module):
    """Subhomogeneous DEQ cell (after Sittoni & Tudisco, ICML 2024).

    `T(z, x) = N(tanh(W z) + relu(U x) + shift)` with `shift > 1`, so the pre-normalised
    vector is strictly positive, and `N(v) = v / max(v)` (or `v / mean(v)`), a
    degree-0 homogeneous normalisation. Positivity plus normalisation is what the
    nonlinear Perron–Frobenius argument works with: it tames weights far beyond the
    `|W| < 1` that the plain `tanh(W z + U x)` cell needs. It is not a guarantee for every
    `W`; measured over 8 seeds (64 units, Gaussian `W` of spectral scale `s`, Picard to
    1e-8): `s = 3`: max-normalised 8/8 in 16–20 steps, unnormalised 7/8 in 16–117;
    `s = 10`: max-normalised 8/8 in 21–99 steps, unnormalised 2/8; `s = 30`:
    max-normalised 5/8.

    ```python
    import jax.numpy as jnp, jax.random as jr, fpx
    cell = fpx.nn.SubDEQCell(jr.PRNGKey(0), state_size=16, input_size=4, weight_scale=3.0)
    z, stats = fpx.nn.DEQ(cell, solver=fpx.Picard(), max_steps=200)(jnp.ones(4))
    assert bool(stats["converged"]) and float(z.max()) == 1.0
    ```
    """

    weight: Float[Array, "d d"]
    input_weight: Float[Array, "d n"]
    shift: float = eqx.field(static=True)
    normalize: str | None = eqx.field(static=True)

    def __init__(
        self,
        key: PRNGKeyArray,
        state_size: int,
        input_size: int,
        *,
        weight_scale: float = 1.0,
        shift: float = 2.0,
        normalize: str | None = "max",
        dtype=None,
    ):
        if shift <= 1:
            raise ValueError(f"`shift` must exceed 1 so that tanh(Wz) + shift > 0, got {shift!r}.")
        if normalize not in ("max", "mean", None):
            raise ValueError(f"`normalize` must be 'max', 'mean' or None, got {normalize!r}.")
        dtype = dtype or jnp.result_type(float)
        kw, ku = jr.split(key)
        self.weight = weight_scale * jr.normal(kw, (state_size, state_size), dtype) / math.sqrt(state_size)
        self.input_weight = jr.normal(ku, (state_size, input_size), dtype) / math.sqrt(input_size)
        self.shift = shift
        self.normalize = normalize

    def __call__(self, z, x):
        v = jnp.tanh(self.weight @ z) + jax.nn.relu(self.input_weight @ x) + self.shift
        if self.normalize == "max":
            return v / jnp.max(v)
        if self.normalize == "mean":
            return v / jnp.mean(v)
        return v

    def init_state(self, x):
        return jnp.ones((self.weight.shape[0],), self.weight.dtype)


def normalized_adjacency(adjacency: Float[Array, "n n"], mask: Float[Array, " n"] | None = None) -> Float[Array, "n n"]:
    """`D^{-1/2} (A + I) D^{-1/2}` on the real nodes of a padded graph; spectral norm <= 1.

    `A` must be symmetric and non-negative; padded nodes (`mask == 0`) are disconnected
    and get zero rows and columns.
    """
    n = adjacency.shape[0]
    if mask is None:
        mask = jnp.ones((n,), adjacency.dtype)
    a = (adjacency + jnp.eye(n, dtype=adjacency.dtype)) * mask[:, None] * mask[None, :]
    degree = a.sum(axis=1)
    inv_sqrt = jnp.where(degree > 0, 1.0 / jnp.sqrt(jnp.where(degree > 0, degree, 1.0)), 0.0)
    return inv_sqrt[:, None] * a * inv_sqrt[None, :]


class CGSCell(eqx.Module):
    """Convergent graph solver cell (after Park et al., ICLR 2022): `T(h) = γ Â h + b(G)`.

    `Â` is the degree-normalised adjacency with self loops (spectral norm <= 1), so `T` is
    a `γ`-contraction in the Frobenius norm over node states `h` of shape
    `(nodes, features)` and Picard needs at most `⌈log(tol / r0) / log γ⌉` steps to bring
    the residual from `r0` to `tol`. `b(G) = relu(X W1) W2` is a node-wise MLP of the node
    features. The input `graph` is `(adjacency, features, mask)` for a padded graph.

    ```python
    import jax.numpy as jnp, jax.random as jr, fpx
    cell = fpx.nn.CGSCell(jr.PRNGKey(0), feature_size=3, state_size=4, gamma=0.8)
    adjacency = jnp.array([[0., 1., 0.], [1., 0., 1.], [0., 1., 0.]])
    graph = (adjacency, jnp.ones((3, 3)), jnp.ones(3))
    h, stats = fpx.nn.DEQ(cell, solver=fpx.Picard())(graph)
    assert h.shape == (3, 4)
    ```
    """

    w1: Float[Array, "f hidden"]
    w2: Float[Array, "hidden d"]
    gamma: float = eqx.field(static=True)

    def __init__(self, key: PRNGKeyArray, feature_size: int, state_size: int, *, hidden_size: int = 32, gamma: float = 0.9, dtype=None):
        if not 0 < gamma < 1:
            raise ValueError(f"`gamma` must lie in (0, 1) for a contraction, got {gamma!r}.")
        dtype = dtype or jnp.result_type(float)
        k1, k2 = jr.split(key)
        self.w1 = jr.normal(k1, (feature_size, hidden_size), dtype) / math.sqrt(feature_size)
        self.w2 = jr.normal(k2, (hidden_size, state_size), dtype) / math.sqrt(hidden_size)
        self.gamma = gamma

    def __call__(self, h, graph):
        adjacency, features, mask = graph
        a_hat = normalized_adjacency(adjacency, mask)
        b = (jax.nn.relu(features @ self.w1) @ self.w2) * mask[:, None]
        return self.gamma * a_hat @ h + b

    def init_state(self, graph):
        return jnp.zeros((graph[1].shape[0], self.w2.shape[1]), self.w2.dtype)


def project(model):
    """Apply every cell's `.project()` (constraint projection) found in `model`.

    Call after each optimizer step to keep, e.g., `ContractiveCell` contractive.
    """

    def is_projectable(x):
        return isinstance(x, eqx.Module) and callable(getattr(x, "project", None))

    return jtu.tree_map(lambda x: x.project() if is_projectable(x) else x, model, is_leaf=is_projectable)


def jacobian_regularizer(fn, z, args, key: PRNGKeyArray, num_samples: int = 1):
    """Hutchinson estimate of `|∂fn/∂z|_F^2 / dim(z)` at `z` (Bai et al., 2021).

    `E_ε |ε^T J|^2 = |J|_F^2` for `ε ~ N(0, I)`; one vjp per sample, the Jacobian is never
    formed. Add `λ * jacobian_regularizer(cell, z_star, x, key)` to the loss to keep a DEQ
    well-conditioned (fewer solver steps) during training.

    ```python
    import jax.numpy as jnp, jax.random as jr, fpx
    fn = lambda z, a: a * z
    est = fpx.nn.jacobian_regularizer(fn, jnp.ones(3), 2.0, jr.PRNGKey(0), num_samples=2000)
    assert abs(est - 4.0) < 0.5
    ```
    """
    leaves = jtu.tree_leaves(z)
    dim = sum(x.size for x in leaves)
    _, vjp = jax.vjp(lambda z: fn(z, args), z)

    def one(k):
        keys = jr.split(k, len(leaves))
        eps = jtu.tree_unflatten(jtu.tree_structure(z), [jr.normal(kk, x.shape, x.dtype) for kk, x in zip(keys, leaves)])
        (row,) = vjp(eps)
        return sum(jnp.sum(r**2) for r in jtu.tree_leaves(row))

    return jnp.mean(jax.vmap(one)(jr.split(key, num_samples))) / dim
