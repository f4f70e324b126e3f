"""Graph value iteration with a convergent graph solver (CGS; Park, Choo & Park, ICLR 2022).

Each input is a random finite MDP (`nS` states, `nA` actions, rewards `r(s, a) ~ U[-1, 1]`,
discount 0.9); the target is its optimal value `V*` from exact value iteration. The graph's
nodes are the states; state `s` has an edge to `s'` where some action moves there.

Model (`_CGS`), one graph at a time (vmapped over the batch):

1. Encoder (the paper's parameter-generating network `f_θ`): `model.layers` rounds of
   message passing on the state-action graph. An action embedding `α(s, a)` starts from
   the reward; each round adds an MLP of `[α(s, a), Σ_s' P(s'|s, a) u(s')]` (the expected
   embedding of the next state) to it, then an MLP of `[u(s), mean_a α(s, a), max_a α(s, a)]`
   to the state embedding `u(s)`.
2. Input-dependent transition, one per head `h` (`model.heads`): a soft policy
   `π_h(a|s) = softmax_a(w_h · α(s, a))` over the real actions gives the edge weights
   `W_h(s, s') = Σ_a π_h(a|s) P(s'|s, a) >= 0`, degree-normalised as
   `Â_h = D_out^{-1/2} W_h D_in^{-1/2}` (out- and in-degrees: the row and column sums of
   `W_h`), whose spectral norm is at most 1 for every non-negative `W_h` (Cauchy–Schwarz:
   `|xᵀ Â y| <= sqrt(Σ W_st x_s² / d_s) sqrt(Σ W_st y_t² / c_t) = |x| |y|`). The bias is
   `b_h(s) = Σ_a π_h(a|s) β_h(α(s, a))`.
3. Fixed point `H* = γ Â H* + b` (`model.gamma`, 0.5 as in the reference code), solved by
   Picard iteration through `fpx.nn.DEQ` with the implicit adjoint. `T` is a
   `γ`-contraction in the Frobenius norm, and so is its adjoint `u -> γ Âᵀ u`.
4. Decoder: a node-wise MLP `g_θ(H*(s))` gives the (standardised) value of each state.

**Step bound.** The solve runs on the right-hand side scaled to unit norm,
`z = γ Â z + b/|b|` (then `H* = |b| z*`), from `z0 = b/|b|`: after `k` Picard steps the
residual is `|(γÂ)^(k+1) b/|b|| <= γ^(k+1)`, so the stopping test `|T(z) - z| <= atol`
(`solver.atol`, the `tol` of the bound; `rtol >= 0` only stops earlier) holds after at most
`⌈log(tol)/log γ⌉ - 1` steps, i.e. `⌈log(tol)/log γ⌉` Picard steps counted from 0
(tol = 1e-6, γ = 0.5: 20). fpx's adjoint solves `u = (γÂ)ᵀ u + ḡ/|ḡ|` the same way (from
`u0 = ḡ/|ḡ|`, the same solver and tolerances), so the same bound holds for every backward
solve. `eval/step_bound` is the bound, the `*_steps_max` metrics the measured maxima
(forward solves from `DEQ`'s stats, backward solves from one `fpx.backward_probe` per
graph), `*_over_bound` the number of solves that exceeded it or failed.

**Policy.** The policy of a prediction is greedy in the Bellman Q computed from the
predicted values, `argmax_a r(s, a) + γ_MDP Σ_s' P(s'|s, a) V̂(s')` (as the reference's
`get_policy`), compared with the optimal policy of `V*`. `*_greedy_policy_accuracy` is the
same for `V̂ = 0` (the reward-greedy policy), the baseline a prediction must beat;
`*_mean_oracle_mape` is the MAPE of predicting each graph's mean optimal value at every state
(an oracle: it needs `V*`), the level a value prediction must beat to carry per-state information.

**Data** (`data.graph`): `dense` is `fpx.data.value_iteration_mdps` (dense random
transition probabilities); `sparse` is the reference code's graph (each action moves
deterministically to a random other state, drawn with replacement), built here with the same
layout. Training graphs have `nS` in `[data.states_min, data.states_max)`; the test sets are
held-out graphs of the training sizes (`test_*`) and graphs of exactly `nS` states for each
`nS` in `data.test_states` (`ns{nS}_*`), all with `nA` in `[data.actions_min, data.actions_max)`.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from ... import nn as fpx_nn
from ...data import MDPs, bellman, value_iteration_mdps
from .._config import NON_NEGATIVE, POSITIVE, POSITIVE_INT, UNIT_OPEN, ConfigError, one_of
from .._registry import build, register_task, set_learning_rate
from .._task import Task, config_dtype

_TEST_SEED = 10_000  # test graphs use seeds _TEST_SEED + i, far from any training seed


def step_bound(tol: float, gamma: float) -> int:
    """`⌈log(tol) / log γ⌉`: Picard steps (counted from 0) that bring a `γ`-contraction's
    residual to `tol` times its initial residual.

    ```python
    from fpx.experiment.tasks.cgs_value_iteration import step_bound
    assert step_bound(1e-6, 0.5) == 20 and step_bound(1e-3, 0.9) == 66
    ```
    """
    if not (0 < tol < 1) or not (0 < gamma < 1):
        raise ValueError(f"step_bound: `tol` ({tol!r}) and `gamma` ({gamma!r}) must both lie in (0, 1).")
    return math.ceil(math.log(tol) / math.log(gamma) - 1e-12)


# --------------------------------------------------------------------------- data


def _sparse_mdps(n: int, seed: int, states: tuple[int, int], actions: tuple[int, int], gamma: float, tol: float = 1e-10) -> MDPs:
    """The reference code's GVI graphs in the layout of `fpx.data.value_iteration_mdps`.

    Each of the `nS` states has `nA` actions; action `a` of state `s` moves to a state drawn
    uniformly (with replacement) from the other `nS - 1` states, with reward `U[-1, 1]`.
    Values by value iteration to `|V - V*|_inf <= tol`.
    """
    s_lo, s_hi = states
    a_lo, a_hi = actions
    if a_hi - 1 >= s_lo - 1:
        raise ConfigError(
            f"sparse graphs (the reference generator) need nA < nS - 1 for every graph: 'data.actions_max' ({a_hi}) "
            f"must be at most 'data.states_min' - 1 ({s_lo - 1}) (fewer actions than states)."
        )
    rng = np.random.default_rng(seed)
    S, A = s_hi - 1, a_hi - 1
    dest = np.zeros((n, S, A), np.int64)
    R = np.zeros((n, S, A))
    ns = np.empty(n, np.int64)
    na = np.empty(n, np.int64)
    for b in range(n):
        ns[b] = k = rng.integers(s_lo, s_hi)
        na[b] = m = rng.integers(a_lo, a_hi)
        R[b, :k, :m] = rng.uniform(-1.0, 1.0, (k, m))
        for s in range(k):
            others = np.delete(np.arange(k), s)
            dest[b, s, :m] = rng.choice(others, m)
    smask = np.arange(S)[None, :] < ns[:, None]
    amask = np.arange(A)[None, :] < na[:, None]
    mask = smask[:, :, None] & amask[:, None, :]
    v = np.zeros((n, S))
    rows = np.arange(n)[:, None, None]
    while True:
        q = np.where(amask[:, None, :], R + gamma * v[rows, dest], -np.inf)
        new = np.where(smask, q.max(axis=2), 0.0)
        residual = np.abs(new - v).max()
        v = new
        if residual <= tol * (1 - gamma):
            break
    P = np.zeros((n, S, A, S))
    b_idx, s_idx, a_idx = np.nonzero(mask)
    P[b_idx, s_idx, a_idx, dest[b_idx, s_idx, a_idx]] = 1.0
    _, q = bellman(P, R, amask, smask, v, gamma)
    policy = np.where(smask, q.argmax(axis=2), 0)
    return MDPs(P, R, smask, amask, v, policy, ns, na, gamma)


def _mdps(graph: str, n: int, seed: int, states, actions, gamma: float) -> MDPs:
    if graph == "dense":
        return value_iteration_mdps(n, seed=seed, states=tuple(states), actions=tuple(actions), gamma=gamma)
    return _sparse_mdps(n, seed, tuple(states), tuple(actions), gamma)


def _mean_oracle_mape_np(mdps: MDPs) -> float:
    """MAPE (%) of the oracle that predicts, for every state, the mean of `V*` over its graph's states."""
    sm = mdps.state_mask
    mean = (mdps.values * sm).sum(1, keepdims=True) / sm.sum(1, keepdims=True)
    err = np.abs(mean - mdps.values) / np.where(sm, np.abs(mdps.values), 1.0)
    return float(100 * np.mean((err * sm).sum(1) / sm.sum(1)))


