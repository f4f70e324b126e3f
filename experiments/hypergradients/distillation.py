"""Dataset distillation on sklearn digits: 10 synthetic digits learned by hypergradients through training.

`python experiments/hypergradients/distillation.py [--out DIR | --update-committed] [--quick]`

Lorraine, Vicol & Duvenaud (2020, §5.3; after Wang et al. 2018): learn one synthetic 8×8
image per class so that a classifier trained *only* on those 10 images does well on real
data. Inner problem: multinomial logistic regression (weights and biases, 650 parameters)
on the 10 synthetic images `x_s` with labels 0..9 and an L2 penalty `½ exp(log λ) |θ|²`,
solved to its minimiser by `fpx.argmin` (Newton-Krylov on the gradient step, warm-started
from the previous outer step). Outer loss: cross-entropy of that minimiser on the real
training split (1437 digits). The hyperparameters `(x_s, log λ)` (641 numbers) follow Adam
(cosine-decayed learning rate; `λ` projected to `>= 1e-3`) on the implicit hypergradient
(CG on the 650×650 Hessian, float64); the synthetic images start from 10 random real
training digits, one per class.

Reported per seed (the seed picks the train/test split and the 10 starting digits): test
accuracy of logistic regression trained on the 10 distilled digits with the learned λ,
against the same model trained on the 10 random real digits it started from, with λ
either the starting one or tuned on the real training split (a vmapped grid of 21
values, by the same outer loss the distillation uses), and the full training split for
reference. Mean ± sd over seeds.

Writes `distillation.json` and `distillation.png` (the 10 distilled digits of the first
seed above the real digits they started from) to `--out` (default `runs/hypergradients`);
`--update-committed` writes them next to this script and rewrites the generated section of
the README.
"""

from __future__ import annotations

import functools
import os
import pathlib
import platform
import time

import matplotlib

matplotlib.use("Agg")
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import fpx
import fpx.data
from fpx.experiment import script_main

jax.config.update("jax_enable_x64", True)

HERE = pathlib.Path(__file__).resolve().parent
README = HERE / "README.md"
LABELS = np.arange(10)
LOG_LAMBDA0 = float(np.log(1e-2))
LOG_LAMBDA_MIN = float(np.log(1e-3))
GRID = np.linspace(LOG_LAMBDA_MIN, 1.0, 21)
# Newton-Krylov on the gradient step: about 10 Newton steps from zero to |grad| <= 1e-9,
# where Anderson needs hundreds to thousands at λ = 1e-3 (the curvature of the 10-point
# cross-entropy falls by orders of magnitude between zero and the minimiser).
INNER = fpx.NewtonKrylov(rtol=0.0, atol=1e-9)
PRESETS = {
    "default": {"seeds": 5, "steps": 300, "lr": 0.05},
    "quick": {"seeds": 3, "steps": 40, "lr": 0.1},
}


def load(seed: int) -> dict:
    """The standardised split of `seed` (float64), the pixel scale to draw images, and 10 real digits, one per class."""
    x, y, x_test, y_test = fpx.data.digits(seed=seed)
    raw = fpx.data.digits(seed=seed, standardize=False)[0]
    std = raw.std(0)
    rng = np.random.default_rng(seed)
    pick = np.array([rng.choice(np.flatnonzero(y == c)) for c in LABELS])
    return {
        "x": x.astype(np.float64), "y": y, "x_test": x_test.astype(np.float64), "y_test": y_test,
        "mean": raw.mean(0), "std": np.where(std > 1e-8, std, 1.0), "real10": x[pick].astype(np.float64),
    }


def logits(params, x):
    W, b = params
    return x @ W + b[None, :]


def cross_entropy(params, x, y):
    z = logits(params, x)
    return jnp.mean(jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, y[:, None], axis=-1)[:, 0])


def accuracy(params, x, y):
    return jnp.mean(jnp.argmax(logits(params, x), axis=-1) == y)


def inner_loss(params, hyper):
    """Training loss on the 10 synthetic digits: what the classifier minimises."""
    x_syn, log_lam = hyper
    W, b = params
    return cross_entropy(params, x_syn, jnp.asarray(LABELS)) + 0.5 * jnp.exp(log_lam) * (jnp.sum(W**2) + jnp.sum(b**2))


