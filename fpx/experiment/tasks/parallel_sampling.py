"""Parallel-in-time diffusion sampling (ParaDiGMS) with a denoiser trained on sklearn digits.

Data: sklearn's 8x8 digits (`fpx.data.digits(standardize=False)`, the stratified split of
seed `data.split_seed`), pixel values `0..16` mapped to `[-1, 1]` (`x / 8 - 1`).

Noise schedule (VP, continuous time `t` in `[0, 1]`, `t = 0` the noise end and `t = 1` the
data end, as `fpx.parallel` orders it): `alpha_bar(t) = exp(-(b0 s + (b1 - b0) s^2 / 2))`
with `s = 1 - t`, `b0 = 0.1`, `b1 = 20` (`alpha_bar(0) = 4.3e-5`, `alpha_bar(1) = 1`).

Denoiser: an MLP `eps(x, t)`: `[x, sin/cos(t * 2^k pi), k < model.time_features]` ->
`model.depth` hidden layers of `model.width` (SiLU) -> 64, trained with the standard
eps-prediction loss `|eps(sqrt(abar) x0 + sqrt(1 - abar) z, t) - z|^2` (mean over pixels),
`t ~ U(0, 1)`, Adam with warm-up and cosine decay.

Evaluation: the eps-loss on the test images (fixed `t` and noise); then, from
`sampling.num_samples` fixed initial noises, for every `T` in `sampling.steps` (uniform grid
of `T + 1` times on `[0, 1]`), every `tol` in `sampling.tols` and every `eta` in
`sampling.etas`: `fpx.parallel.ddim_sample` (T sequential denoiser evaluations) and
`fpx.parallel.picard_sample` (window `sampling.window`), vmapped over the samples. Metrics
per combination, named `T{T}_tol{tol}_eta{eta}_<metric>`:

- `max_dev`: max over samples and pixels of `|picard - ddim|` (pixel scale `[-1, 1]`);
- `rounds`: mean parallel rounds (sequential batched denoiser calls) per sample, and
  `max_rounds`; `speedup`: `T / rounds`;
- `evals`: mean total denoiser evaluations per sample (`num_fn_evals`), and
  `evals_ratio`: `evals / T` (the extra work Picard spends);
- `converged`: fraction of samples whose Picard solve succeeded.

Plus `nn_dist_samples` (mean distance of the `T = max(steps)` DDIM samples with `eta = 0` to
their nearest training image) and `nn_dist_test` (the same for as many test images): a
denoiser that learned the digits puts the first near the second.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import jax.random as jr
import optax

from ... import parallel as fpp
from ...data import digits
from .._config import NON_NEGATIVE, POSITIVE, POSITIVE_INT, ConfigError, one_of
from .._registry import build, register_task, set_learning_rate
from .._task import Task, config_dtype

B0, B1 = 0.1, 20.0


def alpha_bar(t):
    s = 1.0 - t
    return jnp.exp(-(B0 * s + 0.5 * (B1 - B0) * s * s))


def tag(value) -> str:
    """`1e-3 -> "0.001"`, `0.1 -> "0.1"`, `1.0 -> "1"` (for metric names)."""
    return f"{value:g}"


def init_params(key, *, width: int, depth: int, time_features: int, dim: int = 64, dtype=jnp.float32):
    sizes = [dim + 2 * time_features] + [width] * depth + [dim]
    keys = jr.split(key, len(sizes) - 1)
    layers = []
    for k, (m, n) in zip(keys, zip(sizes[:-1], sizes[1:])):
        layers.append({"w": (jr.normal(k, (m, n)) / math.sqrt(m)).astype(dtype), "b": jnp.zeros((n,), dtype)})
    layers[-1]["w"] = layers[-1]["w"] * 0.1
    return layers


def denoiser(params, x, t, time_features: int):
    """`eps(x, t)` for one image `x` `[64]` and a scalar time `t`."""
    freqs = jnp.pi * 2.0 ** jnp.arange(time_features, dtype=x.dtype)
    h = jnp.concatenate([x, jnp.sin(t * freqs), jnp.cos(t * freqs)])
    for layer in params[:-1]:
        h = jax.nn.silu(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]


def eps_loss(eps_fn, x0, t, z):
    """Mean over images and pixels of `|eps(x_t, t) - z|^2`."""
    abar = alpha_bar(t)[:, None]
    xt = jnp.sqrt(abar) * x0 + jnp.sqrt(1 - abar) * z
    return jnp.mean(jnp.square(jax.vmap(eps_fn)(xt, t) - z))


def compare_samplers(eps_fn, noises, T: int, *, window: int, tol: float, eta: float, key):
    """Picard vs DDIM from `noises` `[N, 64]` on the uniform grid of `T` steps: a dict of scalars."""
    ts = jnp.linspace(0.0, 1.0, T + 1, dtype=noises.dtype)
    keys = jr.split(key, noises.shape[0])
    kw = {"eta": eta}

    def one(x, k):
        k = k if eta > 0 else None
        ref = fpp.ddim_sample(eps_fn, x, ts, alpha_bar, key=k, **kw)
        sol = fpp.picard_sample(eps_fn, x, ts, alpha_bar, key=k, window=window, tol=tol, throw=False, **kw)
        return ref, sol.value, sol.stats["num_steps"], sol.stats["num_fn_evals"], sol.converged

    ref, par, rounds, evals, converged = jax.vmap(one)(noises, keys)
    rounds, evals = rounds.astype(jnp.float32), evals.astype(jnp.float32)
    return {
        "max_dev": jnp.max(jnp.abs(par - ref)),
        "rounds": jnp.mean(rounds),
        "max_rounds": jnp.max(rounds),
        "speedup": T / jnp.mean(rounds),
        "evals": jnp.mean(evals),
        "evals_ratio": jnp.mean(evals) / T,
        "converged": jnp.mean(converged.astype(jnp.float32)),
    }, ref


def nearest_distance(points, reference):
    """Mean over `points` of the Euclidean distance to the nearest row of `reference`."""
    d2 = jnp.sum(points**2, 1)[:, None] + jnp.sum(reference**2, 1)[None] - 2 * points @ reference.T
    return jnp.mean(jnp.sqrt(jnp.maximum(jnp.min(d2, axis=1), 0.0)))


class ParallelSampling(Task):
    dynamic = ("seed",)
    constraints = {
        "model.width": POSITIVE_INT,
        "model.depth": POSITIVE_INT,
        "model.time_features": POSITIVE_INT,
        "data.batch_size": POSITIVE_INT,
        "data.split_seed": (lambda v: isinstance(v, int) and v >= 0, "a non-negative integer"),
        "optim.lr": POSITIVE,
        "optim.weight_decay": NON_NEGATIVE,
        "train.warmup_steps": (lambda v: isinstance(v, int) and v >= 0, "a non-negative integer"),
        "sampling.num_samples": POSITIVE_INT,
        "sampling.window": POSITIVE_INT,
        "sampling.steps": (lambda v: len(v) > 0 and all(isinstance(s, int) and s >= 1 for s in v), "a list of positive integers"),
        "sampling.tols": (lambda v: len(v) > 0 and all(s >= 0 for s in v), "a list of non-negative numbers"),
        "sampling.etas": (lambda v: len(v) > 0 and all(0 <= s <= 1 for s in v), "a list of numbers in [0, 1]"),
        "dtype": one_of("float32", "float64"),
    }

    def __init__(self, config):
        self.config = config
        self.dtype = config_dtype(config.dtype)
        x_train, _, x_test, _ = digits(seed=config.data.split_seed, standardize=False)
        self.x_train = jnp.asarray(x_train / 8.0 - 1.0, self.dtype)
        self.x_test = jnp.asarray(x_test / 8.0 - 1.0, self.dtype)
        if config.data.batch_size > self.x_train.shape[0]:
            raise ConfigError(f"'data.batch_size' ({config.data.batch_size}) exceeds the {self.x_train.shape[0]} training images.")
        k_t, k_z, k_x, k_s = jr.split(jr.PRNGKey(1234), 4)
        n = self.x_test.shape[0]
        self.test_t = jr.uniform(k_t, (n,), self.dtype)
        self.test_z = jr.normal(k_z, self.x_test.shape, self.dtype)
        self.noises = jr.normal(k_x, (config.sampling.num_samples, 64), self.dtype)
        self.sample_key = k_s
        self.optimizer = build("optim", config.optim.to_dict())

    def eps_fn(self, params):
        tf = self.config.model.time_features
        return lambda x, t: denoiser(params, x, t, tf)

    def _lr(self, step):
        cfg = self.config
        lr, warm, total = cfg.optim.lr, cfg.train.warmup_steps, cfg.train.steps
        s = step.astype(jnp.float32)
        ramp = jnp.minimum(1.0, (s + 1) / max(warm, 1))
        cosine = 0.05 + 0.95 * 0.5 * (1 + jnp.cos(jnp.pi * jnp.clip(s - warm, 0, None) / max(total - warm, 1)))
        return lr * jnp.where(s < warm, ramp, cosine)

    def init(self, hp, key):
        m = self.config.model
        params = init_params(key, width=m.width, depth=m.depth, time_features=m.time_features, dtype=self.dtype)
        return {"params": params, "opt_state": self.optimizer.init(params), "step": jnp.zeros((), jnp.int32)}

    def train_step(self, state, hp, key):
        k_b, k_t, k_z = jr.split(key, 3)
        bs = self.config.data.batch_size
        x0 = self.x_train[jr.choice(k_b, self.x_train.shape[0], (bs,), replace=False)]
        t = jr.uniform(k_t, (bs,), self.dtype)
        z = jr.normal(k_z, x0.shape, self.dtype)
        loss, grads = jax.value_and_grad(lambda p: eps_loss(self.eps_fn(p), x0, t, z))(state["params"])
        opt_state = set_learning_rate(state["opt_state"], self._lr(state["step"]))
        updates, opt_state = self.optimizer.update(grads, opt_state, state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, {"loss": loss}

    def evaluate(self, state, hp):
        s = self.config.sampling
        eps_fn = self.eps_fn(state["params"])
        out = {"test_loss": eps_loss(eps_fn, self.x_test, self.test_t, self.test_z)}
        for T in s.steps:
            for tol in s.tols:
                for eta in s.etas:
                    figures, ref = compare_samplers(eps_fn, self.noises, T, window=s.window, tol=tol, eta=eta, key=self.sample_key)
                    out.update({f"T{T}_tol{tag(tol)}_eta{tag(eta)}_{k}": v for k, v in figures.items()})
                    if T == max(s.steps) and eta == 0 and tol == s.tols[0]:
                        out["nn_dist_samples"] = nearest_distance(ref, self.x_train)
        out["nn_dist_test"] = nearest_distance(self.x_test[: s.num_samples], self.x_train)
        return out


@register_task("parallel_sampling")
def build_parallel_sampling(config):
    return ParallelSampling(config)


build_parallel_sampling.dynamic = ParallelSampling.dynamic
build_parallel_sampling.constraints = ParallelSampling.constraints



# The default preset's grid (configs/parallel/parallel_sampling.py): T = 100, tol 0.1 and 1e-3, eta = 0.
build_parallel_sampling.headline = ("eval/test_loss",) + tuple(
    f"eval/T100_tol{t}_eta0_{k}" for t in ("0.1", "0.001") for k in ("max_dev", "rounds", "speedup")
)
