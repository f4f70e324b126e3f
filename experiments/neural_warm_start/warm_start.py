"""Neural warm starts that keep the solver's accuracy: an FNO's prediction as the initial guess of PCG.

`python experiments/neural_warm_start/warm_start.py [--out DIR | --update-committed] [--quick]`

Darcy flow `-div(a grad u) = 1` (`fpx.data.darcy`: thresholded GRF coefficients in {3, 12},
5-point finite differences). An FNO (`fpx.operators.FNO`) is trained to predict `u` from `a`
on the training grid; its prediction is the initial guess `x0` of the iterative solver
(`fpx.data.solve_darcy_iterative(a, x0=prediction)`, float64), which then iterates to the
tolerance: "predict, then iterate". The answer has the solver's accuracy and certificate
(true relative residual, converged flag) whatever the guess was; the guess changes only the
iteration count.

1. Training. The FNO is trained (float32, AdamW, cosine schedule) on the relative L2 error of
   its raw prediction for `pretrain` steps; then it branches for `finetune` more steps each:
   on the same regression loss, and on the iteration-aware loss of Arisaka and Li
   ("Principled Acceleration of Iterative Numerical Methods Using Machine Learning", ICML
   2023): the error (or residual) left after `k` iterations of the solver started from the
   prediction, differentiated through the `k` unrolled iterations
   (`fpx.data.iteration_aware_loss`, `fpx.data.unrolled_pcg`). Same batches, same schedule.
2. Solves. On fresh test samples at the training grid and at a finer grid the FNO never saw
   (zero-shot: the same parameters evaluated on the finer grid), Jacobi-preconditioned CG and
   multigrid-preconditioned CG (`method="cg"`, `"mg-cg"`) to relative residuals 1e-6 and
   1e-8, from zero, from the previous sample's solution, and from each FNO's prediction:
   iterations, solve time (one sample after another, one XLA thread, the fastest of 5
   passes), prediction time, and the distance of every answer to the sparse direct solve.
3. How good a guess must be: `x0 = u + delta (prediction - u)` for a range of `delta`.

Writes `warm_start.json` to `--out` (default `runs/neural_warm_start`); `--update-committed`
writes it next to this script and rewrites the README section; `--from-json FILE` only
regenerates the section.
"""

from __future__ import annotations

import functools
import os
import pathlib
import platform
import sys
import time

# One XLA thread, as in the tests and the benchmarks (only when this script loads jax; a
# process that has already imported it, such as the test that runs this script, keeps its own).
if "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import fpx.data  # noqa: E402
from fpx.data import _darcy, _elliptic, iteration_aware_loss, solve_darcy_iterative  # noqa: E402
from fpx.experiment import script_main  # noqa: E402
from fpx.operators import FNO  # noqa: E402

jax.config.update("jax_enable_x64", True)

HERE = pathlib.Path(__file__).resolve().parent
README = HERE / "README.md"

PRESETS = {
    # s: training grid; fine: the zero-shot grid; aware: (method, k, measure) of each
    # iteration-aware branch; deltas: the guess-quality sweep.
    "quick": dict(
        s=9, fine=17, n_train=48, n_test=4, width=8, modes=3, layers=1, padding=2, projection=16, batch=8,
        pretrain=40, finetune=15, lr=3e-3, aware=(("cg", 4, "residual"),), deltas=(1.0, 0.1, 0.01), seed=0,
        timing_passes=1,
    ),
    "default": dict(
        s=43, fine=85, n_train=400, n_test=16, width=12, modes=8, layers=4, padding=5, projection=64, batch=16,
        pretrain=500, finetune=150, lr=1e-3, aware=(("mg-cg", 2, "error"), ("cg", 10, "residual")),
        deltas=(1.0, 0.3, 0.1, 0.03, 0.01, 0.001), seed=0, timing_passes=5,
    ),
    # Not run here (hours on this CPU): the FNO paper's width and modes, trained on 85^2, zero-shot at 169^2.
    "full": dict(
        s=85, fine=169, n_train=1000, n_test=50, width=32, modes=12, layers=4, padding=9, projection=128, batch=20,
        pretrain=20000, finetune=5000, lr=1e-3, aware=(("mg-cg", 2, "error"), ("cg", 20, "residual")),
        deltas=(1.0, 0.3, 0.1, 0.03, 0.01, 0.001), seed=0, timing_passes=5,
    ),
}
TOLS = (1e-6, 1e-8)
METHODS = ("cg", "mg-cg")
METHOD_NAMES = {"cg": "Jacobi-PCG", "mg-cg": "MG-PCG"}
STARTS = ("zero", "previous sample", "FNO, regression loss")


