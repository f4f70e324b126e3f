"""The Darcy benchmark table: from run directories of `configs/operators/darcy_benchmark.py` to the README.

    python experiments/darcy_benchmark/table.py RUN_DIR [RUN_DIR ...]            # print the table
    python experiments/darcy_benchmark/table.py RUN_DIR --save default           # + results.json["default"], README, figure
    python experiments/darcy_benchmark/table.py --from-results                   # README section from results.json only

Per operator (`model.name`; mean over seeds when a run has several; an operator found in
several run directories counts with its furthest-trained members): test and train rel. L2
(the last evaluation), parameters, ms per training step (the median over the run's timed
chunks in `timing.jsonl`; the compiling first chunk is excluded by the runner; a chunk is
`train.eval_every` steps plus one evaluation, so the figure includes the evaluation
amortised over those steps) and XLA's compiled memory (arguments + outputs + temporaries of
one training step, `eval/memory_mib`). `--save NAME` stores the rows in `results.json`
under NAME, rewrites the README section between the markers from every entry of
`results.json`, and draws `darcy_benchmark.png`; `tests/test_darcy_benchmark.py` checks that
the README section is what `results.json` regenerates.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

from fpx.experiment import format_value, generated_section, read_jsonl, timing_by_unit, write_generated_section

HERE = pathlib.Path(__file__).resolve().parent
README = HERE / "README.md"
RESULTS = HERE / "results.json"
FIGURE = HERE / "darcy_benchmark.png"
ORDER = ("fno", "tfno", "t1", "mgno", "galerkin", "fourier_transformer", "iterated_fno")
LABELS = {
    "fno": "FNO",
    "tfno": "TFNO (Tucker)",
    "t1": "T1",
    "mgno": "MgNO",
    "galerkin": "Galerkin transformer",
    "fourier_transformer": "Fourier transformer",
    "iterated_fno": "iterated FNO block",
}


def _model_of(record: dict, config: dict) -> str:
    return record["hparams"].get("model.name", config["model"]["name"])


def collect(run_dirs) -> dict:
    """`{"setup": {...}, "rows": [...]}` from one or more run directories (of the same preset)."""
    members: dict[tuple, dict] = {}
    setups, timing = [], {}
    for d in map(pathlib.Path, run_dirs):
        config = json.loads((d / "config.json").read_text())
        data, train = config["data"], config["train"]
        s = len(range(0, data["s"], data["stride"]))
        setups.append({"grid": f"{s}x{s}", "n_train": data["n_train"], "n_test": data["n_test"],
                       "batch_size": data["batch_size"], "steps": train["steps"],
                       "epochs": train["steps"] * data["batch_size"] // data["n_train"],
                       "schedule": config["schedule"]["name"], "lr": config["optim"]["lr"]})
        for r in read_jsonl(d / "metrics.jsonl", tolerate_partial_tail=True):
            key = (str(d), r["member"])
            if key not in members or r["step"] >= members[key]["step"]:
                members[key] = {**r, "model": _model_of(r, config), "run": str(d)}
        for unit, ms in timing_by_unit(d).items():
            timing[(str(d), unit)] = ms
    if not members:
        raise SystemExit(f"no metrics in {', '.join(map(str, run_dirs))}")
    if any(s != setups[0] for s in setups):
        raise SystemExit(f"the run directories use different setups: {setups}")
    by_model: dict[str, list[dict]] = {}
    for r in members.values():
        by_model.setdefault(r["model"], []).append(r)
    rows = []
    for model in sorted(by_model, key=lambda m: ORDER.index(m) if m in ORDER else len(ORDER)):
        # An operator trained in several run directories (one interrupted, one rerun): the
        # members that got furthest.
        furthest = max(r["step"] for r in by_model[model])
        rs = [r for r in by_model[model] if r["step"] == furthest]
        mean = lambda k: statistics.fmean(r[k] for r in rs) if all(k in r for r in rs) else None  # noqa: E731
        times = [statistics.median(timing[(r["run"], r["unit"])]) for r in rs if (r["run"], r["unit"]) in timing]
        rows.append({
            "model": model,
            "seeds": len(rs),
            "step": min(r["step"] for r in rs),
            "test_rel_l2": mean("eval/test_rel_l2"),
            "train_rel_l2": mean("eval/train_rel_l2"),
            "num_params": int(round(mean("eval/num_params"))),
            "ms_per_step": statistics.fmean(times) if times else None,
            "memory_mib": mean("eval/memory_mib"),
        })
    return {"setup": setups[0], "rows": rows}


def markdown(name: str, result: dict) -> str:
    s = result["setup"]
    head = (f"**`:{name}`** ({s['grid']} grid, {s['n_train']} train / {s['n_test']} test, batch {s['batch_size']}, "
            f"{s['steps']} steps = {s['epochs']} epochs, Adam lr {s['lr']:g}, {s['schedule']} schedule"
            + (f"; {result['note']}" if result.get("note") else "") + ")")
    lines = [head, "",
             "| operator | test rel. L2 | train rel. L2 | parameters | ms / step | compiled memory (MiB) | steps |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cells = [format_value(r[k], f) for k, f in (("test_rel_l2", ".4f"), ("train_rel_l2", ".4f"))]
        cells += [f"{r['num_params']:,}"] + [format_value(r[k], ".3g") for k in ("ms_per_step", "memory_mib")]
        lines.append(f"| {LABELS.get(r['model'], r['model'])} | " + " | ".join(cells) + f" | {r['step']} |")
    return "\n".join(lines)


def section(results: dict) -> str:
    """The README's generated section from all entries of `results.json` (`default` first)."""
    names = sorted(results, key=lambda n: ({"default": 0, "full": 1, "quick": 2}.get(n, 3), n))
    return "\n\n".join(markdown(n, results[n]) for n in names)


