"""Learned relaxation: a bandit choosing SOR's omega per Darcy system (Khodak et al., ICLR 2024).

`python experiments/learned_relaxation/relax.py [--out DIR | --update-committed] [--quick]`

A sequence of Darcy systems `-div(a grad u) = 1` (`fpx.data.darcy`: thresholded GRF
coefficients in {3, 12}, 5-point finite differences, float64) is solved one after another by
red-black SOR (`fpx.data.sor_solve`, run by `fpx.fixed_point`, stopping at a relative
residual of 1e-8). Before each solve, Tsallis-INF (`fpx.data._elliptic.TsallisINF`) picks
`omega` from a grid of K values; it sees only the iteration count of the solve it chose.

1. The table: every system solved with every grid `omega`, `jax.vmap` over the grid (one
   compiled loop per system, each member stopping on its own test). It gives the best fixed
   `omega` in hindsight, `omega = 1` (Gauss-Seidel) and the per-system optimum.
2. The bandit, live: choose, solve (jit-compiled once, `omega` traced), feed back; its
   counts are checked against the table entry for entry. Then replayed on the table for
   several seeds, with the loss of the paper's analysis (iterations / cap, in [0, 1]) and
   with the authors' code's normalisation (the running mean of the counts seen).
3. The same bandits on a longer sequence drawn with replacement from the measured systems,
   to show how the gap to the best fixed `omega` closes with the number of systems.
4. Baselines: CG without preconditioner and Jacobi-preconditioned CG (`pcg`) on every system.

Writes `relax.json` and `relax.png` to `--out` (default `runs/learned_relaxation`);
`--update-committed` writes them next to this script and rewrites the README section.
"""

from __future__ import annotations

import os
import pathlib
import platform
import sys
import time

# One XLA thread, as in the tests and benchmarks/bench_pde_solvers.py (only when this script
# loads jax; a process that has already imported it, such as the test that runs this script, keeps its own).
if "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    ).strip()

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import fpx  # noqa: E402
import fpx.data  # noqa: E402
from fpx.data import _elliptic  # noqa: E402
from fpx.experiment import script_main  # noqa: E402

jax.config.update("jax_enable_x64", True)

HERE = pathlib.Path(__file__).resolve().parent
README = HERE / "README.md"

PRESETS = {
    # s: grid size; instances: systems in the sequence; arms: grid values of omega (Khodak et al.
    # take K ~ (2T)^(1/3)); seeds: bandit replays; resampled: rounds of the longer sequence.
    "quick": dict(s=13, instances=30, arms=5, seeds=2, resampled=300, max_steps=1000, field_seed=0),
    "default": dict(s=31, instances=400, arms=10, seeds=8, resampled=3000, max_steps=4000, field_seed=0),
}
RTOL = 1e-8


def omega_grid(k: int) -> np.ndarray:
    """`k` values from 1 to 1.95, evenly spaced in `log(2 - omega)`: denser towards 2, where the optimum
    `2 / (1 + sin(pi h)) ~ 2 - 2 pi h` of a fine grid lies (Khodak et al. space [1, 1.95] evenly)."""
    return 2.0 - np.geomspace(1.0, 0.05, k)


def systems(p: dict) -> np.ndarray:
    a, _ = fpx.data.darcy(p["instances"], s=p["s"], seed=p["field_seed"], cache=False)
    return np.asarray(a, np.float64)


def grid_table(a: np.ndarray, grid: np.ndarray, max_steps: int):
    """SOR iterations of every system at every grid omega (vmapped over omega); non-converged: the cap."""
    solve = jax.jit(jax.vmap(lambda w, a: _elliptic.sor_solve(a, omega=w, rtol=RTOL, max_steps=max_steps),
                             in_axes=(0, None)))
    g = jnp.asarray(grid)
    steps = np.empty((len(a), len(grid)), np.int64)
    ok = np.empty((len(a), len(grid)), bool)
    for t, x in enumerate(a):
        sol = solve(g, jnp.asarray(x))
        steps[t], ok[t] = np.asarray(sol.num_steps), np.asarray(sol.converged)
    return np.where(ok, steps, max_steps), ok


