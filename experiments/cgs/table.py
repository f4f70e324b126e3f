"""The CGS graph-value-iteration table: from a run directory of `configs/cgs/value_iteration.py` to the README.

    python experiments/cgs/table.py RUN_DIR                              # print the table
    python experiments/cgs/table.py RUN_DIR --save --note "load 1.2"     # + results.json, the plot and the README section
    python experiments/cgs/table.py --from-results                       # README section from results.json only

One row per graph kind (`hparams.variant`: dense / sparse) and test set: the held-out
graphs of the training sizes (nS in [states_min, states_max)) and the larger graphs of
exactly nS states (`data.test_states`). Value MAPE and policy accuracy are the last
evaluation's, mean ± sd over the seeds; the reward-greedy policy accuracy (`V̂ = 0`) is the
baseline. Forward and backward solver steps are maxima over every graph of the set, every
evaluation of the run and every seed (backward steps from one `fpx.backward_probe` per
graph), against the bound ⌈log(tol)/log γ⌉; "over" counts the solves of the set, over all
evaluations and seeds, that exceeded the bound or failed. The `train` row reports the
solves of every training step (running maxima kept in the training state).
`tests/test_cgs.py` checks that the README section is what `results.json` regenerates.
"""

from __future__ import annotations

import pathlib
import statistics

from fpx.experiment import by_variant, format_value, generated_section, mean_sd, member_histories, read_run, table_main

HERE = pathlib.Path(__file__).resolve().parent
README = HERE / "README.md"
RESULTS = HERE / "results.json"
PLOT = HERE / "generalisation.png"
SECTION = "cgs_table"


def _test_sets(config: dict) -> list[tuple[str, str]]:
    """`[(metric prefix, label)]`: the training-size test set, then each larger size."""
    d = config["data"]
    sets = [("test", f"[{d['states_min']}, {d['states_max']})")]
    sets += [(f"ns{n}", str(n)) for n in d["test_states"]]
    return sets


def collect(run_dir) -> dict:
    """`{"setup": {...}, "rows": [...]}` from one run directory."""
    config, records = read_run(run_dir)
    groups = by_variant(member_histories(records), config.get("variants") or {}, default=config["data"]["graph"])
    rows = []
    for variant, members in groups.items():
        last = [rs[-1] for rs in members]
        every = [r for rs in members for r in rs]
        bound = max(r["eval/step_bound"] for r in every)
        for prefix, label in _test_sets(config):
            mape, mape_sd = mean_sd(r[f"eval/{prefix}_mape"] for r in last)
            accuracy, accuracy_sd = mean_sd(r[f"eval/{prefix}_policy_accuracy"] for r in last)
            rows.append({
                "graph": variant,
                "set": label,
                "seeds": len(last),
                "step": min(r["step"] for r in last),
                "mape": mape,
                "mape_sd": mape_sd,
                "policy_accuracy": accuracy,
                "policy_accuracy_sd": accuracy_sd,
                "greedy_policy_accuracy": statistics.fmean(r[f"eval/{prefix}_greedy_policy_accuracy"] for r in last),
                "mean_oracle_mape": statistics.fmean(r[f"eval/{prefix}_mean_oracle_mape"] for r in last),
                "forward_steps_max": max(r[f"eval/{prefix}_forward_steps_max"] for r in every),
                "backward_steps_max": max(r[f"eval/{prefix}_backward_steps_max"] for r in every),
                "bound": bound,
                "over_bound": sum(r[f"eval/{prefix}_over_bound"] for r in every),
            })
        rows.append({
            "graph": variant,
            "set": "train",
            "seeds": len(last),
            "step": min(r["step"] for r in last),
            "mape": statistics.fmean(r["train/mape"] for r in last),
            "mape_sd": None,
            "policy_accuracy": statistics.fmean(r["train/policy_accuracy"] for r in last),
            "policy_accuracy_sd": None,
            "greedy_policy_accuracy": None,
            "mean_oracle_mape": None,
            "forward_steps_max": max(r["eval/train_forward_steps_max"] for r in every),
            "backward_steps_max": max(r["eval/train_backward_steps_max"] for r in every),
            "bound": bound,
            "over_bound": sum(r["eval/train_over_bound"] for r in last),
        })
    d, m = config["data"], config["model"]
    setup = {
        "steps": config["train"]["steps"],
        "n_train": d["n_train"],
        "n_test": d["n_test"],
        "batch_size": d["batch_size"],
        "heads": m["heads"],
        "hidden": m["hidden"],
        "layers": m["layers"],
        "gamma": m["gamma"],
        "tol": config["solver"]["atol"],
        "seeds": len(config["sweep"]["seed"]),
    }
    return {"setup": setup, "rows": rows}


