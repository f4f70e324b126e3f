"""Tables and figure of `iterated_operator` runs: `python experiments/operators/figures.py RUN_DIR [RUN_DIR ...] [--out DIR | --update-committed]`.

With several run directories, a variant found in a later one replaces the earlier one's
(e.g. a re-run of only the `deq` variant).

Prints the markdown results table (mean ± sd over seeds of the final metrics, per variant)
and writes `iterations.png`: final test / train relative L2 against the number of block
applications k (the DEQ drawn at its mean number of forward solver steps), the test error
over training, and (from the final checkpoints) the test error of every trained model when
its block is applied j = 1 ... 32 times at test time, with the fixed-point residual of z_j.
The figure goes into the first RUN_DIR, or `--out DIR`; only `--update-committed`
overwrites the committed `experiments/operators/iterations.png`.
"""

import json
import pathlib
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from ml_collections import ConfigDict  # noqa: E402

import fpx.experiment as fx  # noqa: E402
from fpx.experiment import build_task, expand_sweep, member_config  # noqa: E402
from fpx.operators import mean_relative_l2  # noqa: E402

ORDER = ["k1", "k2", "k4", "k8", "k16", "deq"]


TEST_TIME_K = (1, 2, 4, 8, 16, 32)


def restore(workdir, variant):
    """`(task, params, seeds)`: the task of `variant` and its final parameters (seeds stacked on axis 0)."""
    workdir = pathlib.Path(workdir)
    config = ConfigDict(json.loads((workdir / "config.json").read_text()))
    members = expand_sweep(config)
    mine = sorted({r["member"] for r in fx.read_metrics(workdir) if r["hparams"]["variant"] == variant})
    task = build_task(member_config(config, members[mine[0]]))
    return task, _restore_state(workdir, variant, task)["params"], [members[m]["seed"] for m in mine]


def test_time_iterations(source, variants):
    """{variant: {j: (test errors per seed, median residuals per seed)}} with the block applied j times."""
    params = {v: restore(source[v], v)[1] for v in variants}
    task = restore(source[variants[0]], variants[0])[0]  # every variant has the same lift, block, projection and data
    out = {}
    for j in TEST_TIME_K:
        fn = jax.jit(jax.vmap(lambda p, x: task.iterated(p, x, j), in_axes=(None, 0)))
        for v in variants:
            n = jax.tree_util.tree_leaves(params[v])[0].shape[0]
            errors, residuals = [], []
            for i in range(n):
                p = jax.tree_util.tree_map(lambda a: a[i], params[v])
                pred, res = fn(p, task.x_test)
                errors.append(float(mean_relative_l2(pred, task.y_test)))
                residuals.append(float(jnp.median(res)))
            out.setdefault(v, {})[j] = (errors, residuals)
    return out


def step_times(source, variants, rounds=3, steps=10):
    """{variant: median ms per training step}: one member (seed 0's final state), batch as in
    the config, jitted `train_step`, variants interleaved `rounds` times so that a change in
    machine load hits all of them alike."""
    import time

    fns = {}
    for v in variants:
        config = ConfigDict(json.loads((pathlib.Path(source[v]) / "config.json").read_text()))
        member = next(m for m in expand_sweep(config) if m["variant"] == v)
        task = build_task(member_config(config, member))
        state = jax.tree_util.tree_map(lambda a: a[0], _restore_state(source[v], v, task))
        hp = {"seed": jnp.int32(0), "optim.lr": jnp.float32(task.config.optim.lr)}
        step = jax.jit(task.train_step)
        jax.block_until_ready(step(state, hp, jr.PRNGKey(0)))  # compile
        fns[v] = (step, state, hp)
    times = defaultdict(list)
    for _ in range(rounds):
        for v in variants:
            step, state, hp = fns[v]
            t0 = time.perf_counter()
            for i in range(steps):
                out = step(state, hp, jr.PRNGKey(i + 1))  # always from the final state: same solver work
            jax.block_until_ready(out)
            times[v].append(1e3 * (time.perf_counter() - t0) / steps)
    return {v: float(np.median(t)) for v, t in times.items()}


def _restore_state(workdir, variant, task):
    records = fx.read_metrics(workdir)
    mine = sorted({r["member"] for r in records if r["hparams"]["variant"] == variant})
    unit = {r["unit"] for r in records if r["member"] in mine}.pop()
    hp = {p: jnp.zeros((len(mine),), jnp.float32 if p != "seed" else jnp.int32) for p in task.dynamic}
    abstract = jax.eval_shape(jax.vmap(task.init), hp, jax.vmap(jr.PRNGKey)(jnp.arange(len(mine))))
    manager = ocp.CheckpointManager((pathlib.Path(workdir) / "checkpoints" / f"unit-{unit}").absolute())
    state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(abstract))
    manager.close()
    return state


def _stats(values):
    values = np.asarray(values, float)
    return values.mean(), (values.std(ddof=1) if values.size > 1 else 0.0)


