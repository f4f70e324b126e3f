"""The global-L2 table: hypergradient descent (`configs/hypergradients/global_l2.py`) against the vmapped grid (`global_l2_grid.py`).

    python experiments/hypergradients/table.py DESCENT_RUN --grid GRID_RUN                        # print the table
    python experiments/hypergradients/table.py DESCENT_RUN --grid GRID_RUN --save --note "load 1"  # + results.json, global_l2.png, README
    python experiments/hypergradients/table.py --from-results                                     # README section from results.json only

One row per descent variant (the hypergradient estimator, `hparams.variant`) and one for the
grid. Compute: "inner solves" is the number of `fpx.argmin` solves of training (one per
descent step, one per grid value; the evaluations' warm-started re-solves are not counted),
"inner steps" the sum of the inner solver's steps over them (`train/inner_steps`), and
"hypergradient steps" the sum of the estimator's steps (Hessian-vector products for CG,
Anderson and Neumann; the Hessian's size for the exact estimator, which forms it). The
descent reports its last evaluation (the hyperparameter it ends at) and the best validation
loss on its path; the grid reports the value with the smallest validation loss. ms / step is
the median wall-clock of one training step of the run (compile excluded; the grid's single
step is its compile step, so it has none). `tests/test_hypergradient_task.py` checks that
the README section is what `results.json` regenerates.
"""

from __future__ import annotations

import pathlib

from fpx.experiment import by_variant, format_value, generated_section, member_histories, read_run, table_main
from fpx.experiment import timing_by_unit, unit_ms_per_step

HERE = pathlib.Path(__file__).resolve().parent
README = HERE / "README.md"
RESULTS = HERE / "results.json"
PLOT = HERE / "global_l2.png"
SECTION = "global_l2_table"
ESTIMATOR = {
    "cg": "CG (lineax)",
    "fixed_point": "Anderson on u = u - α(Hu - b)",
    "neumann": "Neumann",
    "exact": "exact (dense Hessian)",
}


def _chunk(config: dict) -> int:
    return config["train"]["eval_every"]


def _descent(run_dir) -> tuple[dict, list[dict]]:
    config, records = read_run(run_dir)
    if config["outer"]["mode"] != "descent":
        raise SystemExit(f"{run_dir} is a run with outer.mode = {config['outer']['mode']!r}; give the descent run first.")
    timing = timing_by_unit(run_dir)
    every = _chunk(config)
    rows = []
    default = config["hypergradient"]["estimator"]
    for variant, members in by_variant(member_histories(records), config.get("variant_order") or [], default=default).items():
        for rs in members:
            last = rs[-1]
            estimator = (config.get("variants") or {}).get(variant, {}).get("hypergradient", {}).get("estimator", default)
            best = min(rs, key=lambda r: r["eval/val_loss"])
            label = ESTIMATOR[estimator] + (f" k={config['hypergradient']['terms']}" if estimator == "neumann" else "")
            rows.append({
                "method": "hypergradient descent",
                "estimator": label,
                "start_log_lambda": last["hparams"].get("hyper.log_lambda", config["hyper"]["log_lambda"]),
                "inner_solves": last["step"],
                "inner_steps": sum(every * r["train/inner_steps"] for r in rs),
                "hypergradient_steps": sum(every * r["train/hypergradient_steps"] for r in rs),
                "hypergradient_failed": sum(every * r["train/hypergradient_failed"] for r in rs),
                "inner_failed": sum(every * r["train/inner_failed"] for r in rs),
                "log_lambda": last["eval/log_lambda"],
                "val_loss": last["eval/val_loss"],
                "test_loss": last["eval/test_loss"],
                "test_accuracy": last["eval/test_accuracy"],
                "best_val_loss": best["eval/val_loss"],
                "best_log_lambda": best["eval/log_lambda"],
                "ms_per_step": unit_ms_per_step([last], timing),
                "path": [[r["step"], r["eval/log_lambda"], r["eval/val_loss"], r["eval/test_loss"]] for r in rs],
            })
    setup = {
        "n_train": config["data"]["n_train"], "n_val": config["data"]["n_val"], "dtype": config["dtype"],
        "steps": config["train"]["steps"], "optimizer": config["optim"]["name"], "lr": config["optim"]["lr"],
        "start_log_lambda": config["hyper"]["log_lambda"],
        "inner_solver": config["solver"]["name"], "inner_rtol": config["solver"].get("rtol"),
        "inner_atol": config["solver"].get("atol"),
        "hypergradient_tolerance": [config["hypergradient"]["rtol"], config["hypergradient"]["atol"]],
    }
    return setup, rows


