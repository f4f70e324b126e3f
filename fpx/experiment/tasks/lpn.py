"""Learned proximal networks (LPN; Fang, Buchanan & Sulam, ICLR 2024) as fpx runner tasks.

An LPN is the gradient `f = ∇ψ` of an input-convex network `ψ` (ICNN), so `f` is exactly
the proximal operator of some (possibly nonconvex) function `R`:
`f(y) = argmin_x ½‖y - x‖² + R(x)` (Gribonval & Nikolova). Evaluating `R` needs the inverse
of `f`: with `f(y) = x`, `R(x) = ⟨x, y⟩ - ½‖x‖² - ψ(y)` (the reference code's
`lpn/utils/prior.py`), up to an additive constant.

**The network** (the reference `exps/laplacian/network.py`, `lpn/networks/lpn_mnist.py`
dense instead of convolutional): for an input `y` of dimension `d`,

    z_1 = s(W_0 y),   z_{k+1} = s(W_k z_k + U_k y + b_k) (k = 1..L),
    ψ(y) = w_outᵀ z_{L+1} + u_outᵀ y + c + (α/2) ‖y‖²,

with `s` the softplus of sharpness `β`, `s(t) = log(1 + exp(β t)) / β` (convex and
non-decreasing). `ψ` is convex when the weights acting on hidden states (`W_1..W_L` and
`w_out`) are non-negative; `W_0`, `U_k`, `b_k`, `u_out`, `c` are free. `α > 0` makes `ψ`
strongly convex (`f - α I` monotone), hence `f` invertible.

**Convexity by projection.** After every optimiser step the constrained weights are
projected onto the non-negative orthant with `fpx.feasibility.project_nonnegative`
(the reference's `wclip`), and once at initialisation, so every iterate is an exact prox.
A reparameterisation (`W = softplus(V)`) would also keep convexity, but changes Adam's
geometry and cannot represent an exact zero weight; the projection is what the paper does.
Every step records the smallest constrained weight after the projection (`min_weight`),
the number of entries that are negative after it (`negative_weights`, 0 when the projection
was applied) and the number the projection clipped (`clipped_weights`: the optimiser
pushed them below 0, so the projection was needed); the state carries the running minimum
over all steps before (`min_raw_weight_ever`) and after the projection
(`min_weight_ever`), which `evaluate` reports.

**Training** (`train_step`): denoising pairs `(x, y = x + σ n)`, `n ~ N(0, I)`, and the loss
`loss.kind`: `l2` (mean of `‖f(y) - x‖²`), `l1` (mean of `‖f(y) - x‖₁`), or
`prox_matching`: a pretraining phase (`loss.pretrain_fraction` of the steps, loss
`loss.pretrain`, as the reference: L1) and then the proximal matching loss
`mean(1 - exp(-(‖f(y) - x‖ / γ)²))` with `γ` annealed in `loss.gamma_stages` equal stages,
linearly from `loss.gamma_start` to `loss.gamma_end`. Learning rate: `optim.lr` decayed
exponentially to `optim.lr * train.lr_decay` over the first phase (the whole run for
`l2`/`l1`), then, under proximal matching, from `optim.lr * loss.lr_start` to
`optim.lr * loss.lr_end`.

Tasks:

- `lpn_laplacian`: the paper's 1-D experiment. `x ~ Laplace(0, b)` (`data.scale`),
  `σ = data.noise`. The MAP denoiser (the prox of `-σ² log p`) is the soft threshold
  `soft(y, λ)`, `λ = σ²/b`; the MMSE denoiser (what `l2` learns) shrinks but is never 0
  off `y = 0`. See `LPNLaplacian` for the metrics.
- `lpn_pnp`: an LPN denoiser (`d = 64`) trained on noisy sklearn digits, used as the prox
  in plug-and-play ADMM, written as a fixed-point map and solved by `fpx.fixed_point`,
  for Gaussian deblurring and random inpainting of test digits, against Tikhonov and
  total variation. See `LPNPnP`.
"""

from __future__ import annotations

import abc
import math

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

from ..._fixed_point import fixed_point
from ...data import digits
from ...feasibility import project_nonnegative
from ...solvers import Picard
from .._config import NON_NEGATIVE, POSITIVE, POSITIVE_INT, UNIT_OPEN, ConfigError, one_of
from .._registry import build, register_task, set_learning_rate
from .._task import Task, config_dtype

_CONSTRAINED = ("wz", "wout")  # the weights acting on hidden states: non-negative for convexity


# --------------------------------------------------------------------------------- network


def _init_lpn(key, *, dim: int, hidden: int, layers: int, init: str, dtype):
    """LPN parameters: a dict of arrays (`wz` and `rw`, `rb` are tuples over the layers).

    `init="uniform"`: PyTorch's `nn.Linear` default `U(-1/√fan_in, 1/√fan_in)` for every
    weight (the reference's 1-D model), the constrained ones then projected (as the
    reference's first `wclip`). `init="small"`: the constrained weights `exp(N(-10, 0.1))`
    (the reference's `init_weights(-10, 0.1)` of its image models), so `ψ` starts nearly
    affine in the hidden path.
    """
    ks = jr.split(key, 2 * layers + 4)

    def uniform(k, shape, fan_in):
        return (jr.uniform(k, shape, dtype, -1.0, 1.0) / math.sqrt(fan_in)).astype(dtype)

    if init == "uniform":
        wz = tuple(uniform(ks[1 + i], (hidden, hidden), hidden) for i in range(layers))
        wout = uniform(ks[layers + 1], (hidden,), hidden)
    else:
        wz = tuple(jnp.exp(-10.0 + 0.1 * jr.normal(ks[1 + i], (hidden, hidden), dtype)) for i in range(layers))
        wout = jnp.exp(-10.0 + 0.1 * jr.normal(ks[layers + 1], (hidden,), dtype))
    params = {
        "w0": uniform(ks[0], (dim, hidden), dim),
        "wz": wz,
        "wout": wout,
        "rw": tuple(uniform(ks[layers + 2 + i], (dim, hidden), dim) for i in range(layers)),
        "rb": tuple(uniform(jr.fold_in(ks[2 * layers + 2], i), (hidden,), dim) for i in range(layers)),
        "ow": uniform(ks[2 * layers + 3], (dim,), dim),
        "ob": jnp.zeros((), dtype),
    }
    return _project(params)