def _policy_accuracy_np(mdps: MDPs, values) -> float:
    """Mean over graphs of the fraction of states whose greedy action under `values` is optimal."""
    _, q = bellman(mdps.transitions, mdps.rewards, mdps.action_mask, mdps.state_mask, values, mdps.gamma)
    correct = (q.argmax(axis=2) == mdps.policy) & mdps.state_mask
    return float(np.mean(correct.sum(1) / mdps.state_mask.sum(1)))


class _Split(eqx.Module):
    """One set of padded graphs as arrays of the task's dtype."""

    transitions: jax.Array  # (n, S, A, S)
    rewards: jax.Array  # (n, S, A)
    state_mask: jax.Array  # (n, S) float
    action_mask: jax.Array  # (n, A) float
    values: jax.Array  # (n, S)
    policy: jax.Array  # (n, S) int

    @staticmethod
    def of(mdps: MDPs, dtype) -> "_Split":
        return _Split(
            jnp.asarray(mdps.transitions, dtype),
            jnp.asarray(mdps.rewards, dtype),
            jnp.asarray(mdps.state_mask, dtype),
            jnp.asarray(mdps.action_mask, dtype),
            jnp.asarray(mdps.values, dtype),
            jnp.asarray(mdps.policy, jnp.int32),
        )

    def take(self, index) -> "_Split":
        return jax.tree_util.tree_map(lambda x: x[index], self)

    @property
    def num_states(self) -> int:
        return self.values.shape[1]

    def pad(self, num_states: int) -> "_Split":
        """The same graphs padded with disconnected, masked states to `num_states`."""
        extra = num_states - self.num_states
        if extra == 0:
            return self

        def pad(x, axes):
            widths = [(0, extra if i in axes else 0) for i in range(x.ndim)]
            return jnp.pad(x, widths)

        return _Split(pad(self.transitions, (1, 3)), pad(self.rewards, (1,)), pad(self.state_mask, (1,)),
                      self.action_mask, pad(self.values, (1,)), pad(self.policy, (1,)))

    @staticmethod
    def concatenate(splits: list["_Split"]) -> "_Split":
        size = max(s.num_states for s in splits)
        padded = [s.pad(size) for s in splits]
        return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *padded)