def zeros():
    return (jnp.zeros((64, 10)), jnp.zeros(10))


def train(hyper, w0=None, **kw):
    """The classifier trained on `hyper = (x_syn, log λ)`: the minimiser of `inner_loss`, differentiable in `hyper`."""
    return fpx.argmin(inner_loss, zeros() if w0 is None else w0, hyper, solver=INNER, max_steps=100, **kw)


@functools.lru_cache  # one compiled step for all seeds
def make_step(lr, steps):
    opt = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.1))

    @jax.jit
    def step(hyper, opt_state, params, x, y):
        def outer(hyper):
            sol = train(hyper, params)  # warm start from the previous outer step's minimiser
            return cross_entropy(sol.value, x, y), sol

        (loss, sol), g = jax.value_and_grad(outer, has_aux=True)(hyper)
        updates, opt_state = opt.update(g, opt_state)
        x_syn, log_lam = optax.apply_updates(hyper, updates)
        # Projected: below λ = 1e-3 the 10-point problem is nearly separable without penalty
        # and the inner solve (and CG on its Hessian, condition ~ 1/λ) slows down sharply.
        return (x_syn, jnp.maximum(log_lam, LOG_LAMBDA_MIN)), opt_state, sol.value, loss, sol.stats["num_steps"]

    return opt, step


@jax.jit
def evaluate(hypers, x, y, x_test, y_test):
    """Test accuracy and training-split loss of the classifiers trained from zero on a batch of `(x_syn, log λ)`."""

    def one(hyper):
        params = train(hyper).value
        return accuracy(params, x_test, y_test), cross_entropy(params, x, y)

    return jax.vmap(one)(hypers)


@jax.jit
def full_training_set(x, y, x_test, y_test):
    def loss(p, _):
        return cross_entropy(p, x, y) + 0.5 * 1e-2 * (jnp.sum(p[0] ** 2) + jnp.sum(p[1] ** 2))

    sol = fpx.argmin(loss, zeros(), None, solver=INNER, max_steps=100)
    return accuracy(sol.value, x_test, y_test)


def distill(seed: int, steps: int, lr: float) -> dict:
    """Learn 10 synthetic digits for `seed`'s split; returns accuracies, the images and the loss curve."""
    d = load(seed)
    opt, step = make_step(lr, steps)
    x, y = jnp.asarray(d["x"]), jnp.asarray(d["y"])
    hyper = (jnp.asarray(d["real10"]), jnp.asarray(LOG_LAMBDA0, jnp.float64))
    opt_state, params = opt.init(hyper), zeros()
    curve, inner_steps, times = [], [], []
    for _ in range(steps):
        start = time.perf_counter()
        hyper, opt_state, params, loss, n = step(hyper, opt_state, params, x, y)
        curve.append(float(loss))
        inner_steps.append(int(n))
        times.append(time.perf_counter() - start)
    test = tuple(map(jnp.asarray, (d["x"], d["y"], d["x_test"], d["y_test"])))
    # One vmapped batch of solves: the distilled digits (learned λ), the real start (its
    # λ), and the real start over the λ grid (the tuned baseline picks by training loss).
    real10 = jnp.asarray(d["real10"])
    log_lams = jnp.concatenate([jnp.stack([hyper[1], jnp.asarray(LOG_LAMBDA0)]), jnp.asarray(GRID)])
    images = jnp.concatenate([hyper[0][None], jnp.broadcast_to(real10, (len(GRID) + 1, *real10.shape))])
    accs, losses = evaluate((images, log_lams), *test)
    best = 2 + int(np.argmin(np.asarray(losses[2:])))
    distilled_acc, distilled_loss, real_acc, real_loss = accs[0], losses[0], accs[1], losses[1]
    tuned_acc, tuned_log_lam = accs[best], log_lams[best]
    return {
        "seed": seed,
        "distilled_accuracy": float(distilled_acc),
        "distilled_train_loss": float(distilled_loss),
        "real_accuracy": float(real_acc),
        "real_train_loss": float(real_loss),
        "real_tuned_accuracy": float(tuned_acc),
        "real_tuned_log_lambda": float(tuned_log_lam),
        "full_accuracy": float(full_training_set(*test)),
        "learned_log_lambda": float(hyper[1]),
        "outer_loss": [float(f"{v:.5g}") for v in curve],
        "mean_inner_steps": float(np.mean(inner_steps)),
        "ms_per_step": 1e3 * float(np.median(times[1:] or times)),  # the first step compiles (once for all seeds)
        # In pixel units (0..16 for real digits), to draw.
        "images": np.round(np.asarray(hyper[0]) * d["std"] + d["mean"], 2).tolist(),
        "start_images": np.round(d["real10"] * d["std"] + d["mean"], 2).tolist(),
    }


