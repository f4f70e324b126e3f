"""Subhomogeneous DEQs (Sittoni & Tudisco, ICML 2024) against a contractive DEQ and explicit networks.

Two datasets, chosen by `data.name`:

- `digits`: sklearn's 8x8 digits (standardised, stratified split), one fixed point per image.
- `csbm`: one contextual stochastic block model graph (`fpx.data.csbm`), transductive node
  classification (the paper's GNN setting): a random `data.csbm.train_fraction` of the nodes is
  labelled, the rest is the test set; one fixed point over the whole graph (state `(N, width)`).

Models (`model.kind`), each followed by a linear head:

- `subdeq`, digits: `fpx.nn.SubDEQCell`, `z = N(tanh(W z) + relu(U x) + shift)` with `W`
  unconstrained; `N` divides by the largest entry when `model.normalize = "max"` (the
  reference implementation's "normalized tanh", shift 1.603), `"none"` is its plain shifted
  tanh (shift 1.2). `model.certify = κ > 0` projects every row of `W` onto the l1 ball that
  makes the certificate below at most `κ` for every input.
- `subdeq`, graph: the reference's predict-then-propagate layer, an encoder
  `H = W2 relu(W1 X + b1) + b2`, then `Z = N(tanh((1 - alpha) Â Z + alpha H) + shift)` (`Â` the
  symmetric-normalised adjacency with self loops, `N` per node).
- `contractive`: digits, `fpx.nn.ContractiveCell`, `z = tanh(W z + U x + b)` with
  `|W|_2 <= gamma` kept by projection (a MonDEQ-style Banach guarantee); graph, the same
  encoder and `Z = tanh((1 - alpha) Â Z + alpha H)`, a `(1 - alpha)`-contraction.
- `mlp`: two hidden ReLU layers on the features (no graph).
- `gnn`: a two-layer GCN, `relu(Â relu(Â X W1 + b1) W2 + b2)` (explicit, two hops).

The explicit networks' hidden width is chosen so that their parameter count is the nearest
to the SubDEQ model's (`eval/params` reports the count of every model; on the graph all models
have the same count). The check of the existence and uniqueness condition is
`subhomogeneity_certificate`; `evaluate` reports it on the trained weights (`kappa_max`,
`kappa_median` over the test inputs, `certified_fraction` with `κ < 1`) together with the
exact local factor at the computed fixed point (`kappa_local_max`), the forward steps of the
configured solver and of Picard to the same tolerance.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

from ... import nn as fpx_nn
from ...adjoint import backward_probe
from ...data import csbm, digits
from ...feasibility import project_l1_ball
from .._config import NON_NEGATIVE, POSITIVE, POSITIVE_INT, UNIT_OPEN, ConfigError, one_of
from .._registry import build, register_task, set_learning_rate
from .._task import Task, config_dtype

# ----------------------------------------------------------------- the subhomogeneity check


def activation_coefficient(shift: float, grid: int = 200_001) -> float:
    """`sup_t |t tanh'(t)| / (tanh(t) + shift)`: the subhomogeneity coefficient of the
    shifted activation `t -> tanh(t) + shift` (`shift > 1`), evaluated on a grid of `t`.

    This is the activation-level number behind the reference implementation's shifts:
    `1.2` gives 0.9991 (< 1, the unnormalised model) and `1.603` gives 0.4992 (< 1/2, the
    max-normalised one, whose normalisation doubles the coefficient; see
    `subhomogeneity_certificate`). For a layer `F(z) = tanh(W z) + c` with `c >= shift` it
    bounds the *radial* ratio `|F'(z) z|_i / F_i(z)` for every `W`, but it is not a
    certificate of uniqueness on its own (see `subhomogeneity_certificate`).

    ```python
    from fpx.experiment.tasks.subdeq import activation_coefficient
    assert abs(activation_coefficient(1.2) - 0.9991) < 1e-3 and abs(activation_coefficient(1.603) - 0.4992) < 1e-3
    ```
    """
    if not (isinstance(shift, (int, float)) and shift > 1):
        raise ValueError(f"activation_coefficient: `shift` must be a number > 1 (so tanh(t) + shift > 0), got {shift!r}.")
    t = np.linspace(-12.0, 12.0, grid)
    return float(np.max(np.abs(t) / np.cosh(t) ** 2 / (np.tanh(t) + shift)))


def _peak(c):
    """`argmax_t (1 - t^2) / (t + c)` over `t in (-1, 1)` for `c > 1`: `sqrt(c^2 - 1) - c`."""
    return -1.0 / (c + jnp.sqrt(c * c - 1.0))  # the same number, without cancellation for large c


def subhomogeneity_certificate(u_lo, u_hi, drive_hi, c, normalized: bool):
    r"""Upper bound on the Thompson-metric contraction factor of a SubDEQ map on its range.

    **Theorem** (the nonlinear Perron–Frobenius argument of Sittoni & Tudisco, ICML 2024,
    in the form checked here). Let `Ω = [l, h] ⊂ R^n_{>0}` be a box, `F: Ω → R^n_{>0}`
    differentiable, and call

        μ = sup_{z ∈ Ω} max_i (|F'(z)| z)_i / F_i(z)

    (`|F'|` the entrywise absolute Jacobian) the subhomogeneity degree of `F` on `Ω`. In log
    coordinates `G(w) = log F(e^w)` has `|G'(w)|_∞ = max_i (|F'(z)| z)_i / F_i(z) <= μ`, and the
    box is convex there, so `F` is `μ`-Lipschitz for the Thompson metric
    `δ(x, y) = |log x - log y|_∞`. If `F(Ω) ⊂ Ω` and `μ < 1`, `F` has exactly one fixed point
    in `Ω` and Picard iteration converges to it linearly, `δ(z_k, z*) <= μ^k δ(z_0, z*)`
    (Banach; `(Ω, δ)` is complete). The normalised map `Φ(z) = F(z) / max_i F_i(z)` is
    `2μ`-Lipschitz (in log coordinates normalisation is `w -> w - max(w) 1`, 2-Lipschitz in
    the ∞-norm), so for it the condition is `μ < 1/2`. If every fixed point of the map lies in
    `Ω` (true below: `Ω` contains the map's whole range), the fixed point is unique in
    `R^n_{>0}`.

    **The bound.** For the SubDEQ map `F(z) = tanh(A z + b) + c` (`A` linear, `c > 1` entrywise:
    `c = relu(U x) + shift` on digits, `b = alpha H` on the graph),
    `(|F'(z)| z)_i = sech^2(u_i) (|A| z)_i` with `u = A z + b`. Given, for
    `z ∈ Ω`, the range `u ∈ [u_lo, u_hi]` (interval arithmetic) and `drive_hi >= |A| z`,

        μ <= max_i drive_hi_i · max_{t ∈ [tanh u_lo_i, tanh u_hi_i]} (1 - t^2) / (t + c_i),

    where the inner maximum is attained at `t` clipped to the interval from the peak
    `sqrt(c^2 - 1) - c` of the unimodal `(1 - t^2) / (t + c)`.

    **Returns** the per-coordinate bound times 2 if `normalized`, else times 1: the
    contraction factor `κ` of the map actually iterated. `κ < 1` (its maximum over the
    coordinates) is the certificate of existence, uniqueness and linear convergence.

    The reference implementation's shifts are set by the activation's coefficient
    (`activation_coefficient`: below 1, and below 1/2 when normalised); that number bounds only
    the radial ratio `|F'(z) z| / F(z)`, for every `W`, and does not imply uniqueness for weights
    of mixed sign (`tests/test_subdeq.py` has a 2x2 `W` with three fixed points at coefficient
    0.499).

    ```python
    import jax.numpy as jnp
    from fpx.experiment.tasks.subdeq import subhomogeneity_certificate
    # F(z) = tanh(W z) + 1.2 on its range [0.2, 2.2]^2 with W = 0.1 * [[1, -1], [0, 1]]
    W, lo, hi, c = 0.1 * jnp.array([[1.0, -1.0], [0.0, 1.0]]), jnp.full(2, 0.2), jnp.full(2, 2.2), jnp.full(2, 1.2)
    pos, neg = jnp.maximum(W, 0), jnp.maximum(-W, 0)
    kappa = subhomogeneity_certificate(pos @ lo - neg @ hi, pos @ hi - neg @ lo, jnp.abs(W) @ hi, c, normalized=False)
    assert float(kappa.max()) < 1                     # a unique fixed point, Picard converges
    ```
    """
    if not isinstance(c, jax.core.Tracer) and np.any(np.asarray(c) <= 1):
        raise ValueError(
            "subhomogeneity_certificate: `c` must exceed 1 entrywise (c = relu(U x) + shift with shift > 1), "
            f"so that tanh(.) + c > 0; got min(c) = {float(np.min(np.asarray(c)))}. Raise the shift."
        )
    c = jnp.asarray(c)
    t_lo, t_hi = jnp.tanh(u_lo), jnp.tanh(u_hi)
    t = jnp.clip(_peak(c), t_lo, t_hi)
    factor = drive_hi * (1.0 - t * t) / (t + c)
    return (2.0 if normalized else 1.0) * factor


def _box(c, normalized: bool, axis=-1):
    """The box `[l, h]` holding the range of `z -> N(tanh(A z) + c)`: `tanh ∈ (-1, 1)`."""
    if normalized:
        return (c - 1.0) / jnp.max(c + 1.0, axis=axis, keepdims=True), jnp.ones_like(c)
    return c - 1.0, c + 1.0


def _local_factor(u, c, z, weight, normalized: bool, op=None):
    """The Thompson-metric Lipschitz constant of the iterated map at the fixed point `z`, exactly.

    In log coordinates the Jacobian of `z -> tanh(A z) + c` at `z` is
    `D = diag(a) A diag(z)` with `a = sech^2(u) / F(z)`, `u = A z`; max-normalisation
    multiplies it by `I - 1 e_m^T` (`m` the maximal entry; per node on the graph). The
    constant is the ∞-norm of the product: a lower bound on the subhomogeneity degree of any
    box containing `z` (so on `κ` of `subhomogeneity_certificate`). `op` is the graph's `Â`
    (non-negative), `None` for a dense `A = weight`.
    """
    f = jnp.tanh(u) + c
    a = (1.0 - jnp.tanh(u) ** 2) / f
    if op is None:  # rows i of D: a_i W_ij z_j
        rows = a[:, None] * weight
        if normalized:
            m = jnp.argmax(f)
            rows = rows - rows[m][None, :]
        return jnp.max(jnp.abs(rows) @ z)
    # graph: D_(n,k),(n',j) = a_nk Â_nn' W_jk z_n'j, so row (n,k) sums to sum_j (Â z)_nj |a_nk W_jk (- a_nm W_jm)|
    az = _propagate(op, z)  # (N, d), Â >= 0
    coef = a[:, None, :] * weight[None, :, :]  # (N, j, k)
    if normalized:
        m = jnp.argmax(f, axis=1)
        coef = coef - jnp.take_along_axis(coef, m[:, None, None], axis=2)
    return jnp.max(jnp.einsum("nj,njk->nk", az, jnp.abs(coef)))


def _thompson(x, y):
    """The Thompson metric `|log x - log y|_∞` of positive arrays."""
    return jnp.max(jnp.abs(jnp.log(x) - jnp.log(y)))


# --------------------------------------------------------------------------- the graph


def _graph_operator(graph, dtype):
    """`(senders, receivers, edge weight, self weight)` of `Â = D^{-1/2} (A + I) D^{-1/2}`."""
    n = graph.features.shape[0]
    degree = 1.0 + np.bincount(graph.receivers, minlength=n).astype(np.float64)
    inv_sqrt = 1.0 / np.sqrt(degree)
    weight = inv_sqrt[graph.senders] * inv_sqrt[graph.receivers]
    return (
        jnp.asarray(graph.senders), jnp.asarray(graph.receivers),
        jnp.asarray(weight, dtype), jnp.asarray(1.0 / degree, dtype),
    )


def _propagate(op, z):
    """`Â z` for node states `z` of shape `(N, d)` (sparse: one gather and one segment sum)."""
    # The barrier keeps XLA from constant-folding the scatter when `z` is a constant (the solver's start).
    senders, receivers, weight, self_weight = jax.lax.optimization_barrier(op)
    messages = weight[:, None] * z[senders]
    return jax.ops.segment_sum(messages, receivers, num_segments=z.shape[0]) + self_weight[:, None] * z


class _PropagationCell(eqx.Module):
    """The paper's graph layer (APPNP-style, predict then propagate), without parameters:
    `Z -> N(tanh((1 - alpha) Â Z + alpha H) + shift)` (SubDEQ; `N` the per-node max
    normalisation or none), or `Z -> tanh((1 - alpha) Â Z + alpha H)` with `shift = None` (a
    `(1 - alpha)`-contraction in the Frobenius norm: `|Â|_2 <= 1`, `tanh` 1-Lipschitz).
    The input is `(H, Â)`: the encoded node features and the propagation operator."""

    alpha: float = eqx.field(static=True)
    shift: float | None = eqx.field(static=True)
    normalize: bool = eqx.field(static=True)

    def preactivation(self, z, x):
        h, op = x
        return (1.0 - self.alpha) * _propagate(op, z) + self.alpha * h

    def __call__(self, z, x):
        v = jnp.tanh(self.preactivation(z, x))
        if self.shift is None:
            return v
        v = v + self.shift
        return v / jnp.max(v, axis=1, keepdims=True) if self.normalize else v

    def init_state(self, x):
        h, _ = x
        return (jnp.zeros_like if self.shift is None else jnp.ones_like)(h)


# --------------------------------------------------------------------------- the models


class _Model(eqx.Module):
    cell: eqx.Module | None
    hidden: tuple[eqx.nn.Linear, eqx.nn.Linear] | None  # the explicit layers, or the graph encoder
    head: eqx.nn.Linear


def _count(model) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array)))


def _explicit_width(inputs: int, classes: int, target: int) -> int:
    """Hidden width `h` of `inputs -> h -> h -> classes` (with biases) whose parameter count is nearest `target`."""
    count = lambda h: (inputs + 1) * h + (h + 1) * h + (h + 1) * classes  # noqa: E731
    return min(range(1, 4 * int(math.sqrt(target)) + 2), key=lambda h: (abs(count(h) - target), h))


class SubDEQTask(Task):
    dynamic = ("seed", "optim.lr")
    constraints = {
        "optim.lr": POSITIVE,
        "optim.weight_decay": NON_NEGATIVE,
        "data.name": one_of("digits", "csbm"),
        "data.digits.test_fraction": UNIT_OPEN,
        "data.digits.batch_size": POSITIVE_INT,
        "data.csbm.nodes": POSITIVE_INT,
        "data.csbm.classes": POSITIVE_INT,
        "data.csbm.features": POSITIVE_INT,
        "data.csbm.avg_degree": POSITIVE,
        "data.csbm.homophily": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
        "data.csbm.signal": NON_NEGATIVE,
        "data.csbm.train_fraction": UNIT_OPEN,
        "model.kind": one_of("subdeq", "contractive", "mlp", "gnn"),
        "model.width": POSITIVE_INT,
        "model.shift": (lambda v: v > 1, "a number > 1 (so that tanh(.) + shift > 0)"),
        "model.normalize": one_of("max", "none"),
        "model.weight_scale": NON_NEGATIVE,
        "model.gamma": UNIT_OPEN,
        "model.alpha": UNIT_OPEN,
        "model.certify": (lambda v: 0 <= v < 1, "a number in [0, 1) (0: off)"),
        "max_steps": POSITIVE_INT,
        "dtype": one_of("float32", "float64"),
    }

    def __init__(self, config):
        self.config = config
        self.dtype = config_dtype(config.dtype)
        self.kind = config.model.kind
        self.graph = config.data.name == "csbm"
        if self.graph:
            d = config.data.csbm
            if d.classes < 2 or d.features < d.classes:
                raise ConfigError(
                    f"'data.csbm.classes' ({d.classes}) must be >= 2 and 'data.csbm.features' ({d.features}) >= classes."
                )
            g = csbm(d.nodes, seed=d.seed, classes=d.classes, features=d.features, avg_degree=d.avg_degree,
                     homophily=d.homophily, signal=d.signal)
            self.features = jnp.asarray(g.features, self.dtype)
            self.labels = jnp.asarray(g.labels)
            order = np.random.default_rng(d.split_seed).permutation(d.nodes)
            n_train = min(d.nodes - 1, max(d.classes, int(round(d.train_fraction * d.nodes))))
            self.train_nodes, self.test_nodes = jnp.asarray(np.sort(order[:n_train])), jnp.asarray(np.sort(order[n_train:]))
            self.op = _graph_operator(g, self.dtype)
            self.inputs, self.classes = d.features, d.classes
        else:
            if self.kind == "gnn":
                raise ConfigError("'model.kind' = 'gnn' needs a graph: set 'data.name' = 'csbm' (or use 'mlp' on digits).")
            d = config.data.digits
            x_train, y_train, x_test, y_test = digits(seed=d.split_seed, test_size=d.test_fraction)
            self.x_train, self.y_train = jnp.asarray(x_train, self.dtype), jnp.asarray(y_train)
            self.x_test, self.y_test = jnp.asarray(x_test, self.dtype), jnp.asarray(y_test)
            if d.batch_size > self.x_train.shape[0]:
                raise ConfigError(
                    f"'data.digits.batch_size' ({d.batch_size}) exceeds the {self.x_train.shape[0]} training examples; "
                    "batches are drawn without replacement."
                )
            self.inputs, self.classes = self.x_train.shape[1], 10
        self.solver = build("solver", config.solver.to_dict())
        self.picard = build("solver", {"name": "picard", "rtol": config.solver.rtol, "atol": config.solver.atol})
        self.adjoint = build("adjoint", config.adjoint.to_dict())
        self.optimizer = build("optim", config.optim.to_dict())
        self.normalized = config.model.normalize == "max"
        self.certify = float(config.model.certify) if self.kind == "subdeq" else 0.0
        if self.certify and (self.graph or not self.normalized):
            raise ConfigError(
                "'model.certify' needs 'data.name' = 'digits' and 'model.normalize' = 'max': the graph layer has no "
                "weight to constrain, and the unnormalised map's range box grows with relu(U x), so no weight "
                "constraint certifies it for every input. Set 'model.certify' = 0.0."
            )
        self.radius = self._certified_radius() if self.certify else None

    def _certified_radius(self) -> float:
        """The l1 radius `r` of the rows of `W` that certifies `κ <= model.certify` for every
        input: with max-normalisation the range box is `[l, 1]`, so the drive is
        `|W| 1 <= r`, and the peak of `(1 - t^2) / (t + c)` is `2 (c - sqrt(c^2 - 1)) <=
        2 (s - sqrt(s^2 - 1))` for `c >= s = shift`; so `κ <= 2 r 2 (s - sqrt(s^2 - 1))`."""
        s = float(self.config.model.shift)
        return self.certify / (4.0 * (s - math.sqrt(s * s - 1.0)))

    def _constrain(self, model):
        """Project the SubDEQ weight's rows onto the l1 ball of the certified radius (if `model.certify`)."""
        if not self.certify:
            return model
        w = jax.vmap(lambda row: project_l1_ball(row, self.radius))(model.cell.weight)
        return eqx.tree_at(lambda m: m.cell.weight, model, w)

    # ------------------------------------------------------------------ model
    def _model(self, key):
        m = self.config.model
        k1, k2, k3 = jr.split(key, 3)
        implicit = self.kind in ("subdeq", "contractive")
        if implicit and not self.graph:
            if self.kind == "subdeq":
                cell = fpx_nn.SubDEQCell(k1, state_size=m.width, input_size=self.inputs, weight_scale=m.weight_scale,
                                         shift=m.shift, normalize="max" if self.normalized else None, dtype=self.dtype)
            else:
                cell = fpx_nn.ContractiveCell(k1, state_size=m.width, input_size=self.inputs, gamma=m.gamma, dtype=self.dtype)
            return _Model(cell, None, eqx.nn.Linear(m.width, self.classes, key=k3, dtype=self.dtype))
        # two dense layers: the explicit networks' hidden layers, or the graph encoder features -> width -> width
        width = m.width if implicit else _explicit_width(self.inputs, self.classes, self.reference_params())
        hidden = (
            eqx.nn.Linear(self.inputs, width, key=k1, dtype=self.dtype),
            eqx.nn.Linear(width, width, key=k2, dtype=self.dtype),
        )
        cell = None
        if self.kind == "subdeq":
            cell = _PropagationCell(alpha=m.alpha, shift=m.shift, normalize=self.normalized)
        elif self.kind == "contractive":
            cell = _PropagationCell(alpha=m.alpha, shift=None, normalize=False)
        return _Model(cell, hidden, eqx.nn.Linear(width, self.classes, key=k3, dtype=self.dtype))

    def reference_params(self) -> int:
        """The parameter count of the SubDEQ model at this width (what the explicit models match)."""
        d = self.config.model.width
        if self.graph:  # the encoder and the head; the propagation has no parameters
            return (self.inputs + 1) * d + (d + 1) * d + (d + 1) * self.classes
        return d * d + self.inputs * d + (d + 1) * self.classes

    def _forward(self, model, x, probe=None, solver=None):
        """Logits and solver stats for one digit `x`, or for the whole graph (`x` the node features)."""
        first, second = model.hidden if model.hidden is not None else (None, None)
        if self.graph:
            if model.cell is None:
                if self.kind == "gnn":
                    h = jax.nn.relu(_propagate(self.op, jax.vmap(first)(x)))
                    h = jax.nn.relu(_propagate(self.op, jax.vmap(second)(h)))
                else:
                    h = jax.nn.relu(jax.vmap(second)(jax.nn.relu(jax.vmap(first)(x))))
                return jax.vmap(model.head)(h), {}
            encoded = jax.vmap(second)(jax.nn.relu(jax.vmap(first)(x)))
            deq = fpx_nn.DEQ(model.cell, solver=solver or self.solver, adjoint=self.adjoint, max_steps=self.config.max_steps)
            z, stats = deq((encoded, self.op), backward_probe=probe)
            return jax.vmap(model.head)(z), {**stats, "z": z, "encoded": encoded}
        if model.cell is None:
            return model.head(jax.nn.relu(second(jax.nn.relu(first(x))))), {}
        deq = fpx_nn.DEQ(model.cell, solver=solver or self.solver, adjoint=self.adjoint, max_steps=self.config.max_steps)
        z, stats = deq(x, backward_probe=probe)
        return model.head(z), {**stats, "z": z}

    # ------------------------------------------------------------ certificate
    def _certificate(self, cell, x, z):
        """`(κ bound over the range box, κ at the fixed point z)` for one digit, or for the graph (`x` = H)."""
        if self.graph:
            a = 1.0 - cell.alpha
            c = jnp.full_like(z, cell.shift)
            lo, hi = _box(c, self.normalized, axis=1)
            u_lo = a * _propagate(self.op, lo) + cell.alpha * x  # Â >= 0: monotone in z
            u_hi = a * _propagate(self.op, hi) + cell.alpha * x
            drive = a * _propagate(self.op, hi)
            u_star, weight, op = cell.preactivation(z, (x, self.op)), a * jnp.eye(z.shape[1], dtype=z.dtype), self.op
        else:
            c = jax.nn.relu(cell.input_weight @ x) + cell.shift
            lo, hi = _box(c, self.normalized)
            pos, neg = jnp.maximum(cell.weight, 0), jnp.maximum(-cell.weight, 0)
            u_lo, u_hi = pos @ lo - neg @ hi, pos @ hi - neg @ lo
            drive = jnp.abs(cell.weight) @ hi
            u_star, weight, op = cell.weight @ z, cell.weight, None
        bound = jnp.max(subhomogeneity_certificate(u_lo, u_hi, drive, c, self.normalized))
        local = _local_factor(u_star, c, z, weight, self.normalized, op)
        return bound, local

    # ------------------------------------------------------------------- task
    def init(self, hp, key):
        model = self._constrain(self._model(key))
        params = eqx.filter(model, eqx.is_inexact_array)
        opt_state = set_learning_rate(self.optimizer.init(params), hp["optim.lr"])
        return {"model": model, "opt_state": opt_state}

    def _logits(self, model, x, probe=None, solver=None):
        if self.graph:
            return self._forward(model, x, probe, solver)
        return jax.vmap(lambda x: self._forward(model, x, probe, solver))(x)

    def train_step(self, state, hp, key):
        model = state["model"]
        if self.graph:
            x, y = self.features, self.labels[self.train_nodes]
        else:
            batch = jr.choice(key, self.x_train.shape[0], (self.config.data.digits.batch_size,), replace=False)
            x, y = self.x_train[batch], self.y_train[batch]
        dynamic, static = eqx.partition(model, eqx.is_inexact_array)

        def loss_fn(dynamic, probe):
            logits, stats = self._logits(eqx.combine(dynamic, static), x, probe)
            if self.graph:
                logits = logits[self.train_nodes]
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), stats

        probe = backward_probe(self.dtype)
        (loss, stats), (grads, probe_bar) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(dynamic, probe)
        opt_state = set_learning_rate(state["opt_state"], hp["optim.lr"])
        updates, opt_state = self.optimizer.update(grads, opt_state, dynamic)
        model = self._constrain(fpx_nn.project(eqx.apply_updates(model, updates)))
        metrics = {"loss": loss}
        if model.cell is not None:
            n = 1 if self.graph else x.shape[0]
            metrics.update(
                forward_steps=jnp.mean(stats["num_steps"].astype(self.dtype)),
                backward_steps=probe_bar[0] / n,
                converged_fraction=jnp.mean(stats["converged"].astype(self.dtype)),
                backward_failed_fraction=probe_bar[2] / n,
            )
        return {"model": model, "opt_state": opt_state}, metrics

    def evaluate(self, state, hp):
        model = state["model"]
        x, y = (self.features, self.labels[self.test_nodes]) if self.graph else (self.x_test, self.y_test)
        logits, stats = self._logits(model, x)
        if self.graph:
            logits = logits[self.test_nodes]
        metrics = {
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == y),
            "loss": optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(),
            "params": jnp.asarray(_count(model), self.dtype),
        }
        if model.cell is None:
            return metrics
        # Picard to the same tolerance: its step count tracks the map's contraction rate.
        picard = stats if self.config.solver.name == "picard" else self._logits(model, x, solver=self.picard)[1]
        metrics.update(
            forward_steps=jnp.mean(stats["num_steps"].astype(self.dtype)),
            converged_fraction=jnp.mean(stats["converged"].astype(self.dtype)),
            picard_steps=jnp.mean(picard["num_steps"].astype(self.dtype)),
            picard_converged_fraction=jnp.mean(picard["converged"].astype(self.dtype)),
        )
        if self.kind == "contractive":
            # Banach in the 2-norm (Frobenius on the graph): |W|_2 <= gamma by projection; 1 - alpha on the graph.
            kappa = jnp.asarray(1.0 - model.cell.alpha, self.dtype) if self.graph else jnp.linalg.norm(model.cell.weight, 2)
            metrics.update(kappa_max=kappa, kappa_median=kappa, kappa_local_max=kappa,
                           certified_fraction=(kappa < 1).astype(self.dtype))
            return metrics
        if self.graph:
            bound, local = self._certificate(model.cell, stats["encoded"], stats["z"])
            bound, local = bound[None], local[None]
        else:
            bound, local = jax.vmap(lambda x, z: self._certificate(model.cell, x, z))(x, stats["z"])
        metrics.update(
            kappa_max=jnp.max(bound), kappa_median=jnp.median(bound), kappa_local_max=jnp.max(local),
            certified_fraction=jnp.mean((bound < 1).astype(self.dtype)),
        )
        return metrics


@register_task("subdeq")
def build_subdeq(config):
    return SubDEQTask(config)


build_subdeq.dynamic = SubDEQTask.dynamic
build_subdeq.constraints = SubDEQTask.constraints
build_subdeq.headline = ("eval/accuracy", "eval/forward_steps", "eval/kappa_max")