def _softplus(t, beta):
    return jax.nn.softplus(beta * t) / beta


def _psi(params, y, beta: float, alpha: float):
    """The convex potential `ψ(y)` of one input `y` of shape `(d,)` (a scalar)."""
    z = _softplus(y @ params["w0"], beta)
    for w, rw, rb in zip(params["wz"], params["rw"], params["rb"]):
        z = _softplus(z @ w + y @ rw + rb, beta)
    return z @ params["wout"] + y @ params["ow"] + params["ob"] + 0.5 * alpha * jnp.sum(y * y)


def _prox(params, y, beta: float, alpha: float):
    """The learned proximal operator `f(y) = ∇ψ(y)` of one input `y` `(d,)`."""
    return jax.grad(_psi, argnums=1)(params, y, beta, alpha)


def _constrained(params) -> list:
    return [leaf for name in _CONSTRAINED for leaf in jax.tree_util.tree_leaves(params[name])]


def _project(params):
    """`params` with the constrained weights projected onto `{w >= 0}` (fpx.feasibility)."""
    out = dict(params)
    for name in _CONSTRAINED:
        out[name] = jax.tree_util.tree_map(project_nonnegative, params[name])
    return out


def _weight_stats(raw, projected, dtype) -> dict:
    leaves_raw, leaves = _constrained(raw), _constrained(projected)
    return {
        "min_raw_weight": jnp.min(jnp.stack([jnp.min(w) for w in leaves_raw])),
        "min_weight": jnp.min(jnp.stack([jnp.min(w) for w in leaves])),
        "clipped_weights": sum(jnp.sum(w < 0) for w in leaves_raw).astype(dtype),
        "negative_weights": sum(jnp.sum(w < 0) for w in leaves).astype(dtype),
    }


# ----------------------------------------------------------------------------------- prior


def _invert(prox_fn, x, *, solver, max_steps: int, step: float = 1.0):
    """Solve `f(y) = x` for `y` by `fpx.fixed_point` on `T(y) = y - step (f(y) - x)`.

    `T` is a gradient step on the convex `ψ(y) - ⟨x, y⟩`, whose minimisers are the
    solutions; its residual `y - T(y)` is `step (f(y) - x)`. Starts at `y = x`.
    """
    return fixed_point(lambda y, x: y - step * (prox_fn(y) - x), x, x, solver=solver, max_steps=max_steps, throw=False)


def _prior(psi_fn, prox_fn, x, *, solver, max_steps: int, step: float = 1.0):
    """`(R(x), solution of the inversion)` with `R(x) = ⟨x, y⟩ - ½‖x‖² - ψ(y)`, `f(y) = x`."""
    sol = _invert(prox_fn, x, solver=solver, max_steps=max_steps, step=step)
    y = sol.value
    return jnp.sum(x * y) - 0.5 * jnp.sum(x * x) - psi_fn(y), sol


# ------------------------------------------------------------------------------ schedules


def _schedule(step, cfg, total: int, dtype):
    """`(phase, gamma, lr factor)` at `step`; phase 0: the first loss (l2/l1/pretrain), 1: matching."""
    loss = cfg.loss
    s = step.astype(dtype)
    first = round(loss.pretrain_fraction * total) if loss.kind == "prox_matching" else total
    t1 = jnp.clip(s / max(first, 1), 0.0, 1.0)
    lr1 = cfg.train.lr_decay**t1
    t2 = jnp.clip((s - first) / max(total - first, 1), 0.0, 1.0)
    stages = loss.gamma_stages
    stage = jnp.minimum(jnp.floor(t2 * stages), stages - 1)
    gamma = loss.gamma_end + (loss.gamma_start - loss.gamma_end) * (1.0 - stage / max(stages - 1, 1))
    if stages == 1:
        gamma = jnp.full_like(s, loss.gamma_end)
    lr2 = loss.lr_start * (loss.lr_end / loss.lr_start) ** t2
    matching = s >= first
    return matching, gamma.astype(dtype), jnp.where(matching, lr2, lr1).astype(dtype)


def _losses(out, target):
    """Per-sample `‖r‖²`, `‖r‖₁`, `‖r‖` of `r = out - target` (`(n, d)` arrays)."""
    r = out - target
    sq = jnp.sum(r * r, axis=-1)
    return sq, jnp.sum(jnp.abs(r), axis=-1), jnp.sqrt(sq + jnp.finfo(r.dtype).tiny)


def _prox_matching(dist, gamma):
    """The proximal matching loss `mean(1 - exp(-(dist / γ)²))`."""
    return jnp.mean(1.0 - jnp.exp(-jnp.square(dist / gamma)))


# ------------------------------------------------------------------------------ base task


def _list_of(check):
    return (lambda v: len(v) > 0 and all(check(x) for x in v), "a non-empty list of positive numbers")


