"""Fixed-point cells: contractive tanh cell, SubDEQ cell, CGS graph cell."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jaxtyping import Array, Float, PRNGKeyArray

from .. import _validate
from .._layers import normalized_adjacency as normalized_adjacency
from ..feasibility import project_spectral_norm_ball


class CellShapeError(ValueError):
    """A state or input of the wrong shape for a cell; the message names both and the expected shapes."""


def _check_shapes(owner: str, expected: dict[str, tuple[int, ...]], got: dict, hint: str = "") -> None:
    """Trace-time check of the arguments' shapes (`expected` maps a description to a shape)."""
    shapes = {name: tuple(jnp.shape(value)) for name, value in got.items()}
    if any(shapes[name] != shape for name, shape in zip(shapes, expected.values())):
        wanted = ", ".join(f"{what} of shape {shape}" for what, shape in expected.items())
        found = ", ".join(f"`{name}` of shape {shape}" for name, shape in shapes.items())
        raise CellShapeError(f"{owner} takes one sample: {wanted}; got {found}.{hint}")


_VMAP_HINT = " For a batch, vmap the layer: `jax.vmap(fpx.nn.DEQ(cell))(xs)`."


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
        state_size = _validate.integer("ContractiveCell", "state_size", state_size)
        input_size = _validate.integer("ContractiveCell", "input_size", input_size)
        _validate.real(
            "ContractiveCell", "gamma", gamma, low=0.0, high=1.0, low_open=True, high_open=True,
            hint=" It is the contraction factor: |W|_2 <= gamma < 1.",
        )
        dtype = dtype or jnp.result_type(float)
        kw, ku = jr.split(key)
        w = jr.normal(kw, (state_size, state_size), dtype) / math.sqrt(state_size)
        self.weight = project_spectral_norm_ball(w, gamma)
        self.input_weight = jr.normal(ku, (state_size, input_size), dtype) / math.sqrt(input_size)
        self.bias = jnp.zeros((state_size,), dtype)
        self.gamma = gamma

    def __call__(self, z, x):
        d, n = self.input_weight.shape
        _check_shapes(
            f"ContractiveCell(state_size={d}, input_size={n})",
            {"a state `z` (the DEQ's `z0`)": (d,), "an input `x`": (n,)},
            {"z": z, "x": x},
            _VMAP_HINT,
        )
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
        state_size = _validate.integer("SubDEQCell", "state_size", state_size)
        input_size = _validate.integer("SubDEQCell", "input_size", input_size)
        _validate.real("SubDEQCell", "weight_scale", weight_scale)
        _validate.real("SubDEQCell", "shift", shift, low=1.0, low_open=True, hint=" It must exceed 1 so that tanh(Wz) + shift > 0.")
        if normalize not in ("max", "mean", None):
            raise ValueError(f"`normalize` must be 'max', 'mean' or None, got {normalize!r}.")
        dtype = dtype or jnp.result_type(float)
        kw, ku = jr.split(key)
        self.weight = weight_scale * jr.normal(kw, (state_size, state_size), dtype) / math.sqrt(state_size)
        self.input_weight = jr.normal(ku, (state_size, input_size), dtype) / math.sqrt(input_size)
        self.shift = shift
        self.normalize = normalize

    def __call__(self, z, x):
        d, n = self.input_weight.shape
        _check_shapes(
            f"SubDEQCell(state_size={d}, input_size={n})",
            {"a state `z` (the DEQ's `z0`)": (d,), "an input `x`": (n,)},
            {"z": z, "x": x},
            _VMAP_HINT,
        )
        v = jnp.tanh(self.weight @ z) + jax.nn.relu(self.input_weight @ x) + self.shift
        if self.normalize == "max":
            return v / jnp.max(v)
        if self.normalize == "mean":
            return v / jnp.mean(v)
        return v

    def init_state(self, x):
        return jnp.ones((self.weight.shape[0],), self.weight.dtype)


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
        feature_size = _validate.integer("CGSCell", "feature_size", feature_size)
        state_size = _validate.integer("CGSCell", "state_size", state_size)
        hidden_size = _validate.integer("CGSCell", "hidden_size", hidden_size)
        _validate.real("CGSCell", "gamma", gamma, low=0.0, high=1.0, low_open=True, high_open=True, hint=" It must be < 1 for a contraction.")
        dtype = dtype or jnp.result_type(float)
        k1, k2 = jr.split(key)
        self.w1 = jr.normal(k1, (feature_size, hidden_size), dtype) / math.sqrt(feature_size)
        self.w2 = jr.normal(k2, (hidden_size, state_size), dtype) / math.sqrt(hidden_size)
        self.gamma = gamma

    def __call__(self, h, graph):
        adjacency, features, mask = self._unpack(graph)
        f, d = self.w1.shape[0], self.w2.shape[1]
        nodes = jnp.shape(features)[0] if jnp.ndim(features) else 0
        _check_shapes(
            f"CGSCell(feature_size={f}, state_size={d})",
            {
                "node states `h` (the DEQ's `z0`)": (nodes, d),
                "`adjacency`": (nodes, nodes),
                "`features`": (nodes, f),
                "`mask`": (nodes,),
            },
            {"h": h, "adjacency": adjacency, "features": features, "mask": mask},
            " The graph is `(adjacency, features, mask)` for one padded graph of N nodes; vmap the layer over a batch.",
        )
        a_hat = normalized_adjacency(adjacency, mask)
        b = (jax.nn.relu(features @ self.w1) @ self.w2) * mask[:, None]
        return self.gamma * a_hat @ h + b

    @staticmethod
    def _unpack(graph):
        if not (isinstance(graph, (tuple, list)) and len(graph) == 3):
            raise TypeError(
                f"CGSCell takes the graph as a tuple `(adjacency, features, mask)`, got {type(graph).__name__}"
                + (f" of length {len(graph)}." if isinstance(graph, (tuple, list)) else ".")
            )
        return graph

    def init_state(self, graph):
        _, features, _ = self._unpack(graph)
        nodes = jnp.shape(features)[0] if jnp.ndim(features) else 0
        return jnp.zeros((nodes, self.w2.shape[1]), self.w2.dtype)


def project(model):
    """Apply every cell's `.project()` (constraint projection) found in `model`.

    Call after each optimizer step to keep, e.g., `ContractiveCell` contractive.

    ```python
    import equinox as eqx, jax.numpy as jnp, jax.random as jr, fpx
    cell = fpx.nn.ContractiveCell(jr.PRNGKey(0), state_size=4, input_size=2, gamma=0.5)
    cell = eqx.tree_at(lambda c: c.weight, cell, 3.0 * cell.weight)   # e.g. after an optimizer step
    model = fpx.nn.project(fpx.nn.DEQ(cell))                          # finds the cell inside the model
    assert jnp.linalg.norm(model.cell.weight, 2) <= 0.5 + 1e-5
    ```
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