@jax.jit
def _cg(a, jacobi):
    op = _elliptic.darcy_operator(a)
    d = op.diagonal()
    pre = lambda r: jnp.where(jacobi, 1.0 / d, 1.0) * r
    return _elliptic.pcg(op.mv, jnp.ones_like(d), precond=pre, rtol=RTOL, max_steps=20 * a.shape[-1] + 200)


def cg_table(a: np.ndarray):
    """CG and Jacobi-CG iterations of every system (one compiled solve, `jacobi` a traced flag)."""
    out = {}
    for name, jacobi in (("cg", False), ("jacobi_cg", True)):
        sols = [_cg(jnp.asarray(x), jnp.asarray(jacobi)) for x in a]
        out[name] = (np.array([int(s.num_steps) for s in sols]), np.array([bool(s.converged) for s in sols]))
    return out


_sor_jit = jax.jit(
    lambda a, w, max_steps: _elliptic.sor_solve(a, omega=w, rtol=RTOL, max_steps=max_steps), static_argnames="max_steps"
)


def _sor(a, omega, max_steps):
    """One SOR solve, compiled once per shape and cap (`omega` is traced)."""
    return _sor_jit(jnp.asarray(a), jnp.asarray(omega), max_steps=max_steps)


def live_bandit(a: np.ndarray, grid: np.ndarray, max_steps: int, seed: int, scale):
    """Choose, solve, feed back: the bandit driving the solver, one system after another."""
    bandit = _elliptic.TsallisINF(grid, seed=seed, scale=scale)
    chosen, steps = [], []
    for x in a:
        i = bandit.choose()
        sol = _sor(x, grid[i], max_steps)
        n = int(sol.num_steps) if bool(sol.converged) else max_steps
        bandit.update(float(n))
        chosen.append(i)
        steps.append(n)
    return np.asarray(chosen), np.asarray(steps)


def replay(costs: np.ndarray, seeds: int, scale) -> dict:
    """The bandit over a cost table for several seeds: totals, ratios to the best fixed arm, mean regret curve."""
    best_arm = int(np.argmin(costs.sum(0)))
    totals, curves = [], []
    for seed in range(seeds):
        chosen = _elliptic.play_bandit(costs, seed=seed, scale=scale)
        paid = costs[np.arange(len(costs)), chosen]
        totals.append(float(paid.sum()))
        curves.append(np.cumsum(paid - costs[:, best_arm]))
    best = float(costs[:, best_arm].sum())
    ratios = [t / best for t in totals]
    return {
        "totals": totals,
        "ratios": ratios,
        "mean_ratio_to_best_fixed": float(np.mean(ratios)),
        "std_ratio": float(np.std(ratios)),
        "regret_curve": [round(float(v), 1) for v in np.mean(curves, axis=0)],
    }


