"""Projection-based training on sklearn digits (PJAX's setting) against Adam, side by side.

sklearn digits, stratified 80/20 split (seeds 0, 1, 2), standardised; MLP
`relu(x W1 + b1) W2` 64 -> 64 -> 10 (and `dr-skip`: plus a skip connection `x W3`); batch
64, 400 updates, cross-entropy prox. For every method: final test accuracy (mean and range
over the split seeds), inner steps per update, median ms per update (each update ends in
`block_until_ready`; the compiling first update is excluded), wall-clock time to 95 % test
accuracy (sum of update times until the first evaluation, every 25 updates, at >= 95 %),
and the splitting state per parameter (floats in the carried iterate / parameter count).
A second table gives accuracy against the inner-step budget for plain and Anderson-
accelerated DR (split seed 0).

`--models` compares every model of `configs/projective/models.py` (MLP, skip-MLP, CNN, RNN,
binary and ternary networks) three ways, interleaved update by update on the same
minibatches from the same initialisation: the default `fpx.projective.Trainer`, optax Adam
and SGD (momentum) on the identical plain-JAX model; the gradient baselines then go on alone
to `--gradient-updates` steps. Accuracy after `--updates` updates (and the gradient
baselines' after their longer run), median ms/update, wall-clock to 90 % and 95 % test
accuracy (evaluated every 25 updates), state floats per parameter.

Usage:
    .venv/bin/python benchmarks/bench_projective.py            # all methods, 3 seeds (~15 min on 2 cores)
    .venv/bin/python benchmarks/bench_projective.py --quick    # 2 methods, 1 seed, 100 updates
    .venv/bin/python benchmarks/bench_projective.py --timing   # ms/update of every method, 60 updates (~4 min),
                                                               # first the default Trainer vs Adam, interleaved
    .venv/bin/python benchmarks/bench_projective.py --models   # every model vs Adam and SGD, 3 seeds (~25 min)
    .venv/bin/python benchmarks/bench_projective.py --update-committed   # regenerate the committed results

Writes `bench_projective[_quick|_timing].json` and the markdown tables (`.md`) into `--out DIR`
(default `runs/bench_projective/`); the committed `benchmarks/results/*.json` (and, for the
full run, the projective section of BENCHMARKS.md) change only with `--update-committed`.
`experiments/projective/figures.py DIR` draws the curves from that JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fpx  # noqa: E402
from benchmarks._common import machine_info, update_markdown_section  # noqa: E402
from fpx.data import digits  # noqa: E402
from fpx.experiment import config_module  # noqa: E402
from fpx.experiment.tasks.projective_classifier import MODELS, init_mlp, init_model, mlp  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- bench_projective:begin -->", "<!-- bench_projective:end -->"
MODELS_BEGIN, MODELS_END = "<!-- bench_projective_models:begin -->", "<!-- bench_projective_models:end -->"
MODELS_CONFIG = config_module(ROOT / "configs" / "projective" / "models.py")
STRICT = dict(rtol=1e-6, atol=1e-8)  # the inner solve uses its whole step budget
METHODS = {
    "dr": dict(method="dr"),
    "ap": dict(method="ap"),
    "dm": dict(method="dm"),
    "dr-anderson": dict(method="dr", solver=fpx.Anderson(memory=5, **STRICT)),
    "dr-halpern": dict(method="dr", solver=fpx.Halpern(**STRICT)),
    "dr-skip": dict(method="dr", skip=True),
    "adam": None,
}


def run(name, seed, updates, steps, anchor, eval_every=25, batch=64):
    x_train, y_train, x_test, y_test = (jnp.asarray(a) for a in digits(seed=seed))
    y_train, y_test = y_train.astype(jnp.int32), y_test.astype(jnp.int32)
    spec = METHODS[name]
    skip = bool(spec and spec.get("skip"))
    params = init_mlp(jax.random.key(seed), 64, 64, 10, skip, jnp.float32)
    rng = np.random.default_rng(seed)
    if spec is None:
        optimizer = optax.adam(1e-3)
        carry = optimizer.init(params)
        step = gradient_step(mlp, optimizer)
    else:
        kwargs = {k: v for k, v in spec.items() if k != "skip"}
        kwargs.setdefault("solver", fpx.Picard(**STRICT))
        trainer = fpx.projective.Trainer(mlp, loss="cross_entropy", steps=steps, anchor=anchor, **kwargs)
        carry = trainer.init(params, x_train[:batch], y_train[:batch])
        step = jax.jit(trainer.update)
    accuracy = jax.jit(lambda p: jnp.mean(jnp.argmax(jax.vmap(mlp, (None, 0))(p, x_test), -1) == y_test))
    times, inner, curve, elapsed, to_95 = [], [], [], 0.0, None
    for k in range(updates):
        index = rng.choice(x_train.shape[0], batch, replace=False)
        start = time.perf_counter()
        params, carry, info = step(params, carry, x_train[index], y_train[index])
        jax.block_until_ready(params)
        took = time.perf_counter() - start
        if k > 0:  # the first call compiles
            times.append(took)
            elapsed += took
        if "steps" in info:
            inner.append(int(info["steps"]))
        if (k + 1) % eval_every == 0:
            acc = float(accuracy(params))
            curve.append((k + 1, acc))
            if to_95 is None and acc >= 0.95:
                to_95 = elapsed
    state_floats = None
    if spec is not None:
        state_floats = sum(leaf.size for leaf in jax.tree_util.tree_leaves(carry.iterate))
    n_params = sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))
    return {
        "method": name,
        "split_seed": seed,
        "test_accuracy": curve[-1][1],
        "curve": curve,
        "inner_steps": float(np.mean(inner)) if inner else None,
        "ms_per_update": 1e3 * float(np.median(times)),
        "seconds_to_95": to_95,
        "state_floats_per_parameter": None if state_floats is None else state_floats / n_params,
        "parameters": n_params,
    }


def default_vs_adam(seed=0, updates=60, batch=64):
    """ms/update of the default `Trainer(mlp, loss="cross_entropy")` and of Adam, interleaved.

    Both train from the same initialisation on the same minibatches, alternating one update
    each (so that load changes hit both alike); medians over the updates after the compiling
    first one. Returns the two medians and their ratio.
    """
    x_train, y_train, _, _ = (jnp.asarray(a) for a in digits(seed=seed))
    y_train = y_train.astype(jnp.int32)
    params = init_mlp(jax.random.key(seed), 64, 64, 10, False, jnp.float32)
    trainer = fpx.projective.Trainer(mlp, loss="cross_entropy")  # the defaults a user gets
    t_params, t_state, t_step = params, trainer.init(params, x_train[:batch], y_train[:batch]), jax.jit(trainer.update)
    optimizer = optax.adam(1e-3)
    a_params, a_state, a_step = params, optimizer.init(params), gradient_step(mlp, optimizer)
    rng = np.random.default_rng(seed)
    times = {"trainer": [], "adam": []}
    for k in range(updates):
        index = rng.choice(x_train.shape[0], batch, replace=False)
        xb, yb = x_train[index], y_train[index]
        start = time.perf_counter()
        t_params, t_state, _ = t_step(t_params, t_state, xb, yb)
        jax.block_until_ready(t_params)
        mid = time.perf_counter()
        a_params, a_state, _ = a_step(a_params, a_state, xb, yb)
        jax.block_until_ready(a_params)
        end = time.perf_counter()
        if k > 0:
            times["trainer"].append(mid - start)
            times["adam"].append(end - mid)
    trainer_ms, adam_ms = (1e3 * float(np.median(times[k])) for k in ("trainer", "adam"))
    return {"trainer_default_ms": trainer_ms, "adam_ms": adam_ms, "ratio": trainer_ms / adam_ms, "updates": updates,
            "load_average": list(os.getloadavg())}


def gradient_step(model, optimizer):
    """A jitted optax step on the cross-entropy of `model` (straight-through estimators included)."""

    @jax.jit
    def step(params, opt_state, x, y):
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(jax.vmap(model, (None, 0))(p, x), y).mean()  # noqa: E731
        grads = jax.grad(loss)(params)
        updates_, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates_), opt_state, {}

    return step


def _optimizer(spec):
    kwargs = {k: v for k, v in spec["optim"].items() if k not in ("name", "lr")}
    return getattr(optax, spec["optim"]["name"])(spec["optim"]["lr"], **kwargs)


def compare_model(kind, seed, updates, gradient_updates, eval_every=25, batch=64, targets=(0.90, 0.95)):
    """One model, one split: default Trainer, Adam and SGD interleaved, then the gradient ones alone."""
    x_train, y_train, x_test, y_test = (jnp.asarray(a) for a in digits(seed=seed))
    y_train, y_test = y_train.astype(jnp.int32), y_test.astype(jnp.int32)
    model = MODELS[kind]
    params = init_model(kind, jax.random.key(seed), hidden=MODELS_CONFIG.HIDDEN.get(kind, 64))
    n_params = sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))
    trainer = fpx.projective.Trainer(model, loss="cross_entropy")  # the defaults a user gets
    methods = {"dr": [params, trainer.init(params, x_train[:batch], y_train[:batch]), jax.jit(trainer.update)]}
    state_floats = sum(leaf.size for leaf in jax.tree_util.tree_leaves(methods["dr"][1].iterate))
    for name in ("adam", "sgd"):
        optimizer = _optimizer(MODELS_CONFIG.TRAINING[name])
        methods[name] = [params, optimizer.init(params), gradient_step(model, optimizer)]
    accuracy = jax.jit(lambda p: jnp.mean(jnp.argmax(jax.vmap(model, (None, 0))(p, x_test), -1) == y_test))
    record = {name: {"times": [], "curve": [], "elapsed": 0.0, "to": {t: None for t in targets}} for name in methods}
    rng = np.random.default_rng(seed)

    def advance(name, k, xb, yb):
        m, r = methods[name], record[name]
        start = time.perf_counter()
        m[0], m[1], _ = m[2](m[0], m[1], xb, yb)
        jax.block_until_ready(m[0])
        took = time.perf_counter() - start
        if k > 0:  # the first call compiles
            r["times"].append(took)
            r["elapsed"] += took
        if (k + 1) % eval_every == 0:
            acc = float(accuracy(m[0]))
            r["curve"].append((k + 1, acc, r["elapsed"]))
            for t in targets:
                if r["to"][t] is None and acc >= t:
                    r["to"][t] = r["elapsed"]

    for k in range(max(updates, gradient_updates)):
        index = rng.choice(x_train.shape[0], batch, replace=False)
        xb, yb = x_train[index], y_train[index]
        for name in methods:
            if k < (updates if name == "dr" else gradient_updates):
                advance(name, k, xb, yb)
    rows = []
    for name, r in record.items():
        at_updates = [acc for step, acc, _ in r["curve"] if step == updates]
        rows.append({
            "model": kind,
            "method": name,
            "split_seed": seed,
            "parameters": n_params,
            "accuracy_at_updates": at_updates[0] if at_updates else None,
            "final_accuracy": r["curve"][-1][1],
            "final_updates": r["curve"][-1][0],
            "curve": r["curve"],
            "ms_per_update": 1e3 * float(np.median(r["times"][: updates - 1])),
            "seconds_to": {f"{t:.2f}": r["to"][t] for t in targets},
            "state_floats_per_parameter": state_floats / n_params if name == "dr" else None,
        })
    return rows


def models_markdown(rows, info, options):
    """The models table from `compare_model` rows (also what `bench_projective_models.json` regenerates)."""
    def seconds(values):
        hit = [v for v in values if v is not None]
        if not hit:
            return "never"
        return f"{np.median(hit):.2f} s ({len(hit)}/{len(values)})"

    lines = [
        f"Measured {info['date_utc']} on {info['processor']} ({info['cpu_count']} cores, 1-minute load "
        f"{info['load_average_start'][0]:.1f} at the start, {info['load_average_end'][0]:.1f} at the end), jax {info['jax']}, fpx {info['git_commit']}, by "
        f"`benchmarks/bench_projective.py --models`. Batch 64, split seeds {', '.join(map(str, options['seeds']))}; "
        f"`dr` is `fpx.projective.Trainer(model, loss=\"cross_entropy\")` with its defaults for {options['updates']} "
        f"updates; Adam (lr 1e-3) and SGD (lr 0.05, momentum 0.9) train the identical function for "
        f"{options['gradient_updates']} steps, the first {options['updates']} interleaved with DR's on the same minibatches. "
        "Accuracy: test accuracy, mean [min, max] over the seeds; time to a target: median over the seeds "
        "that reach it (how many did) of the summed update times up to the first evaluation (every 25 "
        "updates) at the target.",
        "",
        f"| model | parameters | method | accuracy at {options['updates']} | final accuracy (updates) | ms / update | to 90 % | to 95 % | state floats / parameter |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in dict.fromkeys(r["model"] for r in rows):
        for name in dict.fromkeys(r["method"] for r in rows if r["model"] == kind):
            rs = [r for r in rows if r["model"] == kind and r["method"] == name]

            def acc(key):
                values = [r[key] for r in rs]
                return f"{100 * np.mean(values):.1f} % [{100 * min(values):.1f}, {100 * max(values):.1f}]"

            state = rs[0]["state_floats_per_parameter"]
            lines.append(
                f"| {kind} | {rs[0]['parameters']} | {name} | {acc('accuracy_at_updates')} | {acc('final_accuracy')} "
                f"({rs[0]['final_updates']}) | {np.median([r['ms_per_update'] for r in rs]):.2f} "
                f"| {seconds([r['seconds_to']['0.90'] for r in rs])} | {seconds([r['seconds_to']['0.95'] for r in rs])} "
                f"| {'—' if state is None else f'{state:.0f}'} |"
            )
    return "\n".join(lines) + "\n"


def main_models(opts, info):
    info["load_average_start"] = list(os.getloadavg())
    rows = []
    for kind in opts.models:
        for seed in opts.seeds:
            out = compare_model(kind, seed, opts.updates, opts.gradient_updates)
            rows += out
            for r in out:
                print(
                    f"{kind:8s} {r['method']:5s} seed {seed}: {100 * r['accuracy_at_updates']:.1f} % at {opts.updates}, "
                    f"{100 * r['final_accuracy']:.1f} % at {r['final_updates']}, {r['ms_per_update']:.2f} ms/update, "
                    f"to 90/95 % {r['seconds_to']}",
                    flush=True,
                )
    info["load_average_end"] = list(os.getloadavg())
    options = {k: v for k, v in vars(opts).items() if k not in ("out", "update_committed")}
    text = models_markdown(rows, info, options)
    print(text)
    out = RESULTS if opts.update_committed else opts.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_projective_models.json").write_text(json.dumps({"machine": info, "options": options, "runs": rows}, indent=1))
    print(f"wrote {out / 'bench_projective_models.json'}")
    if not opts.update_committed:
        (out / "bench_projective_models.md").write_text(text)
        return
    update_markdown_section(text, MODELS_BEGIN, MODELS_END, "## Projection-based training of other models (`bench_projective.py --models`)")
    update_markdown_section(text, MODELS_BEGIN, MODELS_END, "## Models", path=ROOT / "experiments" / "projective" / "README.md")
    print("updated BENCHMARKS.md and experiments/projective/README.md")


def summarise(rows):
    out = {}
    for name in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == name]
        accs = [r["test_accuracy"] for r in rs]
        t95 = [r["seconds_to_95"] for r in rs]
        out[name] = {
            "accuracy_mean": float(np.mean(accs)),
            "accuracy_min": float(np.min(accs)),
            "accuracy_max": float(np.max(accs)),
            "inner_steps": rs[0]["inner_steps"],
            "ms_per_update": float(np.median([r["ms_per_update"] for r in rs])),
            "seconds_to_95": None if any(t is None for t in t95) else float(np.median(t95)),
            "reached_95": sum(t is not None for t in t95),
            "seeds": len(rs),
            "state_floats_per_parameter": rs[0]["state_floats_per_parameter"],
        }
    return out


def markdown(summary, budget_rows, info, updates, anchor):
    lines = [
        f"Measured {info['date_utc']} on {info['processor']} ({info['cpu_count']} cores), jax {info['jax']}, "
        f"fpx {info['git_commit']}. {updates} updates of batch 64, cross-entropy prox, anchor {anchor}; "
        "accuracy is the final test accuracy, mean [min, max] over split seeds.",
        "",
        "| method | test accuracy | inner steps | ms / update | s to 95 % test (median) | state floats / parameter |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        t95 = "never" if s["seconds_to_95"] is None else f"{s['seconds_to_95']:.2f} ({s['reached_95']}/{s['seeds']} seeds)"
        steps = "—" if s["inner_steps"] is None else f"{s['inner_steps']:.0f}"
        state = "—" if s["state_floats_per_parameter"] is None else f"{s['state_floats_per_parameter']:.0f}"
        lines.append(
            f"| {name} | {100 * s['accuracy_mean']:.1f} % [{100 * s['accuracy_min']:.1f}, {100 * s['accuracy_max']:.1f}] "
            f"| {steps} | {s['ms_per_update']:.1f} | {t95} | {state} |"
        )
    if budget_rows:
        lines += ["", "Inner-step budget (split seed 0): test accuracy after the same number of updates.", ""]
        lines += ["| method | inner steps | test accuracy | ms / update |", "|---|---|---|---|"]
        for r in budget_rows:
            lines.append(f"| {r['method']} | {r['inner_steps']:.0f} | {100 * r['test_accuracy']:.1f} % | {r['ms_per_update']:.1f} |")
    return "\n".join(lines) + "\n"


def committed_tables() -> dict:
    """`{(begin, end): markdown}` regenerated from the committed results files.

    These are the sections `--update-committed` wrote into BENCHMARKS.md and
    experiments/projective/README.md (tests/test_projective_tables.py compares them).
    """
    full = json.loads((RESULTS / "bench_projective.json").read_text())
    options = full["options"]
    tables = {(BEGIN, END): markdown(full["summary"], full["budget"], full["machine"], options["updates"], options["anchor"])}
    models = json.loads((RESULTS / "bench_projective_models.json").read_text())
    tables[(MODELS_BEGIN, MODELS_END)] = models_markdown(models["runs"], models["machine"], models["options"])
    return tables


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--updates", type=int, default=400)
    parser.add_argument("--steps", type=int, default=fpx.projective.Trainer(mlp).steps, help="inner steps per update (default: the Trainer's)")
    parser.add_argument("--anchor", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--budgets", type=int, nargs="*", default=[5, 10, 20, 50])
    parser.add_argument(
        "--timing", action="store_true", help="60 updates per method, split seed 0: ms/update on a quiet machine only"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_projective", help="output directory (default: runs/bench_projective)")
    parser.add_argument(
        "--update-committed", action="store_true",
        help="write the JSON into benchmarks/results (and the full run's tables into BENCHMARKS.md) instead",
    )
    parser.add_argument("--models", nargs="*", default=None, metavar="KIND",
                        help=f"compare these models (default with the bare flag: all of {', '.join(MODELS_CONFIG.MODELS)})")
    parser.add_argument("--gradient-updates", type=int, default=2000, help="with --models: steps of Adam and SGD")
    opts = parser.parse_args(argv)
    if opts.models is not None:
        opts.models = opts.models or list(MODELS_CONFIG.MODELS)
        if opts.quick:
            opts.updates, opts.gradient_updates, opts.seeds = 50, 100, [0]
        return main_models(opts, machine_info())
    if opts.quick:
        opts.updates, opts.seeds, opts.methods, opts.budgets = 100, [0], ["dr", "adam"], []
    if opts.timing:
        opts.updates, opts.seeds = 60, [0]
        opts.budgets = [b for b in opts.budgets if b != opts.steps]
    info = machine_info()
    head_to_head = None
    if opts.timing:
        head_to_head = default_vs_adam()
        print(
            f"default Trainer {head_to_head['trainer_default_ms']:.1f} ms/update vs Adam {head_to_head['adam_ms']:.2f} "
            f"(x{head_to_head['ratio']:.0f}; load {head_to_head['load_average'][0]:.1f})",
            flush=True,
        )
    rows = []
    for name in opts.methods:
        for seed in opts.seeds:
            r = run(name, seed, opts.updates, opts.steps, opts.anchor)
            rows.append(r)
            print(f"{name:12s} seed {seed}: {100 * r['test_accuracy']:.1f} %  {r['ms_per_update']:.1f} ms/update  to95 {r['seconds_to_95']}", flush=True)
    budget_rows = []
    for name in ("dr", "dr-anderson"):
        for steps in opts.budgets:
            r = run(name, 0, opts.updates, steps, opts.anchor)
            budget_rows.append(r)
            print(f"budget {name:12s} {steps:3d}: {100 * r['test_accuracy']:.1f} %  {r['ms_per_update']:.1f} ms/update", flush=True)
    summary = summarise(rows)
    text = markdown(summary, budget_rows, info, opts.updates, opts.anchor)
    if head_to_head:
        text += (
            f"\nDefault `Trainer(mlp, loss=\"cross_entropy\")` vs Adam, interleaved in one process (split seed 0, "
            f"{head_to_head['updates']} updates each, load {head_to_head['load_average'][0]:.1f}): "
            f"{head_to_head['trainer_default_ms']:.1f} vs {head_to_head['adam_ms']:.2f} ms/update ({head_to_head['ratio']:.0f}x).\n"
        )
    print(text)
    out = RESULTS if opts.update_committed else opts.out
    out.mkdir(parents=True, exist_ok=True)
    name = "bench_projective_quick" if opts.quick else "bench_projective_timing" if opts.timing else "bench_projective"
    options = {k: v for k, v in vars(opts).items() if k not in ("out", "update_committed")}  # what was measured
    (out / f"{name}.json").write_text(json.dumps({"machine": info, "options": options, "summary": summary, "runs": rows, "budget": budget_rows, "default_vs_adam": head_to_head}, indent=1))
    print(f"wrote {out / f'{name}.json'}")
    if not opts.update_committed:
        (out / f"{name}.md").write_text(text)
    elif not (opts.quick or opts.timing):
        update_markdown_section(text, BEGIN, END, "## Projection-based training (`bench_projective.py`)")
        update_markdown_section(text, BEGIN, END, "## Results", path=ROOT / "experiments" / "projective" / "README.md")
        print("updated BENCHMARKS.md and experiments/projective/README.md")


if __name__ == "__main__":
    main()
