"""One Darcy benchmark protocol for every operator of `fpx.operators` (issue 18 §2).

`darcy_operators` trains the operator named by `model.name` on `fpx.data.darcy` (the FNO
paper's 2-D Darcy flow: piecewise-constant coefficient `a` -> solution `u`), with the
same data, loop, optimizer, schedule and number of steps for every operator:

- `fno`: `fpx.operators.FNO(dim=2)`; `tfno`: `fpx.operators.TFNO(dim=2)` (Tucker);
- `t1`: `fpx.operators.T1(dim=2)` (transform once, DCT);
- `mgno`: `fpx.operators.MgNO(dim=2)` (V-cycle layers, no lifting);
- `galerkin` / `fourier_transformer`: `fpx.operators.GalerkinTransformer(dim=2,
  attention="galerkin" | "fourier")` (Cao, 2021);
- `iterated_fno`: the weight-tied Fourier block of the iterations experiment
  (`fpx/experiment/tasks/iterated_operator.py`): `a` and the grid lifted to `width`
  channels, zero-padded, one `fpx.operators.FNOBlock` applied `k` times with input
  injection (`fpx.operators.iterate(..., injection=True)`, from `z0 = v`), or solved to
  its fixed point (`kind="deq"`, `fpx.operators.deq` with `solver`/`adjoint`), cropped
  and projected by a pointwise MLP.

Each operator's architecture lives in its own config section `model.<name>` (all of them
are present in every config; only the one `model.name` picks is read), so a sweep over
`model.name` trains every operator, one compiled group after another.

Data: `fpx.data.darcy(n_train + n_test, s=data.s, seed=data.seed)`, subsampled by
`data.stride` (85 -> 43 with stride 2, as the FNO paper subsamples its 421 grid); the
first `n_train` samples train, the next `n_test` test. The input is `a` mapped to
{-1, +1} (one channel; the operators append the grid themselves), the target `u`
divided by the training standard deviation (the relative errors are those of `u`).
Training: the shared loop of `fpx/experiment/tasks/operator_regression.py` (epoch-wise
shuffled minibatches, objective the summed per-sample relative L2 error, Adam with the
config's weight decay, `schedule` constant | step | cosine).

Metrics (`eval/`): `test_rel_l2` (`fpx.operators.mean_relative_l2` on the test set),
`train_rel_l2` (on the first `min(n_train, n_test)` training samples), `num_params`,
and, when `measure_memory` is set, `memory_mib` / `temp_memory_mib`: XLA's compiled
memory analysis of one (un-vmapped) training step, arguments + outputs + temporaries
and temporaries alone, computed once when the task is built. Milliseconds per step come
from the runner's `timing.jsonl` (see `experiments/darcy_benchmark/table.py`).
"""

from __future__ import annotations

import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from ... import data as fpx_data
from ... import operators as ops
from ...operators import fourier_layer_spec, linear, linear_spec, make_init, mlp, mlp_spec
from .._config import POSITIVE, POSITIVE_INT, ConfigError, one_of
from .._registry import build, register_task
from .operator_regression import _COMMON, _OperatorRegression, _map

MODELS = ("fno", "tfno", "t1", "mgno", "galerkin", "fourier_transformer", "iterated_fno")

# The architecture keys each operator's section must have (positive integers unless noted).
_INT_KEYS = {
    "fno": ("modes", "width", "layers", "padding", "projection_width"),
    "tfno": ("modes", "width", "layers", "padding", "projection_width"),
    "t1": ("modes", "width", "layers", "projection_width"),
    "mgno": ("width", "levels", "num_layers"),
    "galerkin": ("modes", "width", "heads", "layers", "decoder_layers"),
    "fourier_transformer": ("modes", "width", "heads", "layers", "decoder_layers"),
    "iterated_fno": ("modes", "width", "k", "padding", "projection_width"),
}
_NON_NEGATIVE_KEYS = ("padding",)


def param_count(params) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


