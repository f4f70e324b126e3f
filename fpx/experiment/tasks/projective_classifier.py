"""Projection-based training (PJAX's setting) on sklearn digits, against Adam on the same MLP.

Model `relu(x W1 + b1) W2` (64 -> 64 -> 10), or with a skip connection from the input to
the logits, `relu(x W1 + b1) W2 + x W3` (not bipartite). `training = "projective"` runs
`fpx.projective.Trainer` (a splitting method, an fpx solver, `steps` inner iterations per
minibatch); `training = "gradient"` runs an optax optimizer on the cross-entropy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.random as jr
import optax

from ...data import digits
from ...projective import Trainer
from .._config import NON_NEGATIVE, POSITIVE, POSITIVE_INT, UNIT_OPEN, ConfigError, one_of
from .._registry import build, register_task, set_learning_rate
from .._task import Task, config_dtype


def mlp(params, x):
    """`relu(x W1 + b1) W2`, plus `x W3` when the parameters have a skip weight."""
    logits = jax.nn.relu(x @ params["w1"] + params["b1"]) @ params["w2"]
    if "w3" in params:
        logits = logits + x @ params["w3"]
    return logits


def init_mlp(key, inputs: int, hidden: int, classes: int, skip: bool, dtype):
    k1, k2, k3 = jr.split(key, 3)
    params = {
        "w1": jr.normal(k1, (inputs, hidden), dtype) * jnp.sqrt(2.0 / inputs).astype(dtype),
        "b1": jnp.zeros(hidden, dtype),
        "w2": jr.normal(k2, (hidden, classes), dtype) * jnp.sqrt(1.0 / hidden).astype(dtype),
    }
    if skip:
        params["w3"] = jr.normal(k3, (inputs, classes), dtype) * jnp.sqrt(0.1 / inputs).astype(dtype)
    return params


class ProjectiveClassifier(Task):
    dynamic = ("seed", "optim.lr")
    constraints = {
        "training": one_of("projective", "gradient"),
        "model.kind": one_of("mlp", "skip"),
        "model.hidden": POSITIVE_INT,
        "projective.method": one_of("dr", "ap", "dm"),
        "projective.loss": one_of("cross_entropy", "margin"),
        "projective.steps": POSITIVE_INT,
        "projective.prox_step": POSITIVE,
        "projective.anchor": NON_NEGATIVE,
        "projective.margin": POSITIVE,
        "optim.lr": POSITIVE,
        "data.batch_size": POSITIVE_INT,
        "data.test_fraction": UNIT_OPEN,
        "dtype": one_of("float32", "float64"),
    }

    def __init__(self, config):
        self.config = config
        self.dtype = config_dtype(config.dtype)
        x_train, y_train, x_test, y_test = digits(seed=config.data.split_seed, test_size=config.data.test_fraction)
        self.x_train, self.y_train = jnp.asarray(x_train, self.dtype), jnp.asarray(y_train, jnp.int32)
        self.x_test, self.y_test = jnp.asarray(x_test, self.dtype), jnp.asarray(y_test, jnp.int32)
        if config.data.batch_size > self.x_train.shape[0]:
            raise ConfigError(
                f"'data.batch_size' ({config.data.batch_size}) exceeds the {self.x_train.shape[0]} training examples; "
                "batches are drawn without replacement."
            )
        p = config.projective
        self.trainer = Trainer(
            mlp,
            loss=p.loss,
            method=p.method,
            solver=build("solver", config.solver.to_dict()),
            steps=p.steps,
            margin=p.margin,
            prox_step=p.prox_step,
            anchor=p.anchor,
            warm_start=p.warm_start,
        )
        self.optimizer = build("optim", config.optim.to_dict())

    def _batch(self, key):
        index = jr.choice(key, self.x_train.shape[0], (self.config.data.batch_size,), replace=False)
        return self.x_train[index], self.y_train[index]

    def init(self, hp, key):
        cfg = self.config.model
        params = init_mlp(key, self.x_train.shape[1], cfg.hidden, 10, cfg.kind == "skip", self.dtype)
        if self.config.training == "gradient":
            return {"params": params, "opt_state": set_learning_rate(self.optimizer.init(params), hp["optim.lr"])}
        x, y = self._batch(jr.fold_in(key, 1))
        return {"params": params, "trainer": self.trainer.init(params, x, y)}

    def train_step(self, state, hp, key):
        x, y = self._batch(key)
        params = state["params"]
        if self.config.training == "gradient":

            def loss_fn(p):
                return optax.softmax_cross_entropy_with_integer_labels(jax.vmap(mlp, (None, 0))(p, x), y).mean()

            loss, grads = jax.value_and_grad(loss_fn)(params)
            opt_state = set_learning_rate(state["opt_state"], hp["optim.lr"])
            updates, opt_state = self.optimizer.update(grads, opt_state, params)
            return {"params": optax.apply_updates(params, updates), "opt_state": opt_state}, {"loss": loss}
        params, trainer_state, info = self.trainer.update(params, state["trainer"], x, y)
        metrics = {
            "loss": info["loss"],
            "inner_steps": info["steps"].astype(self.dtype),
            "residual": info["residual"],
            "gap": info["gap"],
            "infeasible_fraction": info["infeasible"].astype(self.dtype),
        }
        return {"params": params, "trainer": trainer_state}, metrics

    def evaluate(self, state, hp):
        logits = jax.vmap(mlp, (None, 0))(state["params"], self.x_test)
        return {
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == self.y_test),
            "loss": optax.softmax_cross_entropy_with_integer_labels(logits, self.y_test).mean(),
        }


@register_task("projective_classifier")
def build_projective_classifier(config):
    return ProjectiveClassifier(config)


build_projective_classifier.dynamic = ProjectiveClassifier.dynamic
build_projective_classifier.constraints = ProjectiveClassifier.constraints
build_projective_classifier.headline = ("eval/accuracy", "eval/loss")
