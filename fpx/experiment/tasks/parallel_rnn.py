"""A GRU classifier on sklearn digits read as a sequence, evaluated in parallel by `fpx.parallel.scan`.

Model: a GRU cell (`equinox.nn.GRUCell`, hidden size `model.hidden`) run over the image
read as a sequence (`data.sequence = "rows"`: 8 steps of 8 pixels; `"pixels"`: 64 steps of
one pixel), from `h_0 = 0`; `logits = B h_T + c`. Its whole trajectory is computed by
`fpx.parallel.scan(cell, h0, xs, method=scan.method)` (DEER, quasi-DEER, ELK, Jacobi, ...),
one solve per sequence under `jax.vmap`, and differentiated by the implicit function theorem
(one reverse linear scan with the transposed Jacobians at the solution), or by `lax.scan`
and ordinary backpropagation (`scan.method = "sequential"`, the reference).

Metrics: `train/loss`, `eval/accuracy`, `eval/loss` (test split), and for the parallel
methods the iterations per forward pass (`train/forward_steps`, mean over the batch;
`eval/forward_steps`, `eval/max_forward_steps` over the test set), the fraction of test
sequences whose solve converged, and `eval/max_deviation`, the largest
`|h_t - h_t^sequential|` over every state of the first `data.deviation_batch` test
sequences, `h^sequential` computed by `lax.scan` with the same parameters.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax

from ...data import digits
from ...parallel import scan as parallel_scan
from .._config import NON_NEGATIVE, POSITIVE, POSITIVE_INT, UNIT_OPEN, ConfigError, one_of
from .._registry import build, register_task, set_learning_rate
from .._task import Task, config_dtype

PARALLEL_METHODS = ("jacobi", "gauss_seidel", "hybrid", "deer", "quasi_deer", "elk", "quasi_elk")
SEQUENCES = {"rows": (8, 8), "pixels": (64, 1)}  # (steps T, inputs per step)


class _Model(eqx.Module):
    cell: eqx.nn.GRUCell
    head: eqx.nn.Linear


def sequences(x, kind: str):
    """Flattened 8x8 images `[n, 64]` as sequences `[n, T, inputs]` (row by row, or pixel by pixel)."""
    steps, inputs = SEQUENCES[kind]
    return x.reshape(x.shape[0], steps, inputs)


def sequential_trajectory(cell, xs, h0):
    """Every state `h_1 .. h_T` of `h_t = cell(x_t, h_{t-1})` by `lax.scan` (the reference)."""

    def body(h, x):
        h = cell(x, h)
        return h, h

    return jax.lax.scan(body, h0, xs)[1]


class GRUSequenceClassifier(Task):
    dynamic = ("seed", "optim.lr")
    constraints = {
        "optim.lr": POSITIVE,
        "optim.weight_decay": NON_NEGATIVE,
        "model.hidden": POSITIVE_INT,
        "scan.method": one_of("sequential", *PARALLEL_METHODS),
        "scan.gradient": one_of("default", "associative", "sequential"),
        "scan.max_steps": (lambda v: isinstance(v, int) and v >= 0, "a non-negative integer (0: the method's default)"),
        "scan.block_size": POSITIVE_INT,
        "scan.rtol": NON_NEGATIVE,
        "scan.atol": NON_NEGATIVE,
        "data.sequence": one_of(*SEQUENCES),
        "data.batch_size": POSITIVE_INT,
        "data.test_fraction": UNIT_OPEN,
        "data.deviation_batch": POSITIVE_INT,
        "dtype": one_of("float32", "float64"),
    }

    def __init__(self, config):
        self.config = config
        self.dtype = config_dtype(config.dtype)
        x_train, y_train, x_test, y_test = digits(seed=config.data.split_seed, test_size=config.data.test_fraction)
        kind = config.data.sequence
        self.x_train = jnp.asarray(sequences(x_train, kind), self.dtype)
        self.x_test = jnp.asarray(sequences(x_test, kind), self.dtype)
        self.y_train, self.y_test = jnp.asarray(y_train), jnp.asarray(y_test)
        self.classes = 10
        if config.data.batch_size > self.x_train.shape[0]:
            raise ConfigError(
                f"'data.batch_size' ({config.data.batch_size}) exceeds the {self.x_train.shape[0]} training examples; "
                "batches are drawn without replacement."
            )
        if config.data.deviation_batch > self.x_test.shape[0]:
            raise ConfigError(
                f"'data.deviation_batch' ({config.data.deviation_batch}) exceeds the {self.x_test.shape[0]} test examples."
            )
        self.optimizer = build("optim", config.optim.to_dict())
        self.method = config.scan.method
        self.parallel = self.method != "sequential"

    # ------------------------------------------------------------------ model
    def _model(self, key):
        k1, k2 = jr.split(key)
        inputs = self.x_train.shape[2]
        cell = eqx.nn.GRUCell(inputs, self.config.model.hidden, key=k1, dtype=self.dtype)
        return _Model(cell, eqx.nn.Linear(self.config.model.hidden, self.classes, key=k2, dtype=self.dtype))

    def scan_kwargs(self) -> dict:
        """The keyword arguments of `fpx.parallel.scan` this config asks for."""
        cfg = self.config.scan
        kwargs = {"method": self.method, "throw": False}
        if cfg.gradient != "default":
            kwargs["gradient"] = cfg.gradient
        if cfg.max_steps:
            kwargs["max_steps"] = cfg.max_steps
        if self.method == "hybrid":
            kwargs["block_size"] = cfg.block_size
        if cfg.rtol:
            kwargs["rtol"] = cfg.rtol
        if cfg.atol:
            kwargs["atol"] = cfg.atol
        return kwargs

    def trajectory(self, model, xs):
        """`(H [T, hidden], stats)` of one sequence `xs [T, inputs]` by the configured method."""
        h0 = jnp.zeros(self.config.model.hidden, self.dtype)
        if not self.parallel:
            return sequential_trajectory(model.cell, xs, h0), {}
        sol = parallel_scan(lambda h, x: model.cell(x, h), h0, xs, **self.scan_kwargs())
        return sol.value, {"num_steps": sol.stats["num_steps"], "converged": sol.converged}

    def _logits(self, model, xs):
        H, stats = self.trajectory(model, xs)
        return model.head(H[-1]), stats

    # ------------------------------------------------------------------- task
    def init(self, hp, key):
        model = self._model(key)
        params = eqx.filter(model, eqx.is_inexact_array)
        opt_state = set_learning_rate(self.optimizer.init(params), hp["optim.lr"])
        return {"model": model, "opt_state": opt_state}

    def train_step(self, state, hp, key):
        model = state["model"]
        batch = jr.choice(key, self.x_train.shape[0], (self.config.data.batch_size,), replace=False)
        x, y = self.x_train[batch], self.y_train[batch]
        dynamic, static = eqx.partition(model, eqx.is_inexact_array)

        def loss_fn(dynamic):
            m = eqx.combine(dynamic, static)
            logits, stats = jax.vmap(lambda s: self._logits(m, s))(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), stats

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(dynamic)
        opt_state = set_learning_rate(state["opt_state"], hp["optim.lr"])
        updates, opt_state = self.optimizer.update(grads, opt_state, dynamic)
        model = eqx.apply_updates(model, updates)
        metrics = {"loss": loss}
        if self.parallel:
            metrics.update(
                forward_steps=jnp.mean(stats["num_steps"].astype(self.dtype)),
                converged_fraction=jnp.mean(stats["converged"].astype(self.dtype)),
            )
        return {"model": model, "opt_state": opt_state}, metrics

    def evaluate(self, state, hp):
        model = state["model"]
        logits, stats = jax.vmap(lambda s: self._logits(model, s))(self.x_test)
        metrics = {
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == self.y_test),
            "loss": optax.softmax_cross_entropy_with_integer_labels(logits, self.y_test).mean(),
        }
        if self.parallel:
            probe = self.x_test[: self.config.data.deviation_batch]
            h0 = jnp.zeros(self.config.model.hidden, self.dtype)
            parallel = jax.vmap(lambda s: self.trajectory(model, s)[0])(probe)
            reference = jax.vmap(lambda s: sequential_trajectory(model.cell, s, h0))(probe)
            metrics.update(
                forward_steps=jnp.mean(stats["num_steps"].astype(self.dtype)),
                max_forward_steps=jnp.max(stats["num_steps"]).astype(self.dtype),
                converged_fraction=jnp.mean(stats["converged"].astype(self.dtype)),
                max_deviation=jnp.max(jnp.abs(parallel - reference)),
            )
        return metrics


@register_task("gru_sequence_classifier")
def build_gru_sequence_classifier(config):
    return GRUSequenceClassifier(config)


build_gru_sequence_classifier.dynamic = GRUSequenceClassifier.dynamic
build_gru_sequence_classifier.constraints = GRUSequenceClassifier.constraints
build_gru_sequence_classifier.headline = (
    "eval/accuracy",
    "eval/loss",
    "eval/forward_steps",
    "eval/max_deviation",
)
