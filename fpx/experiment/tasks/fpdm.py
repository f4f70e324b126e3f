"""Fixed Point Diffusion Models (Bai & Melas-Kyriazi, CVPR 2024) on sklearn digits (task `fpdm`).

Data: sklearn's 8x8 digits (`fpx.data.digits(standardize=False)`, the stratified split of
seed `data.split_seed`), pixel values `0..16` mapped to `[-1, 1]` (`x / 8 - 1`).

Diffusion: DDPM's linear schedule rescaled to `diffusion.timesteps = T` steps,
`beta_t = linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)`, `abar_t = prod_{s <= t} (1 - beta_s)`
(`abar_0 = 1`, the data), epsilon-prediction loss `|eps(sqrt(abar_t) x0 + sqrt(1 - abar_t) n, t) - n|^2`
with `t ~ U{1..T}`.

Denoiser (the paper's architecture, scaled down): an explicit pre-layer embeds `(x_t, t)`
into the injection `u` (`model.explicit_layers` linear layers with SiLU between them, on
`[x_t, sin/cos(pi 2^k t / T)]`), one weight-tied block is solved as a fixed point,
`z* = g(z*, u) = tanh(W z* + u)`, and an explicit post-layer (as many layers) reads the
noise off `z*`. `|W|_2 <= model.gamma < 1` (spectral normalisation after every step, see
`_FPDM.rescale`), so the block is a contraction for every input: its fixed point exists, is
unique, and Picard converges. (The paper's block, a DiT block behind an MLP over `[z, u]`, is
unconstrained; solving to a tolerance needs the contraction here.)

Training: stochastic Jacobian-free backpropagation (S-JFB, the paper's section 3.2): per
batch, `n ~ U{model.no_grad_min..model.no_grad_max}` iterations of the block from the cold
start `z = 0` with every input under `lax.stop_gradient`, then `k ~ U{model.with_grad_min..
model.with_grad_max}` iterations that are backpropagated through (an unrolled loop of
`with_grad_max` steps, of which the first `with_grad_max - k` are the identity): the
gradient is that of `post(g_theta^k(z_n))` with `z_n` held fixed. Adam with warm-up and
cosine decay.

Sampling: deterministic DDIM (eta = 0, Song et al. 2021, eq. 12) on `sampling.steps`
timesteps evenly spaced in `1..T`; the final sample is clipped to `[-1, 1]`. At every timestep
the block is solved with `fpx.fixed_point` (`fpx.Picard` or `fpx.Anderson(memory=
sampling.anderson_memory)`, stopping at `|z - g(z)| <= sampling.atol + sampling.rtol |z|` or
after `max_steps` steps, each sample its own solve), from

- a *cold* start, `z0 = 0` (what training used), or
- a *warm* start: the previous timestep's fixed point (the paper's "solution reuse";
  at the first timestep both start from 0).

Evaluation (from `sampling.num_samples` fixed initial noises):

- `test_loss`: the epsilon loss on the test images (fixed `t` and noise) with the training
  forward at its largest iteration count; `block_lipschitz`: `|W|_2` by SVD.
- per solver `s` in `sampling.solvers` and start in `cold`, `warm`, solved to tolerance
  (`max_steps = sampling.max_steps`): `{s}_{start}_iters` (mean over samples of the
  fixed-point solver steps summed over all timesteps), `{s}_{start}_converged` (fraction of
  solves that converged), `{s}_{start}_fd`, `{s}_{start}_nn` (sample quality, below);
  `{s}_saving = 1 - warm_iters / cold_iters`; `{s}_warm_cold_dev`: max over samples and
  pixels of `|x_warm - x_cold|` (the same samples, up to the tolerance); and, with both
  solvers, `anderson_picard_dev`, the same between the cold Picard and Anderson samples.
- per budget `b` in `sampling.budgets` (at most `b` solver steps per timestep, stopping
  earlier at the tolerance) and solver in `sampling.budget_solvers`, both starts:
  `b{b}_{s}_{start}_fd`, `_nn`, `_iters`.
- references: `real_fd` (as many training digits as samples against the test digits),
  `real_nn` (the test digits' distance to the training digits) and `classifier_accuracy`.

Sample quality, two numbers (FID has no meaningful feature network on 8x8 images):

- `fd`: the Fréchet distance (FID's formula) between the logits of a digits classifier
  (sklearn `LogisticRegression` fitted on the training digits in `[-1, 1]`, 97 % test
  accuracy) on the samples and on the test digits: FID with the classifier as the feature
  network. It sees both fidelity and diversity (a sampler that draws one digit class too
  often moves the mean logit). An Inception-score-like `exp(E KL(p(y|x) || p(y)))` was tried
  first and rejected: a linear classifier is at least as confident on smeared off-manifold
  samples as on good ones, so it ranked the worst samples best.
- `nn`: the mean Euclidean distance from each sample to its nearest training digit (pixel
  scale `[-1, 1]`): fidelity in pixel space, blind to diversity and to memorisation (a
  copy of a training digit scores 0, below the test digits' `real_nn`).
"""

