"""The DEQ-digits table: from a run directory of `configs/deq/digits.py` to the README.

    python experiments/deq/table.py RUN_DIR                              # print the table
    python experiments/deq/table.py RUN_DIR --save --note "load 1.2"     # + results.json and the README section
    python experiments/deq/table.py --from-results                       # README section from results.json only

Per variant (`hparams.variant`; mean ± sd over its seeds): test accuracy and loss at the
last evaluation, forward and backward solver steps per sample (the mean of the
`train/*_steps` records, each a mean over the training batches since the previous
evaluation), and ms per training step (the median over the run's timed chunks in
`timing.jsonl`, the compiling first chunk excluded by the runner; the seeds of a variant
run as one vmapped program, so the figure is for all of them together, and variants run
one after another in the same process). `tests/test_deq_table.py` checks that the README
section is what `results.json` regenerates.
"""

from __future__ import annotations

import pathlib
import statistics

from fpx.experiment import by_variant, format_value, generated_section, mean_sd, member_histories, read_run, table_main
from fpx.experiment import timing_by_unit, unit_ms_per_step

HERE = pathlib.Path(__file__).resolve().parent
README = HERE / "README.md"
RESULTS = HERE / "results.json"
SECTION = "deq_table"
GRADIENT = {"implicit": "implicit", "jfb": "JFB (one step)", "unrolled": "unrolled (checkpointed)", "phantom": "phantom"}


def collect(run_dir) -> dict:
    """`{"setup": {...}, "rows": [...]}` from one run directory."""
    config, records = read_run(run_dir)
    timing = timing_by_unit(run_dir)
    rows = []
    for variant, members in by_variant(member_histories(records), config["variants"]).items():
        last = [rs[-1] for rs in members]
        spec = config["variants"].get(variant, {})
        is_mlp = spec.get("model", {}).get("kind", config["model"]["kind"]) == "mlp"

        def over_seeds(key, members=members, last=last):
            if not all(key in r for r in last):
                return None
            return [r[key] for r in last]

        def mean_over_training(key, members=members):
            values = [statistics.fmean(r[key] for r in rs if key in r) for rs in members if any(key in r for r in rs)]
            return statistics.fmean(values) if values else None

        accuracy_mean, accuracy_sd = mean_sd(over_seeds("eval/accuracy"))
        adjoint = spec.get("adjoint", {}).get("name", config["adjoint"]["name"])
        solver = spec.get("solver", {}).get("name", config["solver"]["name"])
        backward = mean_over_training("train/backward_steps")
        rows.append({
            "variant": variant,
            "gradient": "backprop (explicit MLP)" if is_mlp else GRADIENT.get(adjoint, adjoint),
            "solver": None if is_mlp else solver,
            "seeds": len(last),
            "step": min(r["step"] for r in last),
            "accuracy_mean": accuracy_mean,
            "accuracy_sd": accuracy_sd,
            "loss": statistics.fmean(over_seeds("eval/loss")),
            "forward_steps": None if is_mlp else mean_over_training("train/forward_steps"),
            "backward_steps": backward if (not is_mlp and adjoint in ("implicit", "phantom")) else None,
            "converged_fraction": None if is_mlp else min(over_seeds("eval/converged_fraction") or [None]),
            "ms_per_step": unit_ms_per_step(last, timing),
        })
    setup = {"steps": config["train"]["steps"], "width": config["model"]["width"], "seeds": len(config["sweep"]["seed"])}
    return {"setup": setup, "rows": rows}


def markdown(result: dict) -> str:
    s = result["setup"]
    head = (f"{s['steps']} training steps, width {s['width']}, {s['seeds']} seeds"
            + (f"; {result['note']}" if result.get("note") else ""))
    lines = [head, "",
             "| variant | gradient | forward solver | test accuracy (mean ± sd) | test loss | forward steps / sample "
             "| backward steps / sample | ms per training step (seeds vmapped) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['variant']} | {r['gradient']} | {r['solver'] or '—'} | "
            f"{format_value(r['accuracy_mean'], '.1f', r['accuracy_sd'], scale=100)} % | {r['loss']:.3f} | "
            f"{format_value(r['forward_steps'], '.1f')} | {format_value(r['backward_steps'], '.1f')} | "
            f"{format_value(r['ms_per_step'], '.2f')} |"
        )
    return "\n".join(lines)


def readme_section() -> str:
    """The committed README section (between the `deq_table` markers)."""
    return generated_section(README, SECTION)


def main(argv=None) -> int:
    return table_main(argv, doc=__doc__, collect=collect, markdown=markdown, readme=README, section=SECTION, results=RESULTS)


if __name__ == "__main__":
    raise SystemExit(main())
