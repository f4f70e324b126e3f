"""The iterated-operator tables: from a run directory of `configs/operators/iterations.py` to the README.

    python experiments/operators/table.py RUN_DIR                           # print the tables
    python experiments/operators/table.py RUN_DIR --save --note "load 12"   # + results.json and the README section
    python experiments/operators/table.py --from-results                    # README section from results.json only

Per variant (`hparams.variant`, in the config's `variant_order`; mean ± sd over its seeds):
the block applications per forward pass (`model.k`; the DEQ: its mean forward solver steps
on the test set, the smallest converged fraction and the largest fraction of skipped
training steps), test and train rel. L2 of the last evaluation, the parameter count, the
median ms per training step of the variant's group in `timing.jsonl` (its seeds vmapped in
one program; a chunk is `train.eval_every` steps plus one evaluation, the compiling first
chunk excluded by the runner) and the training seconds of the timed chunks; the per-seed
test errors. With the checkpoints (`--no-test-time` skips this): every trained model with
its block applied j = 1 ... 32 times at test time (`figures.test_time_iterations`: test
rel. L2 and the median relative fixed-point residual, mean over seeds). The run note is
read from the run's files: finishing date (`summary.json`'s modification time, UTC), wall
time (`config.json`, written when training starts, to `summary.json`) and compilation
(`summary.json`); `--note` adds what the files cannot know (machine, load).
`tests/test_generated_tables.py` checks that the README section is what `results.json`
regenerates.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import pathlib
import statistics

from fpx.experiment import by_variant, format_minutes, format_value, generated_section, mean_sd, member_histories
from fpx.experiment import read_run, run_info, table_main, timing_by_unit

HERE = pathlib.Path(__file__).resolve().parent
README = HERE / "README.md"
RESULTS = HERE / "results.json"
SECTION = "operators_table"


def _figures():
    spec = importlib.util.spec_from_file_location("operators_figures", HERE / "figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def collect(run_dir, test_time: bool = True) -> dict:
    """`{"setup", "rows", "test_time", "run"}` from one run directory (`test_time`: also
    evaluate the final checkpoints at other depths)."""
    run_dir = pathlib.Path(run_dir)
    config, records = read_run(run_dir, tolerate_partial_tail=True)
    histories = member_histories(records)
    timing = timing_by_unit(run_dir)
    groups = by_variant({m: histories[m] for m in sorted(histories)}, config.get("variant_order") or config["variants"])
    every = config["train"]["eval_every"]
    rows = []
    for v, members in groups.items():
        rs = sorted((h[-1] for h in members), key=lambda r: r["hparams"]["seed"])
        model = config["variants"][v].get("model", {})
        deq = model.get("kind", config["model"]["kind"]) == "deq"
        test, train = mean_sd(r["eval/test_rel_l2"] for r in rs), mean_sd(r["eval/train_rel_l2"] for r in rs)
        units = sorted({r["unit"] for r in rs})
        chunks = [ms for u in units for ms in timing.get(u, [])]
        rows.append({
            "variant": v, "deq": deq, "k": None if deq else model.get("k", config["model"]["k"]),
            "seeds": [r["hparams"]["seed"] for r in rs], "step": min(r["step"] for r in rs),
            "test_mean": test[0], "test_sd": test[1], "train_mean": train[0], "train_sd": train[1],
            "test_per_seed": [r["eval/test_rel_l2"] for r in rs],
            "num_params": sorted({int(r["eval/num_params"]) for r in rs}),
            "forward_steps": statistics.fmean(r["eval/forward_steps"] for r in rs) if deq else None,
            "converged_fraction": min(r["eval/converged_fraction"] for r in rs) if deq else None,
            "skipped_fraction": max(r.get("train/skipped_fraction", 0.0) for r in rs) if deq else None,
            "ms_per_step": statistics.median(chunks) if chunks else None,
            "timed_train_s": sum(chunks) * every / 1e3 if chunks else None,
        })
    d = config["data"]
    s = (d["s"] - 1) // d["stride"] + 1
    setup = {"grid": f"{s}x{s}", "n_train": d["n_train"], "n_test": d["n_test"], "steps": config["train"]["steps"],
             "batch_size": d["batch_size"], "max_steps": config["max_steps"], "eval_every": every}
    result = {"setup": setup, "rows": rows, "test_time": None, "run": run_info(run_dir)}
    if test_time:
        figures = _figures()
        variants = [r["variant"] for r in rows]
        tt = figures.test_time_iterations({v: run_dir for v in variants}, variants)
        result["test_time"] = {"j": list(figures.TEST_TIME_K), "rows": [
            {"variant": v, "k": r["k"],
             "error": [statistics.fmean(tt[v][j][0]) for j in figures.TEST_TIME_K],
             "residual": [statistics.fmean(tt[v][j][1]) for j in figures.TEST_TIME_K]}
            for v, r in zip(variants, rows)]}
    return result


def markdown(result: dict) -> str:
    s, run, rows = result["setup"], result["run"], result["rows"]
    seeds = max(len(r["seeds"]) for r in rows)
    head = (f"Run of {run['date']} ({format_minutes(run['wall_s'])} wall clock from writing `config.json` to `summary.json`, "
            f"of it {run['compile_s']:.0f} s compilation; " + (f"{result['note']}; " if result.get("note") else "")
            + f"jax {run['jax']}). Darcy {s['grid']}, {s['n_train']} train / {s['n_test']} test, batch {s['batch_size']}, "
            f"{s['steps']} steps, DEQ `max_steps` {s['max_steps']}; final metrics, mean ± sd over {seeds} seed"
            f"{'s' if seeds != 1 else ''}:")
    lines = [head, "",
             "| variant | block applications per forward pass | test rel. L2 | train rel. L2 | parameters "
             f"| ms / training step ({seeds} seeds vmapped) | training time (timed chunks) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["deq"]:
            apps = (f"{r['forward_steps']:.1f} Anderson steps (test set, mean; {100 * r['converged_fraction']:.0f} % "
                    f"converged; {100 * r['skipped_fraction']:.0f} % training steps skipped)")
        else:
            apps = str(r["k"])
        timed = "—" if r["timed_train_s"] is None else f"{r['timed_train_s'] / 60:.1f} min"
        lines.append(f"| {r['variant']} | {apps} | {format_value(r['test_mean'], '.4f', r['test_sd'])} | "
                     f"{format_value(r['train_mean'], '.4f', r['train_sd'])} | {', '.join(f'{p:,}' for p in r['num_params'])} | "
                     f"{format_value(r['ms_per_step'], '.0f')} | {timed} |")
    lines += ["", "Per seed (test, seeds " + " / ".join(str(x) for x in rows[0]["seeds"]) + "): "
              + ", ".join(f"{r['variant']} " + " / ".join(f"{e:.4f}" for e in r["test_per_seed"]) for r in rows) + "."]
    tt = result.get("test_time")
    if tt:
        lines += ["", "Each trained model with its block applied j times at test time (test rel. L2, mean over seeds; "
                  "in brackets the median relative fixed-point residual `|B(z_j, v) − z_j| / |z_j|`; bold: the k it "
                  "was trained with, and the DEQ's largest j):", "",
                  "| trained as | " + " | ".join(f"j = {j}" for j in tt["j"]) + " |",
                  "|---|" + "---|" * len(tt["j"])]
        for r in tt["rows"]:
            bold = r["k"] if r["k"] is not None else max(tt["j"])
            cells = [(f"**{e:.3f}**" if j == bold else f"{e:.3f}") + f" ({res:.1e})"
                     for j, e, res in zip(tt["j"], r["error"], r["residual"])]
            lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def readme_section() -> str:
    """The committed README section (between the `operators_table` markers)."""
    return generated_section(README, SECTION)


def main(argv=None) -> int:
    return table_main(
        argv, doc=__doc__, collect=collect, markdown=markdown, readme=README, section=SECTION, results=RESULTS,
        options={"--no-test-time": {"dest": "test_time", "action": "store_false",
                                    "help": "skip evaluating the checkpoints at other depths"}},
        note_help="with --save: a remark for the run note (machine, load)",
    )


if __name__ == "__main__":
    raise SystemExit(main())
