"""Image classification with a deep-equilibrium layer (or an explicit MLP baseline).

Model: `z* = tanh(W z* + U x + b)` (fixed point, `|W|_2 <= gamma` kept by projection after
every step), `logits = B z* + c`. The baseline
`mlp` replaces the fixed point by two explicit hidden layers with the same number of
parameters. Data: sklearn's 8x8 digits (ships with scikit-learn), standardised,
stratified split.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax

from ... import nn as fpx_nn
from ...data import digits
from ...adjoint import backward_probe
from .._config import NON_NEGATIVE, POSITIVE, POSITIVE_INT, UNIT_OPEN, ConfigError, one_of
from .._registry import build, register_task, set_learning_rate
from .._task import Task, config_dtype


class _Model(eqx.Module):
    cell: eqx.Module | None
    hidden: tuple[eqx.nn.Linear, eqx.nn.Linear] | None
    head: eqx.nn.Linear


def _mlp_width(inputs: int, width: int, classes: int) -> int:
    """Hidden width h of a 2-hidden-layer MLP with the parameter count of the DEQ model."""
    deq = width * width + inputs * width + width + (width + 1) * classes
    # (inputs+1) h + (h+1) h + (h+1) classes = deq  ->  h^2 + (inputs + 2 + classes) h + classes - deq = 0
    b, c = inputs + 2 + classes, classes - deq
    return max(1, round((-b + math.sqrt(b * b - 4 * c)) / 2))


class DEQClassifier(Task):
    dynamic = ("seed", "optim.lr")
    constraints = {
        "optim.lr": POSITIVE,
        "optim.weight_decay": NON_NEGATIVE,
        "model.width": POSITIVE_INT,
        "model.gamma": UNIT_OPEN,
        "model.kind": one_of("deq", "mlp"),
        "max_steps": POSITIVE_INT,
        "data.batch_size": POSITIVE_INT,
        "data.test_fraction": UNIT_OPEN,
        "dtype": one_of("float32", "float64"),
    }

    def __init__(self, config):
        self.config = config
        self.dtype = config_dtype(config.dtype)
        x_train, y_train, x_test, y_test = digits(seed=config.data.split_seed, test_size=config.data.test_fraction)
        self.x_train, self.y_train = jnp.asarray(x_train, self.dtype), jnp.asarray(y_train)
        self.x_test, self.y_test = jnp.asarray(x_test, self.dtype), jnp.asarray(y_test)
        self.classes = 10
        if config.data.batch_size > self.x_train.shape[0]:
            raise ConfigError(
                f"'data.batch_size' ({config.data.batch_size}) exceeds the {self.x_train.shape[0]} training examples; "
                "batches are drawn without replacement."
            )
        self.solver = build("solver", config.solver.to_dict())
        self.adjoint = build("adjoint", config.adjoint.to_dict())
        self.optimizer = build("optim", config.optim.to_dict())

    # ------------------------------------------------------------------ model
    def _model(self, key):
        cfg = self.config.model
        inputs = self.x_train.shape[1]
        k1, k2, k3 = jr.split(key, 3)
        if cfg.kind == "deq":
            cell = fpx_nn.ContractiveCell(k1, state_size=cfg.width, input_size=inputs, gamma=cfg.gamma, dtype=self.dtype)
            return _Model(cell, None, eqx.nn.Linear(cfg.width, self.classes, key=k3, dtype=self.dtype))
        width = _mlp_width(inputs, cfg.width, self.classes)
        hidden = (
            eqx.nn.Linear(inputs, width, key=k1, dtype=self.dtype),
            eqx.nn.Linear(width, width, key=k2, dtype=self.dtype),
        )
        return _Model(None, hidden, eqx.nn.Linear(width, self.classes, key=k3, dtype=self.dtype))

    def _forward(self, model, x, probe):
        if model.cell is None:
            first, second = model.hidden
            return model.head(jax.nn.relu(second(jax.nn.relu(first(x))))), {}
        deq = fpx_nn.DEQ(model.cell, solver=self.solver, adjoint=self.adjoint, max_steps=self.config.max_steps)
        z, stats = deq(x, backward_probe=probe)
        return model.head(z), stats

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

        def loss_fn(dynamic, probe):
            m = eqx.combine(dynamic, static)
            logits, stats = jax.vmap(lambda x: self._forward(m, x, probe))(x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, stats

        probe = backward_probe(self.dtype)
        (loss, stats), (grads, probe_bar) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(dynamic, probe)
        opt_state = set_learning_rate(state["opt_state"], hp["optim.lr"])
        updates, opt_state = self.optimizer.update(grads, opt_state, dynamic)
        model = fpx_nn.project(eqx.apply_updates(model, updates))
        metrics = {"loss": loss}
        if model.cell is not None:
            n = x.shape[0]
            metrics.update(
                forward_steps=jnp.mean(stats["num_steps"].astype(self.dtype)),
                backward_steps=probe_bar[0] / n,
                converged_fraction=jnp.mean(stats["converged"].astype(self.dtype)),
                backward_failed_fraction=probe_bar[2] / n,
            )
        return {"model": model, "opt_state": opt_state}, metrics

    def evaluate(self, state, hp):
        model = state["model"]
        logits, stats = jax.vmap(lambda x: self._forward(model, x, None))(self.x_test)
        metrics = {
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == self.y_test),
            "loss": optax.softmax_cross_entropy_with_integer_labels(logits, self.y_test).mean(),
        }
        if model.cell is not None:
            metrics.update(
                forward_steps=jnp.mean(stats["num_steps"].astype(self.dtype)),
                converged_fraction=jnp.mean(stats["converged"].astype(self.dtype)),
            )
        return metrics


@register_task("deq_classifier")
def build_deq_classifier(config):
    return DEQClassifier(config)


build_deq_classifier.dynamic = DEQClassifier.dynamic
build_deq_classifier.constraints = DEQClassifier.constraints
build_deq_classifier.headline = ("eval/accuracy", "eval/loss")
