"""Random finite MDPs for graph value iteration (the CGS benchmark), padded to a common size."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from jaxtyping import Bool, Float, Int

from . import _checks
from ._cache import cached


class MDPs(NamedTuple):
    """A batch of `n` MDPs padded to `S` states and `A` actions.

    Fields are documented in `value_iteration_mdps`.

    ```python
    import numpy as np, fpx
    mdps = fpx.data.value_iteration_mdps(2, seed=0, states=(5, 8), actions=(2, 4), cache=False)
    assert isinstance(mdps, fpx.data.MDPs)
    assert mdps.transitions.shape == (2, 7, 3, 7) and mdps.values.shape == (2, 7)
    assert np.allclose(mdps.transitions.sum(-1)[mdps.state_mask], 1.0)   # rows of real states and actions sum to 1
    ```
    """

    transitions: Float[np.ndarray, "n S A S"]
    rewards: Float[np.ndarray, "n S A"]
    state_mask: Bool[np.ndarray, "n S"]
    action_mask: Bool[np.ndarray, "n A"]
    values: Float[np.ndarray, "n S"]
    policy: Int[np.ndarray, "n S"]
    num_states: Int[np.ndarray, " n"]
    num_actions: Int[np.ndarray, " n"]
    gamma: float


def bellman(
    transitions: Float[np.ndarray, "n S A S"],
    rewards: Float[np.ndarray, "n S A"],
    action_mask: Bool[np.ndarray, "n A"],
    state_mask: Bool[np.ndarray, "n S"],
    values: Float[np.ndarray, "n S"],
    gamma: float,
) -> tuple[Float[np.ndarray, "n S"], Float[np.ndarray, "n S A"]]:
    """One Bellman optimality update on padded MDPs: `(T V, Q)`.

    `Q[b, s, a] = rewards[b, s, a] + gamma sum_t transitions[b, s, a, t] values[b, t]`
    (`-inf` for padded actions) and `(T V)[b, s] = max_a Q[b, s, a]` (0 for padded
    states). The layout is that of `value_iteration_mdps`; float64 NumPy.

    ```python
    import numpy as np
    import fpx.data

    mdp = fpx.data.value_iteration_mdps(2, states=(3, 5), actions=(2, 3), cache=False)
    v, q = fpx.data.bellman(mdp.transitions, mdp.rewards, mdp.action_mask, mdp.state_mask, mdp.values, mdp.gamma)
    assert np.allclose(v, mdp.values, atol=1e-10) and q.shape == (2, 4, 2)
    ```
    """
    q = rewards + gamma * np.einsum("bsat,bt->bsa", transitions, values)
    q = np.where(action_mask[:, None, :], q, -np.inf)
    v = np.where(state_mask, q.max(axis=2), 0.0)
    return v, q


def value_iteration_mdps(
    n: int,
    seed: int = 0,
    *,
    states: tuple[int, int] = (20, 50),
    actions: tuple[int, int] = (5, 10),
    gamma: float = 0.9,
    tol: float = 1e-10,
    cache: bool = True,
) -> MDPs:
    r"""Random MDPs with their optimal values, for graph value iteration (the CGS benchmark).

    Each MDP has `nS ~ U{states[0], ..., states[1]-1}` states and
    `nA ~ U{actions[0], ..., actions[1]-1}` actions, rewards `r(s, a) ~ U[-1, 1]` and dense
    random transition probabilities `P(s' | s, a) = w_{s a s'} / sum_t w_{s a t}` with
    `w ~ U[0, 1)` (the MDP graph has an edge `s -> s'` of weight `P(s'|s,a)` per action).
    The optimal value `V*(s) = max_a r(s, a) + gamma sum_s' P(s'|s, a) V*(s')` is computed by
    value iteration from 0 until the Bellman residual `|T V - V|_inf <= tol (1 - gamma)`,
    so `|V - V*|_inf <= tol`.

    Every array is padded to `S = states[1] - 1` states and `A = actions[1] - 1` actions:
    padded entries of `transitions`, `rewards`, `values` are 0 and the masks say which
    entries are real. Arrays are float64 (the values are accurate to `tol`, far below
    float32 resolution; cast for training). The first `k` MDPs do not depend on `n`.

    **Returns:** an `MDPs` named tuple:

    - `transitions`: `(n, S, A, S)`, `transitions[b, s, a, t] = P(t | s, a)`.
    - `rewards`: `(n, S, A)`.
    - `state_mask`: `(n, S)` bool, `action_mask`: `(n, A)` bool.
    - `values`: `(n, S)` optimal values; `policy`: `(n, S)` a greedy optimal action (0 on padding).
    - `num_states`, `num_actions`: `(n,)` int64; `gamma`: the discount.

    ```python
    import numpy as np
    import fpx.data

    mdp = fpx.data.value_iteration_mdps(4, cache=False)
    assert mdp.transitions.shape == (4, 49, 9, 49) and mdp.values.shape == (4, 49)
    assert np.allclose(mdp.transitions.sum(-1), mdp.state_mask[:, :, None] & mdp.action_mask[:, None, :])
    v, _ = fpx.data.bellman(mdp.transitions, mdp.rewards, mdp.action_mask, mdp.state_mask, mdp.values, mdp.gamma)
    assert np.abs(v - mdp.values).max() < 1e-10
    ```
    """
    fn = "value_iteration_mdps"
    n = _checks.positive_int(fn, "n", n)
    seed = _checks.seed(fn, seed)
    s_lo, s_hi = _checks.int_range(fn, "states", states)
    a_lo, a_hi = _checks.int_range(fn, "actions", actions)
    gamma = _checks.open_unit(fn, "gamma", gamma)
    tol = _checks.positive_float(fn, "tol", tol)
    args = dict(n=n, seed=seed, states=[s_lo, s_hi], actions=[a_lo, a_hi], gamma=gamma, tol=tol)

    def generate():
        rng = np.random.default_rng(seed)
        S, A = s_hi - 1, a_hi - 1
        P = np.zeros((n, S, A, S))
        R = np.zeros((n, S, A))
        ns = np.empty(n, np.int64)
        na = np.empty(n, np.int64)
        for b in range(n):
            ns[b] = k = rng.integers(s_lo, s_hi)
            na[b] = m = rng.integers(a_lo, a_hi)
            R[b, :k, :m] = rng.uniform(-1.0, 1.0, (k, m))
            w = rng.random((k, m, k))
            P[b, :k, :m, :k] = w / w.sum(axis=2, keepdims=True)
        smask = np.arange(S)[None, :] < ns[:, None]
        amask = np.arange(A)[None, :] < na[:, None]
        v = np.zeros((n, S))
        while True:
            new, q = bellman(P, R, amask, smask, v, gamma)
            residual = np.abs(new - v).max()
            v = new
            if residual <= tol * (1 - gamma):
                break
        policy = np.where(smask, q.argmax(axis=2), 0)
        return dict(
            transitions=P, rewards=R, state_mask=smask, action_mask=amask, values=v, policy=policy,
            num_states=ns, num_actions=na,
        )

    return MDPs(**cached(fn, args, generate, cache), gamma=gamma)