class _LPNTask(Task):
    """The training loop shared by both tasks; subclasses give the data (`_batch`) and `evaluate`."""

    dynamic = ("seed", "optim.lr")
    constraints = {
        "optim.lr": POSITIVE,
        "model.hidden": POSITIVE_INT,
        "model.layers": POSITIVE_INT,
        "model.beta": POSITIVE,
        "model.alpha": NON_NEGATIVE,
        "model.init": one_of("uniform", "small"),
        "loss.kind": one_of("l2", "l1", "prox_matching"),
        "loss.pretrain": one_of("l2", "l1"),
        "loss.pretrain_fraction": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
        "loss.gamma_start": POSITIVE,
        "loss.gamma_end": POSITIVE,
        "loss.gamma_stages": POSITIVE_INT,
        "loss.lr_start": POSITIVE,
        "loss.lr_end": POSITIVE,
        "train.lr_decay": POSITIVE,
        "data.batch_size": POSITIVE_INT,
        "data.noise": POSITIVE,
        "dtype": one_of("float32", "float64"),
    }
    dim: int = 1

    def __init__(self, config):
        self.config = config
        self.dtype = config_dtype(config.dtype)
        if config.loss.gamma_end > config.loss.gamma_start:
            raise ConfigError(
                f"'loss.gamma_end' ({config.loss.gamma_end}) exceeds 'loss.gamma_start' ({config.loss.gamma_start}): "
                "the proximal matching gamma is annealed downwards; swap them."
            )
        self.optimizer = build("optim", config.optim.to_dict())
        self.solver = build("solver", config.solver.to_dict())
        m = config.model
        self.beta, self.alpha = float(m.beta), float(m.alpha)

    def psi(self, params):
        return lambda y: _psi(params, y, self.beta, self.alpha)

    def prox(self, params):
        return lambda y: _prox(params, y, self.beta, self.alpha)

    @abc.abstractmethod
    def _batch(self, key):
        """A training batch `(x, y)` (clean, noisy), each `(batch, dim)`."""

    def init(self, hp, key):
        m = self.config.model
        params = _init_lpn(key, dim=self.dim, hidden=m.hidden, layers=m.layers, init=m.init, dtype=self.dtype)
        opt_state = set_learning_rate(self.optimizer.init(params), hp["optim.lr"])
        big = jnp.asarray(jnp.inf, self.dtype)
        return {"params": params, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32),
                "min_weight_ever": big, "min_raw_weight_ever": big}

    def train_step(self, state, hp, key):
        cfg = self.config
        x, y = self._batch(key)
        matching, gamma, lr_factor = _schedule(state["step"], cfg, cfg.train.steps, self.dtype)
        first = cfg.loss.pretrain if cfg.loss.kind == "prox_matching" else cfg.loss.kind

        def loss_fn(params):
            out = jax.vmap(self.prox(params))(y)
            sq, ab, dist = _losses(out, x)
            plain = jnp.mean(sq) if first == "l2" else jnp.mean(ab)
            loss = jnp.where(matching, _prox_matching(dist, gamma), plain) if cfg.loss.kind == "prox_matching" else plain
            return loss, jnp.mean(sq)

        (loss, mse), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        opt_state = set_learning_rate(state["opt_state"], hp["optim.lr"] * lr_factor)
        updates, opt_state = self.optimizer.update(grads, opt_state, state["params"])
        raw = optax.apply_updates(state["params"], updates)
        params = _project(raw)
        stats = _weight_stats(raw, params, self.dtype)
        new = {
            "params": params, "opt_state": opt_state, "step": state["step"] + 1,
            "min_weight_ever": jnp.minimum(state["min_weight_ever"], stats["min_weight"]),
            "min_raw_weight_ever": jnp.minimum(state["min_raw_weight_ever"], stats["min_raw_weight"]),
        }
        metrics = {"loss": loss, "mse": mse, "gamma": jnp.where(matching, gamma, 0.0),
                   "lr": hp["optim.lr"] * lr_factor, **stats}
        return new, metrics

    def _weight_metrics(self, state) -> dict:
        leaves = _constrained(state["params"])
        return {
            "min_weight": jnp.min(jnp.stack([jnp.min(w) for w in leaves])),
            "min_weight_ever": state["min_weight_ever"],
            "min_raw_weight_ever": state["min_raw_weight_ever"],
        }


# ----------------------------------------------------------------------------- laplacian


def _laplace_posterior(ys, *, scale: float, noise: float, h: float = 0.005, span: float = 14.0):
    """Quadrature of the posterior of `x ~ Laplace(0, b)` given `y = x + σ n`: `(grid, weights)`,
    weights `(len(ys), len(grid))` normalised per row."""
    grid = np.arange(-span, span + h / 2, h)
    logp = -np.abs(grid)[None, :] / scale - np.square(ys[:, None] - grid[None, :]) / (2 * noise**2)
    w = np.exp(logp - logp.max(axis=1, keepdims=True))
    return grid, w / w.sum(axis=1, keepdims=True)


def _laplace_mmse(ys, *, scale: float = 1.0, noise: float = 1.0):
    """The MMSE denoiser `E[x | y]` for `x ~ Laplace(0, b)`, `y = x + σ n` (quadrature), at `ys`.

    ```python
    import numpy as np
    from fpx.experiment.tasks.lpn import _laplace_mmse
    m = _laplace_mmse(np.array([-2.0, 0.0, 0.5, 2.0]))
    assert abs(m[1]) < 1e-9 and abs(m[0] + m[3]) < 1e-9 and 0.1 < m[2] < 0.5   # odd, shrinks, never 0 off 0
    ```
    """
    grid, w = _laplace_posterior(np.asarray(ys, np.float64), scale=scale, noise=noise)
    return w @ grid