def fastest_time(fn, repeats=15):
    """The fastest of `repeats` warm calls: the least disturbed by other load on the machine."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(min(times))


def wall_times(a: np.ndarray, omega: float, max_steps: int) -> dict:
    """Wall time of one solve of the first system and per iteration (fastest of 15 warm solves)."""
    x = jnp.asarray(a[0])
    out = {}
    for name, fn in (
        ("sor_best_fixed", lambda: _sor(x, omega, max_steps)),
        ("cg", lambda: _cg(x, jnp.asarray(False))),
        ("jacobi_cg", lambda: _cg(x, jnp.asarray(True))),
    ):
        seconds = fastest_time(fn)
        steps = int(fn().num_steps)
        out[name] = {"ms": 1e3 * seconds, "iterations": steps, "us_per_iteration": 1e6 * seconds / steps}
    return out


def run(preset: str) -> dict:
    p = PRESETS[preset]
    start = time.time()
    load_before = " ".join(f"{v:.1f}" for v in os.getloadavg())
    a = systems(p)
    grid = omega_grid(p["arms"])
    t0 = time.time()
    costs, ok = grid_table(a, grid, p["max_steps"])
    table_s = time.time() - t0
    totals = costs.sum(0)
    best = int(np.argmin(totals))
    cg = cg_table(a)

    # The live run (authors' normalisation, seed 0) must equal the replay on the table.
    chosen, live_steps = live_bandit(a, grid, p["max_steps"], seed=0, scale="mean")
    matches = bool(np.array_equal(live_steps, costs[np.arange(len(a)), chosen]))
    matches &= bool(np.array_equal(chosen, _elliptic.play_bandit(costs, seed=0, scale="mean")))

    bandit_mean = replay(costs, p["seeds"], "mean")
    bandit_cap = replay(costs, p["seeds"], float(p["max_steps"]))
    rng = np.random.default_rng(12345)
    long_costs = costs[rng.integers(0, len(a), p["resampled"])]
    long_mean = replay(long_costs, p["seeds"], "mean")
    long_cap = replay(long_costs, p["seeds"], float(p["max_steps"]))
    for r in (long_mean, long_cap):
        r["ratio_curve"] = _ratio_curve(long_costs, r)
        del r["regret_curve"]

    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {jax.default_backend()}",
        "load_before": load_before,
        "load_after": " ".join(f"{v:.1f}" for v in os.getloadavg()),
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "preset": preset,
        "setting": {
            "s": p["s"], "instances": p["instances"], "field_seed": p["field_seed"], "rtol": RTOL,
            "max_steps": p["max_steps"], "grid": [round(float(w), 4) for w in grid], "seeds": p["seeds"],
            "resampled_rounds": p["resampled"],
        },
        "per_arm_total": totals.tolist(),
        "per_arm_mean": (totals / len(a)).tolist(),
        "per_arm_std": costs.std(0).tolist(),
        "instance_best_omega_counts": np.bincount(np.argmin(costs, axis=1), minlength=len(grid)).tolist(),
        "sor_failures": int((~ok).sum()),
        "totals": {
            "omega_1": int(totals[0]),
            "best_fixed": int(totals[best]),
            "best_fixed_omega": round(float(grid[best]), 4),
            "instance_optimal": int(costs.min(1).sum()),
            "cg": int(cg["cg"][0].sum()),
            "jacobi_cg": int(cg["jacobi_cg"][0].sum()),
            "bandit_live": int(live_steps.sum()),
        },
        "cg_converged": bool(cg["cg"][1].all() and cg["jacobi_cg"][1].all()),
        "live_run_matches_table": matches,
        "live_chosen_counts": np.bincount(chosen, minlength=len(grid)).tolist(),
        "bandit": bandit_mean,
        "bandit_cap": bandit_cap,
        "resampled": {"mean": long_mean, "cap": long_cap},
        "wall_times": wall_times(a, float(grid[best]), p["max_steps"]),
        "table_s": table_s,
        "wall_s": time.time() - start,
    }


def _ratio_curve(costs, r, points=60):
    """Mean over seeds of (bandit total so far) / (best fixed arm's total so far), at `points` rounds."""
    best = np.cumsum(costs[:, int(np.argmin(costs.sum(0)))])
    at = np.unique(np.geomspace(10, len(costs), points).astype(int)) - 1
    curve = 1.0 + np.asarray(r["regret_curve"]) / best
    return [[int(t + 1), round(float(curve[t]), 4)] for t in at]


def _at(curve, rounds):
    """`(round, ratio)` of the curve's points nearest to the given rounds (without repeats)."""
    points = np.asarray(curve)
    picked = {}
    for k in rounds:
        j = int(np.argmin(np.abs(points[:, 0] - k)))
        picked[int(points[j, 0])] = float(points[j, 1])
    return sorted(picked.items())


def markdown(r: dict) -> str:
    st, t = r["setting"], r["totals"]
    n, best = st["instances"], t["best_fixed"]
    b, c = r["bandit"], r["bandit_cap"]
    rm, rc = r["resampled"]["mean"], r["resampled"]["cap"]

    def row(name, total, note=""):
        return f"| {name} | {total:,.0f} | {total / n:.1f} | {total / best:.3f} |{note}"

    target = b["mean_ratio_to_best_fixed"]
    verdict = "met" if target <= 1.10 else f"missed by {100 * (target - 1.10):.0f} percentage points"
    lines = [
        f"Measured {r['date']} on {r['machine']}, jax {r['jax']}; load average before / after: "
        f"{r['load_before']} / {r['load_after']}; script wall time {r['wall_s'] / 60:.1f} min "
        f"(the vmapped omega table {r['table_s']:.0f} s).",
        "",
        f"Setting: {n} Darcy systems (`fpx.data.darcy(n={n}, s={st['s']}, seed={st['field_seed']})`, "
        f"{(st['s'] - 2) ** 2} unknowns each, f = 1), red-black SOR to relative residual {st['rtol']:g}, "
        f"cap {st['max_steps']} sweeps; grid of K = {len(st['grid'])} omegas "
        f"{', '.join(f'{w:g}' for w in st['grid'])}; bandit rows: mean ± std over {st['seeds']} seeds "
        f"(the live run is seed 0). SOR runs that hit the cap: {r['sor_failures']}; CG runs all converged: "
        f"{r['cg_converged']}.",
        "",
        "| method | total iterations | per system | vs best fixed ω |",
        "|---|---|---|---|",
        row("SOR, ω = 1 (Gauss-Seidel)", t["omega_1"]),
        row(f"SOR, best fixed ω = {t['best_fixed_omega']:g} (in hindsight, vmapped grid)", best),
        row("SOR, per-system best ω of the grid (instance-optimal)", t["instance_optimal"]),
        row("SOR + Tsallis-INF, loss / running mean (authors' code), live run", t["bandit_live"]),
        f"| SOR + Tsallis-INF, loss / running mean, {st['seeds']} seeds | "
        f"{np.mean(b['totals']):,.0f} ± {np.std(b['totals']):,.0f} | {np.mean(b['totals']) / n:.1f} | "
        f"{b['mean_ratio_to_best_fixed']:.3f} ± {b['std_ratio']:.3f} |",
        f"| SOR + Tsallis-INF, loss = iterations / cap (paper's analysis), {st['seeds']} seeds | "
        f"{np.mean(c['totals']):,.0f} ± {np.std(c['totals']):,.0f} | {np.mean(c['totals']) / n:.1f} | "
        f"{c['mean_ratio_to_best_fixed']:.3f} ± {c['std_ratio']:.3f} |",
        row("CG, no preconditioner", t["cg"]),
        row("Jacobi-preconditioned CG", t["jacobi_cg"]),
        "",
        f"Target (bandit within 10 % of the best fixed ω over the sequence): {verdict} "
        f"(ratio {target:.3f} with the authors' normalisation, {c['mean_ratio_to_best_fixed']:.3f} with the "
        f"paper's). Live run equals the replay on the table, choice for choice and count for count: "
        f"{r['live_run_matches_table']}.",
        "",
        f"Longer sequence: {st['resampled_rounds']} systems drawn with replacement from the {n} measured ones "
        f"(same distribution, repeats): bandit / best fixed ω = {rm['mean_ratio_to_best_fixed']:.3f} ± "
        f"{rm['std_ratio']:.3f} (running-mean loss) and {rc['mean_ratio_to_best_fixed']:.3f} ± {rc['std_ratio']:.3f} "
        f"(iterations / cap); with the running-mean loss " + ", ".join(
            f"{v:.3f} after {k}" for k, v in _at(rm["ratio_curve"], (100, st["instances"], 1000, st["resampled_rounds"]))
        ) + " systems.",
        "",
        f"Regret bound of the analysis (losses iterations / cap in [0, 1]): cap × (4 √(K T) + 1) = "
        f"{st['max_steps'] * (4 * np.sqrt(len(st['grid']) * n) + 1):,.0f} iterations over the {n} systems; "
        f"measured regret {np.mean(c['totals']) - best:,.0f} (iterations / cap) and "
        f"{np.mean(b['totals']) - best:,.0f} (running mean).",
        "",
        "Mean SOR iterations per system at each grid ω (± std over the systems), and how often each ω was "
        "the per-system best / chosen in the live run:",
        "",
        "| ω | " + " | ".join(f"{w:g}" for w in st["grid"]) + " |",
        "|---|" + "---|" * len(st["grid"]),
        "| iterations | " + " | ".join(f"{m:.0f} ± {s:.0f}" for m, s in zip(r["per_arm_mean"], r["per_arm_std"])) + " |",
        "| per-system best | " + " | ".join(str(v) for v in r["instance_best_omega_counts"]) + " |",
        "| chosen (live) | " + " | ".join(str(v) for v in r["live_chosen_counts"]) + " |",
        "",
        "Wall time of one solve of the first system on this machine (fastest of 15 warm solves, one XLA "
        "thread): " + "; ".join(
            f"{label} {w['ms']:.2f} ms ({w['iterations']} iterations, {w['us_per_iteration']:.1f} µs each)"
            for label, w in (
                (f"SOR at ω = {t['best_fixed_omega']:g}", r["wall_times"]["sor_best_fixed"]),
                ("CG", r["wall_times"]["cg"]),
                ("Jacobi-CG", r["wall_times"]["jacobi_cg"]),
            )
        ) + ". A red-black SOR sweep applies the operator three times (two half-sweeps, the residual check).",
    ]
    return "\n".join(lines)


def figure(r: dict, path: pathlib.Path) -> None:
    st = r["setting"]
    grid = np.asarray(st["grid"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    ax.errorbar(grid, r["per_arm_mean"], yerr=r["per_arm_std"], fmt="o-", ms=3, capsize=2, label="SOR (red-black)")
    n = st["instances"]
    ax.axhline(r["totals"]["cg"] / n, color="C1", ls="--", label="CG")
    ax.axhline(r["totals"]["jacobi_cg"] / n, color="C2", ls=":", label="Jacobi-CG")
    ax.set_yscale("log")
    ax.set_xlabel("ω")
    ax.set_ylabel("iterations per system")
    ax.set_title(f"{n} Darcy systems, s = {st['s']}")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[1]
    rounds = np.arange(1, n + 1)
    ax.plot(rounds, r["bandit"]["regret_curve"], label="Tsallis-INF, loss / running mean")
    ax.plot(rounds, r["bandit_cap"]["regret_curve"], label="Tsallis-INF, loss = iterations / cap")
    ax.plot(rounds, 0.1 * np.arange(1, n + 1) * r["totals"]["best_fixed"] / n, "k:", label="10 % of best fixed ω")
    ax.set_xlabel("system")
    ax.set_ylabel("cumulative iterations above best fixed ω")
    ax.set_title(f"regret, mean over {st['seeds']} seeds")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[2]
    for key, label in (("mean", "loss / running mean"), ("cap", "loss = iterations / cap")):
        curve = np.asarray(r["resampled"][key]["ratio_curve"])
        ax.semilogx(curve[:, 0], curve[:, 1], label=label)
    ax.axhline(1.1, color="k", ls=":", label="target 1.10")
    ax.axvline(n, color="grey", lw=0.8)
    ax.set_xlabel("systems (resampled from the measured ones)")
    ax.set_ylabel("bandit / best fixed ω (iterations so far)")
    ax.set_title("longer sequence")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> dict:
    return script_main(
        argv, doc=__doc__, run=lambda quick: run("quick" if quick else "default"), markdown=markdown, readme=README,
        section="learned_relaxation", results_name="relax.json", default_out="runs/learned_relaxation",
        committed_dir=HERE, figure=figure, figure_name="relax.png",
    )

if __name__ == "__main__":
    main()