def markdown(result: dict) -> str:
    s = result["setup"]
    head = (f"{s['steps']} training steps of {s['batch_size']} graphs ({s['n_train']} training graphs), "
            f"{s['heads']} heads, hidden {s['hidden']}, {s['layers']} encoder rounds, γ = {s['gamma']}, tol = {s['tol']:g}, "
            f"{s['seeds']} seeds, {s['n_test']} test graphs per set"
            + (f"; {result['note']}" if result.get("note") else ""))
    lines = [head, "",
             "| graphs | nS | value MAPE (%) | graph-mean oracle MAPE (%) | policy accuracy (%) | reward-greedy policy (%) "
             "| forward steps (max) | backward steps (max) | bound | solves over bound |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        greedy = "—" if r["greedy_policy_accuracy"] is None else f"{100 * r['greedy_policy_accuracy']:.1f}"
        oracle = "—" if r["mean_oracle_mape"] is None else f"{r['mean_oracle_mape']:.2f}"
        name = "training batches" if r["set"] == "train" else r["set"]
        lines.append(
            f"| {r['graph']} | {name} | {format_value(r['mape'], '.2f', r['mape_sd'])} | {oracle} | "
            f"{format_value(r['policy_accuracy'], '.1f', r['policy_accuracy_sd'], scale=100)} | {greedy} | "
            f"{r['forward_steps_max']:.0f} | {r['backward_steps_max']:.0f} | {r['bound']:.0f} | {r['over_bound']:.0f} |"
        )
    return "\n".join(lines)


def plot(result: dict, path: pathlib.Path = PLOT) -> pathlib.Path:
    """Value MAPE and policy accuracy against nS for each graph kind (the baselines dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.0), dpi=100)
    for i, graph in enumerate(dict.fromkeys(r["graph"] for r in result["rows"])):
        rows = [r for r in result["rows"] if r["graph"] == graph and r["set"] != "train"]
        labels = [r["set"] for r in rows]
        x = range(len(rows))
        color = f"C{i}"
        left.errorbar(x, [r["mape"] for r in rows], yerr=[r["mape_sd"] for r in rows], marker="o", color=color, label=f"{graph}: CGS", capsize=3)
        left.plot(x, [r["mean_oracle_mape"] for r in rows], ls="--", color=color, label=f"{graph}: graph-mean oracle")
        right.errorbar(x, [100 * r["policy_accuracy"] for r in rows], yerr=[100 * r["policy_accuracy_sd"] for r in rows],
                       marker="o", color=color, label=f"{graph}: CGS", capsize=3)
        right.plot(x, [100 * r["greedy_policy_accuracy"] for r in rows], ls="--", color=color, label=f"{graph}: reward-greedy")
        for ax in (left, right):
            ax.set_xticks(list(x), labels)
    right.axhline(80, color="0.6", lw=0.8, ls=":")
    left.set(xlabel="nS (test graphs)", ylabel="value MAPE (%)", title="values")
    right.set(xlabel="nS (test graphs)", ylabel="policy accuracy (%)", title="policies (target 80 %)")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def readme_section() -> str:
    """The committed README section (between the `cgs_table` markers)."""
    return generated_section(README, SECTION)


def main(argv=None) -> int:
    return table_main(
        argv, doc=__doc__, collect=collect, markdown=markdown, readme=README, section=SECTION, results=RESULTS,
        after_save=lambda result, run_dir: plot(result),
        save_help="store the rows in results.json, draw the plot and rewrite the README section",
    )


if __name__ == "__main__":
    raise SystemExit(main())