def readme_section() -> str:
    """The committed README section (between the `darcy_table` markers)."""
    return generated_section(README, "darcy_table")


def update_readme(body: str) -> None:
    write_generated_section(README, "darcy_table", body)


def figure(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import LogLocator, NullFormatter

    rows = [r for r in result["rows"] if r["test_rel_l2"] is not None]
    steps = result["setup"]["steps"]
    colors = {m: f"C{i}" for i, m in enumerate(ORDER)}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "ms_per_step", "ms per training step (CPU)"),
                           (axes[1], "memory_mib", "compiled memory of a training step (MiB)")):
        for r in rows:
            if r[key] is None:
                continue
            done = r["step"] >= steps  # an unfinished operator: hollow, its step count named
            ax.scatter(r[key], r["test_rel_l2"], color=colors.get(r["model"], "k"),
                       facecolors=None if done else "none")
            name = LABELS.get(r["model"], r["model"]) + ("" if done else f" ({r['step']} steps)")
            ax.annotate(name, (r[key], r["test_rel_l2"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_minor_formatter(NullFormatter())
            axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.set_xlabel(label)
        ax.set_ylabel("test rel. L2")
    fig.suptitle(f"Darcy {result['setup']['grid']}, {result['setup']['steps']} steps, same budget for every operator")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="*")
    p.add_argument("--save", metavar="NAME", help="store under NAME in results.json, rewrite the README section and figure")
    p.add_argument("--note", default="", help="with --save: a remark printed in the table's heading (load, date)")
    p.add_argument("--from-results", action="store_true", help="rewrite the README section from results.json only")
    args = p.parse_args(argv)
    if args.from_results:
        update_readme(section(json.loads(RESULTS.read_text())))
        return 0
    if not args.run_dirs:
        p.error("give run directories, or --from-results")
    result = collect(args.run_dirs)
    if args.note:
        result["note"] = args.note
    print(markdown(args.save or "run", result))
    if args.save:
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        results[args.save] = result
        RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        update_readme(section(results))
        figure(result, FIGURE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