def _mean_sd(values) -> str:
    values = np.asarray(values, dtype=float)
    return f"{100 * values.mean():.1f} ± {100 * values.std(ddof=1):.1f} %"


def markdown(results: dict) -> str:
    runs = results["runs"]
    p = results["preset"]
    lines = [
        f"Machine: {results['machine']}; load {results['load']}; jax {results['jax']}; {results['date']}; "
        f"preset `{results['preset_name']}`: {len(runs)} seeds, {p['steps']} Adam steps (lr {p['lr']:g}, cosine decay) on the "
        f"10 images and log λ (from log λ = {LOG_LAMBDA0:.2f}), {results['seconds']:.0f} s in all.",
        "",
        "| classifier trained on | test accuracy (mean ± sd over seeds) |",
        "|---|---|",
        f"| 10 distilled digits, learned λ | {_mean_sd([r['distilled_accuracy'] for r in runs])} |",
        f"| 10 random real digits (one per class, the distillation's start), same starting λ | "
        f"{_mean_sd([r['real_accuracy'] for r in runs])} |",
        f"| 10 random real digits, λ tuned on the real training split (grid of {len(GRID)}) | "
        f"{_mean_sd([r['real_tuned_accuracy'] for r in runs])} |",
        f"| the full training split ({results['n_train']} digits), λ = 0.01 | {_mean_sd([r['full_accuracy'] for r in runs])} |",
        "",
        "| seed | distilled | real, start λ | real, tuned λ | learned log λ | outer loss start → end | inner Newton steps (mean, warm-started) | ms / outer step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['seed']} | {100 * r['distilled_accuracy']:.1f} % | {100 * r['real_accuracy']:.1f} % | "
            f"{100 * r['real_tuned_accuracy']:.1f} % | {r['learned_log_lambda']:.2f} | {r['outer_loss'][0]:.3f} → "
            f"{r['outer_loss'][-1]:.3f} | {r['mean_inner_steps']:.1f} | {r['ms_per_step']:.1f} |"
        )
    return "\n".join(lines)


def figure(results: dict, path: pathlib.Path) -> None:
    run = results["runs"][0]
    fig, axes = plt.subplots(2, 10, figsize=(10, 2.4))
    for row, key, title in ((0, "images", "distilled"), (1, "start_images", "start (real)")):
        for c in range(10):
            ax = axes[row, c]
            ax.imshow(np.asarray(run[key][c]).reshape(8, 8), cmap="gray_r")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(str(c), fontsize=9)
        axes[row, 0].set_ylabel(title, fontsize=8)
    fig.suptitle(
        f"seed {run['seed']}: distilled {100 * run['distilled_accuracy']:.1f} % test accuracy, "
        f"the real start {100 * run['real_accuracy']:.1f} %", fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run(quick: bool) -> dict:
    """All seeds of the `quick` or `default` preset, with the machine's particulars."""
    name = "quick" if quick else "default"
    preset = PRESETS[name]
    start = time.perf_counter()
    runs = [distill(seed, preset["steps"], preset["lr"]) for seed in range(preset["seeds"])]
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "preset_name": name,
        "preset": preset,
        "n_train": int(len(load(0)["y"])),
        "seconds": time.perf_counter() - start,
        "runs": runs,
    }


def main(argv=None) -> dict:
    return script_main(
        argv, doc=__doc__, run=run, markdown=markdown, readme=README, section="distillation",
        results_name="distillation.json", default_out="runs/hypergradients", committed_dir=HERE,
        figure=figure, figure_name="distillation.png",
    )


if __name__ == "__main__":
    main()
