"""Contextual stochastic block model graphs for node classification."""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np
from jaxtyping import Float, Int

from . import _checks
from ._cache import cached


class Graph(NamedTuple):
    """An undirected graph as a symmetric edge list, with node features and labels.

    - `senders`, `receivers`: `(2 E,)` int32; every undirected edge `{i, j}` appears as
      `(i, j)` and `(j, i)`, no self-loops, no duplicates, sorted by `(sender, receiver)`.
    - `features`: `(N, F)` float32 node features.
    - `labels`: `(N,)` int32 classes in `0 .. classes-1`.

    ```python
    import numpy as np, fpx
    g = fpx.data.csbm(100, seed=0, classes=2, features=8, cache=False)
    assert isinstance(g, fpx.data.Graph) and g.features.shape == (100, 8) and g.labels.shape == (100,)
    assert len(g.senders) == len(g.receivers) and np.all(g.senders != g.receivers)   # no self-loops
    ```
    """

    senders: Int[np.ndarray, " e"]
    receivers: Int[np.ndarray, " e"]
    features: Float[np.ndarray, "N F"]
    labels: Int[np.ndarray, " N"]


def _triangle(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pair `(i, j)`, `i < j`, with index `k = j (j - 1) / 2 + i` (row-by-row enumeration of a triangle)."""
    j = np.floor((1 + np.sqrt(1 + 8 * k.astype(np.float64))) / 2).astype(np.int64)
    j = np.where(j * (j - 1) // 2 > k, j - 1, j)  # correct float rounding either way
    j = np.where((j + 1) * j // 2 <= k, j + 1, j)
    return k - j * (j - 1) // 2, j


def csbm(
    n_nodes: int,
    seed: int = 0,
    *,
    classes: int = 2,
    features: int = 16,
    avg_degree: float = 5.0,
    homophily: float = 0.8,
    signal: float = 1.0,
    cache: bool = True,
) -> Graph:
    r"""A contextual stochastic block model (CSBM) graph for node classification.

    Labels are balanced (`n_nodes / classes` nodes per class, up to one, in random order).
    Edges are drawn independently per node pair (a stochastic block model): with
    probability `p_in` inside a class and `p_out` across classes, chosen so that the
    expected degree is `avg_degree` and the expected fraction of edges joining nodes of the
    same class (the edge homophily) is `homophily`:
    `p_in = avg_degree homophily classes / n_nodes`,
    `p_out = avg_degree (1 - homophily) classes / ((classes - 1) n_nodes)`
    (exact up to `O(1/n_nodes)` from excluding self-pairs). Features are Gaussian,
    `x_i = mu_{y_i} + N(0, I)`, with class means `mu_c = signal q_c` for random orthonormal
    `q_c`: `signal` is the norm of each mean in units of the noise standard deviation
    (the means are `signal sqrt(2)` apart); `features >= classes`.

    (Deshpande et al. 2018, "Contextual stochastic block models", with `classes` blocks.)

    **Returns:** a `Graph` named tuple `(senders, receivers, features, labels)`; see its
    docstring for the layout.

    ```python
    import numpy as np
    import fpx.data

    g = fpx.data.csbm(200, avg_degree=6.0, homophily=0.9, cache=False)
    assert g.features.shape == (200, 16) and g.labels.shape == (200,)
    same = g.labels[g.senders] == g.labels[g.receivers]
    assert 0.8 < same.mean() <= 1.0 and 4.0 < len(g.senders) / 200 < 8.0
    ```
    """
    fn = "csbm"
    n_nodes = _checks.positive_int(fn, "n_nodes", n_nodes)
    seed = _checks.seed(fn, seed)
    classes = _checks.positive_int(fn, "classes", classes)
    if classes < 2:
        raise ValueError(f"fpx.data.csbm: `classes` must be >= 2, got {classes!r}.")
    if n_nodes < classes:
        raise ValueError(f"fpx.data.csbm: `n_nodes` must be >= `classes` = {classes}, got {n_nodes!r}.")
    features = _checks.positive_int(fn, "features", features)
    if features < classes:
        raise ValueError(
            f"fpx.data.csbm: `features` must be >= `classes` = {classes} (orthogonal class means), got {features!r}."
        )
    if isinstance(avg_degree, bool) or not isinstance(avg_degree, numbers.Real) or not 0 <= avg_degree < float("inf"):
        raise ValueError(f"fpx.data.csbm: `avg_degree` must be a finite number >= 0, got {avg_degree!r}.")
    avg_degree = float(avg_degree)
    if isinstance(homophily, bool) or not isinstance(homophily, numbers.Real) or not 0 <= homophily <= 1:
        raise ValueError(f"fpx.data.csbm: `homophily` must lie in [0, 1], got {homophily!r}.")
    homophily = float(homophily)
    if isinstance(signal, bool) or not isinstance(signal, numbers.Real) or not 0 <= signal < float("inf"):
        raise ValueError(f"fpx.data.csbm: `signal` must be a finite number >= 0, got {signal!r}.")
    signal = float(signal)
    p_in = avg_degree * homophily * classes / n_nodes
    p_out = avg_degree * (1 - homophily) * classes / ((classes - 1) * n_nodes)
    if max(p_in, p_out) > 1:
        raise ValueError(
            f"fpx.data.csbm: `avg_degree` = {avg_degree} with `homophily` = {homophily} needs edge probabilities "
            f"p_in = {p_in:.3g}, p_out = {p_out:.3g} > 1 for {n_nodes} nodes in {classes} classes; "
            "lower `avg_degree` or use more nodes."
        )
    args = dict(
        n_nodes=n_nodes, seed=seed, classes=classes, features=features, avg_degree=avg_degree,
        homophily=homophily, signal=signal,
    )

    def generate():
        rng = np.random.default_rng(seed)
        labels = rng.permutation(np.arange(n_nodes) % classes)
        members = [np.flatnonzero(labels == c) for c in range(classes)]
        senders, receivers = [], []
        for c in range(classes):
            for d in range(c, classes):
                nc, nd = len(members[c]), len(members[d])
                pairs = nc * (nc - 1) // 2 if c == d else nc * nd
                count = rng.binomial(pairs, p_in if c == d else p_out)
                k = rng.choice(pairs, size=count, replace=False)
                i, j = _triangle(k) if c == d else divmod(k, nd)
                senders.append(members[c][i])
                receivers.append(members[d][j])
        i, j = np.concatenate(senders), np.concatenate(receivers)
        snd, rcv = np.concatenate([i, j]), np.concatenate([j, i])
        order = np.lexsort((rcv, snd))
        q, _ = np.linalg.qr(rng.standard_normal((features, classes)))
        x = signal * q.T[labels] + rng.standard_normal((n_nodes, features))
        return dict(
            senders=snd[order].astype(np.int32), receivers=rcv[order].astype(np.int32),
            features=x.astype(np.float32), labels=labels.astype(np.int32),
        )

    return Graph(**cached(fn, args, generate, cache))
