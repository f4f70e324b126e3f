"""Darcy flow with one weight-tied Fourier block applied k times (or solved as a DEQ).

Model (one sample, 2-D): `a` (mapped to {-1, +1}) and the grid coordinates are lifted
pointwise to `width` channels (`v`), zero-padded by `padding` nodes along both axes (the
FNO reference's treatment of the non-periodic domain), then

- `kind="iterate"`: `z <- relax * z + (1 - relax) * B(z, v)` applied `k` times from
  `z0 = v` (`fpx.operators.iterate(block, k, relax, injection=True)`), or
- `kind="deq"`: `z* = B(z*, v)` solved by `solver`, gradients by `adjoint`
  (`fpx.operators.deq`, implicit by default),

with `B(z, v) = gelu(K z + W z + b + v)` the `fpx.operators.FNOBlock` (spectral convolution
`K` on `modes` frequencies, pointwise `W, b`); the padding is cropped and a pointwise MLP
(`width -> projection_width -> 1`) projects to `u`. Every variant has the same parameters
(lift, one block, projection): only the number of applications of the block differs, and
`deq` is the `k -> infinity` limit (the fixed point does not depend on `relax`).

The block takes the lifted input at every application (input injection) so that the
iteration has a fixed point that depends on `a` (a plain `z <- B(z)` forgets its start when
it contracts) and so that `iterate` is exactly the unrolled `deq`. Starting from `z0 = v`
(not 0) makes `k = 1` one ordinary Fourier layer: from `z0 = 0`, `B(0, v)` never uses `K`.

Data: `fpx.data.darcy(n_train + n_test, s, seed)`, optionally subsampled by `stride`
(`85 -> 43` with stride 2, as the FNO paper subsamples 421). `u` is divided by the
training standard deviation; the loss is the mean relative L2 error (scale invariant, so
the reported errors are those of `u` itself). Adam with an optional cosine decay of the
learning rate to 0 over `train.steps`. In the DEQ variant a step whose gradient is not
finite (a failed adjoint solve returns NaN gradients with `throw=False`) is skipped and
counted (`train/skipped_fraction`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from ... import data as fpx_data
from ... import operators as ops
from ...operators import fourier_layer_spec, linear, linear_spec, make_init, mlp, mlp_spec
from .._config import ConfigError, NON_NEGATIVE, POSITIVE, POSITIVE_INT, one_of
from .._registry import build, register_task, set_learning_rate
from .._task import Task, config_dtype

_UNIT_CLOSED_OPEN = (lambda v: 0 <= v < 1, "a number in [0, 1)")


def param_count(params) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


class IteratedOperator(Task):
    dynamic = ("seed", "optim.lr")
    constraints = {
        "optim.lr": POSITIVE,
        "optim.weight_decay": NON_NEGATIVE,
        "model.kind": one_of("iterate", "deq"),
        "model.k": POSITIVE_INT,
        "model.relax": _UNIT_CLOSED_OPEN,
        "model.width": POSITIVE_INT,
        "model.modes": POSITIVE_INT,
        "model.padding": (lambda v: isinstance(v, int) and v >= 0, "a non-negative integer"),
        "model.projection_width": POSITIVE_INT,
        "model.init_scale": POSITIVE,
        "max_steps": POSITIVE_INT,
        "data.n_train": POSITIVE_INT,
        "data.n_test": POSITIVE_INT,
        "data.s": (lambda v: isinstance(v, int) and v >= 3, "an integer >= 3"),
        "data.stride": POSITIVE_INT,
        "data.batch_size": POSITIVE_INT,
        "train.lr_schedule": one_of("constant", "cosine"),
        "dtype": one_of("float32", "float64"),
    }

    def __init__(self, config):
        self.config = config
        self.dtype = config_dtype(config.dtype)
        d = config.data
        if d.batch_size > d.n_train:
            raise ConfigError(f"'data.batch_size' ({d.batch_size}) must not exceed 'data.n_train' ({d.n_train}).")
        a, u = fpx_data.darcy(d.n_train + d.n_test, s=d.s, seed=d.seed)
        a, u = a[:, :: d.stride, :: d.stride], u[:, :: d.stride, :: d.stride]
        self.resolution = a.shape[1]
        m = config.model
        if m.modes > self.resolution // 2:
            raise ConfigError(
                f"'model.modes' ({m.modes}) is too many for the {self.resolution}^2 grid (s={d.s}, stride={d.stride}): "
                f"need modes <= {self.resolution // 2}."
            )
        a = (a - 7.5) / 4.5  # {3, 12} -> {-1, +1}
        self.u_scale = float(u[: d.n_train].std())
        u = u / self.u_scale
        features = np.concatenate([a[..., None], np.broadcast_to(self._grid(), a.shape + (2,))], axis=-1)
        self.x_train = jnp.asarray(features[: d.n_train], self.dtype)
        self.y_train = jnp.asarray(u[: d.n_train, ..., None], self.dtype)
        self.x_test = jnp.asarray(features[d.n_train :], self.dtype)
        self.y_test = jnp.asarray(u[d.n_train :, ..., None], self.dtype)
        self.n_train_eval = min(d.n_train, d.n_test)  # train error on a fixed subset of this size
        self.optimizer = build("optim", config.optim.to_dict())
        self.model, self.is_deq = self._build_model()

    def _grid(self):
        t = np.linspace(0.0, 1.0, self.resolution, dtype=np.float32)
        return np.stack(np.meshgrid(t, t, indexing="ij"), axis=-1)

    # ------------------------------------------------------------------ model
    def _build_model(self):
        m, dtype = self.config.model, self.dtype
        block = ops.FNOBlock(dim=2, modes=m.modes, width=m.width, init_scale=m.init_scale, dtype=dtype)
        start = lambda v: v  # noqa: E731  (z0 = the lifted input: k=1 is one Fourier layer)
        if m.kind == "deq":
            core = ops.deq(
                block,
                solver=build("solver", self.config.solver.to_dict()),
                adjoint=build("adjoint", self.config.adjoint.to_dict()),
                max_steps=self.config.max_steps,
                init_state=start,
                return_stats=True,
            )
        else:
            unrolled = ops.iterate(block, m.k, m.relax, injection=True, init_state=start)
            core = ops.Operator(unrolled.init, lambda p, v: (unrolled.apply(p, v), {}))

        # All parameters from one random draw (`make_init`): each draw is a random-bits
        # kernel to compile, and the runner compiles `init` once per variant. The block's
        # part is `FNOBlock`'s own init spec, scaled by `init_scale` as `FNOBlock` does.
        def specs():
            return {
                "lift": linear_spec(3, m.width),
                "block": fourier_layer_spec(m.width, (m.modes, m.modes)),
                "projection": mlp_spec((m.width, m.projection_width, 1)),
            }

        def scale_block(p):
            return {**p, "block": jax.tree_util.tree_map(lambda a: m.init_scale * a, p["block"])}

        init = make_init(specs, dtype, scale_block)
        mine = jax.eval_shape(lambda: init(jr.PRNGKey(0))["block"])
        if mine != jax.eval_shape(lambda: block.init(jr.PRNGKey(0))):  # pragma: no cover
            raise AssertionError("iterated_operator: the block's init spec no longer matches FNOBlock.init.")

        def apply(params, x):
            z, stats = core.apply(params["block"], self._lift(params, x))
            return self._project(params, z), stats

        self.block = block
        return ops.Operator(init, apply), m.kind == "deq"

    def _lift(self, params, x):
        pad = self.config.model.padding
        v = linear(params["lift"], x)
        return jnp.pad(v, ((0, pad), (0, pad), (0, 0)))  # zeros outside the domain, as the FNO reference

    def _project(self, params, z):
        pad = self.config.model.padding
        z = z[: z.shape[0] - pad, : z.shape[1] - pad]
        return mlp(params["projection"], z, jax.nn.gelu)

    def iterated(self, params, x, k: int):
        """Analysis: one sample `x` through the trained model with its block applied `k` times.

        Returns `(prediction, residual)`, `residual = |B(z_k, v) - z_k| / |z_k|` (the relative
        fixed-point residual of the state the projection sees). Works for every variant's
        parameters, so a model trained at one `k` (or as a DEQ) can be run at another.
        """
        v = self._lift(params, x)
        z = ops.iterate(self.block, k, self.config.model.relax, injection=True, init_state=lambda v: v).apply(params["block"], v)
        residual = jnp.linalg.norm((self.block.apply(params["block"], z, v) - z).ravel()) / jnp.linalg.norm(z.ravel())
        return self._project(params, z), residual

    def _predict(self, params, x):
        return jax.vmap(self.model.apply, in_axes=(None, 0))(params, x)

    def _solver_metrics(self, stats):
        if not self.is_deq:
            return {}
        return {
            "forward_steps": jnp.mean(stats["num_steps"].astype(self.dtype)),
            "converged_fraction": jnp.mean(stats["converged"].astype(self.dtype)),
        }

    # ------------------------------------------------------------------- task
    def init(self, hp, key):
        params = self.model.init(key)
        opt_state = set_learning_rate(self.optimizer.init(params), hp["optim.lr"])
        return {"params": params, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32)}

    def _lr(self, hp, step):
        lr = jnp.asarray(hp["optim.lr"], self.dtype)
        if self.config.train.lr_schedule == "cosine":
            frac = step.astype(self.dtype) / self.config.train.steps
            lr = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        return lr

    def train_step(self, state, hp, key):
        batch = jr.choice(key, self.x_train.shape[0], (self.config.data.batch_size,), replace=False)
        x, y = self.x_train[batch], self.y_train[batch]

        def loss_fn(params):
            pred, stats = self._predict(params, x)
            return ops.mean_relative_l2(pred, y), stats

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        lr = self._lr(hp, state["step"])
        opt_state = set_learning_rate(state["opt_state"], lr)
        updates, new_opt_state = self.optimizer.update(grads, opt_state, state["params"])
        new_params = jax.tree_util.tree_map(lambda p, u: p + u, state["params"], updates)
        metrics = {"loss": loss, "lr": lr, **self._solver_metrics(stats)}
        if self.is_deq:
            # A failed adjoint solve gives NaN gradients (throw=False): skip that step, count it.
            finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)]))
            keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
            new_params, new_opt_state = keep(new_params, state["params"]), keep(new_opt_state, opt_state)
            metrics["skipped_fraction"] = 1.0 - finite.astype(self.dtype)
        return {"params": new_params, "opt_state": new_opt_state, "step": state["step"] + 1}, metrics

    def evaluate(self, state, hp):
        # One forward pass over the test set and a fixed training subset (one compiled copy).
        params, n, m = state["params"], self.x_test.shape[0], self.n_train_eval
        pred, stats = self._predict(params, jnp.concatenate([self.x_test, self.x_train[:m]]))
        test_stats = jax.tree_util.tree_map(lambda v: v[:n], stats)
        test = ops.mean_relative_l2(pred[:n], self.y_test)
        return {
            "loss": test,
            "test_rel_l2": test,
            "train_rel_l2": ops.mean_relative_l2(pred[n:], self.y_train[:m]),
            "num_params": jnp.asarray(param_count(params), self.dtype),
            **self._solver_metrics(test_stats),
        }


@register_task("iterated_operator")
def build_iterated_operator(config):
    return IteratedOperator(config)


build_iterated_operator.dynamic = IteratedOperator.dynamic
build_iterated_operator.constraints = IteratedOperator.constraints
build_iterated_operator.headline = ("eval/test_rel_l2", "eval/train_rel_l2", "eval/forward_steps")