def _laplace_matching_optimum(ys, gamma: float, *, scale: float = 1.0, noise: float = 1.0):
    """The population minimiser of the proximal matching loss at `γ` for the Laplace prior.

    `argmin_c E[1 - exp(-((c - x)/γ)²) | y]` is the mode of the posterior smoothed by the
    kernel `exp(-(t/γ)²)`; computed by FFT convolution on a grid of step 0.005 with a
    parabolic refinement of the maximum. As `γ -> 0` it tends to the MAP, `soft(y, σ²/b)`.

    ```python
    import numpy as np
    from fpx.experiment.tasks.lpn import _laplace_matching_optimum
    c = _laplace_matching_optimum(np.array([1.0, 3.0]), 0.1)
    assert 0.10 < c[0] < 0.12 and abs(c[1] - 2.0) < 0.01   # soft(1, 1) = 0: the kink is missed by 0.11
    ```
    """
    ys = np.asarray(ys, np.float64)
    if not gamma > 0:
        raise ValueError(f"_laplace_matching_optimum: `gamma` must be positive, got {gamma!r}.")
    grid, w = _laplace_posterior(ys, scale=scale, noise=noise)
    h = grid[1] - grid[0]
    half = int(np.ceil(5 * gamma / h))
    kernel = np.exp(-np.square(np.arange(-half, half + 1) * h / gamma))
    n = grid.size + kernel.size - 1
    size = 1 << int(np.ceil(np.log2(n)))
    smooth = np.fft.irfft(np.fft.rfft(w, size, axis=1) * np.fft.rfft(kernel, size)[None, :], size, axis=1)
    smooth = smooth[:, half : half + grid.size]
    i = np.clip(np.argmax(smooth, axis=1), 1, grid.size - 2)
    rows = np.arange(ys.size)
    a, b, c = smooth[rows, i - 1], smooth[rows, i], smooth[rows, i + 1]
    denom = a - 2 * b + c
    shift = np.where(np.abs(denom) > 0, 0.5 * (a - c) / np.where(denom == 0, 1, denom), 0.0)
    return grid[i] + np.clip(shift, -1, 1) * h


def _soft_threshold(y, lam):
    """`sign(y) max(|y| - λ, 0)`, the prox of `λ|x|`."""
    return jnp.sign(y) * jnp.maximum(jnp.abs(y) - lam, 0.0)