def aware_name(spec) -> str:
    method, k, measure = spec
    return f"FNO, iteration-aware ({METHOD_NAMES[method]}, k = {k}, {measure})"


def start_names(p: dict) -> tuple[str, ...]:
    return STARTS + tuple(aware_name(spec) for spec in p["aware"])


# ---------------------------------------------------------------------------------------------
# data


def systems(n: int, s: int, seed: int):
    """Coefficients (float64) and their sparse direct solutions (float64) at grid `s`."""
    a, _ = fpx.data.darcy(n, s=s, seed=seed, cache=False, progress=False)
    a = np.asarray(a, np.float64)
    return a, np.stack([_darcy.solve_darcy(x) for x in a])


# ---------------------------------------------------------------------------------------------
# the network and its training


def make_model(p: dict, scale: float, padding: int | None = None):
    """`predict(params, a) -> u`: the FNO on one coefficient field, output rescaled, zero on the boundary."""
    fno = FNO(
        dim=2, modes=p["modes"], width=p["width"], layers=p["layers"],
        padding=p["padding"] if padding is None else padding, projection_width=p["projection"], dtype=jnp.float32,
    )

    def predict(params, a):
        x = ((a.astype(jnp.float32) - 7.5) / 4.5)[..., None]  # {3, 12} -> {-1, 1}
        y = fno.apply(params, x)[..., 0] * scale
        return jnp.pad(y[1:-1, 1:-1], 1)

    return fno, predict


def batch_loss(predict, params, a, u, spec):
    """Mean over the batch of the iteration-aware loss; `spec = ("cg", 0, "error")` is the relative L2 regression loss."""
    method, k, measure = spec
    guesses = jax.vmap(predict, in_axes=(None, 0))(params, a)
    per_sample = jax.vmap(lambda a, x, u: iteration_aware_loss(a, x, u, steps=k, method=method, measure=measure))
    return jnp.mean(per_sample(a, guesses, u))


REGRESSION = ("cg", 0, "error")