def _eval_groups(sizes: dict[str, int], slack: float = 1.25) -> list[list[str]]:
    """Test sets grouped for one solve each: sizes within `slack` of the group's smallest
    share one padded size (fewer compiled copies of the model, little padding)."""
    groups: list[list[str]] = []
    for name in sorted(sizes, key=lambda n: sizes[n]):
        if groups and sizes[name] <= slack * sizes[groups[-1][0]]:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


# -------------------------------------------------------------------------- model


class _Dense(eqx.Module):
    weight: jax.Array
    bias: jax.Array

    def __call__(self, x):
        return x @ self.weight + jnp.reshape(self.bias, (1,) * (x.ndim - 1) + (-1,))


class _MLP(eqx.Module):
    """`x -> W2 leaky_relu(W1 x)`, on the last axis."""

    first: _Dense
    second: _Dense

    def __call__(self, x):
        return self.second(jax.nn.leaky_relu(self.first(x)))


class _Init:
    """Layers with `N(0, 1/fan_in)` weights and zero biases, all drawn from one normal vector
    (one random-number kernel for the whole model, not one per layer: it compiles faster)."""

    def __init__(self, key, shapes: list[tuple[int, int]], dtype):
        total = sum(a * b for a, b in shapes)
        self.flat = jr.normal(key, (total,), dtype)
        self.offset = 0
        self.dtype = dtype

    def dense(self, n_in: int, n_out: int) -> _Dense:
        w = self.flat[self.offset : self.offset + n_in * n_out].reshape(n_in, n_out) / math.sqrt(n_in)
        self.offset += n_in * n_out
        return _Dense(w, jnp.zeros((n_out,), self.dtype))

    def mlp(self, n_in: int, hidden: int, n_out: int) -> _MLP:
        return _MLP(self.dense(n_in, hidden), self.dense(hidden, n_out))


