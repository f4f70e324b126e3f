"""Parallel evaluation of recurrences with `fpx.parallel.scan`: `python experiments/parallel_rnn/deer_gru.py [--out DIR | --update-committed]`.

Measures, against `lax.scan` (the sequential reference):

1. **Random GRUs** (hidden size D = 1, 8, 32; T = 1e3, 1e4 and, where it fits the CPU,
   1e5; float64 and float32): for every method (`deer`, `quasi_deer`, `elk`, `quasi_elk`,
   `jacobi`) the iterations to converge, the result code, `max_t |h_t - h_t^seq|`, the
   relative error of the gradient of `sum_t <g_t, h_t>` with respect to the GRU's weights
   and the inputs against `lax.scan` autodiff, and the warm wall time of the forward solve.
2. **Divergence**: `h = tanh(W h + x)` with `W = 2 N(0, 1) / sqrt(8)` in float32, T = 600:
   plain DEER reports failure (a result code, best iterate returned), ELK converges.
3. **Feedforward chain** (Song et al., 2021): a 64-layer tanh MLP evaluated as a recurrence
   over its stacked layers (`xs` = the per-layer weights) by Jacobi, hybrid (blocks of 4,
   8, 16), Gauss-Seidel and DEER equals the sequential evaluation; iterations <= 64.
4. **RNN backprop** (Song et al.'s case): the backward pass of a tanh RNN, the reverse
   linear recurrence `lam_t = g_t + J_{t+1}^T lam_{t+1}`, by `scan(..., reverse=True)`,
   against `jax.grad` of the sequential RNN.

Writes `deer_gru.json` and `deer_gru.png` into `--out DIR` (default `runs/parallel-rnn`)
and prints the markdown tables. `--update-committed` writes them next to this script and
rewrites the generated section of `experiments/parallel_rnn/README.md` instead.
`--classifier-run RUN_DIR` (an `fpx run configs/parallel/gru_digits.py` directory) adds
the GRU classifier's table and learning curves. `--quick` runs tiny sizes (a smoke test).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import time
from typing import NamedTuple

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import fpx  # noqa: E402
from fpx.experiment import write_generated_section  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
README = HERE / "README.md"
METHODS = ("deer", "quasi_deer", "elk", "quasi_elk", "jacobi")
# (hidden size, T) measured by default; T = 1e5 only where it fits a 2-core CPU's time.
DEFAULT_GRID = ((1, 1000), (8, 1000), (32, 1000), (1, 10_000), (8, 10_000), (32, 10_000), (1, 100_000), (8, 100_000))
QUICK_GRID = ((1, 100), (4, 200))
TARGETS = {"float64": 1e-10, "float32": 1e-5}


# --------------------------------------------------------------------------- problems


class GRU(NamedTuple):
    """A GRU cell without biases, every weight `N(0, 1) / sqrt(D)`."""

    Wz: jax.Array
    Wr: jax.Array
    Wh: jax.Array
    Uz: jax.Array
    Ur: jax.Array
    Uh: jax.Array

    def __call__(self, h, x):
        hi = jax.lax.Precision.HIGHEST
        z = jax.nn.sigmoid(jnp.dot(self.Wz, x, precision=hi) + jnp.dot(self.Uz, h, precision=hi))
        r = jax.nn.sigmoid(jnp.dot(self.Wr, x, precision=hi) + jnp.dot(self.Ur, h, precision=hi))
        candidate = jnp.tanh(jnp.dot(self.Wh, x, precision=hi) + jnp.dot(self.Uh, r * h, precision=hi))
        return (1 - z) * h + z * candidate


def random_gru(hidden: int, seed: int = 0, dtype=jnp.float64) -> GRU:
    keys = jax.random.split(jax.random.key(seed), 6)
    return GRU(*(jax.random.normal(k, (hidden, hidden), dtype) / float(np.sqrt(hidden)) for k in keys))


def sequential(f, h0, xs, reverse: bool = False):
    """The `ys` of `lax.scan`: every state `h_1 .. h_T`."""

    def body(h, x):
        h = f(h, x)
        return h, h

    return jax.lax.scan(body, h0, xs, reverse=reverse)[1]


def _rel_error(got, want) -> float:
    err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(want))
    return err / scale


def _warm_median(fn, *args, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def result_name(result) -> str:
    code = int(np.asarray(result._value))
    return next(n for n, item in fpx.RESULTS._name_to_item.items() if int(item._value) == code)


# --------------------------------------------------------------------------- 1. GRUs


def gru_case(hidden: int, T: int, dtype: str, methods=METHODS, seed: int = 0, timing_repeats: int = 3) -> dict:
    """Every method on one random GRU: iterations, deviation, gradient error, time."""
    dt = jnp.dtype(dtype)
    cell = random_gru(hidden, seed, dt)
    xs = jax.random.normal(jax.random.key(seed + 1), (T, hidden), dt)
    g = jax.random.normal(jax.random.key(seed + 2), (T, hidden), dt)
    h0 = jnp.zeros(hidden, dt)

    ref_fn = jax.jit(lambda c, xs: sequential(c, h0, xs))
    ref = ref_fn(cell, xs)
    ref_grad_fn = jax.jit(jax.grad(lambda c, xs: jnp.sum(g * sequential(c, h0, xs)), argnums=(0, 1)))
    ref_grad = ref_grad_fn(cell, xs)
    row = {
        "hidden": hidden,
        "T": T,
        "dtype": dtype,
        "sequential_ms": 1e3 * _warm_median(ref_fn, cell, xs, repeats=timing_repeats),
        "sequential_grad_ms": 1e3 * _warm_median(ref_grad_fn, cell, xs, repeats=timing_repeats),
        "methods": {},
    }
    for method in methods:

        def solve(c, xs, method=method):
            return fpx.parallel.scan(c, h0, xs, method=method, throw=False)

        fwd = jax.jit(solve)
        t0 = time.perf_counter()
        sol = jax.block_until_ready(fwd(cell, xs))
        first = time.perf_counter() - t0
        grad_fn = jax.jit(jax.grad(lambda c, xs, method=method: jnp.sum(g * solve(c, xs, method).value), argnums=(0, 1)))
        grad = grad_fn(cell, xs)
        entry = {
            "result": result_name(sol.result),
            "num_steps": int(sol.stats["num_steps"]),
            "residual_norm": float(sol.stats["residual_norm"]),
            "max_abs_deviation": float(jnp.max(jnp.abs(sol.value - ref))),
            "grad_rel_error": _rel_error(grad, ref_grad),
            "first_call_s": first,
            "forward_ms": 1e3 * _warm_median(fwd, cell, xs, repeats=timing_repeats),
            "grad_ms": 1e3 * _warm_median(grad_fn, cell, xs, repeats=timing_repeats),
        }
        if "num_rejected" in sol.stats:
            entry["num_rejected"] = int(sol.stats["num_rejected"])
        row["methods"][method] = entry
        print(f"  gru D={hidden} T={T} {dtype} {method}: {entry}", flush=True)
    return row


# --------------------------------------------------------------------------- 2. divergence


def unstable_rnn():
    """`h = tanh(W h + x)`, `W = 2 N(0, 1) / sqrt(8)` (spectral radius ~2), float32, T = 600."""
    W = 2.0 * jax.random.normal(jax.random.key(0), (8, 8), jnp.float32) / jnp.sqrt(8.0)
    xs = jax.random.normal(jax.random.key(1), (600, 8), jnp.float32)

    def cell(h, x):
        return jnp.tanh(jnp.dot(W, h, precision=jax.lax.Precision.HIGHEST) + x)

    return W, cell, xs


def divergence_case(methods=("deer", "quasi_deer", "elk", "quasi_elk", "jacobi"), trace_length: int = 64) -> dict:
    W, cell, xs = unstable_rnn()
    h0 = jnp.zeros(8, jnp.float32)
    ref = sequential(cell, h0, xs)
    out = {"spectral_radius_W": float(np.max(np.abs(np.linalg.eigvals(np.asarray(W, np.float64))))), "T": 600, "methods": {}}
    for method in methods:
        sol = fpx.parallel.scan(cell, h0, xs, method=method, throw=False, trace_length=trace_length)
        trace = np.asarray(sol.stats["residual_trace"], np.float64)
        entry = {
            "result": result_name(sol.result),
            "num_steps": int(sol.stats["num_steps"]),
            "residual_norm": float(sol.stats["residual_norm"]),
            "max_abs_deviation": float(jnp.max(jnp.abs(sol.value - ref))),
            "value_finite": bool(jnp.all(jnp.isfinite(sol.value))),
            "residual_trace": [float(v) if np.isfinite(v) else None for v in trace],
        }
        if "num_rejected" in sol.stats:
            entry["num_rejected"] = int(sol.stats["num_rejected"])
        out["methods"][method] = entry
        print(f"  divergence {method}: { {k: v for k, v in entry.items() if k != 'residual_trace'} }", flush=True)
    return out


# --------------------------------------------------------------------------- 3. feedforward


class Layer(NamedTuple):
    W: jax.Array
    b: jax.Array


def mlp_layers(depth: int, width: int, dtype=jnp.float64, gain: float = 1.0, seed: int = 0) -> Layer:
    """`depth` layers stacked along axis 0: `W_l ~ gain N(0, 1) / sqrt(width)`, `b_l ~ 0.1 N(0, 1)`."""
    kw, kb = jax.random.split(jax.random.key(seed))
    W = gain * jax.random.normal(kw, (depth, width, width), dtype) / float(np.sqrt(width))
    b = 0.1 * jax.random.normal(kb, (depth, width), dtype)
    return Layer(W, b)


def mlp_layer(h, layer: Layer):
    return jnp.tanh(jnp.dot(layer.W, h, precision=jax.lax.Precision.HIGHEST) + layer.b)


def feedforward_case(depth: int = 64, width: int = 32, dtype: str = "float64", gain: float = 1.0, trace_length: int = 0) -> dict:
    """Song et al.'s chain: the layers of an MLP as the steps of a recurrence."""
    dt = jnp.dtype(dtype)
    layers = mlp_layers(depth, width, dt, gain)
    h0 = jax.random.normal(jax.random.key(7), (width,), dt)
    ref = sequential(mlp_layer, h0, layers)
    out = {"depth": depth, "width": width, "dtype": dtype, "gain": gain, "methods": {}}
    variants = {
        "jacobi": {"method": "jacobi"},
        "hybrid(4)": {"method": "hybrid", "block_size": 4},
        "hybrid(8)": {"method": "hybrid", "block_size": 8},
        "hybrid(16)": {"method": "hybrid", "block_size": 16},
        "gauss_seidel": {"method": "gauss_seidel"},
        "deer": {"method": "deer"},
    }
    for name, kwargs in variants.items():
        sol = fpx.parallel.scan(mlp_layer, h0, layers, throw=False, trace_length=trace_length, **kwargs)
        bound = depth if kwargs["method"] in ("jacobi", "deer") else (-(-depth // kwargs.get("block_size", depth)))
        entry = {
            "result": result_name(sol.result),
            "num_steps": int(sol.stats["num_steps"]),
            "bound": bound,
            "max_abs_deviation": float(jnp.max(jnp.abs(sol.value - ref))),
            "bitwise_equal": bool(jnp.array_equal(sol.value, ref)),
        }
        if trace_length:
            entry["residual_trace"] = [float(v) if np.isfinite(v) else None for v in np.asarray(sol.stats["residual_trace"], np.float64)]
        out["methods"][name] = entry
        print(f"  feedforward {dtype} gain={gain} {name}: { {k: v for k, v in entry.items() if k != 'residual_trace'} }", flush=True)
    return out


# --------------------------------------------------------------------------- 4. RNN backprop


def rnn_backprop_case(T: int = 1000, hidden: int = 16, dtype: str = "float64", scale: float = 0.9) -> dict:
    """`dL/dx_t` of `L = sum_t <g_t, h_t>`, `h_t = tanh(W h_{t-1} + x_t)`, by the reverse linear
    recurrence `lam_t = g_t + J_{t+1}^T lam_{t+1}` (`J_{t+1} = diag(1 - h_{t+1}^2) W`), run by
    `fpx.parallel.scan(..., reverse=True)`: `dL/dx_t = (1 - h_t^2) * lam_t`."""
    dt = jnp.dtype(dtype)
    W = scale * jax.random.normal(jax.random.key(0), (hidden, hidden), dt) / float(np.sqrt(hidden))
    xs = jax.random.normal(jax.random.key(1), (T, hidden), dt)
    g = jax.random.normal(jax.random.key(2), (T, hidden), dt)
    h0 = jnp.zeros(hidden, dt)

    def cell(h, x):
        return jnp.tanh(jnp.dot(W, h, precision=jax.lax.Precision.HIGHEST) + x)

    H = sequential(cell, h0, xs)
    want = jax.grad(lambda xs: jnp.sum(g * sequential(cell, h0, xs)))(xs)
    s = 1 - H**2  # tanh' at step t
    # lam_t = g_t + W^T (s_{t+1} * lam_{t+1}); the input of step t is (g_t, s_{t+1}), s_{T+1} = 0.
    s_next = jnp.concatenate([s[1:], jnp.zeros_like(s[:1])], axis=0)

    def adjoint_step(lam, inputs):
        g_t, s_t1 = inputs
        return g_t + jnp.dot(W.T, s_t1 * lam, precision=jax.lax.Precision.HIGHEST)

    out = {"T": T, "hidden": hidden, "dtype": dtype, "scale": scale, "methods": {}}
    for method, kwargs in {
        "jacobi": {"method": "jacobi"},
        "hybrid(32)": {"method": "hybrid", "block_size": 32},
        "deer": {"method": "deer"},
        "quasi_deer": {"method": "quasi_deer"},
    }.items():
        sol = fpx.parallel.scan(adjoint_step, jnp.zeros(hidden, dt), (g, s_next), reverse=True, throw=False, **kwargs)
        grad = s * sol.value
        entry = {
            "result": result_name(sol.result),
            "num_steps": int(sol.stats["num_steps"]),
            "grad_rel_error": _rel_error(grad, want),
        }
        out["methods"][method] = entry
        print(f"  rnn backprop {dtype} {method}: {entry}", flush=True)
    return out


# --------------------------------------------------------------------------- tables


def _e(x) -> str:
    return "—" if x is None else f"{x:.1e}"


def _ms(x) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def gru_table(rows) -> str:
    lines = [
        "| D | T | dtype | method | result | iterations | max abs(h − h_seq) | grad rel. error | forward ms | lax.scan ms | grad ms | lax.scan grad ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for method, m in row["methods"].items():
            ok = m["max_abs_deviation"] <= TARGETS[row["dtype"]]
            lines.append(
                f"| {row['hidden']} | {row['T']:.0e} | {row['dtype']} | {method} | {m['result'] or 'successful'} | {m['num_steps']} | "
                f"{_e(m['max_abs_deviation'])}{'' if ok else ' ✗'} | {_e(m['grad_rel_error'])} | {_ms(m['forward_ms'])} | "
                f"{_ms(row['sequential_ms'])} | {_ms(m['grad_ms'])} | {_ms(row['sequential_grad_ms'])} |"
            )
    return "\n".join(lines) + "\n"


def divergence_table(case) -> str:
    lines = [
        "| method | result | iterations | final residual | max abs(h − h_seq) | rejected steps |",
        "|---|---|---|---|---|---|",
    ]
    for method, m in case["methods"].items():
        lines.append(
            f"| {method} | {m['result'] or 'successful'} | {m['num_steps']} | {_e(m['residual_norm'])} | "
            f"{_e(m['max_abs_deviation'])} | {m.get('num_rejected', '—')} |"
        )
    return "\n".join(lines) + "\n"


def feedforward_table(cases) -> str:
    lines = ["| dtype | weight gain | method | result | iterations (bound) | max abs deviation | bitwise equal |", "|---|---|---|---|---|---|---|"]
    for case in cases:
        for name, m in case["methods"].items():
            lines.append(
                f"| {case['dtype']} | {case['gain']} | {name} | {m['result'] or 'successful'} | {m['num_steps']} ({m['bound']}) | "
                f"{_e(m['max_abs_deviation'])} | {'yes' if m['bitwise_equal'] else 'no'} |"
            )
    return "\n".join(lines) + "\n"


def backprop_table(cases) -> str:
    lines = ["| dtype | T | D | method | result | iterations | grad rel. error vs jax.grad |", "|---|---|---|---|---|---|---|"]
    for case in cases:
        for name, m in case["methods"].items():
            lines.append(
                f"| {case['dtype']} | {case['T']} | {case['hidden']} | {name} | {m['result'] or 'successful'} | {m['num_steps']} | {_e(m['grad_rel_error'])} |"
            )
    return "\n".join(lines) + "\n"


def classifier_summary(workdir) -> dict:
    """Final metrics per variant (mean and sd over seeds) and the accuracy curves of an `fpx run` of gru_digits."""
    import fpx.experiment as fx

    workdir = pathlib.Path(workdir)
    summary = json.loads((workdir / "summary.json").read_text())
    config = json.loads((workdir / "config.json").read_text())
    by_variant: dict[str, list[dict]] = {}
    for row in summary["members"]:
        by_variant.setdefault(row["hparams"]["variant"], []).append(row)
    curves: dict[str, dict[int, list]] = {}
    for r in fx.read_metrics(workdir):
        curves.setdefault(r["hparams"]["variant"], {}).setdefault(r["hparams"]["seed"], []).append(
            (r["step"], r["eval/accuracy"], r["train/loss"])
        )
    keys = ("eval/accuracy", "eval/loss", "train/loss", "train/forward_steps", "eval/forward_steps", "eval/max_forward_steps", "eval/max_deviation", "eval/converged_fraction", "ms_per_step")
    variants = {}
    for name, rows in by_variant.items():
        stats = {}
        for k in keys:
            vals = [r[k] for r in rows if r.get(k) is not None]
            if vals:
                stats[k] = {"mean": float(np.mean(vals)), "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, "max": float(np.max(vals)), "values": vals}
        variants[name] = {"seeds": [r["hparams"]["seed"] for r in rows], "steps": rows[0]["step"], "final": stats}
    return {
        "workdir": str(workdir),
        "config": {k: config[k] for k in ("data", "model", "optim", "train", "dtype")},
        "variants": variants,
        "curves": {v: {str(s): sorted(c) for s, c in seeds.items()} for v, seeds in curves.items()},
    }


def classifier_table(summary) -> str:
    lines = [
        "| variant | seeds | test accuracy | test loss | train loss | iterations / forward pass (train, test mean, test max) | max abs(h − h_seq) (eval) | ms / step (seeds vmapped) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, v in summary["variants"].items():
        f = v["final"]
        pm = lambda k, d=3: f"{f[k]['mean']:.{d}f} ± {f[k]['sd']:.{d}f}" if k in f else "—"  # noqa: E731
        steps = (
            f"{f['train/forward_steps']['mean']:.2f}, {f['eval/forward_steps']['mean']:.2f}, {f['eval/max_forward_steps']['max']:.0f}"
            if "eval/forward_steps" in f
            else "— (lax.scan)"
        )
        dev = _e(f["eval/max_deviation"]["max"]) if "eval/max_deviation" in f else "—"
        ms = f"{f['ms_per_step']['mean']:.1f}" if "ms_per_step" in f else "—"
        lines.append(f"| {name} | {len(v['seeds'])} | {pm('eval/accuracy')} | {pm('eval/loss')} | {pm('train/loss')} | {steps} | {dev} | {ms} |")
    return "\n".join(lines) + "\n"


def markdown(results) -> str:
    meta = results["machine"]
    parts = [
        f"Measured {meta['date_utc']} on {meta['platform']}, {meta['cpu_count']} CPUs ({meta['jax_backend']}), jax {meta['jax']}; "
        f"load average before / after: {meta['load_before']} / {meta['load_after']}; script wall time {results['wall_s'] / 60:.1f} min.\n",
        "\n**1. Random GRUs** (weights N(0, 1)/√D, no biases, inputs x_t ~ N(0, I_D), h_0 = 0; default tolerances: "
        "rtol = atol = 1e-12 in float64, 1e-6 in float32; gradient of Σ_t ⟨g_t, h_t⟩ with respect to the six weight "
        "matrices and the inputs, max abs error over max abs value, against `lax.scan` autodiff; times are medians of "
        "3 warm calls of the jitted function; ✗ marks a deviation above the target, 1e-10 (float64) / 1e-5 (float32)):\n\n",
        gru_table(results["gru"]),
    ]
    if "divergence" in results:
        d = results["divergence"]
        parts += [
            f"\n**2. Divergence**: `h = tanh(W h + x)`, W = 2·N(0, 1)/√8 (spectral radius {d['spectral_radius_W']:.2f}), "
            f"x ~ N(0, I), T = {d['T']}, float32, `throw=False`:\n\n",
            divergence_table(d),
        ]
    if "feedforward" in results:
        ff = results["feedforward"]
        parts += [
            f"\n**3. Feedforward chain**: a {ff[0]['depth']}-layer tanh MLP of width {ff[0]['width']} "
            "(W_l = gain·N(0, 1)/√width, b_l = 0.1·N(0, 1)), the layers stacked as `xs`; deviation from the "
            "sequential evaluation (`lax.scan`), iterations against the prefix-property bound:\n\n",
            feedforward_table(ff),
        ]
    if "rnn_backprop" in results:
        parts += [
            "\n**4. RNN backprop**: the adjoint recurrence λ_t = g_t + J_{t+1}ᵀ λ_{t+1} of a tanh RNN "
            "(W = 0.9·N(0, 1)/√D) by `fpx.parallel.scan(..., reverse=True)`; dL/dx_t = (1 − h_t²) λ_t against "
            "`jax.grad` of the sequential RNN:\n\n",
            backprop_table(results["rnn_backprop"]),
        ]
    if "classifier" in results:
        c = results["classifier"]
        cfg = c["config"]
        parts += [
            f"\n**5. GRU classifier** (`configs/parallel/gru_digits.py`, run `{pathlib.Path(c['workdir']).name}`): digits read as "
            f"{cfg['data']['sequence']}, hidden {cfg['model']['hidden']}, batch {cfg['data']['batch_size']}, "
            f"Adam lr {cfg['optim']['lr']}, {cfg['train']['steps']} steps, {cfg['dtype']}; final metrics, mean ± sd over seeds "
            f"(max deviation and max iterations: the largest over seeds):\n\n",
            classifier_table(c),
        ]
    return "".join(parts)


# --------------------------------------------------------------------------- figure


def figure(results, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 + ("classifier" in results)
    fig, axes = plt.subplots(1, panels, figsize=(4.3 * panels, 3.5))
    ax = axes[0]
    for i, method in enumerate(METHODS):
        for dtype, style in (("float64", "-"), ("float32", "--")):
            rows = [r for r in results["gru"] if r["dtype"] == dtype and method in r["methods"] and r["hidden"] == max(x["hidden"] for x in results["gru"])]
            if rows:
                ax.semilogx([r["T"] for r in rows], [r["methods"][method]["num_steps"] for r in rows], style, marker="o", color=f"C{i}",
                            label=f"{method} {dtype}" if dtype == "float64" else None)
    ax.set_yscale("log")
    ax.set_xlabel("T")
    ax.set_ylabel("iterations")
    ax.set_title(f"GRU, D = {max(x['hidden'] for x in results['gru'])} (dashed: float32)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    ax = axes[1]
    for i, (method, m) in enumerate(results["divergence"]["methods"].items()):
        tr = [np.nan if v is None else v for v in m["residual_trace"]]
        ax.semilogy(tr, marker=".", color=f"C{i}", label=f"{method}: {m['result'] or 'successful'}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("max residual |h_t − f(h_{t−1}, x_t)|")
    ax.set_title("tanh RNN, W = 2 N/√8, float32")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    ax = axes[2]
    for case in results["feedforward"]:
        if case["dtype"] != "float64":
            continue
        for i, (name, m) in enumerate(case["methods"].items()):
            if "residual_trace" in m:
                tr = np.array([np.nan if v is None else v for v in m["residual_trace"]])
                tr = np.where(tr > 0, tr, 1e-17)
                ax.semilogy(tr, color=f"C{i}", ls="-" if case["gain"] == 1.0 else "--", label=f"{name}" if case["gain"] == 1.0 else None)
    ax.axvline(results["feedforward"][0]["depth"], color="k", lw=0.8)
    ax.set_xlabel("iteration")
    ax.set_ylabel("max residual (0 drawn at 1e-17)")
    ax.set_title("64-layer MLP (solid gain 1, dashed gain 3)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    if "classifier" in results:
        ax = axes[3]
        for i, (variant, seeds) in enumerate(results["classifier"]["curves"].items()):
            for j, (seed, curve) in enumerate(seeds.items()):
                steps, acc = [c[0] for c in curve], [c[1] for c in curve]
                ax.plot(steps, acc, color=f"C{i}", ls=["-", "--", ":"][j % 3], marker="o" if variant == "sequential" else None, ms=3,
                        label=f"{variant} seed {seed}")
        ax.set_xlabel("training step")
        ax.set_ylabel("test accuracy")
        ax.set_title("GRU on digits: DEER vs lax.scan")
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def machine(load) -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "fpx": fpx.__version__,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_before": " ".join(f"{x:.2f}" for x in load),
    }


def run(grid, dtypes=("float64", "float32"), methods=METHODS, quick: bool = False, classifier_run=None) -> dict:
    t0 = time.perf_counter()
    results = {"machine": machine(os.getloadavg()), "grid": [list(g) for g in grid], "gru": []}
    for dtype in dtypes:
        for hidden, T in grid:
            results["gru"].append(gru_case(hidden, T, dtype, methods, timing_repeats=1 if quick else 3))
    results["divergence"] = divergence_case(trace_length=32 if quick else 64)
    depth, width = (16, 8) if quick else (64, 32)
    results["feedforward"] = [
        feedforward_case(depth, width, "float64", gain=1.0, trace_length=depth + 2),
        feedforward_case(depth, width, "float64", gain=3.0, trace_length=depth + 2),
        feedforward_case(depth, width, "float32", gain=1.0),
    ]
    T_bp = 200 if quick else 1000
    results["rnn_backprop"] = [rnn_backprop_case(T_bp, 8 if quick else 16, "float64"), rnn_backprop_case(T_bp, 8 if quick else 16, "float32")]
    if classifier_run is not None:
        results["classifier"] = classifier_summary(classifier_run)
    results["machine"]["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results["wall_s"] = time.perf_counter() - t0
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0].strip('"'))
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=pathlib.Path, default=None, help="directory for deer_gru.json / deer_gru.png (default runs/parallel-rnn)")
    where.add_argument("--update-committed", action="store_true", help="write next to this script and rewrite the README's generated section")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of well under a minute")
    parser.add_argument("--max-T", type=int, default=None, help="drop the grid points with T above this")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods for the GRU grid")
    parser.add_argument("--classifier-run", type=pathlib.Path, default=None, help="an `fpx run configs/parallel/gru_digits.py` directory: adds its table and curves")
    parser.add_argument("--from-json", type=pathlib.Path, default=None, help="regenerate the tables and figure from a deer_gru.json instead of measuring")
    args = parser.parse_args(argv)
    out = HERE if args.update_committed else (args.out or pathlib.Path("runs/parallel-rnn"))
    out.mkdir(parents=True, exist_ok=True)
    if args.from_json is not None:
        results = json.loads(args.from_json.read_text())
        if args.classifier_run is not None:
            results["classifier"] = classifier_summary(args.classifier_run)
    else:
        grid = QUICK_GRID if args.quick else DEFAULT_GRID
        if args.max_T is not None:
            grid = tuple(g for g in grid if g[1] <= args.max_T)
        methods = tuple(m for m in args.methods.split(",") if m)
        unknown = set(methods) - set(METHODS)
        if unknown:
            parser.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
        results = run(grid, methods=methods, quick=args.quick, classifier_run=args.classifier_run)
    (out / "deer_gru.json").write_text(json.dumps(results, indent=1))
    figure(results, out / "deer_gru.png")
    section = markdown(results)
    print(section)
    if args.update_committed:
        write_generated_section(README, "deer_gru", section)
    print(out / "deer_gru.json", out / "deer_gru.png")
    return results


if __name__ == "__main__":
    main()