def train(p: dict, a: np.ndarray, u: np.ndarray):
    """Pretrain on the regression loss, then branch: regression and each iteration-aware loss, same batches."""
    scale = float(u.std())
    fno, predict = make_model(p, scale)
    params = fno.init(jax.random.PRNGKey(p["seed"]))
    total = p["pretrain"] + p["finetune"]
    opt = optax.adamw(optax.cosine_decay_schedule(p["lr"], total), weight_decay=1e-4)
    state = opt.init(params)
    a32, u32 = jnp.asarray(a, jnp.float32), jnp.asarray(u, jnp.float32)

    @functools.partial(jax.jit, static_argnames="spec")
    def step(params, state, a, u, idx, spec):
        loss, grad = jax.value_and_grad(lambda q: batch_loss(predict, q, a[idx], u[idx], spec))(params)
        updates, state = opt.update(grad, state, params)
        return optax.apply_updates(params, updates), state, loss

    def batches(seed, count):
        """Epoch-wise shuffled minibatches, the same sequence for every branch started from `seed`."""
        rng = np.random.default_rng(seed)
        n, b = len(a), p["batch"]
        out = []
        while len(out) < count:
            perm = rng.permutation(n)
            out += [perm[i : i + b] for i in range(0, n - b + 1, b)]
        return [jnp.asarray(i) for i in out[:count]]

    def fit(params, state, spec, idx):
        t0 = time.perf_counter()
        jax.block_until_ready(step(params, state, a32, u32, idx[0], spec))  # compile outside the timed loop
        compile_s = time.perf_counter() - t0
        losses = []
        t0 = time.perf_counter()
        for i in idx:
            params, state, loss = step(params, state, a32, u32, i, spec)
            losses.append(loss)
        jax.block_until_ready(params)
        return params, state, {
            "steps": len(idx), "seconds": time.perf_counter() - t0, "compile_s": compile_s,
            "first_loss": float(losses[0]), "last_loss": float(np.mean([float(v) for v in losses[-10:]])),
        }

    params, state, pre = fit(params, state, REGRESSION, batches(p["seed"], p["pretrain"]))
    models = {}
    branch_batches = batches(p["seed"] + 1, p["finetune"])
    for name, spec in [(STARTS[2], REGRESSION)] + [(aware_name(s), tuple(s)) for s in p["aware"]]:
        q, _, log = fit(params, state, spec, branch_batches)
        models[name] = {"params": q, "spec": spec, "log": log}
    return scale, pre, models


# ---------------------------------------------------------------------------------------------
# evaluation


def fastest(fn, passes):
    """The fastest of `passes` warm calls (the least disturbed by other load), and the last result."""
    out = jax.block_until_ready(fn())
    best = np.inf
    for _ in range(passes):
        t = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best, out


def relative_residuals(a, x):
    out = []
    for ai, xi in zip(a, x):
        op = _elliptic.darcy_operator(jnp.asarray(ai))
        b = jnp.ones_like(op.diagonal())
        r = b - op.mv(jnp.asarray(xi)[1:-1, 1:-1])
        out.append(float(jnp.linalg.norm(r) / jnp.linalg.norm(b)))
    return np.asarray(out)


def rel_l2(x, u):
    n = len(u)
    return np.linalg.norm((x - u).reshape(n, -1), axis=1) / np.linalg.norm(u.reshape(n, -1), axis=1)


def solve_cell(a, u, x0, method, rtol):
    """Solve every sample (one after another) from `x0`: iterations, certificate, accuracy (the time comes later)."""
    sol = jax.block_until_ready(solve_darcy_iterative(a, method=method, rtol=rtol, x0=x0, batch=1))
    steps = np.asarray(sol.num_steps)
    return {
        "rtol": rtol,
        "samples": len(a),
        "iterations_mean": float(steps.mean()),
        "iterations_min": int(steps.min()),
        "iterations_max": int(steps.max()),
        "converged": int(np.asarray(sol.converged).sum()),
        "max_residual": float(np.asarray(sol.residual_norm).max()),
        "max_rel_diff_direct": float(rel_l2(np.asarray(sol.value), u).max()),
    }


def time_cells(a, guesses, rows, passes):
    """Solve time per sample of every (start, solver, tolerance): the fastest of `passes` passes,
    the passes interleaved over all the cells so that a burst of other load does not favour one start."""
    best = {}
    for _ in range(passes):
        for row in rows:
            x0 = guesses[row["start"]]
            for key in row["solves"]:
                method, rtol = key.split("@")
                t = time.perf_counter()
                jax.block_until_ready(solve_darcy_iterative(a, method=method, rtol=float(rtol), x0=x0, batch=1).value)
                seconds = time.perf_counter() - t
                best[(row["start"], key)] = min(best.get((row["start"], key), np.inf), seconds)
    for row in rows:
        for key, cell in row["solves"].items():
            cell["ms_per_sample"] = 1e3 * best[(row["start"], key)] / len(a)


