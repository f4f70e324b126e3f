"""The FPDM-digits tables and plot: from a run directory of `configs/fpdm/digits.py` to the README.

    python experiments/fpdm/table.py RUN_DIR                              # print the tables
    python experiments/fpdm/table.py RUN_DIR --save --note "load 1.2"     # + results.json, budget.png, samples.png, the README section
    python experiments/fpdm/table.py --from-results                       # README section and plot from results.json only

Reads the last evaluation of every member (seed) in `metrics.jsonl` (task `fpdm`, see
`fpx/experiment/tasks/fpdm.py` for the metrics) and reports, mean ± sd over the seeds:

- per solver (Picard, Anderson) and start (cold: `z0 = 0`; warm: the previous timestep's
  fixed point), solved to the sampling tolerance: fixed-point iterations per sample summed
  over the DDIM timesteps, the saving of warm over cold starts, the fraction of converged
  solves and the sample quality (classifier Fréchet distance, nearest-neighbour distance);
- per per-timestep budget `b` (at most `b` solver steps per timestep): the sample quality
  and the solver steps actually used per timestep (fewer than `b` where a solve reaches
  the tolerance first).

`tests/test_fpdm.py` checks that the README section is what `results.json` regenerates.
"""

from __future__ import annotations

import json
import pathlib
import re
import statistics

from fpx.experiment import format_value, generated_section, mean_sd, member_histories, read_run, table_main
from fpx.experiment import write_generated_section

HERE = pathlib.Path(__file__).resolve().parent
README = HERE / "README.md"
RESULTS = HERE / "results.json"
PLOT = HERE / "budget.png"
SAMPLES = HERE / "samples.png"
SECTION = "fpdm_table"
SOLVERS = ("picard", "anderson")
STARTS = ("cold", "warm")
NAME = {"picard": "Picard", "anderson": "Anderson"}


def _stats(values: list[float]) -> dict:
    mean, sd = mean_sd(values)
    return {"mean": mean, "sd": sd, "min": min(values), "max": max(values)}


def collect(run_dir) -> dict:
    """`{"setup", "reference", "tolerance", "budgets"}` from one run directory (the last
    evaluation of each member)."""
    config, records = read_run(run_dir)
    histories = member_histories(records)
    rows = [histories[m][-1] for m in sorted(histories)]

    def over(key):
        return _stats([r[key] for r in rows]) if all(key in r for r in rows) else None

    tolerance = []
    for solver in SOLVERS:
        for start in STARTS:
            p = f"eval/{solver}_{start}_"
            if not all(p + "iters" in r for r in rows):
                continue
            tolerance.append({
                "solver": solver, "start": start, "iters": over(p + "iters"), "converged": over(p + "converged"),
                "fd": over(p + "fd"), "nn": over(p + "nn"),
                "saving": over(f"eval/{solver}_saving") if start == "warm" else None,
                "warm_cold_dev": over(f"eval/{solver}_warm_cold_dev") if start == "warm" else None,
            })
    budgets = []
    found = sorted({(int(m.group(1)), m.group(2), m.group(3)) for k in rows[0]
                    if (m := re.fullmatch(r"eval/b(\d+)_(\w+?)_(cold|warm)_fd", k))},
                   key=lambda g: (g[0], SOLVERS.index(g[1]) if g[1] in SOLVERS else 9, STARTS.index(g[2])))
    for b, solver, start in found:
        p = f"eval/b{b}_{solver}_{start}_"
        budgets.append({"budget": b, "solver": solver, "start": start, "fd": over(p + "fd"),
                        "nn": over(p + "nn"), "iters": over(p + "iters")})
    s, m = config["sampling"], config["model"]
    setup = {
        "steps": min(r["step"] for r in rows), "seeds": len(rows), "width": m["width"], "gamma": m["gamma"],
        "explicit_layers": m["explicit_layers"], "no_grad": [m["no_grad_min"], m["no_grad_max"]],
        "with_grad": [m["with_grad_min"], m["with_grad_max"]], "timesteps": config["diffusion"]["timesteps"],
        "sampling_steps": s["steps"], "num_samples": s["num_samples"], "rtol": s["rtol"], "atol": s["atol"],
        "max_steps": s["max_steps"], "anderson_memory": s["anderson_memory"],
    }
    reference = {"real_fd": rows[0]["eval/real_fd"], "real_nn": rows[0]["eval/real_nn"],
                 "classifier_accuracy": rows[0]["eval/classifier_accuracy"], "test_loss": over("eval/test_loss"),
                 "block_lipschitz": over("eval/block_lipschitz"), "anderson_picard_dev": over("eval/anderson_picard_dev")}
    return {"setup": setup, "reference": reference, "tolerance": tolerance, "budgets": budgets}


def _pm(st, fmt, scale=1.0) -> str:
    return "—" if st is None else format_value(st["mean"], fmt, st["sd"], scale=scale, hide_zero_sd=True)


