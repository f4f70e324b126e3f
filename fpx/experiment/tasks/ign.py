"""Idempotent generative network (Shocher et al., ICLR 2024) on two moons: task `ign`.

A network `f: R^d -> R^d` is trained so that data are its fixed points (`f(x) = x`), noise
lands on them in one step (`f(f(z)) = f(z)`), and the set of fixed points is no larger than
the data (tightness). With `D` the distance `loss.distance` (`"l1"`: mean absolute
difference, the default; `"mse"`: mean squared difference, as in the paper's Source Code 1)
and `theta'` a frozen copy of the parameters (`jax.lax.stop_gradient`), the losses of one
batch `x ~ data`, `z ~ N(0, I)` are, as the paper defines them (its optimisation section and
Source Code 1; see experiments/ign/README.md):

- `L_rec   = D(f_theta(x), x)`
- `L_idem  = D(f_theta'(f_theta(z)), f_theta(z))`: the gradient flows through the inner
  application only (it moves `f(z)` onto the current fixed-point set);
- `L_tight = -D(f_theta(f_theta'(z)), f_theta'(z))`: the gradient flows through the outer
  application only (it shrinks the fixed-point set away from `f(z)`);
- smooth clamp (the paper's tanh clamp): `L_tight <- tanh(L_tight / (a L_rec)) a L_rec`,
  `a = loss.tight_clamp` (`0` switches it off), so the negative term is bounded by
  `a L_rec`;
- `L = lambda_rec L_rec + lambda_idem L_idem + lambda_tight L_tight`, minimised by Adam
  (`optim`), with `train.cosine_decay` decaying the learning rate to 5 % over training.

`loss.tight_grad = "frozen_outer"` puts the frozen copy in the wrong place (the outer
application, `-D(f_theta'(f_theta'(z)), f_theta'(z))`): the tightness term's gradient is
then exactly zero and only the clamp's `L_rec` factor is left (the failure this experiment
tests for).

Model: an MLP `d -> width (x depth) -> d` (`model.activation`). Data: two moons
(`sklearn.datasets.make_moons`, generated, `data.noise`), `data.num_train` training and
`data.num_test` held-out points, standardised with the training mean and sd.

Evaluation on `eval.num_samples` fixed noises `z` and the held-out data `x`:

- `idem_error`: `E |f(f(z)) - f(z)|` (Euclidean norm per sample); `rec_error`: `E |f(x) - x|`;
- `energy_fz`: the energy distance between `f(z)` and the held-out data (`_energy_distance`,
  scipy's convention); `energy_z` (the noise itself) and `energy_floor` (as many training
  points: what a perfect generator would reach) for scale;
- `nn_fz`: `E_z min_x |f(z) - x|` (how far samples lie from the data: precision) and
  `nn_data`: `E_x min_z |x - f(z)|` (how well the samples cover the data: recall), with
  `nn_floor` (training points against the held-out ones) for scale;
- `rel_change_k{k}` for `k = 1..eval.iterations`: `E |f^{k+1}(z) - f^k(z)| / E |f^k(z)|`
  (zero for an idempotent `f` at every `k`), and `energy_fK`, the energy distance of
  `f^K(z)` with `K = eval.iterations + 1`;
- `fpx.fixed_point` iterates `f` from `z` (the `solver` section, `max_steps`): `fp_steps`
  (mean steps; 1 means `f(z)` already is a fixed point to the solver's tolerance),
  `fp_converged` (fraction of successful solves), `fp_dist` (`E |z* - f(z)|`),
  `energy_fp` (energy distance of the fixed points `z*` to the data);
- `tight_grad_norm`, `idem_grad_norm`, `rec_grad_norm`: the norms of the parameter
  gradients of the three raw loss terms on a fixed batch (the tightness one is zero when
  the frozen copy sits in the wrong place).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

from ..._fixed_point import fixed_point
from .._config import NON_NEGATIVE, POSITIVE, POSITIVE_INT, ConfigError, one_of
from .._registry import build, register_task, set_learning_rate
from .._task import Task, config_dtype

_ACTIVATIONS = {"silu": jax.nn.silu, "relu": jax.nn.relu, "leaky_relu": lambda h: jax.nn.leaky_relu(h, 0.2), "tanh": jnp.tanh}
_DISTANCES = ("l1", "mse")
_PLACEMENTS = ("outer", "frozen_outer")


# ----------------------------------------------------------------------------- pieces
def _moons(n: int, noise: float, seed: int) -> np.ndarray:
    from sklearn.datasets import make_moons

    x, _ = make_moons(n_samples=n, noise=noise, random_state=seed)
    return x


def _init_mlp(key, dim: int, width: int, depth: int, dtype):
    sizes = [dim] + [width] * depth + [dim]
    keys = jr.split(key, len(sizes) - 1)
    return [
        {"w": (jr.normal(k, (m, n)) / math.sqrt(m)).astype(dtype), "b": jnp.zeros((n,), dtype)}
        for k, (m, n) in zip(keys, zip(sizes[:-1], sizes[1:]))
    ]


def _apply(params, y, activation: str = "silu"):
    """`f(y)` for a batch `y` `[n, d]` (or one point `[d]`)."""
    act = _ACTIVATIONS[activation]
    lead = (1,) * (y.ndim - 1)
    h = y
    for layer in params[:-1]:
        h = act(h @ layer["w"] + layer["b"].reshape(lead + layer["b"].shape))
    return h @ params[-1]["w"] + params[-1]["b"].reshape(lead + params[-1]["b"].shape)


def _distance(a, b, kind: str):
    """`D(a, b)`: the mean over samples and coordinates of `|a - b|` (`"l1"`) or `(a - b)^2` (`"mse"`)."""
    if kind == "l1":
        return jnp.mean(jnp.abs(a - b))
    if kind == "mse":
        return jnp.mean(jnp.square(a - b))
    raise ValueError(f"distance {kind!r}: choose one of {', '.join(_DISTANCES)}.")


def _ign_terms(params, x, z, f, *, distance: str = "l1", tight_grad: str = "outer", tight_clamp: float = 1.5):
    """The paper's loss terms for one batch: `{"rec", "idem", "tight_raw", "tight"}`.

    `f(params, y)` is the network; the frozen copy `theta'` is `stop_gradient(params)`.
    `tight_raw = -D(f_theta(f_theta'(z)), f_theta'(z))` (gradient through the outer
    application; `tight_grad="frozen_outer"` freezes the outer one as well, which makes
    its gradient zero); `tight` is `tight_raw` after the tanh clamp with ratio
    `tight_clamp` (`0`: no clamp).
    """
    if tight_grad not in _PLACEMENTS:
        raise ValueError(f"tight_grad {tight_grad!r}: choose one of {', '.join(_PLACEMENTS)}.")
    frozen = jax.lax.stop_gradient(params)
    fx = f(params, x)
    fz = f(params, z)
    fz_frozen = jax.lax.stop_gradient(fz)  # = f_theta'(z)
    rec = _distance(fx, x, distance)
    idem = _distance(f(frozen, fz), fz, distance)
    outer = params if tight_grad == "outer" else frozen
    tight_raw = -_distance(f(outer, fz_frozen), fz_frozen, distance)
    if tight_clamp > 0:
        scale = tight_clamp * rec
        tight = jnp.tanh(tight_raw / scale) * scale
    else:
        tight = tight_raw
    return {"rec": rec, "idem": idem, "tight_raw": tight_raw, "tight": tight}


def _pairwise_mean_distance(a, b, batch_size: int = 256):
    """`mean_{i,j} |a_i - b_j|` (Euclidean), one row of `a` at a time (exact zeros for equal points)."""

    def row(ai):
        return jnp.mean(jnp.sqrt(jnp.sum(jnp.square(b - ai[None, :]), axis=1)))

    return jnp.mean(jax.lax.map(row, a, batch_size=min(batch_size, a.shape[0])))


def _nearest_distance(a, b, batch_size: int = 256):
    """`mean_i min_j |a_i - b_j|` (Euclidean): how far the rows of `a` lie from the point set `b`."""

    def row(ai):
        return jnp.sqrt(jnp.min(jnp.sum(jnp.square(b - ai[None, :]), axis=1)))

    return jnp.mean(jax.lax.map(row, a, batch_size=min(batch_size, a.shape[0])))


def _energy_distance(a, b, within_b=None):
    """The energy distance between the empirical distributions of the rows of `a` `[n, d]` and `b` `[m, d]`.

    `sqrt(2 E|X - Y| - E|X - X'| - E|Y - Y'|)`, all pairs included (the V-statistic, >= 0),
    the convention of `scipy.stats.energy_distance` (which is the 1-D case). Zero for
    identical samples; for one point each, `sqrt(2 |a - b|)`. `within_b`, if given, is
    `E|Y - Y'|` precomputed (`_pairwise_mean_distance(b, b)`), for many `a` against one `b`.

    ```python
    import jax.numpy as jnp, scipy.stats
    from fpx.experiment.tasks.ign import _energy_distance
    a, b = jnp.array([[0.0], [1.0], [3.0]]), jnp.array([[0.5], [2.0]])
    assert jnp.allclose(_energy_distance(a, b), scipy.stats.energy_distance([0, 1, 3], [0.5, 2]))
    assert _energy_distance(a, a) == 0.0
    ```
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"_energy_distance: a and b must be [n, d] and [m, d] with the same d, got {a.shape} and {b.shape}.")
    cross = _pairwise_mean_distance(a, b)
    within_b = _pairwise_mean_distance(b, b) if within_b is None else within_b
    within = _pairwise_mean_distance(a, a) + within_b
    return jnp.sqrt(jnp.maximum(2.0 * cross - within, 0.0))