def evaluate_resolution(p, s, seed, scale, models, zero_shot):
    a_all, u_all = systems(p["n_test"] + 1, s, seed)
    a, u = a_all[1:], u_all[1:]  # sample 0 is only the first one's predecessor
    guesses = {"zero": np.zeros_like(u), "previous sample": u_all[:-1]}
    predict_ms = {}
    # The FNO at this grid: the same parameters; padding in grid points as in training.
    _, predict = make_model(p, scale)
    one_by_one = jax.jit(lambda q, a: jax.lax.map(lambda x: predict(q, x), a))
    for name, m in models.items():
        seconds, pred = fastest(lambda: one_by_one(m["params"], jnp.asarray(a)), p["timing_passes"])
        guesses[name] = np.asarray(pred, np.float64)
        predict_ms[name] = 1e3 * seconds / len(a)
    if zero_shot:
        # The padding is a number of grid points: on the finer grid the same number is a narrower
        # strip of the domain. Also the regression FNO with the padding scaled to the same width.
        padding = round(p["padding"] * (s - 1) / (p["s"] - 1))
        _, predict_scaled = make_model(p, scale, padding)
        scaled = jax.jit(lambda q, a: jax.lax.map(lambda x: predict_scaled(q, x), a))
        name = f"{STARTS[2]}, padding {padding} (scaled to the grid)"
        seconds, pred = fastest(lambda: scaled(models[STARTS[2]]["params"], jnp.asarray(a)), p["timing_passes"])
        guesses[name] = np.asarray(pred, np.float64)
        predict_ms[name] = 1e3 * seconds / len(a)
    rows = []
    for name, x0 in guesses.items():
        row = {
            "start": name,
            "guess_rel_l2": float(rel_l2(x0, u).mean()) if name != "zero" else 1.0,
            "guess_rel_residual": float(relative_residuals(a, x0).mean()),
            "predict_ms": predict_ms.get(name, 0.0),
            "solves": {},
        }
        for method in METHODS:
            for rtol in TOLS:
                row["solves"][f"{method}@{rtol:g}"] = solve_cell(a, u, x0, method, rtol)
        rows.append(row)
    time_cells(a, guesses, rows, p["timing_passes"])
    return {"s": s, "zero_shot": zero_shot, "field_seed": seed, "rows": rows}, (a, u, guesses)


def delta_sweep(p, a, u, guess):
    """Iterations from `u + delta (guess - u)`: how accurate a guess must be to pay off."""
    out = []
    for delta in p["deltas"]:
        x0 = u + delta * (guess - u)
        entry = {"delta": delta, "guess_rel_l2": float(rel_l2(x0, u).mean())}
        for method in METHODS:
            sol = solve_darcy_iterative(a, method=method, rtol=TOLS[-1], x0=x0, batch=1)
            entry[method] = float(np.asarray(sol.num_steps).mean())
            entry[f"{method}_converged"] = bool(np.asarray(sol.converged).all())
        out.append(entry)
    return out


def run(preset: str) -> dict:
    p = PRESETS[preset]
    start = time.time()
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    a_train, u_train = systems(p["n_train"], p["s"], 0)
    t0 = time.time()
    scale, pretrain_log, models = train(p, a_train, u_train)
    train_s = time.time() - t0
    t0 = time.time()
    resolutions, sweep = [], None
    for s, seed, zero_shot in ((p["s"], 1, False), (p["fine"], 2, True)):
        res, (a, u, guesses) = evaluate_resolution(p, s, seed, scale, models, zero_shot)
        resolutions.append(res)
        if not zero_shot:
            sweep = delta_sweep(p, a, u, guesses[STARTS[2]])
    eval_s = time.time() - t0
    setting = {k: (list(map(list, v)) if k == "aware" else (list(v) if isinstance(v, tuple) else v)) for k, v in p.items()}
    setting.update(tols=list(TOLS), scale=scale)
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {jax.default_backend()}",
        "load_before": load_before,
        "load_after": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "preset": preset,
        "setting": setting,
        "parameters": int(sum(x.size for x in jax.tree_util.tree_leaves(next(iter(models.values()))["params"]))),
        "training": {"pretrain": pretrain_log, **{name: m["log"] for name, m in models.items()}},
        "resolutions": resolutions,
        "delta_sweep": sweep,
        "train_s": train_s,
        "eval_s": eval_s,
        "wall_s": time.time() - start,
    }