from __future__ import annotations

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from ... import solvers as fpx_solvers
from ..._fixed_point import fixed_point
from ...adjoint import JFBAdjoint
from ...data import digits
from ...feasibility import project_spectral_norm_ball
from .._config import NON_NEGATIVE, POSITIVE, POSITIVE_INT, UNIT_OPEN, ConfigError, one_of
from .._registry import build, register_task, set_learning_rate
from .._task import Task, config_dtype

SOLVERS = ("picard", "anderson")
STARTS = ("cold", "warm")
NON_NEGATIVE_INT = (lambda v: isinstance(v, int) and v >= 0, "a non-negative integer")


# ------------------------------------------------------------------ diffusion


def _schedule(timesteps: int, dtype) -> jnp.ndarray:
    """`abar_0 .. abar_T` of DDPM's linear schedule rescaled to `T` steps (`abar_0 = 1`; the
    betas are capped at 0.999, which only matters for `T < 21`)."""
    scale = 1000.0 / timesteps
    betas = np.minimum(np.linspace(1e-4 * scale, 0.02 * scale, timesteps, dtype=np.float64), 0.999)
    abar = np.concatenate([[1.0], np.cumprod(1.0 - betas)])
    return jnp.asarray(abar, dtype)


def _sampling_times(timesteps: int, steps: int) -> np.ndarray:
    """`steps` distinct timesteps in `1..T`, decreasing from `T`, followed by 0."""
    times = np.unique(np.round(np.linspace(1, timesteps, steps)).astype(np.int64))[::-1]
    return np.concatenate([times, [0]])


def _time_features(s, features: int, dtype):
    freqs = jnp.pi * 2.0 ** jnp.arange(features, dtype=dtype)
    return jnp.concatenate([jnp.sin(s * freqs), jnp.cos(s * freqs)])


# ------------------------------------------------------------------ model