def _mean_norm(v):
    return jnp.mean(jnp.sqrt(jnp.sum(jnp.square(v), axis=-1)))


def _tree_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(tree)))


# ----------------------------------------------------------------------------- task
class IGN(Task):
    dynamic = ("seed", "optim.lr")
    constraints = {
        "data.name": one_of("moons"),
        "data.noise": NON_NEGATIVE,
        "data.num_train": POSITIVE_INT,
        "data.num_test": POSITIVE_INT,
        "data.split_seed": (lambda v: isinstance(v, int) and v >= 0, "a non-negative integer"),
        "data.batch_size": POSITIVE_INT,
        "model.width": POSITIVE_INT,
        "model.depth": POSITIVE_INT,
        "model.activation": one_of(*_ACTIVATIONS),
        "loss.distance": one_of(*_DISTANCES),
        "loss.lambda_rec": NON_NEGATIVE,
        "loss.lambda_idem": NON_NEGATIVE,
        "loss.lambda_tight": NON_NEGATIVE,
        "loss.tight_clamp": NON_NEGATIVE,
        "loss.tight_grad": one_of(*_PLACEMENTS),
        "optim.lr": POSITIVE,
        "eval.num_samples": POSITIVE_INT,
        "eval.iterations": POSITIVE_INT,
        "eval.grad_batch": POSITIVE_INT,
        "max_steps": POSITIVE_INT,
        "dtype": one_of("float32", "float64"),
    }

    def __init__(self, config):
        self.config = config
        self.dtype = config_dtype(config.dtype)
        d = config.data
        x_train = _moons(d.num_train, d.noise, d.split_seed)
        x_test = _moons(d.num_test, d.noise, d.split_seed + 1)
        mean, sd = x_train.mean(0), x_train.std(0)
        self.x_train = jnp.asarray((x_train - mean) / sd, self.dtype)
        self.x_test = jnp.asarray((x_test - mean) / sd, self.dtype)
        self.dim = self.x_train.shape[1]
        if d.batch_size > d.num_train:
            raise ConfigError(
                f"'data.batch_size' ({d.batch_size}) exceeds 'data.num_train' ({d.num_train}); "
                "batches are drawn without replacement."
            )
        e = config.eval
        if e.grad_batch > d.num_train or e.grad_batch > e.num_samples:
            raise ConfigError(
                f"'eval.grad_batch' ({e.grad_batch}) must not exceed 'data.num_train' ({d.num_train}) "
                f"or 'eval.num_samples' ({e.num_samples})."
            )
        self.z_eval = jr.normal(jr.PRNGKey(1234), (e.num_samples, self.dim), self.dtype)
        floor_n = min(e.num_samples, d.num_train)
        self.within_test = float(_pairwise_mean_distance(self.x_test, self.x_test))
        self.energy_floor = float(_energy_distance(self.x_train[:floor_n], self.x_test, self.within_test))
        self.nn_floor = float(_nearest_distance(self.x_train[:floor_n], self.x_test))
        self.energy_z = float(_energy_distance(self.z_eval, self.x_test, self.within_test))
        self.solver = build("solver", config.solver.to_dict())
        self.optimizer = build("optim", config.optim.to_dict())

    def f(self, params, y):
        return _apply(params, y, self.config.model.activation)

    def terms(self, params, x, z, tight_grad=None):
        loss = self.config.loss
        return _ign_terms(
            params, x, z, self.f, distance=loss.distance,
            tight_grad=loss.tight_grad if tight_grad is None else tight_grad, tight_clamp=loss.tight_clamp,
        )

    def total(self, terms):
        loss = self.config.loss
        return loss.lambda_rec * terms["rec"] + loss.lambda_idem * terms["idem"] + loss.lambda_tight * terms["tight"]

    def init(self, hp, key):
        m = self.config.model
        params = _init_mlp(key, self.dim, m.width, m.depth, self.dtype)
        opt_state = set_learning_rate(self.optimizer.init(params), hp["optim.lr"])
        return {"params": params, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32)}

    def learning_rate(self, lr, step):
        """`lr`, or with `train.cosine_decay` its cosine decay to 5 % over `train.steps`."""
        if not self.config.train.cosine_decay:
            return lr
        s = jnp.minimum(step.astype(jnp.float32) / self.config.train.steps, 1.0)
        return lr * (0.05 + 0.95 * 0.5 * (1.0 + jnp.cos(jnp.pi * s)))

    def train_step(self, state, hp, key):
        k_x, k_z = jr.split(key)
        bs = self.config.data.batch_size
        x = self.x_train[jr.choice(k_x, self.x_train.shape[0], (bs,), replace=False)]
        z = jr.normal(k_z, x.shape, self.dtype)

        def loss_fn(params):
            terms = self.terms(params, x, z)
            return self.total(terms), terms

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        opt_state = set_learning_rate(state["opt_state"], self.learning_rate(hp["optim.lr"], state["step"]))
        updates, opt_state = self.optimizer.update(grads, opt_state, state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "rec": terms["rec"], "idem": terms["idem"], "tight": terms["tight"], "tight_raw": terms["tight_raw"]}
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    def iterates(self, params, z, k: int):
        """`[f(z), f(f(z)), ..., f^k(z)]` stacked on axis 0."""
        out, y = [], z
        for _ in range(k):
            y = self.f(params, y)
            out.append(y)
        return jnp.stack(out)

    def fixed_points(self, params, z):
        """`fpx.fixed_point` of `f` from each row of `z` (vmapped): the `Solution`."""
        fn = lambda y, p: self.f(p, y)  # noqa: E731
        solve = lambda z0: fixed_point(  # noqa: E731
            fn, z0, params, solver=self.solver, max_steps=self.config.max_steps, throw=False
        )
        return jax.vmap(solve)(z)

    def evaluate(self, state, hp):
        params = state["params"]
        e = self.config.eval
        z, x = self.z_eval, self.x_test
        energy = lambda a: _energy_distance(a, x, jnp.asarray(self.within_test, self.dtype))  # noqa: E731
        fk = self.iterates(params, z, e.iterations + 1)  # f^1 .. f^{K}
        fz = fk[0]
        norms = jax.vmap(_mean_norm)(fk)
        changes = jax.vmap(_mean_norm)(fk[1:] - fk[:-1])
        out = {
            "idem_error": changes[0],
            "rec_error": _mean_norm(self.f(params, x) - x),
            "energy_fz": energy(fz),
            "energy_fK": energy(fk[-1]),
            "nn_fz": _nearest_distance(fz, x),
            "nn_data": _nearest_distance(x, fz),
            "energy_z": jnp.asarray(self.energy_z, self.dtype),
            "energy_floor": jnp.asarray(self.energy_floor, self.dtype),
            "nn_floor": jnp.asarray(self.nn_floor, self.dtype),
        }
        for k in range(1, e.iterations + 1):
            out[f"rel_change_k{k}"] = changes[k - 1] / norms[k - 1]
        sol = self.fixed_points(params, z)
        out.update(
            fp_steps=jnp.mean(sol.stats["num_steps"].astype(self.dtype)),
            fp_converged=jnp.mean(sol.converged.astype(self.dtype)),
            fp_dist=_mean_norm(sol.value - fz),
            energy_fp=energy(sol.value),
        )
        n = e.grad_batch
        grads = jax.jacrev(lambda p: self.terms(p, self.x_train[:n], z[:n]))(params)
        out.update({f"{k}_grad_norm": _tree_norm(grads[k]) for k in ("rec", "idem", "tight_raw")})
        out["tight_grad_norm"] = out.pop("tight_raw_grad_norm")
        return out


@register_task("ign")
def build_ign(config):
    return IGN(config)


build_ign.dynamic = IGN.dynamic
build_ign.constraints = IGN.constraints
build_ign.headline = ("eval/idem_error", "eval/energy_fz", "eval/nn_fz", "eval/rec_error", "eval/fp_steps")
