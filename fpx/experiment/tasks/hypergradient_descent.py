"""A global L2 strength tuned by hypergradient descent through `fpx.argmin`, or by a grid sweep.

Inner problem (training), full batch on the first `data.n_train` digits of the training
split: `L_T(w, θ) = CE(f_w(x_train), y_train) + ½ exp(θ) |w|²`, one hyperparameter
`θ = log λ` for every weight. `f_w` is multinomial logistic regression without bias (64 × 10
weights, convex: `fpx.HypergradientExact` can form the 640 × 640 Hessian) or, with
`model.hidden > 0`, a one-hidden-layer tanh MLP. The minimiser `w*(θ)` is found by
`fpx.argmin` (the `solver` section, a gradient step of size `1/λ_max`, `inner.max_steps`).
Outer loss: the cross-entropy of `f_{w*(θ)}` on the next `data.n_val` digits (validation).

Two modes (`outer.mode`):

- `descent`: every training step is one outer step. It solves the inner problem at the
  current `θ` (warm-started from the previous minimiser), computes the hypergradient
  `dL_V/dθ` by the estimator of the `hypergradient` section (`cg`: lineax CG on the
  Hessian, `fixed_point`: Anderson on `u = u - α(Hu - b)`, `neumann`: Lorraine et al.'s
  `k`-term Neumann series, `exact`: the dense Hessian) and updates `θ` by the `optim`
  section (Adam by default). `hyper.log_lambda` is the starting point.
- `grid`: `θ = hyper.log_lambda` stays fixed and a training step is a plain inner solve (no
  hypergradient); sweeping `hyper.log_lambda` (it is `dynamic`) runs the whole grid as one
  vmapped program. One step per member is one inner solve, as one outer step of `descent`
  is, so a grid of `n` values and `n` descent steps cost the same number of inner solves.

Training metrics (per step): `log_lambda` and `val_loss` at the step's inner solution
(before the update), `inner_steps` (the inner solver's steps: the inner-training compute),
`inner_failed` (1 when the inner solve did not converge), and in `descent` mode
`hypergradient`, `hypergradient_steps` (the estimator's steps: its Hessian-vector products
for CG, Anderson and Neumann, the Hessian's size for `exact`), `hypergradient_residual`
(`|Hu - b| / |b|`) and `hypergradient_failed`. Evaluation reports the model of the last
inner solve (no solve of its own, so that `n` outer steps are `n` evaluated models, as `n`
grid values are): `log_lambda` (the value it was solved at; the last update of a descent is
not evaluated), `train_loss`, `val_loss`, `test_loss`, the accuracies and
`converged_fraction` (1 when that inner solve converged). Solves run with `throw=False`: a
failed inner or hypergradient solve makes the hypergradient NaN (and `converged_fraction`
0), which the runner reports as a diverged or unconverged member, never silently.

Data: sklearn's 8×8 digits (`fpx.data.digits`, standardised); the test set is the held-out
`data.test_fraction` of the images. float64 is the default (`dtype`; run with
`JAX_ENABLE_X64=1`): at the small L2 strengths the search reaches, the Hessian's condition
number is about 1e4, beyond what lineax's CG resolves in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import jax.random as jr
import optax

from ... import RESULTS, Anderson, argmin, backward_probe
from ... import (
    AbstractHypergradient,
    HypergradientExact,
    HypergradientFixedPoint,
    HypergradientLinearSolve,
    HypergradientNeumann,
)
from ...data import digits
from .._config import NON_NEGATIVE, POSITIVE, POSITIVE_INT, UNIT_OPEN, ConfigError, one_of
from .._registry import build, register_task, set_learning_rate
from .._task import Task, config_dtype

ESTIMATORS = ("cg", "fixed_point", "neumann", "exact")


def make_estimator(cfg) -> AbstractHypergradient:
    """The fpx hypergradient estimator of a config's `hypergradient` section.

    ```python
    import fpx
    from fpx.experiment.tasks.hypergradient_descent import make_estimator
    est = make_estimator({"estimator": "neumann", "rtol": 1e-8, "atol": 1e-8, "max_steps": 1000, "terms": 20})
    assert isinstance(est, fpx.HypergradientNeumann) and est.terms == 20
    ```
    """
    import lineax as lx

    name = cfg["estimator"]
    if name == "cg":
        return HypergradientLinearSolve(lx.CG(rtol=cfg["rtol"], atol=cfg["atol"], max_steps=cfg["max_steps"]))
    if name == "fixed_point":
        solver = Anderson(rtol=cfg["rtol"], atol=cfg["atol"])
        return HypergradientFixedPoint(solver, max_steps=cfg["max_steps"])
    if name == "neumann":
        return HypergradientNeumann(terms=cfg["terms"])
    if name == "exact":
        return HypergradientExact()
    raise ConfigError(f"config key 'hypergradient.estimator' = {name!r} is not allowed: it must be one of {', '.join(ESTIMATORS)}.")


def _cross_entropy(logits, y):
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0])


class HypergradientDescent(Task):
    dynamic = ("seed", "hyper.log_lambda", "optim.lr")
    constraints = {
        "outer.mode": one_of("descent", "grid"),
        "hypergradient.estimator": one_of(*ESTIMATORS),
        "hypergradient.rtol": NON_NEGATIVE,
        "hypergradient.atol": NON_NEGATIVE,
        "hypergradient.max_steps": POSITIVE_INT,
        "hypergradient.terms": POSITIVE_INT,
        "inner.max_steps": POSITIVE_INT,
        "optim.lr": POSITIVE,
        "model.hidden": (lambda v: isinstance(v, int) and v >= 0, "a non-negative integer (0: logistic regression)"),
        "data.n_train": POSITIVE_INT,
        "data.n_val": POSITIVE_INT,
        "data.test_fraction": UNIT_OPEN,
        "dtype": one_of("float32", "float64"),
    }

    def __init__(self, config):
        self.config = config
        self.dtype = config_dtype(config.dtype)
        d = config.data
        x, y, x_test, y_test = digits(seed=d.split_seed, test_size=d.test_fraction)
        if d.n_train + d.n_val > x.shape[0]:
            raise ConfigError(
                f"'data.n_train' + 'data.n_val' ({d.n_train} + {d.n_val}) exceeds the {x.shape[0]} images of the "
                f"training split (test_fraction {d.test_fraction}); lower them."
            )
        n, m = d.n_train, d.n_val
        self.x_train, self.y_train = jnp.asarray(x[:n], self.dtype), jnp.asarray(y[:n])
        self.x_val, self.y_val = jnp.asarray(x[n : n + m], self.dtype), jnp.asarray(y[n : n + m])
        self.x_test, self.y_test = jnp.asarray(x_test, self.dtype), jnp.asarray(y_test)
        self.mode = config.outer.mode
        self.solver = build("solver", config.solver.to_dict())
        self.optimizer = build("optim", config.optim.to_dict())
        self.estimator = make_estimator(config.hypergradient.to_dict())
        self.max_steps = config.inner.max_steps

    # ------------------------------------------------------------------ model
    def _weights(self, key):
        hidden, inputs = self.config.model.hidden, self.x_train.shape[1]
        if hidden == 0:
            # Convex: zeros are as good a start as any, and keep the grid members comparable.
            return {"out": jnp.zeros((inputs, 10), self.dtype)}
        k1, k2 = jr.split(key)
        return {
            "hidden": jr.normal(k1, (inputs, hidden), self.dtype) / math.sqrt(inputs),
            "hidden_bias": jnp.zeros((hidden,), self.dtype),
            "out": jr.normal(k2, (hidden, 10), self.dtype) / math.sqrt(hidden),
            "out_bias": jnp.zeros((10,), self.dtype),
        }

    @staticmethod
    def _logits(w, x):
        if "hidden" in w:
            return jnp.tanh(x @ w["hidden"] + w["hidden_bias"][None]) @ w["out"] + w["out_bias"][None]
        return x @ w["out"]

    def _inner_loss(self, w, log_lambda):
        decay = sum(jnp.sum(v**2) for v in jax.tree_util.tree_leaves(w))
        return _cross_entropy(self._logits(w, self.x_train), self.y_train) + 0.5 * jnp.exp(log_lambda) * decay

    def _solve(self, w0, log_lambda, probe=None):
        return argmin(self._inner_loss, w0, log_lambda, solver=self.solver, adjoint=self.estimator,
                      max_steps=self.max_steps, throw=False, backward_probe=probe)

    def _losses(self, w):
        out = {}
        for name, x, y in (("train", self.x_train, self.y_train), ("val", self.x_val, self.y_val),
                           ("test", self.x_test, self.y_test)):
            logits = self._logits(w, x)
            out[f"{name}_loss"] = _cross_entropy(logits, y)
            out[f"{name}_accuracy"] = jnp.mean(jnp.argmax(logits, -1) == y)
        return out

    # ------------------------------------------------------------------- task
    def init(self, hp, key):
        log_lambda = jnp.asarray(hp["hyper.log_lambda"], self.dtype)
        opt_state = set_learning_rate(self.optimizer.init(log_lambda), hp["optim.lr"])
        # `weights` is the last inner solution, `solved_at` the log λ it was solved at.
        return {"log_lambda": log_lambda, "weights": self._weights(key), "solved_at": log_lambda,
                "converged": jnp.zeros((), self.dtype), "opt_state": opt_state}

    def train_step(self, state, hp, key):
        del key  # full batch: deterministic
        log_lambda, w0 = state["log_lambda"], state["weights"]
        if self.mode == "grid":
            sol = self._solve(w0, log_lambda)
            grad = report = None
        else:
            def validation(theta, probe):
                sol = self._solve(w0, theta, probe)
                return _cross_entropy(self._logits(sol.value, self.x_val), self.y_val), sol

            (_, sol), (grad, report) = jax.value_and_grad(validation, argnums=(0, 1), has_aux=True)(
                log_lambda, backward_probe(self.dtype))
        w = jax.lax.stop_gradient(sol.value)
        converged = (sol.result == RESULTS.successful).astype(self.dtype)
        metrics = {
            "log_lambda": log_lambda,
            "val_loss": self._losses(w)["val_loss"],
            "inner_steps": sol.stats["num_steps"].astype(self.dtype),
            "inner_failed": 1 - converged,
        }
        new = {**state, "weights": w, "solved_at": log_lambda, "converged": converged}
        if self.mode == "descent":
            metrics.update(hypergradient=grad, hypergradient_steps=report[0], hypergradient_residual=report[1],
                           hypergradient_failed=report[2])
            opt_state = set_learning_rate(state["opt_state"], hp["optim.lr"])
            updates, opt_state = self.optimizer.update(grad, opt_state, log_lambda)
            new.update(log_lambda=optax.apply_updates(log_lambda, updates), opt_state=opt_state)
        return new, metrics

    def evaluate(self, state, hp):
        # The model of the last outer step: n steps are n evaluated inner solves, as n grid values are.
        metrics = self._losses(state["weights"])
        metrics.update(log_lambda=state["solved_at"], converged_fraction=state["converged"])
        return metrics


@register_task("hypergradient_descent")
def build_hypergradient_descent(config):
    return HypergradientDescent(config)


build_hypergradient_descent.dynamic = HypergradientDescent.dynamic
build_hypergradient_descent.constraints = HypergradientDescent.constraints
build_hypergradient_descent.headline = ("eval/val_loss", "eval/test_loss", "eval/log_lambda")
