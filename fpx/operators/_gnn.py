"""Message-passing GNN on padded graphs, and the degree-normalised graph operator of CGS."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from .._layers import normalized_adjacency
from ._operator import Operator, check_positive_int, default_dtype, linear, linear_spec, make_init, mlp, mlp_spec


class Graph(NamedTuple):
    """One padded graph: the input of `GNN.apply`.

    - `nodes`: node features, shape `(N, F)`.
    - `senders`, `receivers`: integer edge lists, shape `(E,)`; edge `e` carries a message
      from `senders[e]` to `receivers[e]` (list both directions for an undirected edge).
    - `edge_mask`: shape `(E,)`, true (or 1) for real edges, false for padding; `None`:
      all real.
    - `node_mask`: shape `(N,)`, likewise for nodes; `None`: all real.

    Padding to fixed `N` and `E` lets graphs of different sizes share one compiled
    function and be vmapped. Any plain 3- or 5-tuple in this order works as well.

    ```python
    import jax.numpy as jnp
    from fpx.operators import Graph
    g = Graph(jnp.ones((3, 2)), jnp.array([0, 1]), jnp.array([1, 2]))
    assert g.edge_mask is None and g.nodes.shape == (3, 2)
    ```
    """

    nodes: Float[Array, "n f"]
    senders: Int[Array, " e"]
    receivers: Int[Array, " e"]
    edge_mask: Bool[Array, " e"] | None = None
    node_mask: Bool[Array, " n"] | None = None


def _edge_list(senders, receivers, num_nodes: int, edge_mask, node_mask, what: str):
    """Validated edge arrays and the effective masks (an edge is live only between live nodes)."""
    senders, receivers = jnp.asarray(senders), jnp.asarray(receivers)
    if senders.ndim != 1 or senders.shape != receivers.shape:
        raise ValueError(
            f"{what}: `senders` and `receivers` must be 1-D edge lists of equal length, got shapes "
            f"{senders.shape} and {receivers.shape}."
        )
    if not (jnp.issubdtype(senders.dtype, jnp.integer) and jnp.issubdtype(receivers.dtype, jnp.integer)):
        raise TypeError(f"{what}: `senders`/`receivers` must be integer arrays, got {senders.dtype}/{receivers.dtype}.")
    num_edges = senders.shape[0]
    if edge_mask is None:
        edge_mask = jnp.ones((num_edges,), bool)
    edge_mask = jnp.asarray(edge_mask)
    if edge_mask.shape != (num_edges,):
        raise ValueError(f"{what}: `edge_mask` must have shape ({num_edges},) like the edge lists, got {edge_mask.shape}.")
    if node_mask is None:
        node_mask = jnp.ones((num_nodes,), bool)
    node_mask = jnp.asarray(node_mask)
    if node_mask.shape != (num_nodes,):
        raise ValueError(f"{what}: `node_mask` must have shape ({num_nodes},), one entry per node, got {node_mask.shape}.")
    node_mask = node_mask.astype(bool)
    in_range = (senders >= 0) & (senders < num_nodes) & (receivers >= 0) & (receivers < num_nodes)
    live = (
        edge_mask.astype(bool)
        & in_range
        & jnp.take(node_mask, senders, mode="clip")
        & jnp.take(node_mask, receivers, mode="clip")
    )
    return senders, receivers, live, node_mask


def GNN(
    hidden: int,
    layers: int,
    in_features: int,
    out_features: int,
    *,
    activation: Callable[[Array], Array] = jax.nn.relu,
    aggregation: str = "sum",
    dtype=None,
) -> Operator:
    """Message-passing graph network (encode, `layers` x message passing, decode) on padded graphs.

    `apply(params, graph)`: `graph` a `Graph(nodes, senders, receivers, edge_mask,
    node_mask)` with `nodes` of shape `(N, in_features)`; returns `(N, out_features)`,
    zero on padded nodes. Per layer `l` (separate weights):

        m_e = MLP_l(h_senders[e], h_receivers[e])             (edges with mask 1 only)
        a_i = Σ_{e: receivers[e] = i} m_e                    (masked `segment_sum`;
                                                              "mean" divides by the in-degree)
        h_i <- h_i + U_l(h_i, a_i)                           (residual update MLP)

    with `h = Linear(in_features, hidden)(nodes)` before and a two-layer MLP to
    `out_features` after. An edge counts only if its mask is set, both ends are real
    nodes and its indices lie in `[0, N)`; padded node features are zeroed before use,
    so padding (any number of extra nodes and edges, any garbage in them) never changes
    the outputs at real nodes.

    ```python
    import jax.numpy as jnp, jax.random as jr
    from fpx.operators import GNN, Graph
    gnn = GNN(hidden=8, layers=2, in_features=3, out_features=1)
    params = gnn.init(jr.PRNGKey(0))
    g = Graph(jnp.ones((3, 3)), jnp.array([0, 1, 1, 2]), jnp.array([1, 0, 2, 1]))
    padded = Graph(jnp.ones((5, 3)), jnp.array([0, 1, 1, 2, 4]), jnp.array([1, 0, 2, 1, 0]),
                   edge_mask=jnp.array([1, 1, 1, 1, 0]), node_mask=jnp.array([1, 1, 1, 0, 0]))
    out, out_padded = gnn.apply(params, g), gnn.apply(params, padded)
    assert out.shape == (3, 1) and jnp.allclose(out, out_padded[:3]) and (out_padded[3:] == 0).all()
    ```
    """
    check_positive_int("hidden", hidden)
    check_positive_int("layers", layers)
    check_positive_int("in_features", in_features)
    check_positive_int("out_features", out_features)
    if aggregation not in ("sum", "mean"):
        raise ValueError(f"`aggregation` must be 'sum' or 'mean', got {aggregation!r}.")

    def specs() -> dict:
        layer = {"message": mlp_spec((2 * hidden, hidden, hidden)), "update": mlp_spec((2 * hidden, hidden, hidden))}
        return {
            "encoder": linear_spec(in_features, hidden),
            "layers": [layer] * layers,
            "decoder": mlp_spec((hidden, hidden, out_features)),
        }

    init = make_init(specs, dtype)

    def apply(params: dict, graph) -> Float[Array, "n o"]:
        if not isinstance(graph, tuple) or len(graph) not in (3, 5):
            raise TypeError(
                "GNN.apply takes a `Graph(nodes, senders, receivers, edge_mask, node_mask)` "
                f"(or a 3- or 5-tuple in that order), got {type(graph).__name__}."
            )
        nodes, senders, receivers, *masks = graph
        edge_mask, node_mask = masks if masks else (None, None)
        nodes = jnp.asarray(nodes)
        if nodes.ndim != 2 or nodes.shape[1] != in_features:
            raise ValueError(
                f"GNN was built for in_features={in_features}: `nodes` must have shape (N, {in_features}), got {nodes.shape}."
            )
        num_nodes = nodes.shape[0]
        senders, receivers, live, node_mask = _edge_list(senders, receivers, num_nodes, edge_mask, node_mask, "GNN")
        keep_node = node_mask[:, None]
        keep_edge = live[:, None]
        # Zero padded nodes first: garbage (even NaN) there must not reach a real node, nor
        # the weight gradients through `0 * NaN`.
        h = linear(params["encoder"], jnp.where(keep_node, nodes, 0))
        h = jnp.where(keep_node, h, 0)
        if aggregation == "mean":
            degree = jax.ops.segment_sum(live.astype(h.dtype), receivers, num_nodes)
            inv_degree = (1.0 / jnp.maximum(degree, 1.0))[:, None]
        for layer in params["layers"]:
            pair = jnp.concatenate(
                [jnp.take(h, senders, axis=0, mode="clip"), jnp.take(h, receivers, axis=0, mode="clip")], axis=-1
            )
            messages = jnp.where(keep_edge, mlp(layer["message"], pair, activation), 0)
            aggregated = jax.ops.segment_sum(messages, receivers, num_nodes)
            if aggregation == "mean":
                aggregated = aggregated * inv_degree
            h = h + mlp(layer["update"], jnp.concatenate([h, aggregated], axis=-1), activation)
            h = jnp.where(keep_node, h, 0)
        return jnp.where(keep_node, mlp(params["decoder"], h, activation), 0)

    return Operator(init, apply)


def graph_operator(
    senders: Int[ArrayLike, " e"],
    receivers: Int[ArrayLike, " e"],
    num_nodes: int,
    edge_mask: ArrayLike | None = None,
    node_mask: ArrayLike | None = None,
    *,
    symmetrize: bool = False,
    dtype=None,
) -> Float[Array, "n n"]:
    """The degree-normalised operator `Â = D^{-1/2} (A + I) D^{-1/2}` of a padded edge list.

    `A[r, s]` counts the live edges `s -> r` (mask set, both ends real nodes, indices in
    `[0, num_nodes)`), so `(Â h)_r` gathers from the senders into `r`. The
    normalisation is `fpx.nn.normalized_adjacency`, the one the CGS cell
    (`fpx.nn.CGSCell`, `T(h) = γ Â h + b`) uses: for a symmetric `A` (list both
    directions of every undirected edge, or pass `symmetrize=True`, which takes
    `max(A, A^T)`) its spectral norm is at most 1, so `γ < 1` makes the cell a
    contraction. Padded nodes get zero rows and columns. Dense `(N, N)`.

    ```python
    import jax.numpy as jnp, fpx
    from fpx.operators import graph_operator
    a_hat = graph_operator(jnp.array([0, 1]), jnp.array([1, 2]), 3, symmetrize=True)
    path = jnp.array([[0., 1., 0.], [1., 0., 1.], [0., 1., 0.]])
    assert jnp.allclose(a_hat, fpx.nn.normalized_adjacency(path))
    assert jnp.linalg.norm(a_hat, 2) <= 1 + 1e-6
    ```
    """
    check_positive_int("num_nodes", num_nodes)
    senders, receivers, live, node_mask = _edge_list(
        senders, receivers, num_nodes, edge_mask, node_mask, "graph_operator"
    )
    dt = default_dtype(dtype)
    adjacency = jnp.zeros((num_nodes, num_nodes), dt).at[receivers, senders].add(live.astype(dt), mode="drop")
    if symmetrize:
        adjacency = jnp.maximum(adjacency, adjacency.T)
    return normalized_adjacency(adjacency, node_mask.astype(dt))