class _FPDM(eqx.Module):
    pre: tuple[eqx.nn.Linear, ...]
    weight: jax.Array
    post: tuple[eqx.nn.Linear, ...]
    gamma: float = eqx.field(static=True)
    time_features: int = eqx.field(static=True)
    timesteps: int = eqx.field(static=True)

    def __init__(self, key, *, width, gamma, time_features, timesteps, explicit_layers=2, dim=64, dtype=jnp.float32):
        k_pre, k_w, k_post = jr.split(key, 3)
        sizes = [dim + 2 * time_features] + [width] * explicit_layers
        keys = jr.split(k_pre, explicit_layers)
        self.pre = tuple(eqx.nn.Linear(m, n, key=k, dtype=dtype) for k, m, n in zip(keys, sizes[:-1], sizes[1:]))
        w = jr.normal(k_w, (width, width), dtype) / math.sqrt(width)
        self.weight = project_spectral_norm_ball(w, gamma)
        sizes = [width] * explicit_layers + [dim]
        keys = jr.split(k_post, explicit_layers)
        post = [eqx.nn.Linear(m, n, key=k, dtype=dtype) for k, m, n in zip(keys, sizes[:-1], sizes[1:])]
        post[-1] = eqx.tree_at(lambda l: l.weight, post[-1], post[-1].weight * 0.1)
        self.post = tuple(post)
        self.gamma, self.time_features, self.timesteps = gamma, time_features, timesteps

    def embed(self, x, t):
        """The explicit pre-layer: the injection `u` of one image `x` `[64]` at timestep `t`."""
        s = jnp.asarray(t, x.dtype) / self.timesteps
        h = jnp.concatenate([x, _time_features(s, self.time_features, x.dtype)])
        for layer in self.pre[:-1]:
            h = jax.nn.silu(layer(h))
        return self.pre[-1](h)

    def block(self, z, u):
        """The weight-tied fixed-point block `g(z, u) = tanh(W z + u)`, a `gamma`-contraction in `z`."""
        return jnp.tanh(self.weight @ z + u)

    def head(self, z):
        """The explicit post-layer: predicted noise from the fixed point."""
        for layer in self.post[:-1]:
            z = jax.nn.silu(layer(z))
        return self.post[-1](z)

    def rescale(self, u, iterations: int = 2):
        """`(model, u)`: `W` scaled by `min(1, gamma / sigma)`, `sigma` its largest singular value
        estimated by `iterations` power iterations from the persistent left vector `u`
        (spectral normalisation, Miyato et al. 2018). An SVD per step would cost more than
        the training step itself; the estimate is checked against the SVD at every evaluation
        (`block_lipschitz`)."""
        w = self.weight
        for _ in range(iterations):
            v = w.T @ u
            v = v / jnp.linalg.norm(v)
            u = w @ v
            u = u / jnp.linalg.norm(u)
        sigma = u @ (w @ v)
        scaled = w * jnp.minimum(1.0, self.gamma / sigma)
        return eqx.tree_at(lambda m: m.weight, self, scaled), u


def _sjfb_state(model, u, n_no_grad, k_with_grad, with_grad_max):
    """The S-JFB forward of one image: `n_no_grad` block iterations from 0 outside the
    gradient, then `k_with_grad` (<= `with_grad_max`) iterations inside it."""
    frozen = jax.lax.stop_gradient((model.weight, u))

    def no_grad(_, z):
        return jnp.tanh(frozen[0] @ z + frozen[1])

    z = jax.lax.fori_loop(0, n_no_grad, no_grad, jnp.zeros_like(u))
    z = jax.lax.stop_gradient(z)

    def with_grad(z, i):
        return jnp.where(i >= with_grad_max - k_with_grad, model.block(z, u), z), None

    z, _ = jax.lax.scan(with_grad, z, jnp.arange(with_grad_max))
    return z


def _solver(name: str, rtol: float, atol: float, memory: int):
    if name == "picard":
        return fpx_solvers.Picard(rtol=rtol, atol=atol)
    return fpx_solvers.Anderson(memory=memory, rtol=rtol, atol=atol)


def _solve(model, u, z0, solver, max_steps):
    sol = fixed_point(model.block, z0, u, solver=solver, adjoint=JFBAdjoint(), max_steps=max_steps, throw=False)
    return sol.value, sol.stats["num_steps"], sol.converged