class LPNLaplacian(_LPNTask):
    """The 1-D Laplacian experiment (the paper's §5.1, `exps/laplacian/`).

    Metrics of `evaluate`, on the grid of `eval.points` inputs `y` in `[-eval.range, eval.range]`:

    - `soft_sup_error`: `max |f(y) - soft(y, λ)|`, `λ = σ²/b` (the MAP denoiser), attained at
      `y = soft_sup_error_at`;
      `soft_sup_error_off_kinks`: the same away from the kinks (`||y| - λ| > 0.25`);
    - `mmse_sup_error`: `max |f(y) - E[x|y]|` (what the L2 loss targets);
    - `optimum_sup_error`: `max |f(y) - c*_γ(y)|`, `c*_γ` the population minimiser of the
      proximal matching loss at `γ = loss.gamma_end` (`_laplace_matching_optimum`): how well
      training minimised its own loss; `optimum_soft_sup_error`: `max |c*_γ - soft|`, the
      best any model can do at that `γ` (0.111 at `γ = 0.1`, at `|y| = λ`);
    - `f_half`: `f(0.5)` (0 for the soft threshold, > 0 for the MMSE);
    - the prior, by inverting `f` with `fpx.fixed_point` (`solver`, from `y = x`) on the
      grid of `prior.points` values `x` in `[-prior.range, prior.range]`:
      `prior_sup_error`: `max |R(x) - R(0) - λ|x||`, `prior_residual`: `max |f(y(x)) - x|`,
      `prior_converged`: the fraction of inversions that converged, `prior_steps`: their
      mean number of solver steps;
    - the constrained weights: `min_weight` (now), `min_weight_ever` (after the projection,
      over all steps so far: >= 0), `min_raw_weight_ever` (before it: < 0 when the
      projection was needed);
    - `prox_curve_{i}` (`f` at `eval.curve_points` points of `[-range, range]`) and
      `prior_curve_{i}` (`R - R(0)` at `eval.curve_points // 2 + 1` points of
      `[-prior.range, prior.range]`), for plots.

    ```python
    import jax, jax.numpy as jnp, fpx.experiment as fx
    config = fx.resolve_config("configs/lpn/laplacian.py:quick")   # run from the repository root
    task = fx.build_task(fx.member_config(config, fx.expand_sweep(config)[0]))
    hp = {"seed": jnp.asarray(0), "optim.lr": jnp.asarray(1e-2, jnp.float32)}
    state, metrics = task.train_step(task.init(hp, jax.random.PRNGKey(0)), hp, jax.random.PRNGKey(1))
    assert metrics["negative_weights"] == 0 and metrics["min_weight"] >= 0   # projected after the Adam step
    ```
    """

    constraints = {
        **_LPNTask.constraints,
        "data.scale": POSITIVE,
        "eval.range": POSITIVE,
        "eval.points": POSITIVE_INT,
        "eval.curve_points": (lambda v: isinstance(v, int) and v >= 2, "an integer >= 2"),
        "prior.range": POSITIVE,
        "prior.points": (lambda v: isinstance(v, int) and v >= 3 and v % 2 == 1, "an odd integer >= 3 (the grid contains 0)"),
        "prior.max_steps": POSITIVE_INT,
        "prior.step": POSITIVE,
    }
    dim = 1

    def __init__(self, config):
        super().__init__(config)
        d, e = config.data, config.eval
        self.lam = d.noise**2 / d.scale
        ys = np.linspace(-e.range, e.range, e.points)
        self.ys = jnp.asarray(ys, self.dtype)
        self.mmse = jnp.asarray(_laplace_mmse(ys, scale=d.scale, noise=d.noise), self.dtype)
        self.optimum = jnp.asarray(_laplace_matching_optimum(ys, config.loss.gamma_end, scale=d.scale, noise=d.noise), self.dtype)
        self.off_kinks = jnp.asarray(np.abs(np.abs(ys) - self.lam) > 0.25)
        self.curve_ys = jnp.asarray(np.linspace(-e.range, e.range, e.curve_points), self.dtype)
        self.xs = jnp.asarray(np.linspace(-config.prior.range, config.prior.range, config.prior.points), self.dtype)
        self.curve_xs = jnp.asarray(np.linspace(-config.prior.range, config.prior.range, e.curve_points // 2 + 1), self.dtype)

    def _batch(self, key):
        k1, k2 = jr.split(key)
        n, d = self.config.data.batch_size, self.config.data
        x = d.scale * jr.laplace(k1, (n, 1), self.dtype)
        return x, x + d.noise * jr.normal(k2, (n, 1), self.dtype)

    def priors(self, params, xs):
        """`(R(xs) - R(0), solutions)` for a 1-D array `xs` (R by inverting f with fpx)."""
        psi, prox = self.psi(params), self.prox(params)
        p = self.config.prior
        xs0 = jnp.concatenate([jnp.zeros((1,), xs.dtype), xs])
        r, sols = jax.vmap(lambda x: _prior(psi, prox, x[None], solver=self.solver, max_steps=p.max_steps, step=p.step))(xs0)
        return r[1:] - r[0], jax.tree_util.tree_map(lambda v: v[1:], sols)

    def evaluate(self, state, hp):
        params = state["params"]
        prox = self.prox(params)
        f = jax.vmap(lambda y: prox(y[None])[0])
        ys = jnp.concatenate([self.ys, self.curve_ys, jnp.full((1,), 0.5, self.dtype)])
        fall = f(ys)
        n, m = self.ys.shape[0], self.curve_ys.shape[0]
        fy, curve, f_half = fall[:n], fall[n : n + m], fall[-1]
        soft = _soft_threshold(self.ys, self.lam)
        err = jnp.abs(fy - soft)
        k = self.xs.shape[0]
        r, sols = self.priors(params, jnp.concatenate([self.xs, self.curve_xs]))
        r, prior_curve = r[:k], r[k:]
        fx = f(sols.value[:k, 0])
        converged = sols.converged.astype(self.dtype)
        out = {
            "soft_sup_error": jnp.max(err),
            "soft_sup_error_at": self.ys[jnp.argmax(err)],
            "soft_sup_error_off_kinks": jnp.max(jnp.where(self.off_kinks, err, 0.0)),
            "mmse_sup_error": jnp.max(jnp.abs(fy - self.mmse)),
            "optimum_sup_error": jnp.max(jnp.abs(fy - self.optimum)),
            "optimum_soft_sup_error": jnp.max(jnp.abs(self.optimum - soft)),
            "f_half": f_half,
            "prior_sup_error": jnp.max(jnp.abs(r - self.lam * jnp.abs(self.xs))),
            "prior_residual": jnp.max(jnp.abs(fx - self.xs)),
            "prior_converged": jnp.mean(converged[:k]),
            "prior_steps": jnp.mean(sols.stats["num_steps"][:k].astype(self.dtype)),
            **self._weight_metrics(state),
        }
        out.update({f"prox_curve_{i}": curve[i] for i in range(m)})
        out.update({f"prior_curve_{i}": prior_curve[i] for i in range(prior_curve.shape[0])})
        return out


@register_task("lpn_laplacian")
def build_lpn_laplacian(config):
    return LPNLaplacian(config)


build_lpn_laplacian.dynamic = LPNLaplacian.dynamic
build_lpn_laplacian.constraints = LPNLaplacian.constraints
build_lpn_laplacian.headline = ("eval/soft_sup_error", "eval/mmse_sup_error", "eval/f_half", "eval/prior_sup_error",
                                "eval/min_weight_ever")


# -------------------------------------------------------------------------- plug-and-play


def _gaussian_blur_matrix(size: int, sigma: float, width: int) -> np.ndarray:
    """The `(size², size²)` matrix of a normalised Gaussian blur (std `sigma`, `width`×`width`
    kernel, zero boundary) acting on row-major `size`×`size` images."""
    r = width // 2
    t = np.arange(-r, r + 1)
    k = np.exp(-(t[:, None] ** 2 + t[None, :] ** 2) / (2 * sigma**2))
    k /= k.sum()
    a = np.zeros((size * size, size * size))
    for i in range(size):
        for j in range(size):
            for di in range(-r, r + 1):
                for dj in range(-r, r + 1):
                    ii, jj = i + di, j + dj
                    if 0 <= ii < size and 0 <= jj < size:
                        a[i * size + j, ii * size + jj] += k[di + r, dj + r]
    return a


def _gradient_matrix(size: int) -> np.ndarray:
    """Forward differences with Neumann boundary: `(2 size², size²)`, rows `[dx; dy]`."""
    n = size * size
    d = np.zeros((2 * n, n))
    for i in range(size):
        for j in range(size):
            p = i * size + j
            if j + 1 < size:
                d[p, p], d[p, p + 1] = -1.0, 1.0
            if i + 1 < size:
                d[n + p, p], d[n + p, p + size] = -1.0, 1.0
    return d


def _psnr(x, ref):
    """Peak signal-to-noise ratio in dB of images in `[0, 1]` (last axis: pixels; numpy or jax)."""
    xp = jnp if isinstance(x, jax.Array) else np
    mse = xp.mean(xp.square(x - ref), axis=-1)
    return 10.0 * xp.log10(1.0 / xp.maximum(mse, 1e-12))


class _Problem:
    """A linear inverse problem on `n` images: `y_i = A_i x_i + noise`, with `A_iᵀA_i = Q diag(λ_i) Qᵀ`.

    Deblurring shares `A` (and `Q`); inpainting has `A_i = diag(mask_i)`, `Q = I`, `λ_i = mask_i`.
    """

    def __init__(self, ops: np.ndarray, y: np.ndarray, shared: bool):
        self.ops, self.y = ops, y
        self.aty = np.einsum("nij,ni->nj", ops, y)
        self.diagonal = not shared
        if shared:
            lam, q = np.linalg.eigh(ops[0].T @ ops[0])
            self.q, self.lam = q, np.broadcast_to(np.clip(lam, 0, None), y.shape)
        else:  # diagonal operators
            self.q, self.lam = np.eye(y.shape[1]), np.einsum("nii->ni", ops) ** 2

    def apply_inverse(self, v, shift, scale):
        """`(shift I + scale AᵀA)⁻¹ v` per image (`v`: `(..., n, 64)`, `scale` a scalar)."""
        if self.diagonal:
            return v / (shift + scale * self.lam)
        return ((v @ self.q) / (shift + scale * self.lam)) @ self.q.T


def _tikhonov(problem: _Problem, lam: float, dtd: np.ndarray) -> np.ndarray:
    """`argmin ½‖A x - y‖² + (λ/2)‖D x‖²` (+1e-8 ‖x‖², for uniqueness) per image: one linear solve each."""
    mats = np.einsum("nki,nkj->nij", problem.ops, problem.ops) + lam * dtd[None] + 1e-8 * np.eye(dtd.shape[0])[None]
    return np.linalg.solve(mats, problem.aty[..., None])[..., 0]


def _grad(x, size: int = 8):
    """`x @ D.T` for `D = _gradient_matrix(size)`, by slicing: `(n, size²) -> (n, 2 size²)`."""
    img = x.reshape(-1, size, size)
    dx = jnp.pad(img[:, :, 1:] - img[:, :, :-1], ((0, 0), (0, 0), (0, 1)))
    dy = jnp.pad(img[:, 1:, :] - img[:, :-1, :], ((0, 0), (0, 1), (0, 0)))
    return jnp.concatenate([dx.reshape(x.shape[0], -1), dy.reshape(x.shape[0], -1)], axis=1)


def _grad_t(p, size: int = 8):
    """`p @ D` (the adjoint of `_grad`): `(n, 2 size²) -> (n, size²)`."""
    n = size * size
    px, py = p[:, :n].reshape(-1, size, size)[:, :, :-1], p[:, n:].reshape(-1, size, size)[:, :-1, :]
    out = jnp.pad(px, ((0, 0), (0, 0), (1, 0))) - jnp.pad(px, ((0, 0), (0, 0), (0, 1)))
    out = out + jnp.pad(py, ((0, 0), (1, 0), (0, 0))) - jnp.pad(py, ((0, 0), (0, 1), (0, 0)))
    return out.reshape(p.shape[0], n)


@jax.jit
def _tv_kernel(aty, q, lam_a, lams, steps):
    tau = sigma = 0.35
    w, (n_img, n) = lams.shape[0], aty.shape
    lams = lams[:, None, None, None]
    inverse = lambda v: ((v @ q) / (1.0 + tau * lam_a)[None]) @ q.T  # noqa: E731

    def body(_, carry):
        x, xbar, p = carry
        q2 = (p + sigma * _grad(xbar.reshape(-1, n)).reshape(w, n_img, 2 * n)).reshape(w, n_img, 2, n)
        q2 = q2 / jnp.maximum(1.0, jnp.sqrt(jnp.sum(q2 * q2, axis=2, keepdims=True)) / lams)
        p = q2.reshape(w, n_img, 2 * n)
        x_new = inverse(x - tau * _grad_t(p.reshape(-1, 2 * n)).reshape(w, n_img, n) + tau * aty[None])
        return x_new, 2 * x_new - x, p

    x = jnp.broadcast_to(aty, (w, n_img, n))
    x, _, _ = jax.lax.fori_loop(0, steps, body, (x, x, jnp.zeros((w, n_img, 2 * n), aty.dtype)))
    return x


def _tv(problem: _Problem, lam, steps: int) -> np.ndarray:
    """`argmin ½‖A x - y‖² + λ TV(x)` (isotropic TV) per image by `steps` Chambolle–Pock iterations.

    Dual variable on `K = D` (forward differences, `‖D‖² <= 8`, step sizes `τ = σ = 0.35`), the data
    term through its prox `(I + τ AᵀA)⁻¹ (v + τ Aᵀy)`. `lam` a scalar, or a 1-D array of weights:
    then all are solved at once (jitted), the result `(len(lam), n, 64)`.
    """
    dt = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    f = lambda a: jnp.asarray(a, dt)  # noqa: E731
    x = _tv_kernel(f(problem.aty), f(problem.q), f(problem.lam), f(np.atleast_1d(lam)), steps)
    x = np.asarray(x, np.float64)
    return x if np.ndim(lam) else x[0]


def _admm_map(prox_fn, q, lam, aty, weight):
    """PnP-ADMM for `min (w/2)‖A x - y‖² + R(x)` with `f = prox_R` learned, as a map on `(z, u)`.

    `x = argmin (w/2)‖A x - y‖² + ½‖x - (z - u)‖²` (with `AᵀA = Q diag(λ) Qᵀ`), `z+ = f(x + u)`,
    `u+ = u + x - z+`. Its fixed points are ADMM's, with `x = z` the reconstruction.
    """

    def step(zu, _):
        z, u = zu
        x = q @ ((q.T @ (weight * aty + z - u)) / (1.0 + weight * lam))
        z_new = prox_fn(x + u)
        return z_new, u + x - z_new

    return step


def _pnp_solve(prox_fn, q, lam, aty, weight, solver, max_steps: int):
    """PnP-ADMM on one image by `fpx.fixed_point` from `z = Aᵀy`, `u = 0`: `(reconstruction, solution)`."""
    sol = fixed_point(_admm_map(prox_fn, q, lam, aty, weight), (aty, jnp.zeros_like(aty)), None, solver=solver,
                      max_steps=max_steps, throw=False)
    return sol.value[0], sol


class LPNPnP(_LPNTask):
    """An LPN denoiser for 8×8 digits and plug-and-play ADMM with it (the paper's §5.3, small).

    Data: `fpx.data.digits(standardize=False)` (split `data.split_seed`) scaled to `[0, 1]`;
    the denoiser is trained on the training split at noise `data.noise`. Evaluation uses
    the test split: its first `data.num_val` images tune every method's weight, the next
    `data.num_test` are the test images. Problems (fixed, seeded measurements):

    - `deblur`: `y = A x + σ_b n`, `A` a Gaussian blur (std `pnp.blur_sigma`,
      `pnp.blur_width`² kernel, zero boundary), `σ_b = pnp.blur_noise`;
    - `inpaint`: `y = M (x + σ_i n)`, `M` keeps each pixel with probability `pnp.keep`
      (a random mask per image), `σ_i = pnp.inpaint_noise`.

    Methods, each with its weight chosen by the mean PSNR on the validation images:
    `tikhonov`, `argmin ½‖Ax - y‖² + (λ/2)‖Dx‖²` (D: forward differences; λ from
    `pnp.tikhonov_weights`); `tv`, `argmin ½‖Ax - y‖² + λ TV(x)` by `pnp.tv_steps`
    Chambolle–Pock steps (λ from `pnp.tv_weights`) — both independent of the network, so
    computed once when the task is built; `pnp`: PnP-ADMM with the LPN as the prox, data
    weight `w = (data.noise / σ)² × factor` (the MAP weight if `R = σ_train² (-log p)`),
    factor from `pnp.weight_factors`, solved by `fpx.fixed_point` with `solver` (from
    `z = Aᵀy`, `u = 0`, at most `pnp.max_steps` steps), then on the test images by `Picard`
    (the plain ADMM iteration, same tolerances) and by `solver`, reporting each one's PSNR,
    mean and max steps and converged fraction. Reconstructions are clipped to `[0, 1]`.

    Metrics: `{problem}_{tikhonov|tv}_psnr` (and `_weight`, the chosen λ),
    `{problem}_measured_psnr` (the measurement itself), `{problem}_pnp_{picard|accel}_{psnr|
    steps|max_steps|converged}`, `{problem}_pnp_weight` (the chosen factor), `denoise_psnr`
    (the LPN on the noisy test images at `data.noise`) and `noisy_psnr`, plus the
    constrained-weight metrics of `LPNLaplacian`.

    ```python
    import jax, jax.numpy as jnp, fpx.experiment as fx
    config = fx.resolve_config("configs/lpn/pnp.py:quick")         # run from the repository root
    task = fx.build_task(fx.member_config(config, fx.expand_sweep(config)[0]))
    assert task.baselines["deblur_tikhonov_psnr"] > task.baselines["deblur_measured_psnr"]
    hp = {"seed": jnp.asarray(0), "optim.lr": jnp.asarray(1e-3, jnp.float32)}
    metrics = jax.jit(task.evaluate)(task.init(hp, jax.random.PRNGKey(0)), hp)
    assert metrics["deblur_pnp_accel_converged"] > 0.5           # PnP-ADMM solved by fpx.fixed_point
    ```
    """

    constraints = {
        **_LPNTask.constraints,
        "data.split_seed": (lambda v: isinstance(v, int) and v >= 0, "a non-negative integer"),
        "data.num_val": POSITIVE_INT,
        "data.num_test": POSITIVE_INT,
        "pnp.blur_sigma": POSITIVE,
        "pnp.blur_width": (lambda v: isinstance(v, int) and v >= 1 and v % 2 == 1, "an odd positive integer"),
        "pnp.blur_noise": POSITIVE,
        "pnp.keep": UNIT_OPEN,
        "pnp.inpaint_noise": POSITIVE,
        "pnp.max_steps": POSITIVE_INT,
        "pnp.tv_steps": POSITIVE_INT,
        "pnp.weight_factors": _list_of(lambda v: v > 0),
        "pnp.tikhonov_weights": _list_of(lambda v: v > 0),
        "pnp.tv_weights": _list_of(lambda v: v > 0),
    }
    dim = 64
    PROBLEMS = ("deblur", "inpaint")

    def __init__(self, config):
        super().__init__(config)
        d, p = config.data, config.pnp
        x_train, _, x_test, _ = digits(seed=d.split_seed, standardize=False)
        self.x_train = jnp.asarray(x_train / 16.0, self.dtype)
        if d.batch_size > self.x_train.shape[0]:
            raise ConfigError(f"'data.batch_size' ({d.batch_size}) exceeds the {self.x_train.shape[0]} training images.")
        if d.num_val + d.num_test > x_test.shape[0]:
            raise ConfigError(
                f"'data.num_val' + 'data.num_test' ({d.num_val} + {d.num_test}) exceeds the {x_test.shape[0]} test-split "
                "images; lower them."
            )
        images = x_test[: d.num_val + d.num_test].astype(np.float64) / 16.0
        n = images.shape[0]
        self.val, self.test = slice(0, d.num_val), slice(d.num_val, n)
        rng = np.random.default_rng(20240510)
        blur = _gaussian_blur_matrix(8, p.blur_sigma, p.blur_width)
        masks = (rng.random((n, 64)) < p.keep).astype(np.float64)
        self.sigma = {"deblur": p.blur_noise, "inpaint": p.inpaint_noise}
        deblur_y = images @ blur.T + p.blur_noise * rng.standard_normal((n, 64))
        inpaint_y = masks * (images + p.inpaint_noise * rng.standard_normal((n, 64)))
        self.problems = {
            "deblur": _Problem(np.broadcast_to(blur, (n, 64, 64)), deblur_y, shared=True),
            "inpaint": _Problem(masks[:, :, None] * np.eye(64)[None], inpaint_y, shared=False),
        }
        self.images = images
        self.noisy = images + d.noise * rng.standard_normal(images.shape)
        self.baselines = self._baselines()
        self.picard = Picard(rtol=self.solver.rtol, atol=self.solver.atol)

    def _baselines(self) -> dict:
        """Tikhonov and TV on every problem: the weight by validation PSNR, the test PSNR at it."""
        p = self.config.pnp
        grad = _gradient_matrix(8)
        clean = self.images
        out = {"noisy_psnr": float(np.mean(_psnr(self.noisy[self.test], clean[self.test])))}
        for name, problem in self.problems.items():
            out[f"{name}_measured_psnr"] = float(np.mean(_psnr(np.clip(problem.y[self.test], 0, 1), clean[self.test])))
            for method, weights in (("tikhonov", p.tikhonov_weights), ("tv", p.tv_weights)):
                if method == "tikhonov":
                    recs = [np.clip(_tikhonov(problem, lam, grad.T @ grad), 0, 1) for lam in weights]
                else:
                    recs = list(np.clip(_tv(problem, np.asarray(weights), p.tv_steps), 0, 1))
                i = int(np.argmax([np.mean(_psnr(r[self.val], clean[self.val])) for r in recs]))
                out[f"{name}_{method}_psnr"] = float(np.mean(_psnr(recs[i][self.test], clean[self.test])))
                out[f"{name}_{method}_weight"] = float(weights[i])
        return out

    def _batch(self, key):
        k1, k2 = jr.split(key)
        cfg = self.config.data
        x = self.x_train[jr.choice(k1, self.x_train.shape[0], (cfg.batch_size,), replace=False)]
        return x, x + cfg.noise * jr.normal(k2, x.shape, self.dtype)

    def evaluate(self, state, hp):
        cfg, p = self.config, self.config.pnp
        prox = self.prox(state["params"])
        dt = self.dtype
        clean = jnp.asarray(self.images, dt)
        nv = self.val.stop
        denoised = jax.vmap(prox)(jnp.asarray(self.noisy[self.test], dt))
        out = {k: jnp.asarray(v, dt) for k, v in self.baselines.items()}
        out["denoise_psnr"] = jnp.mean(_psnr(jnp.clip(denoised, 0, 1), clean[self.test]))
        names = list(self.problems)
        q = jnp.asarray(np.stack([self.problems[k].q for k in names]), dt)            # (P, 64, 64)
        lam = jnp.asarray(np.stack([self.problems[k].lam for k in names]), dt)        # (P, n, 64)
        aty = jnp.asarray(np.stack([self.problems[k].aty for k in names]), dt)        # (P, n, 64)
        base = jnp.asarray([(cfg.data.noise / self.sigma[k]) ** 2 for k in names], dt)
        factors = jnp.asarray(p.weight_factors, dt)

        def solve(q, lam, aty, w, solver):  # one problem, one weight, all images
            return jax.vmap(lambda lam, aty: _pnp_solve(prox, q, lam, aty, w, solver, p.max_steps))(lam, aty)

        # Every weight on every image with the accelerated solver: select by the validation images,
        # report the test images at the chosen weight; then Picard (plain ADMM) there.
        grid = jax.vmap(lambda q, lam, aty, b: jax.vmap(lambda f: solve(q, lam, aty, b * f, self.solver))(factors))
        rec, sol = grid(q, lam, aty, base)                                            # (P, W, n, ...)
        scores = _psnr(jnp.clip(rec, 0, 1), clean[None, None])                         # (P, W, n)
        best = jnp.argmax(jnp.mean(scores[:, :, :nv], axis=2), axis=1)                # (P,)
        take = lambda v: jnp.take_along_axis(v, best.reshape((-1,) + (1,) * (v.ndim - 1)), axis=1)[:, 0]  # noqa: E731
        accel = (take(scores)[:, nv:], take(sol.stats["num_steps"])[:, nv:], take(sol.converged)[:, nv:])
        rec_p, sol_p = jax.vmap(lambda q, lam, aty, w: solve(q, lam[nv:], aty[nv:], w, self.picard))(
            q, lam, aty, base * factors[best])
        picard = (_psnr(jnp.clip(rec_p, 0, 1), clean[None, nv:]), sol_p.stats["num_steps"], sol_p.converged)
        for j, name in enumerate(names):
            out[f"{name}_pnp_weight"] = factors[best[j]]
            for label, (score, steps, converged) in (("picard", picard), ("accel", accel)):
                steps = steps[j].astype(dt)
                out[f"{name}_pnp_{label}_psnr"] = jnp.mean(score[j])
                out[f"{name}_pnp_{label}_steps"] = jnp.mean(steps)
                out[f"{name}_pnp_{label}_max_steps"] = jnp.max(steps)
                out[f"{name}_pnp_{label}_converged"] = jnp.mean(converged[j].astype(dt))
        out.update(self._weight_metrics(state))
        return out


@register_task("lpn_pnp")
def build_lpn_pnp(config):
    return LPNPnP(config)


build_lpn_pnp.dynamic = LPNPnP.dynamic
build_lpn_pnp.constraints = LPNPnP.constraints
build_lpn_pnp.headline = ("eval/deblur_pnp_picard_psnr", "eval/deblur_pnp_accel_psnr", "eval/deblur_tv_psnr",
                          "eval/inpaint_pnp_picard_psnr", "eval/inpaint_pnp_accel_psnr", "eval/inpaint_tikhonov_psnr",
                          "eval/deblur_pnp_picard_steps", "eval/deblur_pnp_accel_steps", "eval/min_weight_ever")
