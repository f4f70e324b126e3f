"""Projection-based training (PJAX's setting) on sklearn digits, against optax on the same model.

The models (`model.kind`), all plain JAX functions `model(params, x)` of one standardised
64-pixel digit returning 10 logits:

- `mlp`: `relu(x W1 + b1) W2` (64 -> hidden -> 10), PJAX's MLP;
- `skip`: the MLP plus a skip connection from the input to the logits, `+ x W3` (PJAX's
  skip-concatenation `[h, x] W`, which it trains only after a bipartite rewrite);
- `cnn`: a 3x3 convolution with `channels` filters on the 8x8 image (`lax.conv_general_dilated`
  with a parameter kernel), bias, relu, 2x2 max-pooling, then a dense layer to the logits;
- `rnn`: a tanh RNN reading the image row by row (8 steps of 8 pixels), `h <- tanh(x_t U + h W
  + b)`, logits `h V`;
- `binary`: binary weights and binary activations, `sign(x sign(W1) / 8 + b1) W2`, each sign
  a straight-through estimator so that gradient training (the baseline) has a gradient;
- `ternary`: ternary first-layer weights, `relu(x q(W1) / 8 + b1) W2` with `q =
  fpx.projective.quantize(., [-1, 0, 1], [-1/2, 1/2])` as a straight-through estimator.

`training = "projective"` runs `fpx.projective.Trainer` (a splitting method, an fpx solver,
`steps` inner iterations per minibatch), which sees the quantisers themselves (it reads a
straight-through estimator as its forward value); `training = "gradient"` runs an optax
optimizer on the cross-entropy of the same function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from jax import lax

from ...data import digits
from ...projective import Trainer, quantize
from .._config import NON_NEGATIVE, POSITIVE, POSITIVE_INT, UNIT_OPEN, ConfigError, one_of
from .._registry import build, register_task, set_learning_rate
from .._task import Task, config_dtype


def straight_through(quantiser, w):
    """`quantiser(w)` in the forward pass with the identity's derivative (the STE)."""
    return w + lax.stop_gradient(quantiser(w) - w)


def ternary(w):
    """Ternary levels {-1, 0, 1} with thresholds at +-1/2."""
    return quantize(w, [-1.0, 0.0, 1.0], [-0.5, 0.5])


def mlp(params, x):
    """`relu(x W1 + b1) W2`, plus `x W3` when the parameters have a skip weight."""
    logits = jax.nn.relu(x @ params["w1"] + params["b1"]) @ params["w2"]
    if "w3" in params:
        logits = logits + x @ params["w3"]
    return logits


def cnn(params, x):
    """3x3 convolution (VALID) -> bias -> relu -> 2x2 max-pool -> dense, on the 8x8 image."""
    image = x.reshape(1, 1, 8, 8)
    h = lax.conv_general_dilated(image, params["kernel"], (1, 1), "VALID")[0] + params["bk"][:, None, None]
    h = lax.reduce_window(jax.nn.relu(h), -jnp.inf, lax.max, (1, 2, 2), (1, 2, 2), "VALID")
    return h.reshape(-1) @ params["w"] + params["b"]


def rnn(params, x):
    """A tanh RNN over the image's 8 rows; the logits read the last hidden state."""
    rows = x.reshape(8, 8)
    h = jnp.tanh(rows[0] @ params["u"] + params["b"])
    for t in range(1, 8):
        h = jnp.tanh(rows[t] @ params["u"] + h @ params["w"] + params["b"])
    return h @ params["v"]


def binary_mlp(params, x):
    """Binary weights and activations in the hidden layer (straight-through signs)."""
    w1 = straight_through(jnp.sign, params["w1"])
    h = straight_through(jnp.sign, (x @ w1) / 8 + params["b1"])
    return h @ params["w2"]


def ternary_mlp(params, x):
    """Ternary first-layer weights (a straight-through `ternary`), relu, a real output layer."""
    h = jax.nn.relu((x @ straight_through(ternary, params["w1"])) / 8 + params["b1"])
    return h @ params["w2"]


MODELS = {"mlp": mlp, "skip": mlp, "cnn": cnn, "rnn": rnn, "binary": binary_mlp, "ternary": ternary_mlp}


def init_model(kind: str, key, inputs: int = 64, hidden: int = 64, classes: int = 10, channels: int = 8, dtype=jnp.float32):
    """Parameters of `MODELS[kind]` (He/LeCun-scaled normals; quantised weights at unit scale)."""
    k1, k2, k3 = jr.split(key, 3)

    def normal(k, shape, variance):
        return jr.normal(k, shape, dtype) * jnp.sqrt(variance).astype(dtype)

    if kind in ("mlp", "skip"):
        return init_mlp(key, inputs, hidden, classes, kind == "skip", dtype)
    if kind == "cnn":
        features = channels * ((int(round(inputs**0.5)) - 2) // 2) ** 2
        return {
            "kernel": normal(k1, (channels, 1, 3, 3), 2 / 9),
            "bk": jnp.zeros(channels, dtype),
            "w": normal(k2, (features, classes), 1 / features),
            "b": jnp.zeros(classes, dtype),
        }
    if kind == "rnn":
        width = int(round(inputs**0.5))
        return {
            "u": normal(k1, (width, hidden), 1 / width),
            "w": normal(k2, (hidden, hidden), 1 / hidden),
            "b": jnp.zeros(hidden, dtype),
            "v": normal(k3, (hidden, classes), 1 / hidden),
        }
    if kind in ("binary", "ternary"):
        return {"w1": normal(k1, (inputs, hidden), 1.0), "b1": jnp.zeros(hidden, dtype), "w2": normal(k2, (hidden, classes), 1 / hidden)}
    raise ValueError(f"init_model: unknown kind={kind!r}; choose from {', '.join(MODELS)}.")


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
        "model.kind": one_of(*MODELS),
        "model.hidden": POSITIVE_INT,
        "model.channels": POSITIVE_INT,
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
        self.model = MODELS[config.model.kind]
        p = config.projective
        self.trainer = Trainer(
            self.model,
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
        params = init_model(cfg.kind, key, self.x_train.shape[1], cfg.hidden, 10, cfg.get("channels", 8), self.dtype)
        if self.config.training == "gradient":
            return {"params": params, "opt_state": set_learning_rate(self.optimizer.init(params), hp["optim.lr"])}
        x, y = self._batch(jr.fold_in(key, 1))
        return {"params": params, "trainer": self.trainer.init(params, x, y)}

    def train_step(self, state, hp, key):
        x, y = self._batch(key)
        params = state["params"]
        if self.config.training == "gradient":

            def loss_fn(p):
                return optax.softmax_cross_entropy_with_integer_labels(jax.vmap(self.model, (None, 0))(p, x), y).mean()

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
        logits = jax.vmap(self.model, (None, 0))(state["params"], self.x_test)
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