def main(workdirs, out, timing=True):
    rows, source, k_of = {}, {}, {}
    curves = {}
    for workdir in map(pathlib.Path, workdirs):
        summary = json.loads((workdir / "summary.json").read_text())
        config = json.loads((workdir / "config.json").read_text())
        mine = defaultdict(list)
        for row in summary["members"]:
            mine[row["hparams"]["variant"]].append(row)
        for v, rs in mine.items():
            rows[v], source[v], k_of[v] = rs, workdir, config["variants"][v]["model"].get("k")
            curves[v] = defaultdict(list)
            for r in fx.read_metrics(workdir):
                if r["hparams"]["variant"] == v:
                    curves[v][r["step"]].append(r["eval/test_rel_l2"])
    variants = [v for v in ORDER if v in rows]

    seeds = len(next(iter(rows.values())))
    ms = step_times(source, variants) if timing else {}
    print(
        f"| variant | block applications per forward pass | test rel. L2 (mean ± sd, {seeds} seeds) | train rel. L2 | "
        f"parameters | ms / step (1 member, back to back) | ms / step in the run ({seeds} seeds vmapped) |"
    )
    print("|---|---|---|---|---|---|---|")
    for v in variants:
        rs = rows[v]
        test, train = _stats([r["eval/test_rel_l2"] for r in rs]), _stats([r["eval/train_rel_l2"] for r in rs])
        if v == "deq":
            steps = _stats([r["eval/forward_steps"] for r in rs])[0]
            conv = min(r["eval/converged_fraction"] for r in rs)
            skipped = max(r.get("train/skipped_fraction", 0.0) for r in rs)
            apps = f"{steps:.1f} (Anderson steps, test set; converged {100 * conv:.0f} %, skipped steps {100 * skipped:.0f} %)"
        else:
            apps = str(k_of[v])
        params = {int(r["eval/num_params"]) for r in rs}
        print(
            f"| {v} | {apps} | {test[0]:.4f} ± {test[1]:.4f} | {train[0]:.4f} ± {train[1]:.4f} | "
            f"{', '.join(f'{p:,}' for p in sorted(params))} | {ms.get(v, float('nan')):.0f} | {rs[0]['ms_per_step']:.0f} |"
        )

    tt = test_time_iterations(source, variants)
    print()
    print("Test rel. L2 (mean over seeds) with the trained block applied j times at test time; in brackets the median relative fixed-point residual |B(z_j) - z_j| / |z_j|:")
    print()
    print("| trained as | " + " | ".join(f"j = {j}" for j in TEST_TIME_K) + " |")
    print("|---|" + "---|" * len(TEST_TIME_K))
    for v in variants:
        cells = [f"{np.mean(tt[v][j][0]):.4f} ({np.mean(tt[v][j][1]):.1e})" for j in TEST_TIME_K]
        print(f"| {v} | " + " | ".join(cells) + " |")

    d = config["data"]
    res = (d["s"] - 1) // d["stride"] + 1
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    ax = axes[0]
    ks = [k_of[v] for v in variants if v != "deq"]
    n_eval = min(d["n_train"], d["n_test"])
    for key, label, color in [("eval/test_rel_l2", "test", "C0"), ("eval/train_rel_l2", f"train ({n_eval} samples)", "C1")]:
        means = [_stats([r[key] for r in rows[v]]) for v in variants if v != "deq"]
        ax.errorbar(ks, [m for m, _ in means], yerr=[s for _, s in means], fmt="o-", color=color, capsize=3, label=f"iterated k times, {label}")
        for v in variants:
            if v != "deq":
                ax.plot([k_of[v]] * len(rows[v]), [r[key] for r in rows[v]], ".", color=color, alpha=0.4)
        if "deq" in rows:
            m, s = _stats([r[key] for r in rows["deq"]])
            x = _stats([r["eval/forward_steps"] for r in rows["deq"]])[0]
            ax.errorbar([x], [m], yerr=[s], fmt="*", ms=12, color=color, capsize=3, label=f"DEQ (at its mean solver steps), {label}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("block applications k (same parameters)")
    ax.set_ylabel("final mean relative L2")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(f"Darcy {res}x{res}: one weight-tied Fourier block, k times")
    ax = axes[1]
    for i, v in enumerate(variants):
        steps = sorted(curves[v])
        ax.semilogy(steps, [np.mean(curves[v][s]) for s in steps], "o-", color=f"C{i}", label=v)
    ax.set_xlabel("training step")
    ax.set_ylabel("test relative L2 (mean over seeds)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title("test error during training")
    ax = axes[2]
    for i, v in enumerate(variants):
        ax.loglog(TEST_TIME_K, [np.mean(tt[v][j][0]) for j in TEST_TIME_K], "o-", color=f"C{i}", label=f"trained as {v}")
        if k_of.get(v):
            ax.plot([k_of[v]], [np.mean(tt[v][k_of[v]][0])], "ks", ms=8, mfc="none")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("block applications j at test time")
    ax.set_ylabel("test relative L2 (mean over seeds)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title("trained models run at another depth (□ = trained k)")
    fig.tight_layout()
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "iterations.png", dpi=80)
    print(out / "iterations.png", file=sys.stderr)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=pathlib.Path, help="directory for iterations.png (default: the first RUN_DIR)")
    where.add_argument("--update-committed", action="store_true", help="overwrite the committed experiments/operators/iterations.png")
    parser.add_argument("--no-timing", dest="timing", action="store_false", help="skip the back-to-back step timing")
    args = parser.parse_args()
    main(args.workdirs, pathlib.Path(__file__).parent if args.update_committed else args.out or args.workdirs[0], args.timing)