# ---------------------------------------------------------------------------------------------
# the README section


def _cell(c):
    return f"{c['iterations_mean']:.1f} ({c['ms_per_sample']:.2f} ms)"


def markdown(r: dict) -> str:
    st = r["setting"]
    tr = r["training"]
    lines = [
        f"Measured {r['date']} on {r['machine']}, jax {r['jax']}, preset `{r['preset']}`; load average "
        f"before / after: {r['load_before']} / {r['load_after']}; script wall time {r['wall_s'] / 60:.1f} min "
        f"(training {r['train_s']:.0f} s, solves and timing {r['eval_s']:.0f} s).",
        "",
        f"Setting: FNO (width {st['width']}, {st['modes']} modes, {st['layers']} layers, padding {st['padding']}, "
        f"projection {st['projection']}; {r['parameters']:,} parameters, float32) trained on {st['n_train']} Darcy "
        f"samples at {st['s']}² (`fpx.data.darcy(seed=0)`), batch {st['batch']}, AdamW lr {st['lr']:g} cosine: "
        f"{st['pretrain']} steps on the relative L2 loss, then {st['finetune']} more steps in each branch. Test: "
        f"{st['n_test']} fresh samples at {st['s']}² (seed 1) and at {st['fine']}² (seed 2, zero-shot). Solves in "
        f"float64 by `fpx.data.solve_darcy_iterative(a, x0=..., method=...)`, one sample after another, times "
        f"the fastest of {st['timing_passes']} interleaved passes per sample; the FNO's prediction time (one sample after "
        f"another, float32) is separate.",
        "",
    ]
    for res in r["resolutions"]:
        where = f"zero-shot: the FNO was trained at {st['s']}²" if res["zero_shot"] else "training grid"
        title = f"**{res['s']}² ({where})**"
        lines += [
            title + ": mean iterations per sample (solve time per sample) to relative residual 1e-6 / 1e-8",
            "",
            "| start | guess rel. L2 error | guess rel. residual | predict ms | "
            + " | ".join(f"{METHOD_NAMES[m]} {t:g}" for m in METHODS for t in st["tols"]) + " |",
            "|---|---|---|---|" + "---|" * (len(METHODS) * len(st["tols"])),
        ]
        for row in res["rows"]:
            cells = [_cell(row["solves"][f"{m}@{t:g}"]) for m in METHODS for t in st["tols"]]
            lines.append(
                f"| {row['start']} | {row['guess_rel_l2']:.4f} | {row['guess_rel_residual']:.3g} | "
                f"{row['predict_ms']:.2f} | " + " | ".join(cells) + " |"
            )
        lines.append("")
    # Iterations saved against zero, and the certificate.
    zero_rows = {res["s"]: res["rows"][0] for res in r["resolutions"]}
    lines += [
        "Change in iterations against the zero start (mean over the test samples, and in % of the zero "
        "start's count; negative: fewer), and wall time to tolerance including the prediction, relative to "
        "the zero start's (< 1: faster):",
        "",
        "| start | grid | " + " | ".join(f"{METHOD_NAMES[m]} {t:g}" for m in METHODS for t in st["tols"]) + " |",
        "|---|---|" + "---|" * (len(METHODS) * len(st["tols"])),
    ]
    for res in r["resolutions"]:
        for row in res["rows"][1:]:
            cells = []
            for m in METHODS:
                for t in st["tols"]:
                    key = f"{m}@{t:g}"
                    z, c = zero_rows[res["s"]]["solves"][key], row["solves"][key]
                    change = c["iterations_mean"] - z["iterations_mean"]
                    ratio = (c["ms_per_sample"] + row["predict_ms"]) / z["ms_per_sample"]
                    cells.append(f"{change:+.1f} ({100 * change / z['iterations_mean']:+.0f} %), time ×{ratio:.2f}")
            lines.append(f"| {row['start']} | {res['s']}² | " + " | ".join(cells) + " |")
    all_cells = [c for res in r["resolutions"] for row in res["rows"] for c in row["solves"].values()]
    worst_diff = max(c["max_rel_diff_direct"] for c in all_cells if c["rtol"] == st["tols"][-1])
    worst_res = max(c["max_residual"] / c["rtol"] for c in all_cells)
    n_conv = sum(c["converged"] for c in all_cells)
    n_all = sum(c["samples"] for c in all_cells)
    lines += [
        "",
        f"Accuracy kept: {n_conv} of {n_all} solves converged (every start, solver, tolerance and grid); the "
        f"largest reported residual is {worst_res:.2f} × the tolerance; at 1e-8 the largest relative L2 "
        f"distance of an answer to the sparse direct solve is {worst_diff:.1e}.",
        "",
        "Training (the loss is the mean over the batch; last = mean of the last 10 steps), and the raw "
        "prediction's relative L2 error on the test samples:",
        "",
        "| model | loss | steps | s / step | compile s | loss first → last | test rel. L2, "
        + " / ".join(f"{res['s']}²" for res in r["resolutions"]) + " |",
        "|---|---|---|---|---|---|---|",
    ]
    pre = tr["pretrain"]
    lines.append(
        f"| pretraining (shared) | relative L2 of the prediction | {pre['steps']} | {pre['seconds'] / pre['steps']:.3f} | "
        f"{pre['compile_s']:.1f} | {pre['first_loss']:.4f} → {pre['last_loss']:.4f} | — |"
    )
    names = [row["start"] for row in r["resolutions"][0]["rows"][2:]]
    specs = [("cg", 0, "error")] + [tuple(s) for s in st["aware"]]
    for name, spec in zip(names, specs):
        log = tr[name]
        loss = "relative L2 of the prediction" if spec[1] == 0 else (
            f"relative {spec[2]} after {spec[1]} {METHOD_NAMES[spec[0]]} iterations")
        errs = " / ".join(
            f"{next(row for row in res['rows'] if row['start'] == name)['guess_rel_l2']:.4f}" for res in r["resolutions"]
        )
        lines.append(
            f"| {name} | {loss} | {log['steps']} | {log['seconds'] / log['steps']:.3f} | {log['compile_s']:.1f} | "
            f"{log['first_loss']:.4g} → {log['last_loss']:.4g} | {errs} |"
        )
    sw = r["delta_sweep"]
    lines += [
        "",
        f"How accurate a guess must be (at {st['s']}², tolerance {st['tols'][-1]:g}): mean iterations from "
        f"`u + δ (FNO prediction − u)` (regression FNO; δ = 1 is the prediction itself, the zero start needs "
        + ", ".join(
            f"{zero_rows[st['s']]['solves'][m + '@' + format(st['tols'][-1], 'g')]['iterations_mean']:.1f} "
            f"({METHOD_NAMES[m]})"
            for m in METHODS
        )
        + "):",
        "",
        "| δ | guess rel. L2 error | " + " | ".join(METHOD_NAMES[m] for m in METHODS) + " |",
        "|---|---|" + "---|" * len(METHODS),
    ]
    for e in sw:
        lines.append(f"| {e['delta']:g} | {e['guess_rel_l2']:.2e} | " + " | ".join(f"{e[m]:.1f}" for m in METHODS) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    return script_main(
        argv, doc=__doc__, run=lambda quick: run("quick" if quick else "default"), markdown=markdown, readme=README,
        section="neural_warm_start", results_name="warm_start.json", default_out="runs/neural_warm_start",
        committed_dir=HERE,
    )

if __name__ == "__main__":
    main()