def _ddim_sample(model, noise, abar, times, solver, max_steps: int, warm):
    """Deterministic DDIM from `noise` `[64]` along `times` (decreasing, ending at 0), solving
    the fixed-point block at each timestep from 0 (`warm` False) or from the previous
    timestep's fixed point (`warm` True; may be traced). Returns `(x0, steps, converged)`
    with the per-timestep solver steps and convergence flags."""
    times = jnp.asarray(times)

    def step(carry, pair):
        x, z_prev = carry
        t, t_next = pair
        u = model.embed(x, t)
        z0 = jnp.where(warm, z_prev, jnp.zeros_like(z_prev))
        z, num_steps, converged = _solve(model, u, z0, solver, max_steps)
        eps = model.head(z)
        a, a_next = abar[t], abar[t_next]
        x0 = (x - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
        x_next = jnp.sqrt(a_next) * x0 + jnp.sqrt(1 - a_next) * eps
        return (x_next, z), (num_steps, converged)

    width = model.weight.shape[0]
    (x, _), (steps, converged) = jax.lax.scan(step, (noise, jnp.zeros((width,), noise.dtype)), (times[:-1], times[1:]))
    return jnp.clip(x, -1.0, 1.0), steps, converged


# ------------------------------------------------------------------ scores


def _digits_pm1(split_seed: int):
    """`(x_train, y_train, x_test, y_test)` of `fpx.data.digits` with pixels mapped to `[-1, 1]`."""
    x_train, y_train, x_test, y_test = digits(seed=split_seed, standardize=False)
    return x_train / 8.0 - 1.0, y_train, x_test / 8.0 - 1.0, y_test


@functools.lru_cache(maxsize=4)
def _fit_classifier(split_seed: int):
    """`(weight [10, 64], bias [10], test accuracy)` of a logistic regression fitted on the
    training digits of split `split_seed` in `[-1, 1]` (cached: deterministic, ~1 s)."""
    from sklearn.linear_model import LogisticRegression

    x_train, y_train, x_test, y_test = _digits_pm1(split_seed)
    clf = LogisticRegression(max_iter=5000, C=1.0).fit(x_train.astype(np.float64), y_train)
    return clf.coef_, clf.intercept_, float(clf.score(x_test.astype(np.float64), y_test))


def _frechet_distance(a, b):
    """Fréchet distance between Gaussians fitted to the rows of `a` and of `b`:
    `|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2)` (FID's formula)."""
    mu_a, mu_b = jnp.mean(a, 0), jnp.mean(b, 0)
    c_a, c_b = jnp.cov(a, rowvar=False), jnp.cov(b, rowvar=False)
    w, v = jnp.linalg.eigh(c_a)
    root = (v * jnp.sqrt(jnp.maximum(w, 0.0))[None, :]) @ v.T
    lam = jnp.linalg.eigvalsh(root @ c_b @ root)
    return jnp.sum(jnp.square(mu_a - mu_b)) + jnp.trace(c_a) + jnp.trace(c_b) - 2 * jnp.sum(jnp.sqrt(jnp.maximum(lam, 0.0)))


def _classifier_fd(images, reference, weight, bias):
    """`frechet_distance` of the logits `W x + b` of a digits classifier: FID with the
    classifier as the feature network."""
    return _frechet_distance(images @ weight.T + bias[None, :], reference @ weight.T + bias[None, :])


def _nearest_distance(points, reference):
    """Mean over `points` of the Euclidean distance to the nearest row of `reference`."""
    d2 = jnp.sum(points**2, 1)[:, None] + jnp.sum(reference**2, 1)[None, :] - 2 * points @ reference.T
    return jnp.mean(jnp.sqrt(jnp.maximum(jnp.min(d2, axis=1), 0.0)))


# ------------------------------------------------------------------ task


def _int_list(v):
    return isinstance(v, (list, tuple)) and all(isinstance(b, int) and b >= 1 for b in v)


def _solver_list(v):
    return isinstance(v, (list, tuple)) and 0 < len(v) == len(set(v)) and all(name in SOLVERS for name in v)


class FPDM(Task):
    """The `fpdm` task: S-JFB training of the fixed-point denoiser, DDIM sampling evaluations
    (see the module docstring for every metric).

    ```python
    import jax.random as jr
    import fpx.experiment as fx
    config = fx.resolve_config("configs/fpdm/digits.py:quick")   # from the repository root
    task = fx.build_task(fx.member_config(config, fx.expand_sweep(config)[0]))
    state = task.init({"seed": 0}, jr.PRNGKey(0))
    state, metrics = task.train_step(state, {"seed": 0}, jr.PRNGKey(1))
    assert metrics["loss"] > 0 and 0 <= metrics["iterations"] <= 13   # n no-grad + k with-grad
    ```
    """

    dynamic = ("seed",)
    constraints = {
        "data.batch_size": POSITIVE_INT,
        "data.split_seed": NON_NEGATIVE_INT,
        "diffusion.timesteps": POSITIVE_INT,
        "model.width": POSITIVE_INT,
        "model.gamma": UNIT_OPEN,
        "model.time_features": POSITIVE_INT,
        "model.explicit_layers": POSITIVE_INT,
        "model.no_grad_min": NON_NEGATIVE_INT,
        "model.no_grad_max": NON_NEGATIVE_INT,
        "model.with_grad_min": POSITIVE_INT,
        "model.with_grad_max": POSITIVE_INT,
        "optim.lr": POSITIVE,
        "optim.weight_decay": NON_NEGATIVE,
        "train.warmup_steps": NON_NEGATIVE_INT,
        "sampling.num_samples": POSITIVE_INT,
        "sampling.steps": POSITIVE_INT,
        "sampling.rtol": NON_NEGATIVE,
        "sampling.atol": NON_NEGATIVE,
        "sampling.max_steps": POSITIVE_INT,
        "sampling.anderson_memory": POSITIVE_INT,
        "sampling.budgets": (_int_list, "a list of positive integers"),
        "sampling.solvers": (_solver_list, "a non-empty list of distinct names from 'picard', 'anderson'"),
        "sampling.budget_solvers": (_solver_list, "a non-empty list of distinct names from 'picard', 'anderson'"),
        "dtype": one_of("float32", "float64"),
    }

    def __init__(self, config):
        self.config = config
        self.dtype = config_dtype(config.dtype)
        m, s = config.model, config.sampling
        if m.no_grad_min > m.no_grad_max:
            raise ConfigError(f"'model.no_grad_min' ({m.no_grad_min}) exceeds 'model.no_grad_max' ({m.no_grad_max}); "
                              "lower the first or raise the second.")
        if m.with_grad_min > m.with_grad_max:
            raise ConfigError(f"'model.with_grad_min' ({m.with_grad_min}) exceeds 'model.with_grad_max' "
                              f"({m.with_grad_max}); lower the first or raise the second.")
        if s.steps > config.diffusion.timesteps:
            raise ConfigError(f"'sampling.steps' ({s.steps}) exceeds 'diffusion.timesteps' "
                              f"({config.diffusion.timesteps}); DDIM samples on a subset of the training timesteps.")
        if s.rtol == 0 and s.atol == 0:
            raise ConfigError("'sampling.rtol' and 'sampling.atol' are both 0: a solve could never stop at the "
                              "tolerance; set one of them positive.")
        x_train, _, x_test, _ = _digits_pm1(config.data.split_seed)
        self.x_train = jnp.asarray(x_train, self.dtype)
        self.x_test = jnp.asarray(x_test, self.dtype)
        if config.data.batch_size > self.x_train.shape[0]:
            raise ConfigError(f"'data.batch_size' ({config.data.batch_size}) exceeds the {self.x_train.shape[0]} "
                              "training images; batches are drawn without replacement.")
        weight, bias, accuracy = _fit_classifier(config.data.split_seed)
        self.clf_weight, self.clf_bias = jnp.asarray(weight, self.dtype), jnp.asarray(bias, self.dtype)
        self.classifier_accuracy = accuracy
        self.abar = _schedule(config.diffusion.timesteps, self.dtype)
        self.times = _sampling_times(config.diffusion.timesteps, s.steps)
        # Fixed evaluation noise (numpy: no eager JAX computations to compile at build time).
        rng = np.random.default_rng(1234)
        n = x_test.shape[0]
        self.test_t = jnp.asarray(rng.integers(1, config.diffusion.timesteps + 1, n), jnp.int32)
        self.test_z = jnp.asarray(rng.standard_normal(x_test.shape), self.dtype)
        self.noises = jnp.asarray(rng.standard_normal((s.num_samples, 64)), self.dtype)
        # As many training digits as samples: the real-data level of the classifier FD.
        self.real_train = self.x_train[np.sort(rng.choice(x_train.shape[0], min(s.num_samples, x_train.shape[0]), replace=False))]
        self.optimizer = build("optim", config.optim.to_dict())

    # -------------------------------------------------------------- pieces
    def model(self, key):
        m = self.config.model
        return _FPDM(key, width=m.width, gamma=m.gamma, time_features=m.time_features, explicit_layers=m.explicit_layers,
                     timesteps=self.config.diffusion.timesteps, dtype=self.dtype)

    def noisy(self, x0, t, noise):
        a = self.abar[t][:, None]
        return jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise

    def eps_deepest(self, model, x, t):
        """The training-time denoiser at its largest iteration count (`no_grad_max + with_grad_max`
        iterations from 0): what `test_loss` evaluates."""
        m = self.config.model
        return model.head(_sjfb_state(model, model.embed(x, t), m.no_grad_max, m.with_grad_max, m.with_grad_max))

    def sample(self, model, solver: str, max_steps: int):
        """Cold- and warm-started DDIM samples from the same noises, in one vmapped program:
        `(x, steps, converged)`, each with a leading axis of 2 (cold, warm)."""
        s = self.config.sampling
        solver = _solver(solver, s.rtol, s.atol, s.anderson_memory)
        n = self.noises.shape[0]
        noises = jnp.concatenate([self.noises, self.noises])
        warm = jnp.arange(2 * n) >= n
        out = jax.vmap(lambda x, w: _ddim_sample(model, x, self.abar, self.times, solver, max_steps, w))(noises, warm)
        return jax.tree_util.tree_map(lambda a: a.reshape(2, n, *a.shape[1:]), out)

    def quality(self, images):
        """`(fd, nn)`: the classifier Fréchet distance to the test digits and the mean distance
        to the nearest training digit."""
        return _classifier_fd(images, self.x_test, self.clf_weight, self.clf_bias), _nearest_distance(images, self.x_train)

    def _lr(self, step):
        cfg = self.config
        lr, warm, total = cfg.optim.lr, cfg.train.warmup_steps, cfg.train.steps
        s = step.astype(self.dtype)
        ramp = jnp.minimum(1.0, (s + 1) / max(warm, 1))
        cosine = 0.05 + 0.95 * 0.5 * (1 + jnp.cos(jnp.pi * jnp.clip(s - warm, 0, None) / max(total - warm, 1)))
        return lr * jnp.where(s < warm, ramp, cosine)

    # -------------------------------------------------------------- task
    def init(self, hp, key):
        model = self.model(key)
        params = eqx.filter(model, eqx.is_inexact_array)
        u = jr.normal(jr.fold_in(key, 1), (self.config.model.width,), self.dtype)
        model, u = model.rescale(u / jnp.linalg.norm(u), iterations=20)
        return {"model": model, "opt_state": self.optimizer.init(params), "step": jnp.zeros((), jnp.int32), "u": u}

    def train_step(self, state, hp, key):
        cfg = self.config
        m = cfg.model
        k_b, k_t, k_z, k_n, k_k = jr.split(key, 5)
        bs = cfg.data.batch_size
        x0 = self.x_train[jr.randint(k_b, (bs,), 0, self.x_train.shape[0])]
        t = jr.randint(k_t, (bs,), 1, cfg.diffusion.timesteps + 1)
        noise = jr.normal(k_z, x0.shape, self.dtype)
        xt = self.noisy(x0, t, noise)
        n_no_grad = jr.randint(k_n, (), m.no_grad_min, m.no_grad_max + 1)
        k_with_grad = jr.randint(k_k, (), m.with_grad_min, m.with_grad_max + 1)
        model = state["model"]
        dynamic, static = eqx.partition(model, eqx.is_inexact_array)

        def loss_fn(dynamic):
            mdl = eqx.combine(dynamic, static)

            def one(x, t):
                z = _sjfb_state(mdl, mdl.embed(x, t), n_no_grad, k_with_grad, m.with_grad_max)
                return mdl.head(z)

            return jnp.mean(jnp.square(jax.vmap(one)(xt, t) - noise))

        loss, grads = jax.value_and_grad(loss_fn)(dynamic)
        opt_state = set_learning_rate(state["opt_state"], self._lr(state["step"]))
        updates, opt_state = self.optimizer.update(grads, opt_state, dynamic)
        model, u = eqx.apply_updates(model, updates).rescale(state["u"])
        metrics = {"loss": loss, "iterations": (n_no_grad + k_with_grad).astype(self.dtype)}
        return {"model": model, "opt_state": opt_state, "step": state["step"] + 1, "u": u}, metrics

    def evaluate(self, state, hp):
        s = self.config.sampling
        model = state["model"]
        out = {}
        eps = jax.vmap(lambda x, t: self.eps_deepest(model, x, t))(self.noisy(self.x_test, self.test_t, self.test_z), self.test_t)
        out["test_loss"] = jnp.mean(jnp.square(eps - self.test_z))
        out["block_lipschitz"] = jnp.linalg.norm(model.weight, 2)  # |W|_2 by SVD: <= gamma (up to the estimate)
        cold_samples = {}
        for solver in s.solvers:
            # cold and warm in one vmapped program (the start is a traced flag)
            x, steps, conv = self.sample(model, solver, s.max_steps)
            iters = jnp.mean(jnp.sum(steps, axis=-1).astype(self.dtype), axis=-1)
            for i, start in enumerate(STARTS):
                fd, nn = self.quality(x[i])
                out[f"{solver}_{start}_iters"] = iters[i]
                out[f"{solver}_{start}_converged"] = jnp.mean(conv[i].astype(self.dtype))
                out[f"{solver}_{start}_fd"] = fd
                out[f"{solver}_{start}_nn"] = nn
            out[f"{solver}_saving"] = 1.0 - iters[1] / iters[0]
            out[f"{solver}_warm_cold_dev"] = jnp.max(jnp.abs(x[1] - x[0]))
            cold_samples[solver] = x[0]
        if len(cold_samples) == 2:
            out["anderson_picard_dev"] = jnp.max(jnp.abs(cold_samples["anderson"] - cold_samples["picard"]))
        for b in s.budgets:
            for solver in s.budget_solvers:
                x, steps, _ = self.sample(model, solver, b)
                iters = jnp.mean(jnp.sum(steps, axis=-1).astype(self.dtype), axis=-1)
                for i, start in enumerate(STARTS):
                    fd, nn = self.quality(x[i])
                    out[f"b{b}_{solver}_{start}_fd"] = fd
                    out[f"b{b}_{solver}_{start}_nn"] = nn
                    out[f"b{b}_{solver}_{start}_iters"] = iters[i]
        out["real_fd"] = _classifier_fd(self.real_train, self.x_test, self.clf_weight, self.clf_bias)
        out["real_nn"] = _nearest_distance(self.x_test, self.x_train)
        out["classifier_accuracy"] = jnp.asarray(self.classifier_accuracy, self.dtype)
        return out


@register_task("fpdm")
def build_fpdm(config):
    """The `fpdm` task of `config` (see `FPDM`)."""
    return FPDM(config)


build_fpdm.dynamic = FPDM.dynamic
build_fpdm.constraints = FPDM.constraints
build_fpdm.headline = ("eval/test_loss", "eval/picard_saving", "eval/anderson_saving",
                       "eval/picard_warm_fd", "eval/picard_warm_nn")