class DarcyOperators(_OperatorRegression):
    constraints: ClassVar[dict] = {
        **_COMMON,
        "model.name": one_of(*MODELS),
        "data.s": (lambda v: isinstance(v, int) and v >= 5, "an integer >= 5"),
        "data.stride": POSITIVE_INT,
        "model.tfno.rank": POSITIVE,
        "model.iterated_fno.kind": one_of("iterate", "deq"),
        "model.iterated_fno.init_scale": POSITIVE,
        "max_steps": POSITIVE_INT,
        "measure_memory": one_of(True, False),
    }

    def __init__(self, config):
        name = config.model.name
        if name not in MODELS:
            raise ConfigError(f"config key 'model.name' = {name!r} is not allowed: it must be one of {', '.join(map(repr, MODELS))}.")
        if name not in config.model:
            raise ConfigError(f"config key 'model.name' = {name!r} needs a section 'model.{name}' with its architecture.")
        self.name, self.m = name, config.model[name]
        for key in _INT_KEYS[name]:
            v = self.m.get(key, None)
            low = 0 if key in _NON_NEGATIVE_KEYS else 1
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= low):
                raise ConfigError(f"config key 'model.{name}.{key}' = {v!r} must be an integer >= {low}.")
        d = config.data
        self.num_items = d.n_train
        super().__init__(config)
        if self.batch_size > d.n_train:
            raise ConfigError(f"'data.batch_size' ({self.batch_size}) exceeds 'data.n_train' ({d.n_train}).")
        a, u = fpx_data.darcy(d.n_train + d.n_test, s=d.s, seed=d.seed)
        a, u = a[:, :: d.stride, :: d.stride], u[:, :: d.stride, :: d.stride]
        self.resolution = a.shape[1]
        a = (a - 7.5) / 4.5  # {3, 12} -> {-1, +1}
        self.u_scale = float(u[: d.n_train].std())
        u = u / self.u_scale
        f = lambda x: jnp.asarray(x[..., None], self.dtype)  # noqa: E731
        self.x_train, self.y_train = f(a[: d.n_train]), f(u[: d.n_train])
        self.x_test, self.y_test = f(a[d.n_train :]), f(u[d.n_train :])
        self.n_train_eval = min(d.n_train, d.n_test)
        self.operator = self._build_operator()
        try:  # resolution limits (modes, levels) surface at trace time
            shapes = jax.eval_shape(lambda: self.operator.apply(self.operator.init(jr.PRNGKey(0)), self.x_train[0]))
        except ValueError as e:
            raise ConfigError(f"model {name!r} does not fit the {self.resolution}^2 grid: {e}") from None
        if shapes.shape != self.y_train.shape[1:]:  # pragma: no cover
            raise AssertionError(f"darcy_operators: {name} returns {shapes.shape}, expected {self.y_train.shape[1:]}.")
        self.num_params = param_count(jax.eval_shape(self.operator.init, jr.PRNGKey(0)))
        self.memory = self._memory() if config.get("measure_memory", False) else None

    # ------------------------------------------------------------------ models
    def _build_operator(self):
        m, dt, name = self.m, self.dtype, self.name
        if name == "fno":
            return ops.FNO(dim=2, modes=m.modes, width=m.width, layers=m.layers, padding=m.padding,
                           projection_width=m.projection_width, dtype=dt)
        if name == "tfno":
            return ops.TFNO(dim=2, modes=m.modes, width=m.width, layers=m.layers, padding=m.padding,
                            projection_width=m.projection_width, factorization="tucker", rank=m.rank, dtype=dt)
        if name == "t1":
            return ops.T1(dim=2, modes=m.modes, width=m.width, layers=m.layers, projection_width=m.projection_width, dtype=dt)
        if name == "mgno":
            return ops.MgNO(in_channels=1, out_channels=1, width=m.width, levels=m.levels, num_layers=m.num_layers,
                            dim=2, boundary="zero", dtype=dt)
        if name in ("galerkin", "fourier_transformer"):
            return ops.GalerkinTransformer(dim=2, modes=m.modes, width=m.width, heads=m.heads, layers=m.layers,
                                           decoder_layers=m.decoder_layers,
                                           attention="galerkin" if name == "galerkin" else "fourier", dtype=dt)
        return self._iterated_fno()

    def _iterated_fno(self):
        m, dt = self.m, self.dtype
        block = ops.FNOBlock(dim=2, modes=m.modes, width=m.width, init_scale=m.init_scale, dtype=dt)
        start = lambda v: v  # noqa: E731  (z0 = the lifted input: k = 1 is one Fourier layer)
        if m.kind == "deq":
            core = ops.deq(block, solver=build("solver", self.config.solver.to_dict()),
                           adjoint=build("adjoint", self.config.adjoint.to_dict()),
                           max_steps=self.config.max_steps, init_state=start)
        else:
            core = ops.iterate(block, m.k, 0.0, injection=True, init_state=start)

        def specs():
            return {"lift": linear_spec(3, m.width), "block": fourier_layer_spec(m.width, (m.modes, m.modes)),
                    "projection": mlp_spec((m.width, m.projection_width, 1))}

        def scale_block(p):
            return {**p, "block": jax.tree_util.tree_map(lambda x: m.init_scale * x, p["block"])}

        init = make_init(specs, dt, scale_block)
        pad = m.padding

        def apply(params, x):
            s1, s2 = x.shape[:2]
            t1, t2 = jnp.linspace(0.0, 1.0, s1, dtype=dt), jnp.linspace(0.0, 1.0, s2, dtype=dt)
            grid = jnp.stack(jnp.meshgrid(t1, t2, indexing="ij"), axis=-1)
            v = linear(params["lift"], jnp.concatenate([x, grid], axis=-1))
            v = jnp.pad(v, ((0, pad), (0, pad), (0, 0)))
            z = core.apply(params["block"], v)[:s1, :s2]
            return mlp(params["projection"], z, jax.nn.gelu)

        return ops.Operator(init, apply)

    # ---------------------------------------------------------------- metrics
    def _memory(self):
        """XLA's memory analysis of one compiled training step (one member, no vmap)."""
        hp = {"seed": jnp.zeros((), jnp.int32), "optim.lr": jnp.asarray(self.config.optim.lr, self.dtype)}
        key = jr.PRNGKey(0)
        state = jax.eval_shape(self.init, hp, key)
        analysis = jax.jit(self.train_step).lower(state, hp, key).compile().memory_analysis()
        if analysis is None:  # pragma: no cover  (a backend without the analysis)
            return None
        temp = int(analysis.temp_size_in_bytes)
        total = temp + int(analysis.argument_size_in_bytes) + int(analysis.output_size_in_bytes)
        return {"memory_mib": total / 2**20, "temp_memory_mib": temp / 2**20}

    def predict(self, params, x):
        return _map(lambda xi: self.operator.apply(params, xi), x, batch=50)

    def _batch_loss(self, params, idx):
        x, y = (self.x_train, self.y_train) if idx is None else (self.x_train[idx], self.y_train[idx])
        pred = jax.vmap(self.operator.apply, in_axes=(None, 0))(params, x)
        errors = jax.vmap(ops.relative_l2)(pred, y)
        return jnp.sum(errors), jnp.mean(errors)

    def evaluate(self, state, hp):
        params, n = state["params"], self.n_train_eval
        test = ops.mean_relative_l2(self.predict(params, self.x_test), self.y_test)
        out = {
            "loss": test,
            "test_rel_l2": test,
            "train_rel_l2": ops.mean_relative_l2(self.predict(params, self.x_train[:n]), self.y_train[:n]),
            "num_params": jnp.asarray(self.num_params, jnp.float32),
            "epoch": state["step"].astype(self.dtype) / self.steps_per_epoch,
        }
        if self.memory is not None:
            out.update({k: jnp.asarray(v, jnp.float32) for k, v in self.memory.items()})
        return out


@register_task("darcy_operators")
def build_darcy_operators(config):
    return DarcyOperators(config)


build_darcy_operators.dynamic = DarcyOperators.dynamic
build_darcy_operators.constraints = DarcyOperators.constraints
build_darcy_operators.headline = ("eval/test_rel_l2", "eval/num_params", "eval/memory_mib")