def _grid(run_dir) -> dict:
    config, records = read_run(run_dir)
    if config["outer"]["mode"] != "grid":
        raise SystemExit(f"--grid {run_dir} is a run with outer.mode = {config['outer']['mode']!r}; give the grid run.")
    last = [rs[-1] for rs in member_histories(records).values()]
    last.sort(key=lambda r: r["eval/log_lambda"])
    best = min(last, key=lambda r: r["eval/val_loss"])
    every = _chunk(config)
    return {
        "method": f"vmapped grid ({len(last)} values)",
        "estimator": "—",
        "range": [last[0]["eval/log_lambda"], last[-1]["eval/log_lambda"]],
        "inner_solves": sum(r["step"] for r in last),
        "inner_steps": sum(every * r["train/inner_steps"] for r in last),
        "hypergradient_steps": None,
        "hypergradient_failed": 0,
        "inner_failed": sum(every * r["train/inner_failed"] for r in last),
        "log_lambda": best["eval/log_lambda"],
        "val_loss": best["eval/val_loss"],
        "test_loss": best["eval/test_loss"],
        "test_accuracy": best["eval/test_accuracy"],
        "best_val_loss": best["eval/val_loss"],
        "best_log_lambda": best["eval/log_lambda"],
        "ms_per_step": None,
        "curve": [[r["eval/log_lambda"], r["eval/val_loss"], r["eval/test_loss"]] for r in last],
        "data": [config["data"]["n_train"], config["data"]["n_val"]],
    }


def collect(run_dir, grid=None) -> dict:
    """`{"setup": {...}, "rows": [...]}` from a descent run directory and (`grid`) a grid run directory."""
    setup, rows = _descent(run_dir)
    if grid is not None:
        g = _grid(grid)
        if g.pop("data") != [setup["n_train"], setup["n_val"]]:
            raise SystemExit(f"--grid {grid} was run on other data sizes than {run_dir}; compare runs of the same preset.")
        rows.append(g)
    return {"setup": setup, "rows": rows}


def markdown(result: dict) -> str:
    s = result["setup"]
    head = (
        f"Logistic regression on {s['n_train']} training digits, validation loss on {s['n_val']}, {s['dtype']}; "
        f"inner solves by {s['inner_solver']} (rtol {s['inner_rtol']:g}, atol {s['inner_atol']:g}); descent: "
        f"{s['steps']} {s['optimizer']} steps (lr {s['lr']:g}) on log λ from {s['start_log_lambda']:g}, warm-started "
        f"inner solves, hypergradient solves to rtol {s['hypergradient_tolerance'][0]:g} / atol "
        f"{s['hypergradient_tolerance'][1]:g}"
    )
    grid = [r for r in result["rows"] if "curve" in r]
    if grid:
        g = grid[0]
        head += f"; grid: log λ evenly spaced in [{g['range'][0]:g}, {g['range'][1]:g}], inner solves from zero"
    head += "." + (f" {result['note']}." if result.get("note") else "")
    lines = [
        head, "",
        "| method | estimator | inner solves | inner steps | hypergradient steps | log λ | validation loss | "
        "test loss | test accuracy | best validation loss (at log λ) | ms / step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {r['estimator']} | {r['inner_solves']} | {r['inner_steps']:.0f} | "
            f"{format_value(r['hypergradient_steps'], '.0f')} | {r['log_lambda']:.2f} | {r['val_loss']:.5f} | "
            f"{r['test_loss']:.5f} | {100 * r['test_accuracy']:.1f} % | {r['best_val_loss']:.5f} "
            f"({r['best_log_lambda']:.2f}) | {format_value(r['ms_per_step'], '.1f')} |"
        )
    failed = [r for r in result["rows"] if r["hypergradient_failed"] or r["inner_failed"]]
    if failed:
        lines += ["", "Failed solves: " + "; ".join(
            f"{r['method']}{'' if r['estimator'] == '—' else ', ' + r['estimator']}: {r['inner_failed']:.0f} of "
            f"{r['inner_solves']} inner solves did not converge, {r['hypergradient_failed']:.0f} hypergradient solves "
            "failed" for r in failed) + "."]
    else:
        lines += ["", "Every inner and hypergradient solve converged."]
    return "\n".join(lines)


def plot(result: dict, path: pathlib.Path = PLOT) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.8))
    for r in result["rows"]:
        if "curve" in r:
            lam, val, test = zip(*r["curve"])
            ax0.plot(lam, val, ".-", color="0.3", label=f"{r['method']}: validation")
            ax0.plot(lam, test, ":", color="0.5", label="grid: test")
    for i, r in enumerate(r for r in result["rows"] if "path" in r):
        steps, lam, val, test = zip(*r["path"])
        ax0.plot(lam, val, "x-", color=f"C{i}", ms=3, lw=0.8, label=f"descent, {r['estimator']}")
        ax1.plot(steps, val, "-", color=f"C{i}", label=f"{r['estimator']}: validation")
        ax1.plot(steps, test, "--", color=f"C{i}", lw=0.8)
    ax0.set_xlabel("log λ (global L2)")
    ax0.set_ylabel("cross-entropy")
    ax0.set_yscale("log")
    ax0.legend(fontsize=7)
    ax0.grid(alpha=0.3)
    ax1.set_xlabel("outer step (one inner solve each)")
    ax1.set_ylabel("cross-entropy (dashed: test)")
    ax1.set_yscale("log")
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def readme_section() -> str:
    """The committed README section (between the `global_l2_table` markers)."""
    return generated_section(README, SECTION)


def main(argv=None) -> int:
    return table_main(
        argv, doc=__doc__, collect=collect, markdown=markdown, readme=README, section=SECTION, results=RESULTS,
        options={"--grid": {"default": None, "help": "the run directory of configs/hypergradients/global_l2_grid.py"}},
        after_save=lambda result, run_dir: plot(result), allow_nan=False,
    )


if __name__ == "__main__":
    raise SystemExit(main())