class _Transition(eqx.Module):
    """The CGS map `T(H) = γ [Â_h H_{:, h}]_h + b` for the graph `(Â, b)`, `Â`: (heads, S, S), `H, b`: (S, heads)."""

    gamma: float = eqx.field(static=True)

    def __call__(self, h, graph):
        a_hat, b = graph
        return self.gamma * jnp.einsum("hst,th->sh", a_hat, h) + b


def degree_normalised(weights):
    """`D_out^{-1/2} W D_in^{-1/2}` for non-negative `W` of shape `(..., S, S)`; spectral norm <= 1.

    Out- and in-degrees are the row and column sums of `W`; a node with none gets a zero
    row (column).

    ```python
    import jax.numpy as jnp, jax.random as jr
    from fpx.experiment.tasks.cgs_value_iteration import degree_normalised
    w = jr.uniform(jr.PRNGKey(0), (6, 6)) * (jr.uniform(jr.PRNGKey(1), (6, 6)) < 0.4)
    assert jnp.linalg.norm(degree_normalised(w), 2) <= 1 + 1e-6
    ```
    """
    def inv_sqrt(d):
        return jnp.where(d > 0, 1.0 / jnp.sqrt(jnp.where(d > 0, d, 1.0)), 0.0)

    out_degree = inv_sqrt(jnp.sum(weights, axis=-1))
    in_degree = inv_sqrt(jnp.sum(weights, axis=-2))
    return weights * out_degree[..., :, None] * in_degree[..., None, :]


class _CGS(eqx.Module):
    action_in: _Dense
    action_updates: tuple
    state_updates: tuple
    policy: _Dense
    bias: _Dense
    decoder: _MLP
    gamma: float = eqx.field(static=True)

    def __init__(self, key, *, hidden: int, heads: int, layers: int, decoder_hidden: int, gamma: float, dtype):
        shapes = [(1, hidden)]
        shapes += [(2 * hidden, hidden), (hidden, hidden)] * layers
        shapes += [(3 * hidden, hidden), (hidden, hidden)] * layers
        shapes += [(hidden, heads), (hidden, heads), (heads, decoder_hidden), (decoder_hidden, 1)]
        init = _Init(key, shapes, dtype)
        self.action_in = init.dense(1, hidden)
        self.action_updates = tuple(init.mlp(2 * hidden, hidden, hidden) for _ in range(layers))
        self.state_updates = tuple(init.mlp(3 * hidden, hidden, hidden) for _ in range(layers))
        self.policy = init.dense(hidden, heads)
        self.bias = init.dense(hidden, heads)
        self.decoder = init.mlp(heads, decoder_hidden, 1)
        assert init.offset == init.flat.shape[0]
        self.gamma = gamma

    def system(self, P, r, smask, amask):
        """`(Â, b)` of one padded graph: `P` (S, A, S), `r` (S, A), masks (S,), (A,)."""
        mask = smask[:, None] * amask[None, :]  # (S, A) real state-action pairs
        mask3 = mask[:, :, None]
        n_actions = jnp.maximum(jnp.sum(amask), 1.0)
        alpha = jax.nn.leaky_relu(self.action_in(r[:, :, None])) * mask3
        u = jnp.zeros((P.shape[0], alpha.shape[-1]), alpha.dtype)
        for i, (action_update, state_update) in enumerate(zip(self.action_updates, self.state_updates)):
            # E[u(s') | s, a]; zero in the first round (u = 0), where it is not computed.
            successor = jnp.einsum("sat,td->sad", P, u) if i else jnp.zeros_like(alpha)
            alpha = alpha + action_update(jnp.concatenate([alpha, successor], -1)) * mask3
            mean = jnp.sum(alpha, axis=1) / n_actions
            peak = jnp.max(jnp.where(mask3 > 0, alpha, -jnp.inf), axis=1)
            peak = jnp.where(smask[:, None] > 0, peak, 0.0)
            u = u + state_update(jnp.concatenate([u, mean, peak], -1)) * smask[:, None]
        logits = jnp.where(mask3 > 0, self.policy(alpha), -1e9)  # (S, A, heads)
        pi = jax.nn.softmax(logits, axis=1) * mask3
        weights = jnp.einsum("sah,sat->hst", pi, P)  # (heads, S, S), W_h(s, s') >= 0
        a_hat = degree_normalised(weights)
        b = jnp.sum(pi * self.bias(alpha), axis=1) * smask[:, None]  # (S, heads)
        return a_hat, b

    def __call__(self, P, r, smask, amask, *, solver, adjoint, max_steps, probe=None):
        """Standardised values (S,) and the forward solve's stats."""
        a_hat, b = self.system(P, r, smask, amask)
        norm = jnp.sqrt(jnp.sum(b * b))
        scale = jnp.where(norm > 0, norm, 1.0)
        b_unit = b / scale
        deq = fpx_nn.DEQ(_Transition(self.gamma), solver=solver, adjoint=adjoint, max_steps=max_steps)
        z, stats = deq((a_hat, b_unit), z0=b_unit, backward_probe=probe)
        h = scale * z
        return self.decoder(h)[:, 0] * smask, stats


