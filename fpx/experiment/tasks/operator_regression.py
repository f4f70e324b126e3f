"""Supervised operator regression: FNO on 1-D Burgers and DeepONet on the antiderivative.

Both tasks share one training loop (`_OperatorRegression`): parameters from
`fpx.operators`, Adam (any `optim` of the registry) with a learning-rate schedule,
epoch-wise shuffled minibatches, and periodic evaluation on a held-out test set.

- `fno_burgers` (Li et al., 2020): `u0 -> u(T=1)` for viscous Burgers (`fpx.data.burgers`,
  nu = 1e-3). Trained at resolution `data.s`, tested at `data.s` and zero-shot at
  `data.eval_s` on the *same* test functions (one solve at `data.solve_s`, both
  resolutions strided from it). Objective: the per-sample relative L2 error summed
  over the batch (the reference code's `LpLoss(size_average=False)`, whose scale sets
  the strength of Adam's coupled weight decay 1e-4); reported metrics are means.
- `deeponet_antiderivative` (Lu et al., 2021): `v -> int_0^y v` (`fpx.data.antiderivative`,
  RBF GRF with length scale 0.2, 100 sensors). Training data are triplets
  `(v_i at the sensors, y, G(v_i)(y))`: `data.points_per_function` query points drawn
  (seeded) from the `data.num_points` grid for each of `data.n_train` functions (the
  paper: 10000 functions, one point each); the test set is every grid point of
  `data.n_test` other functions. Objective: mean squared error (the paper's loss).

Learning-rate schedule (`schedule.name`): `constant`; `step`: `lr * factor ** (epoch //
every_epochs)` (the FNO paper: halve every 100 epochs, PyTorch's `StepLR` stepped per
epoch); `cosine`: `lr * (1 + cos(pi * step / train.steps)) / 2`, to zero at the last step
(`every_epochs` and `factor` are unused). An epoch is `n_items // batch_size` steps over
one random permutation of the training items (the last partial batch is dropped; with
`batch_size` equal to the number of items every step is one full-batch step).
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

from ... import data as fpx_data
from ... import operators as ops
from .._config import NON_NEGATIVE, POSITIVE, POSITIVE_INT, ConfigError, one_of
from .._registry import build, register_task, set_learning_rate
from .._runner import restore as restore_run
from .._task import Task, config_dtype

_POWER_OF_TWO = (lambda v: isinstance(v, int) and v >= 1 and v & (v - 1) == 0, "a power of two")
_SCHEDULE = {
    "schedule.name": one_of("constant", "step", "cosine"),
    "schedule.every_epochs": POSITIVE_INT,
    "schedule.factor": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
}
_COMMON = {
    "optim.lr": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "data.batch_size": POSITIVE_INT,
    "data.n_train": POSITIVE_INT,
    "data.n_test": POSITIVE_INT,
    "data.seed": (lambda v: isinstance(v, int) and v >= 0, "a non-negative integer"),
    "dtype": one_of("float32", "float64"),
    **_SCHEDULE,
}


class _OperatorRegression(Task):
    """Shared loop. Subclasses set `self.operator`, `self.num_items` and implement
    `_batch_loss(params, idx) -> (objective, metric)` and `evaluate`."""

    dynamic = ("seed", "optim.lr")

    def __init__(self, config):
        self.config = config
        self.dtype = config_dtype(config.dtype)
        self.optimizer = build("optim", config.optim.to_dict())
        self.batch_size = config.data.batch_size
        self.steps_per_epoch = max(1, self.num_items // self.batch_size)

    # ------------------------------------------------------------- schedule
    def learning_rate(self, lr, step):
        """The scheduled learning rate at (0-based) `step` for base rate `lr`."""
        sched = self.config.schedule
        if sched.name == "constant":
            return lr
        if sched.name == "step":
            epoch = step // self.steps_per_epoch
            return lr * jnp.asarray(sched.factor, self.dtype) ** (epoch // sched.every_epochs).astype(self.dtype)
        progress = step.astype(self.dtype) / self.config.train.steps
        return lr * 0.5 * (1 + jnp.cos(jnp.pi * progress))

    def _indices(self, shuffle_key, step):
        """Indices of this step's minibatch, or `None` for a full-batch step (no gather)."""
        if self.batch_size >= self.num_items:
            return None
        epoch, position = step // self.steps_per_epoch, step % self.steps_per_epoch
        perm = jr.permutation(jr.fold_in(shuffle_key, epoch), self.num_items)
        return jax.lax.dynamic_slice(perm, (position * self.batch_size,), (self.batch_size,))

    # ----------------------------------------------------------------- task
    def init(self, hp, key):
        k_model, k_shuffle = jr.split(key)
        params = self.operator.init(k_model)
        opt_state = set_learning_rate(self.optimizer.init(params), hp["optim.lr"])
        return {"params": params, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32), "shuffle_key": k_shuffle}

    def train_step(self, state, hp, key):
        del key  # batches come from the per-epoch permutation of `shuffle_key`
        step = state["step"]
        idx = self._indices(state["shuffle_key"], step)
        (_, metric), grads = jax.value_and_grad(self._batch_loss, has_aux=True)(state["params"], idx)
        lr = self.learning_rate(jnp.asarray(hp["optim.lr"], self.dtype), step)
        opt_state = set_learning_rate(state["opt_state"], lr)
        updates, opt_state = self.optimizer.update(grads, opt_state, state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = {"params": params, "opt_state": opt_state, "step": step + 1, "shuffle_key": state["shuffle_key"]}
        return new, {"loss": metric, "lr": lr}


def _map(fn, xs, batch: int = 100):
    """`vmap(fn)(xs)` evaluated in chunks of `batch` (bounded memory)."""
    return jax.lax.map(fn, xs, batch_size=min(batch, jax.tree_util.tree_leaves(xs)[0].shape[0]))


# =============================================================================== FNO Burgers


class FNOBurgers(_OperatorRegression):
    constraints: ClassVar[dict] = {
        **_COMMON,
        "data.s": _POWER_OF_TWO,
        "data.eval_s": _POWER_OF_TWO,
        "data.solve_s": _POWER_OF_TWO,
        "data.solver_steps": POSITIVE_INT,
        "data.nu": POSITIVE,
        "model.modes": POSITIVE_INT,
        "model.width": POSITIVE_INT,
        "model.layers": POSITIVE_INT,
        "model.projection_width": POSITIVE_INT,
    }

    def __init__(self, config):
        d = config.data
        if not (d.s <= d.eval_s <= d.solve_s):
            raise ConfigError(
                f"need data.s <= data.eval_s <= data.solve_s (powers of two), got {d.s}, {d.eval_s}, {d.solve_s}."
            )
        if config.model.modes > d.s // 2 + 1:
            raise ConfigError(f"config key 'model.modes' = {config.model.modes} exceeds data.s // 2 + 1 = {d.s // 2 + 1}.")
        self.num_items = d.n_train
        super().__init__(config)
        if self.batch_size > d.n_train:
            raise ConfigError(f"'data.batch_size' ({self.batch_size}) exceeds 'data.n_train' ({d.n_train}).")
        u0, uT = fpx_data.burgers(
            d.n_train + d.n_test, s=d.eval_s, nu=d.nu, seed=d.seed, solve_s=d.solve_s, steps=d.solver_steps
        )
        stride = d.eval_s // d.s
        as_x = lambda a: jnp.asarray(a[..., None], self.dtype)
        self.x_train, self.y_train = as_x(u0[: d.n_train, ::stride]), as_x(uT[: d.n_train, ::stride])
        self.x_test, self.y_test = as_x(u0[d.n_train :, ::stride]), as_x(uT[d.n_train :, ::stride])
        self.x_eval, self.y_eval = as_x(u0[d.n_train :]), as_x(uT[d.n_train :])
        m = config.model
        self.operator = ops.FNO(
            dim=1, modes=m.modes, width=m.width, layers=m.layers, projection_width=m.projection_width, dtype=self.dtype
        )

    def predict(self, params, x):
        """Predictions for a batch `x` of shape `(n, s, 1)` at any resolution `s`."""
        return _map(lambda xi: self.operator.apply(params, xi), x)

    def _batch_loss(self, params, idx):
        x, y = (self.x_train, self.y_train) if idx is None else (self.x_train[idx], self.y_train[idx])
        pred = jax.vmap(self.operator.apply, in_axes=(None, 0))(params, x)
        errors = jax.vmap(ops.relative_l2)(pred, y)
        return jnp.sum(errors), jnp.mean(errors)

    def evaluate(self, state, hp):
        params = state["params"]
        test = ops.mean_relative_l2(self.predict(params, self.x_test), self.y_test)
        zero_shot = ops.mean_relative_l2(self.predict(params, self.x_eval), self.y_eval)
        return {
            "loss": test,
            "test_rel_l2": test,
            "zero_shot_rel_l2": zero_shot,
            "zero_shot_ratio": zero_shot / test,
            "train_rel_l2": ops.mean_relative_l2(self.predict(params, self.x_train), self.y_train),
            "epoch": state["step"].astype(self.dtype) / self.steps_per_epoch,
        }


@register_task("fno_burgers")
def build_fno_burgers(config):
    return FNOBurgers(config)


build_fno_burgers.dynamic = FNOBurgers.dynamic
build_fno_burgers.constraints = FNOBurgers.constraints


# ==================================================================== DeepONet antiderivative


class DeepONetAntiderivative(_OperatorRegression):
    constraints: ClassVar[dict] = {
        **_COMMON,
        "data.sensors": (lambda v: isinstance(v, int) and v >= 2, "an integer >= 2"),
        "data.num_points": (lambda v: isinstance(v, int) and v >= 2, "an integer >= 2"),
        "data.points_per_function": POSITIVE_INT,
        "data.length_scale": POSITIVE,
        "model.latent": POSITIVE_INT,
        "model.activation": one_of("relu", "tanh", "gelu"),
    }

    def __init__(self, config):
        d = config.data
        for key in ("branch", "trunk"):
            sizes = config.model[key]
            if not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in sizes):
                raise ConfigError(f"config key 'model.{key}' = {list(sizes)!r} must be a list of positive integers.")
        if d.points_per_function > d.num_points:
            raise ConfigError(
                f"'data.points_per_function' ({d.points_per_function}) exceeds 'data.num_points' ({d.num_points})."
            )
        self.num_items = d.n_train * d.points_per_function
        super().__init__(config)
        if self.batch_size > self.num_items:
            raise ConfigError(
                f"'data.batch_size' ({self.batch_size}) exceeds the number of training triplets "
                f"(data.n_train * data.points_per_function = {self.num_items})."
            )
        full = fpx_data.antiderivative(
            d.n_train + d.n_test, m=d.sensors, seed=d.seed, length_scale=d.length_scale, num_points=d.num_points
        )
        # Triplets: for each training function, `points_per_function` distinct grid points (seeded).
        rng = np.random.default_rng([d.seed, 1])
        cols = np.argsort(rng.random((d.n_train, d.num_points)), axis=1)[:, : d.points_per_function]
        rows = np.repeat(np.arange(d.n_train), d.points_per_function)
        cols = cols.reshape(-1)
        f = lambda a: jnp.asarray(a, self.dtype)
        self.sensors_train, self.y_points = f(full.sensors[: d.n_train]), f(full.y[:, None])
        self.triplets = (f(full.sensors[rows]), f(full.y[cols, None]), f(full.u[rows, cols]))
        self.u_train = f(full.u[: d.n_train])
        self.sensors_test, self.u_test = f(full.sensors[d.n_train :]), f(full.u[d.n_train :])
        m = config.model
        self.operator = ops.DeepONet(
            sensors=d.sensors,
            branch=tuple(m.branch),
            trunk=tuple(m.trunk),
            latent=m.latent,
            activation=getattr(jax.nn, m.activation),
            dtype=self.dtype,
        )

    def predict(self, params, sensors):
        """`G(v)` on the query grid for a batch of sensor values `(n, m)`: shape `(n, num_points)`."""
        return _map(lambda v: self.operator.apply(params, (v, self.y_points)), sensors)

    def _batch_loss(self, params, idx):
        v, y, u = self.triplets if idx is None else (a[idx] for a in self.triplets)
        pred = jax.vmap(lambda v, y: self.operator.apply(params, (v, y)))(v, y)
        mse = jnp.mean((pred - u) ** 2)
        return mse, mse

    def evaluate(self, state, hp):
        params = state["params"]
        test_pred = self.predict(params, self.sensors_test)
        train_pred = self.predict(params, self.sensors_train)
        test_mse = jnp.mean((test_pred - self.u_test) ** 2)
        return {
            "loss": test_mse,
            "test_mse": test_mse,
            "test_rel_l2": ops.mean_relative_l2(test_pred, self.u_test),
            # Every grid point of the training functions (most of them unseen in training
            # when points_per_function < num_points).
            "train_functions_mse": jnp.mean((train_pred - self.u_train) ** 2),
        }


@register_task("deeponet_antiderivative")
def build_deeponet_antiderivative(config):
    return DeepONetAntiderivative(config)


build_deeponet_antiderivative.dynamic = DeepONetAntiderivative.dynamic
build_deeponet_antiderivative.constraints = DeepONetAntiderivative.constraints


# ============================================================================ after a run


def restore(workdir, unit: int = 0, step: int | None = None):
    """`(task, state)` of a finished run directory (`fpx.experiment.restore` without the
    member list), for the figure scripts of the operator experiments."""
    task, state, _ = restore_run(workdir, unit, step)
    return task, state


build_fno_burgers.headline = ("eval/test_rel_l2", "eval/zero_shot_rel_l2")
build_deeponet_antiderivative.headline = ("eval/test_mse", "eval/test_rel_l2")