def markdown(result: dict) -> str:
    s, ref = result["setup"], result["reference"]
    S = s["sampling_steps"]
    head = (f"{s['steps']} training steps, {s['seeds']} seed(s) (mean ± sd), width {s['width']}, γ = {s['gamma']}, "
            f"S-JFB {s['no_grad'][0]}–{s['no_grad'][1]} + {s['with_grad'][0]}–{s['with_grad'][1]} iterations; "
            f"{s['num_samples']} DDIM samples, {S} of {s['timesteps']} timesteps, tolerance rtol {s['rtol']:g}, "
            f"atol {s['atol']:g}" + (f"; {result['note']}" if result.get("note") else ""))
    lines = [head, "", f"**Solved to tolerance** (iterations summed over the {S} timesteps of one sample):", "",
             "| solver | start | fixed-point iterations / sample | per timestep | saving (warm vs cold) "
             "| solves converged | classifier FD ↓ | NN distance ↓ |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["tolerance"]:
        per_step = {k: r["iters"][k] / S for k in ("mean", "sd")}
        lines.append(
            f"| {NAME.get(r['solver'], r['solver'])} | {r['start']} | {_pm(r['iters'], '.1f')} | {_pm(per_step, '.2f')} | "
            f"{_pm(r['saving'], '.1f', 100) + ' %' if r['saving'] else '—'} | {100 * r['converged']['min']:.1f} % | "
            f"{_pm(r['fd'], '.2f')} | {_pm(r['nn'], '.2f')} |")
    devs = [f"{NAME.get(r['solver'], r['solver'])} {r['warm_cold_dev']['max']:.1e}" for r in result["tolerance"] if r["warm_cold_dev"]]
    lines += ["", f"Real digits: classifier FD {ref['real_fd']:.2f} ({s['num_samples']} training digits against the test "
              f"digits), NN distance {ref['real_nn']:.2f} (the test digits); the classifier's test accuracy "
              f"{100 * ref['classifier_accuracy']:.1f} %. Largest pixel difference "
              f"between the warm- and cold-started samples: {', '.join(devs) or '—'}"
              + (f"; between Picard's and Anderson's (cold): {ref['anderson_picard_dev']['max']:.1e}"
                 if ref.get("anderson_picard_dev") else "")
              + f". Denoiser test loss {_pm(ref['test_loss'], '.4f')}, |W|₂ ≤ {ref['block_lipschitz']['max']:.3f}."]
    if result.get("timing"):
        t = result["timing"]
        lines += ["", f"Wall time of one sampling run to tolerance ({t['samples']} trajectories, cold and warm, seed 0's "
                  f"model; median of {t['repeats']}, measured by `table.py --save` at load average "
                  f"{'/'.join(str(x) for x in t['load'])}): "
                  + ", ".join(f"{NAME.get(k, k)} {v:.2f} s" for k, v in t["seconds"].items()) + "."]
    if result["budgets"]:
        combos = [(sv, st) for sv in SOLVERS for st in STARTS if any(b["solver"] == sv and b["start"] == st for b in result["budgets"])]
        cols = " | ".join(f"{NAME[sv]} {st}" for sv, st in combos)
        lines += ["", "**Per-timestep budget** (at most b solver steps per timestep, stopping earlier at the tolerance; "
                  "classifier FD ↓ / NN distance ↓ (solver steps used per timestep)):", "",
                  f"| b | {cols} |", "|---|" + "---|" * len(combos)]
        by = {(b["budget"], b["solver"], b["start"]): b for b in result["budgets"]}
        tol = {(r["solver"], r["start"]): r for r in result["tolerance"]}
        for budget in sorted({b["budget"] for b in result["budgets"]}):
            cells = [f"{_pm(by[(budget, sv, st)]['fd'], '.2f')} / {_pm(by[(budget, sv, st)]['nn'], '.2f')} "
                     f"({by[(budget, sv, st)]['iters']['mean'] / S:.2f})" if (budget, sv, st) in by else "—" for sv, st in combos]
            lines.append(f"| {budget} | " + " | ".join(cells) + " |")
        cells = [f"{_pm(tol[c]['fd'], '.2f')} / {_pm(tol[c]['nn'], '.2f')} ({tol[c]['iters']['mean'] / S:.2f})"
                 if c in tol else "—" for c in combos]
        lines.append(f"| to tolerance (≤ {s['max_steps']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path=PLOT) -> None:
    """Sample quality against the per-timestep budget (one line per solver and start)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    ref = result["reference"]
    tol = {(r["solver"], r["start"]): r for r in result["tolerance"]}
    for ax, key, label, real in ((axes[0], "fd", "classifier FD to the test digits (lower is better)", ref["real_fd"]),
                                 (axes[1], "nn", "NN distance to training digits (lower is better)", ref["real_nn"])):
        for i, solver in enumerate(SOLVERS):
            for start, style in (("cold", "--"), ("warm", "-")):
                rows = sorted((b for b in result["budgets"] if b["solver"] == solver and b["start"] == start),
                              key=lambda b: b["budget"])
                if not rows:
                    continue
                xs = [b["budget"] for b in rows]
                ax.errorbar(xs, [b[key]["mean"] for b in rows], yerr=[b[key]["sd"] for b in rows], color=f"C{i}",
                            linestyle=style, marker="o", ms=3, capsize=2, label=f"{NAME[solver]} {start}")
        if ("picard", "cold") in tol:
            ax.axhline(tol[("picard", "cold")][key]["mean"], color="0.4", lw=1, linestyle=":", label="to tolerance")
        ax.axhline(real, color="k", lw=1, label="real test digits")
        budgets = sorted({b["budget"] for b in result["budgets"]})
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_xlabel("budget: solver steps per timestep")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def restore(run_dir):
    """`(task, state)`: the task rebuilt from the run's `config.json` and the last checkpoint of
    its (single) sweep unit, the seeds stacked on axis 0."""
    from fpx.experiment import restore as restore_run

    task, state, _ = restore_run(run_dir)
    return task, state


def solver_timing(run_dir, repeats: int = 5) -> dict:
    """Wall seconds (median of `repeats`, interleaved, after compiling) of one tolerance
    sampling run of seed 0's model per solver: all evaluation noises, cold and warm."""
    import os
    import time

    import jax

    task, state = restore(run_dir)
    model = jax.tree_util.tree_map(lambda a: a[0], state["model"])
    runs = {s: jax.jit(lambda m, s=s: task.sample(m, s, task.config.sampling.max_steps)) for s in task.config.sampling.solvers}
    for run in runs.values():
        jax.block_until_ready(run(model))
    times = {s: [] for s in runs}
    for _ in range(repeats):
        for s, run in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(run(model))
            times[s].append(time.perf_counter() - t0)
    return {"seconds": {s: statistics.median(t) for s, t in times.items()}, "repeats": repeats,
            "samples": 2 * int(task.noises.shape[0]), "load": [round(x, 1) for x in os.getloadavg()]}


def samples_figure(run_dir, path=SAMPLES, count: int = 12) -> None:
    """DDIM samples of seed 0 from the first `count` evaluation noises: cold and warm starts at a
    budget of one solver step per timestep and solved to tolerance, and real test digits."""
    import jax
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fpx.experiment.tasks import fpdm

    task, state = restore(run_dir)
    model = jax.tree_util.tree_map(lambda a: a[0], state["model"])
    s = task.config.sampling
    rows = []
    for solver, budget, label in (("picard", 1, "Picard, b = 1"), ("picard", s.max_steps, "Picard, to tolerance"),
                                  ("anderson", s.max_steps, "Anderson, to tolerance")):
        solve = fpdm._solver(solver, s.rtol, s.atol, s.anderson_memory)
        for warm in (False, True):
            run = jax.jit(jax.vmap(lambda x: fpdm._ddim_sample(model, x, task.abar, task.times, solve, budget, warm)[0]))
            rows.append((f"{label}, {'warm' if warm else 'cold'}", np.asarray(run(task.noises[:count]))))
    rows.append(("real test digits", np.asarray(task.x_test[:count])))
    fig, axes = plt.subplots(len(rows), count, figsize=(count * 0.55, len(rows) * 0.62))
    for r, (label, images) in enumerate(rows):
        for c in range(count):
            ax = axes[r, c]
            ax.imshow(images[c].reshape(8, 8), cmap="gray_r", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.subplots_adjust(left=0.25, right=0.99, top=0.99, bottom=0.01, wspace=0.05, hspace=0.1)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def readme_section() -> str:
    """The committed README section (between the `fpdm_table` markers)."""
    return generated_section(README, SECTION)


def _after_save(result: dict, run_dir: str) -> None:
    """The plot; with the run's checkpoints also the solver timing (stored in results.json and
    the README section) and the samples figure."""
    plot(result)
    if (pathlib.Path(run_dir) / "checkpoints").is_dir():
        result["timing"] = solver_timing(run_dir)
        RESULTS.write_text(json.dumps(result, indent=1) + "\n")
        write_generated_section(README, SECTION, markdown(result))
        samples_figure(run_dir)


def main(argv=None) -> int:
    return table_main(
        argv, doc=__doc__, collect=collect, markdown=markdown, readme=README, section=SECTION, results=RESULTS,
        after_save=_after_save, after_from_results=plot,
        save_help="store results.json, budget.png and rewrite the README section",
        from_results_help="rewrite the README section and plot from results.json only",
    )


if __name__ == "__main__":
    raise SystemExit(main())