# --------------------------------------------------------------------------- task


def _masked_mean(x, mask):
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


class CGSValueIteration(Task):
    dynamic = ("seed", "optim.lr")
    constraints = {
        "optim.lr": POSITIVE,
        "optim.weight_decay": NON_NEGATIVE,
        "schedule.name": one_of("constant", "cosine"),
        "model.heads": POSITIVE_INT,
        "model.hidden": POSITIVE_INT,
        "model.layers": POSITIVE_INT,
        "model.decoder_hidden": POSITIVE_INT,
        "model.gamma": UNIT_OPEN,
        "solver.name": one_of("picard"),
        "solver.atol": UNIT_OPEN,
        "solver.rtol": NON_NEGATIVE,
        "adjoint.name": one_of("implicit"),
        "max_steps": POSITIVE_INT,
        "data.graph": one_of("dense", "sparse"),
        "data.n_train": POSITIVE_INT,
        "data.n_test": POSITIVE_INT,
        "data.batch_size": POSITIVE_INT,
        "data.states_min": POSITIVE_INT,
        "data.states_max": POSITIVE_INT,
        "data.actions_min": POSITIVE_INT,
        "data.actions_max": POSITIVE_INT,
        "data.gamma": UNIT_OPEN,
        "data.seed": (lambda v: isinstance(v, int) and 0 <= v < _TEST_SEED, f"an integer in [0, {_TEST_SEED})"),
        "data.test_states": (lambda v: all(isinstance(s, int) and s >= 2 for s in v), "a list of integers >= 2"),
        "dtype": one_of("float32", "float64"),
    }

    def __init__(self, config):
        self.config = config
        self.dtype = config_dtype(config.dtype)
        d = config.data
        if not d.states_min < d.states_max:
            raise ConfigError(f"'data.states_min' ({d.states_min}) must be below 'data.states_max' ({d.states_max}): nS is drawn from [min, max).")
        if not d.actions_min < d.actions_max:
            raise ConfigError(f"'data.actions_min' ({d.actions_min}) must be below 'data.actions_max' ({d.actions_max}): nA is drawn from [min, max).")
        if d.batch_size > d.n_train:
            raise ConfigError(f"'data.batch_size' ({d.batch_size}) exceeds 'data.n_train' ({d.n_train}); batches are drawn without replacement.")
        if config.max_steps <= step_bound(config.solver.atol, config.model.gamma):
            raise ConfigError(
                f"'max_steps' ({config.max_steps}) must exceed the step bound ⌈log(atol)/log γ⌉ = "
                f"{step_bound(config.solver.atol, config.model.gamma)}, so that a solve that breaks the bound is seen, not cut off."
            )
        states, actions = (d.states_min, d.states_max), (d.actions_min, d.actions_max)
        train = _mdps(d.graph, d.n_train, d.seed, states, actions, d.gamma)
        sets = {"test": _mdps(d.graph, d.n_test, _TEST_SEED, states, actions, d.gamma)}
        for i, n_states in enumerate(d.test_states):
            sets[f"ns{n_states}"] = _mdps(d.graph, d.n_test, _TEST_SEED + 1 + i, (n_states, n_states + 1), actions, d.gamma)
        self.train = _Split.of(train, self.dtype)
        self.tests = {name: _Split.of(m, self.dtype) for name, m in sets.items()}
        self.groups = _eval_groups({name: split.num_states for name, split in self.tests.items()})
        self.group_splits = [_Split.concatenate([self.tests[n] for n in group]) for group in self.groups]
        self.greedy = {name: _policy_accuracy_np(m, np.zeros_like(m.values)) for name, m in sets.items()}
        self.mean_oracle = {name: _mean_oracle_mape_np(m) for name, m in sets.items()}
        real = train.values[train.state_mask]
        self.value_mean, self.value_std = float(real.mean()), float(real.std())
        self.mdp_gamma = float(d.gamma)
        self.solver = build("solver", config.solver.to_dict())
        self.adjoint = build("adjoint", config.adjoint.to_dict())
        self.optimizer = build("optim", config.optim.to_dict())
        self.bound = step_bound(config.solver.atol, config.model.gamma)

    # ------------------------------------------------------------------ model
    def _model(self, key):
        m = self.config.model
        return _CGS(key, hidden=m.hidden, heads=m.heads, layers=m.layers, decoder_hidden=m.decoder_hidden, gamma=m.gamma, dtype=self.dtype)

    def _predict(self, model, split: _Split, probes):
        """Values (n, S) (un-standardised), forward stats, for every graph of `split`."""

        def one(P, r, sm, am, probe):
            out, stats = model(P, r, sm, am, solver=self.solver, adjoint=self.adjoint, max_steps=self.config.max_steps, probe=probe)
            return out, stats

        out, stats = jax.vmap(one)(split.transitions, split.rewards, split.state_mask, split.action_mask, probes)
        return out, stats

    def _loss(self, out, split: _Split):
        target = (split.values - self.value_mean) / self.value_std
        return _masked_mean((out - target) ** 2, split.state_mask)

    def _values(self, out, split: _Split):
        return (self.value_mean + self.value_std * out) * split.state_mask

    def _scores(self, values, split: _Split):
        """(MAPE in %, policy accuracy), both means over graphs of per-graph means over states."""
        sm = split.state_mask
        per_state = jnp.abs(values - split.values) / jnp.where(sm > 0, jnp.abs(split.values), 1.0)
        mape = 100 * jnp.mean(jnp.sum(per_state * sm, 1) / jnp.sum(sm, 1))
        q = split.rewards + self.mdp_gamma * jnp.einsum("nsat,nt->nsa", split.transitions, values)
        q = jnp.where(split.action_mask[:, None, :] > 0, q, -jnp.inf)
        correct = (jnp.argmax(q, axis=2) == split.policy).astype(values.dtype) * sm
        return mape, jnp.mean(jnp.sum(correct, 1) / jnp.sum(sm, 1))

    def _solve_and_differentiate(self, model, split: _Split, with_params: bool):
        """Loss, outputs, forward stats, per-graph backward reports (n, 3) and parameter grads (or None)."""
        # The test sets are constants of the compiled program: the barrier keeps XLA from
        # constant-folding the model's first products with them (minutes of compilation and
        # folded copies of the data in the program).
        split = jax.lax.optimization_barrier(split)
        dynamic, static = eqx.partition(model, eqx.is_inexact_array)
        n = split.values.shape[0]
        probes = jnp.zeros((n, 3), self.dtype)

        def loss_fn(dynamic, probes):
            out, stats = self._predict(eqx.combine(dynamic, static), split, probes)
            return self._loss(out, split), (out, stats)

        argnums = (0, 1) if with_params else 1
        (loss, (out, stats)), grads = jax.value_and_grad(loss_fn, argnums=argnums, has_aux=True)(dynamic, probes)
        grads, reports = grads if with_params else (None, grads)
        return loss, out, stats, reports, grads

    def _solver_metrics(self, stats, reports, prefix: str):
        fwd = stats["num_steps"]
        bwd = reports[:, 0]
        over = (fwd > self.bound) | ~stats["converged"] | (bwd > self.bound) | (reports[:, 2] > 0)
        return {
            f"{prefix}forward_steps": jnp.mean(fwd.astype(self.dtype)),
            f"{prefix}forward_steps_max": jnp.max(fwd).astype(self.dtype),
            f"{prefix}backward_steps": jnp.mean(bwd),
            f"{prefix}backward_steps_max": jnp.max(bwd),
            f"{prefix}over_bound": jnp.sum(over).astype(self.dtype),
        }

    # ------------------------------------------------------------------- task
    def init(self, hp, key):
        model = self._model(key)
        params = eqx.filter(model, eqx.is_inexact_array)
        opt_state = set_learning_rate(self.optimizer.init(params), hp["optim.lr"])
        zero = jnp.zeros((), self.dtype)
        return {"model": model, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32),
                "forward_max": zero, "backward_max": zero, "over_bound": zero}

    def _lr(self, hp, step):
        if self.config.schedule.name == "cosine":
            frac = step.astype(self.dtype) / self.config.train.steps
            return hp["optim.lr"] * 0.5 * (1 + jnp.cos(jnp.pi * frac))
        return hp["optim.lr"]

    def train_step(self, state, hp, key):
        model = state["model"]
        batch = jr.choice(key, self.train.values.shape[0], (self.config.data.batch_size,), replace=False)
        split = self.train.take(batch)
        loss, out, stats, reports, grads = self._solve_and_differentiate(model, split, with_params=True)
        dynamic = eqx.filter(model, eqx.is_inexact_array)
        opt_state = set_learning_rate(state["opt_state"], self._lr(hp, state["step"]))
        updates, opt_state = self.optimizer.update(grads, opt_state, dynamic)
        model = eqx.apply_updates(model, updates)
        mape, accuracy = self._scores(jax.lax.stop_gradient(self._values(out, split)), split)
        solver = self._solver_metrics(stats, reports, "")
        metrics = {"loss": loss, "mape": mape, "policy_accuracy": accuracy,
                   "forward_steps": solver["forward_steps"], "backward_steps": solver["backward_steps"]}
        new_state = {
            "model": model, "opt_state": opt_state, "step": state["step"] + 1,
            "forward_max": jnp.maximum(state["forward_max"], solver["forward_steps_max"]),
            "backward_max": jnp.maximum(state["backward_max"], solver["backward_steps_max"]),
            "over_bound": state["over_bound"] + solver["over_bound"],
        }
        return new_state, metrics

    def evaluate(self, state, hp):
        model = state["model"]
        metrics = {
            "step_bound": jnp.asarray(self.bound, self.dtype),
            "train_forward_steps_max": state["forward_max"],
            "train_backward_steps_max": state["backward_max"],
            "train_over_bound": state["over_bound"],
        }
        for group, joint in zip(self.groups, self.group_splits):
            _, out, stats, reports, _ = self._solve_and_differentiate(model, joint, with_params=False)
            start = 0
            for name in group:
                split = self.tests[name]
                n, size = split.values.shape
                part = slice(start, start + n)
                start += n
                out_n = out[part, :size]
                stats_n = jax.tree_util.tree_map(lambda x: x[part], stats)
                mape, accuracy = self._scores(self._values(out_n, split), split)
                metrics.update({
                    f"{name}_loss": self._loss(out_n, split),
                    f"{name}_mape": mape,
                    f"{name}_policy_accuracy": accuracy,
                    f"{name}_greedy_policy_accuracy": jnp.asarray(self.greedy[name], self.dtype),
                    f"{name}_mean_oracle_mape": jnp.asarray(self.mean_oracle[name], self.dtype),
                    **self._solver_metrics(stats_n, reports[part], f"{name}_"),
                })
        return metrics


@register_task("cgs_value_iteration")
def build_cgs_value_iteration(config):
    return CGSValueIteration(config)


build_cgs_value_iteration.dynamic = CGSValueIteration.dynamic
build_cgs_value_iteration.constraints = CGSValueIteration.constraints
build_cgs_value_iteration.headline = ("eval/test_mape", "eval/test_policy_accuracy", "eval/test_forward_steps_max", "eval/test_backward_steps_max")
