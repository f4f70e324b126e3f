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

import argparse
import json
import pathlib
import statistics

from fpx.experiment import generated_section, write_generated_section

HERE = pathlib.Path(__file__).resolve().parent
README = HERE / "README.md"
RESULTS = HERE / "results.json"
GRADIENT = {"implicit": "implicit", "jfb": "JFB (one step)", "unrolled": "unrolled (checkpointed)", "phantom": "phantom"}


def _read_jsonl(path: pathlib.Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def collect(run_dir) -> dict:
    """`{"setup": {...}, "rows": [...]}` from one run directory."""
    run_dir = pathlib.Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    records = _read_jsonl(run_dir / "metrics.jsonl")
    if not records:
        raise SystemExit(f"no metrics in {run_dir}")
    timing: dict[int, list[float]] = {}
    for t in _read_jsonl(run_dir / "timing.jsonl"):
        timing.setdefault(t["unit"], []).append(t["ms_per_step"])
    by_member: dict[int, list[dict]] = {}
    for r in records:
        by_member.setdefault(r["member"], []).append(r)
    by_variant: dict[str, list[list[dict]]] = {}
    for rs in by_member.values():
        rs.sort(key=lambda r: r["step"])
        by_variant.setdefault(rs[-1]["hparams"]["variant"], []).append(rs)
    order = list(config["variants"])
    rows = []
    for variant in sorted(by_variant, key=lambda v: order.index(v) if v in order else len(order)):
        members = by_variant[variant]
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

        accuracy = over_seeds("eval/accuracy")
        units = sorted({r["unit"] for r in last})
        times = [statistics.median(timing[u]) for u in units if u in timing]
        adjoint = spec.get("adjoint", {}).get("name", config["adjoint"]["name"])
        solver = spec.get("solver", {}).get("name", config["solver"]["name"])
        backward = mean_over_training("train/backward_steps")
        rows.append({
            "variant": variant,
            "gradient": "backprop (explicit MLP)" if is_mlp else GRADIENT.get(adjoint, adjoint),
            "solver": None if is_mlp else solver,
            "seeds": len(last),
            "step": min(r["step"] for r in last),
            "accuracy_mean": statistics.fmean(accuracy),
            "accuracy_sd": statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0,
            "loss": statistics.fmean(over_seeds("eval/loss")),
            "forward_steps": None if is_mlp else mean_over_training("train/forward_steps"),
            "backward_steps": backward if (not is_mlp and adjoint in ("implicit", "phantom")) else None,
            "converged_fraction": None if is_mlp else min(over_seeds("eval/converged_fraction") or [None]),
            "ms_per_step": statistics.fmean(times) if times else None,
        })
    setup = {"steps": config["train"]["steps"], "width": config["model"]["width"], "seeds": len(config["sweep"]["seed"])}
    return {"setup": setup, "rows": rows}


def _f(v, fmt):
    return "—" if v is None else format(v, fmt)


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
            f"{100 * r['accuracy_mean']:.1f} ± {100 * r['accuracy_sd']:.1f} % | {r['loss']:.3f} | "
            f"{_f(r['forward_steps'], '.1f')} | {_f(r['backward_steps'], '.1f')} | {_f(r['ms_per_step'], '.2f')} |"
        )
    return "\n".join(lines)


def readme_section() -> str:
    """The committed README section (between the `deq_table` markers)."""
    return generated_section(README, "deq_table")


def update_readme(body: str) -> None:
    write_generated_section(README, "deq_table", body)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", nargs="?")
    p.add_argument("--save", action="store_true", help="store the rows in results.json and rewrite the README section")
    p.add_argument("--note", default="", help="with --save: a remark for the table's heading (date, load, machine)")
    p.add_argument("--from-results", action="store_true", help="rewrite the README section from results.json only")
    args = p.parse_args(argv)
    if args.from_results:
        update_readme(markdown(json.loads(RESULTS.read_text())))
        return 0
    if not args.run_dir:
        p.error("give a run directory, or --from-results")
    result = collect(args.run_dir)
    if args.note:
        result["note"] = args.note
    print(markdown(result))
    if args.save:
        RESULTS.write_text(json.dumps(result, indent=1) + "\n")
        update_readme(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
